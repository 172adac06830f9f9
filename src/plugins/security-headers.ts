import helmet, { type FastifyHelmetOptions } from '@fastify/helmet';
import Fastify, { type FastifyInstance } from 'fastify';
import fp from 'fastify-plugin';

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
 * Security headers on every response (404s and errors included). @fastify/helmet runs helmet's
 * middleware factory on every request — CSP directives parsed, a dozen middlewares built, ~8% of the
 * CPU of a hot endpoint — to produce a set of headers that depends only on configuration. So the set is
 * computed once at start and copied onto each reply by a synchronous hook. Routes needing per-request
 * CSP nonces would need helmet back; none does (Swagger UI runs with `staticCSP: false`).
 */
async function securityHeadersPlugin(app: FastifyInstance, options: { helmet: FastifyHelmetOptions }) {
  const headers = await helmetHeaders(options.helmet);
  app.addHook('onRequest', (_request, reply, done) => {
    reply.headers(headers);
    done();
  });
}

export default fp(securityHeadersPlugin, { name: 'security-headers', fastify: '5.x' });
