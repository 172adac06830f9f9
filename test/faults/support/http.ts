import { type IncomingHttpHeaders, request } from 'node:http';

/** One HTTP exchange as the client saw it; times are performance.now() of the test process. */
export interface Outcome {
  op: string;
  /** 0 when no HTTP answer came (see `error`). */
  status: number;
  /** The socket error code (ECONNREFUSED, ECONNRESET, …) or `timeout` when no answer came. */
  error?: string;
  contentType: string;
  headers: IncomingHttpHeaders;
  body: unknown;
  start: number;
  end: number;
  ms: number;
}

export interface SendOptions {
  body?: unknown;
  token?: string;
  /** Sent as they are (an HTTP Basic client authentication, say); after `token`'s. */
  headers?: Record<string, string>;
  op?: string;
  /** A request still unanswered after this is recorded as a hang. */
  timeoutMs?: number;
}

/**
 * Sends one request on a connection of its own (no keep-alive), so every outcome belongs to exactly
 * one request: a reset or a refusal is never a stale pooled socket's.
 */
export function send(baseUrl: string, method: string, path: string, options: SendOptions = {}) {
  const start = performance.now();
  const payload = options.body === undefined ? undefined : JSON.stringify(options.body);
  const headers: Record<string, string> = {};
  if (payload !== undefined) headers['content-type'] = 'application/json';
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  Object.assign(headers, options.headers);
  const op = options.op ?? `${method} ${path}`;
  return new Promise<Outcome>((resolve) => {
    let settled = false;
    const finish = (partial: Omit<Outcome, 'op' | 'start' | 'end' | 'ms'>) => {
      if (settled) return;
      settled = true;
      const end = performance.now();
      resolve({ op, start, end, ms: end - start, ...partial });
    };
    const req = request(`${baseUrl}${path}`, { method, headers, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', (err: NodeJS.ErrnoException) =>
        finish({ status: 0, error: err.code ?? err.message, contentType: '', headers: {}, body: null }),
      );
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let body: unknown = text;
        try {
          body = text ? JSON.parse(text) : null;
        } catch {
          // Not JSON: keep the text.
        }
        finish({
          status: res.statusCode ?? 0,
          contentType: String(res.headers['content-type'] ?? ''),
          headers: res.headers,
          body,
        });
      });
    });
    req.setTimeout(options.timeoutMs ?? 20_000, () => {
      finish({ status: 0, error: 'timeout', contentType: '', headers: {}, body: null });
      req.destroy();
    });
    req.on('error', (err: NodeJS.ErrnoException) =>
      finish({ status: 0, error: err.code ?? err.message, contentType: '', headers: {}, body: null }),
    );
    req.end(payload);
  });
}
