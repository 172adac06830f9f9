import helmet, { type FastifyHelmetOptions } from '@fastify/helmet';
import Fastify from 'fastify';

/**
 * The headers helmet sets for a configuration, computed by helmet itself on a throwaway instance, so
 * helmet's maintained defaults and our CSP stay the one source of the header set.
 */
export async function helmetHeaders(options: FastifyHelmetOptions): Promise<Record<string, string>> {
  const probe = Fastify({ logger: false });
  await probe.register(helmet, options);
  // helmet writes onto the raw response in onRequest; what is there by the handler is exactly its set.
  probe.get('/', async (_request, reply) => reply.raw.getHeaders());
  try {
    const res = await probe.inject({ method: 'GET', url: '/' });
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(res.json() as Record<string, unknown>)) {
      headers[name] = Array.isArray(value) ? value.join(', ') : String(value);
    }
    return Object.freeze(headers);
  } finally {
    await probe.close();
  }
}

/**
 * The set for API answers (JSON, problem+json, JWKS, metrics): the OWASP REST Security Cheat Sheet's
 * list. A JSON document loads nothing and must never be framed, sniffed into HTML or read cross-site
 * by a no-cors request; helmet's other headers (COOP, Origin-Agent-Cluster, DNS prefetch, IE download
 * options, Flash/PDF cross-domain policies) only mean something to an HTML page. `no-store` too
 * (ASVS 8.2.1): an answer about an account (`/v1/auth/me`, a user, a profile, the audit log) is never
 * kept by a browser or a proxy; the public documents meant to be cached (the JWKS, the discovery
 * metadata) set their own Cache-Control on the reply, which replaces this one.
 */
export const API_SECURITY_HEADERS: Readonly<Record<string, string>> = Object.freeze({
  'cache-control': 'no-store',
  'content-security-policy': "default-src 'none'; frame-ancestors 'none'",
  'cross-origin-resource-policy': 'same-site',
  'referrer-policy': 'no-referrer',
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'x-frame-options': 'DENY',
});

/**
 * Never stored (Cache-Control and Pragma): under /oauth on every answer (app.ts, by prefix); elsewhere
 * on the routes declaring `config.noStore` and on every error answer (error-handler.ts). Defined with
 * the verifier, whose error answers carry it too.
 */
export { NO_STORE_HEADERS } from '../verifier/no-store.js';

/**
 * Whether `url` (a path, perhaps with its query) is `path` itself or a path under `path/`: `/docs`,
 * `/docs?x=1` and `/docs/static/x.js` are, `/docsX` and `/docs.json` are not.
 */
export function isAtOrUnder(url: string, path: string): boolean {
  if (!url.startsWith(path)) return false;
  const next = url.charCodeAt(path.length);
  return Number.isNaN(next) || next === 47 /* / */ || next === 63 /* ? */;
}

export interface ResponseHeadersOptions {
  /**
   * The HTML pages, by path (the path itself and everything under it, see `isAtOrUnder`), each with
   * helmet's configuration of its own (Swagger UI's; ReDoc's CSP admits its CDN script); everything
   * else is an API answer.
   */
  pages: Array<{ prefix: string; helmet: FastifyHelmetOptions }>;
  /** Headers added to the API set under a URL prefix (the OAuth endpoints' no-store, RFC 6749 §5.1). */
  extra?: Array<{ prefix: string; headers: Readonly<Record<string, string>> }>;
}

/**
 * The security headers of every response (404s and errors included), by URL: helmet's full set on
 * the HTML `pages`, the REST set everywhere else, with any `extra` headers of
 * its prefix. @fastify/helmet runs helmet's middleware factory on every request — CSP directives
 * parsed, a dozen middlewares built — to produce headers that depend only on configuration, so every
 * set is computed once at start and the app's one onRequest hook copies the one a URL gets onto its
 * reply. Routes needing per-request CSP nonces would need helmet back; none does (Swagger UI runs
 * with `staticCSP: false`).
 */
export async function responseHeaders(
  options: ResponseHeadersOptions,
): Promise<(url: string) => Readonly<Record<string, string>>> {
  const pages = await Promise.all(
    options.pages.map(async (p) => ({ prefix: p.prefix, headers: await helmetHeaders(p.helmet) })),
  );
  const extra = (options.extra ?? []).map((e) => ({
    prefix: e.prefix,
    headers: Object.freeze({ ...API_SECURITY_HEADERS, ...e.headers }),
  }));
  return (url) => {
    for (const p of pages) if (isAtOrUnder(url, p.prefix)) return p.headers;
    for (const e of extra) if (url.startsWith(e.prefix)) return e.headers;
    return API_SECURITY_HEADERS;
  };
}
