import { Counter, Histogram, Registry } from 'prom-client';
import { describe, expect, it } from 'vitest';
import { HttpRequestMetrics } from '../../src/lib/http-metrics.js';

const BOUNDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

/** prom-client's own Counter and Histogram, fed the same requests: the reference exposition. */
function reference() {
  const registry = new Registry();
  const labelNames = ['method', 'route', 'status'] as const;
  const requests = new Counter({
    name: 'http_requests_total',
    help: 'HTTP requests by method, route and status',
    labelNames,
    registers: [registry],
  });
  const duration = new Histogram({
    name: 'http_request_duration_seconds',
    help: 'HTTP request latency by method, route and status',
    labelNames,
    buckets: BOUNDS,
    registers: [registry],
  });
  return {
    registry,
    record(method: string, route: string, status: number, seconds: number) {
      const labels = { method, route, status: String(status) };
      requests.inc(labels);
      duration.observe(labels, seconds);
    },
  };
}

describe('HttpRequestMetrics', () => {
  it('exposes exactly what prom-client’s Counter and Histogram expose for the same requests', async () => {
    const ours = new Registry();
    const metrics = new HttpRequestMetrics(ours, BOUNDS);
    const theirs = reference();
    let seed = 42;
    const random = () => {
      seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    const routes = ['/v1/auth/me', '/oauth/introspect', 'unmatched', '/v1/users/:id'];
    const methods = ['GET', 'POST'];
    const statuses = [200, 401, 404, 503];
    for (let i = 0; i < 5000; i++) {
      const args = [
        methods[Math.floor(random() * methods.length)]!,
        routes[Math.floor(random() * routes.length)]!,
        statuses[Math.floor(random() * statuses.length)]!,
        // Durations spread over every bucket, bounds themselves included (le is inclusive).
        i % 10 === 0 ? BOUNDS[i % BOUNDS.length]! : random() ** 4 * 8,
      ] as const;
      metrics.record(...args);
      theirs.record(...args);
    }
    const sortLines = (text: string) => text.split('\n').sort();
    expect(sortLines(await ours.metrics())).toEqual(sortLines(await theirs.registry.metrics()));
    expect(await ours.getMetricsAsJSON()).toHaveLength(2);
  });

  it('counts a duration equal to a bound in that bound’s bucket, and one beyond the largest only in +Inf', async () => {
    const registry = new Registry();
    const metrics = new HttpRequestMetrics(registry, [0.1, 1]);
    metrics.record('GET', '/x', 200, 0.1);
    metrics.record('GET', '/x', 200, 7);
    const text = await registry.metrics();
    expect(text).toContain(
      'http_request_duration_seconds_bucket{le="0.1",method="GET",route="/x",status="200"} 1',
    );
    expect(text).toContain(
      'http_request_duration_seconds_bucket{le="1",method="GET",route="/x",status="200"} 1',
    );
    expect(text).toContain(
      'http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/x",status="200"} 2',
    );
    expect(text).toContain('http_requests_total{method="GET",route="/x",status="200"} 2');
  });
});
