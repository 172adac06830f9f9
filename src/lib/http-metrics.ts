import type { Registry } from 'prom-client';

/*
 * `http_requests_total` and `http_request_duration_seconds`, counted per request in plain numbers and
 * handed to prom-client's registry (which formats them with every other metric) only when scraped.
 * prom-client's own labelled children re-validate and re-hash their label object on every `inc` and
 * `observe`: measured under `npm run bench`, that was 3–6% of the server's CPU on the endpoints other
 * services call on every request. The exposition is the same as prom-client's Counter and Histogram
 * give (test/unit/http-metrics.test.ts compares the two).
 */

type Labels = { method: string; route: string; status: string };

interface Series {
  labels: Labels;
  count: number;
  sum: number;
  /** Observations per bucket, not cumulative; the last one is over the largest bound. */
  buckets: Float64Array;
}

/** What prom-client's registry reads from a metric (Registry#getMetricsAsString, #getMetricsAsJSON). */
interface MetricView {
  name: string;
  help: string;
  type: 'counter' | 'histogram';
  aggregator: 'sum';
  get(): {
    name: string;
    help: string;
    type: string;
    aggregator: string;
    values: Array<{ labels: Record<string, string | number>; value: number; metricName?: string }>;
  };
  reset(): void;
}

export class HttpRequestMetrics {
  /** Bounded: routes come from the route table (or `unmatched`), methods from the parser, statuses are codes. */
  private readonly series: Series[] = [];
  /**
   * The series by route, method and status: looked up with the strings the request already holds
   * (their hashes cached), where a `method status route` key was a new string to build and hash on
   * every request.
   */
  private readonly index = new Map<string, Map<string, Map<number, Series>>>();
  private readonly bounds: readonly number[];

  constructor(registry: Registry, bounds: readonly number[]) {
    this.bounds = [...bounds].sort((a, b) => a - b);
    const requests: MetricView = {
      name: 'http_requests_total',
      help: 'HTTP requests by method, route and status',
      type: 'counter',
      aggregator: 'sum',
      get: () => ({
        ...requests,
        values: this.series.map((s) => ({ labels: s.labels, value: s.count })),
      }),
      reset: () => this.reset(),
    };
    const duration: MetricView = {
      name: 'http_request_duration_seconds',
      help: 'HTTP request latency by method, route and status',
      type: 'histogram',
      aggregator: 'sum',
      get: () => ({ ...duration, values: this.series.flatMap((s) => this.histogramValues(s)) }),
      reset: () => this.reset(),
    };
    // prom-client's Metric type is its own classes; the registry only reads the members above.
    registry.registerMetric(requests as never);
    registry.registerMetric(duration as never);
  }

  /** Counts one answered request. */
  record(method: string, route: string, status: number, seconds: number): void {
    let byMethod = this.index.get(route);
    if (!byMethod) {
      byMethod = new Map();
      this.index.set(route, byMethod);
    }
    let byStatus = byMethod.get(method);
    if (!byStatus) {
      byStatus = new Map();
      byMethod.set(method, byStatus);
    }
    let s = byStatus.get(status);
    if (!s) {
      s = {
        labels: { method, route, status: String(status) },
        count: 0,
        sum: 0,
        buckets: new Float64Array(this.bounds.length + 1),
      };
      byStatus.set(status, s);
      this.series.push(s);
    }
    s.count += 1;
    s.sum += seconds;
    const bounds = this.bounds;
    let i = 0;
    while (i < bounds.length && seconds > bounds[i]!) i++;
    s.buckets[i]! += 1;
  }

  private reset() {
    this.series.length = 0;
    this.index.clear();
  }

  private histogramValues(s: Series) {
    const name = 'http_request_duration_seconds';
    const values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> = [];
    let cumulative = 0;
    this.bounds.forEach((bound, i) => {
      cumulative += s.buckets[i]!;
      values.push({ labels: { le: bound, ...s.labels }, value: cumulative, metricName: `${name}_bucket` });
    });
    values.push({ labels: { le: '+Inf', ...s.labels }, value: s.count, metricName: `${name}_bucket` });
    values.push({ labels: s.labels, value: s.sum, metricName: `${name}_sum` });
    values.push({ labels: s.labels, value: s.count, metricName: `${name}_count` });
    return values;
  }
}
