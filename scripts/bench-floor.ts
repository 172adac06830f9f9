import formbody from '@fastify/formbody';
import Fastify from 'fastify';

/*
 * The benchmark's floor: bare Fastify answering a request of an endpoint's shape (method, headers,
 * body, parsed by Fastify's own JSON parser or by @fastify/formbody: the service's JSON parser and its
 * own form parser, src/lib/form.ts, check more, on the same fast-querystring) with a recorded
 * answer of that endpoint (status, headers, bytes), and doing nothing else. No service on Fastify can
 * answer that request faster on this machine, so its ratio to the hello world says how much of an
 * endpoint's gap is Fastify and Node, and how much is the service's own work.
 *
 * `PUT /_floor/<name>` records an answer ({status, headers, body}); `GET|POST /_floor/<name>` replays it.
 */
interface Recorded {
  status: number;
  headers: Record<string, string>;
  body: string;
}

const answers = new Map<string, Recorded>();
const app = Fastify({ logger: false });
await app.register(formbody);
app.put<{ Params: { name: string }; Body: Recorded }>('/_floor/:name', async (request, reply) => {
  answers.set(request.params.name, request.body);
  return reply.status(204).send();
});
const replay = async (request: { params: { name: string } }, reply: import('fastify').FastifyReply) => {
  const answer = answers.get(request.params.name);
  if (!answer) return reply.status(404).send();
  return reply.status(answer.status).headers(answer.headers).send(answer.body);
};
app.get<{ Params: { name: string } }>('/_floor/:name', replay);
app.post<{ Params: { name: string } }>('/_floor/:name', replay);
await app.listen({ port: Number(process.env.PORT ?? 0), host: '127.0.0.1' });
process.on('SIGTERM', () => {
  app.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
