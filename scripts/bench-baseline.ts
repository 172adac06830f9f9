import Fastify from 'fastify';

/*
 * The benchmark's yardstick: a bare Fastify hello world on the same machine, Node and loopback as
 * the service, so every figure of `npm run bench` is read as a ratio to what Fastify itself does here.
 */
const app = Fastify({ logger: false });
app.get('/', async () => ({ hello: 'world' }));
await app.listen({ port: Number(process.env.PORT ?? 0), host: '127.0.0.1' });
process.on('SIGTERM', () => {
  app.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
