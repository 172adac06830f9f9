import type { FastifyInstance, FastifyReply } from 'fastify';
import type { ZodTypeProvider } from 'fastify-type-provider-zod';
import { beforeAll, describe, expect, it } from 'vitest';
import { z } from 'zod';
import { buildTestApp } from '../support/app.js';
import { takeContractViolations } from '../support/contract.js';

/*
 * The suite-wide contract check (test/support/contract.ts) must itself catch an answer that differs
 * from the document, or every file passing it proves nothing. Probe routes under /probe/ are
 * documented like any route and answer, on purpose, what their schema does not say; each test takes
 * the violations it caused, so the file's own end-of-file check stays clean.
 */
describe('the suite-wide OpenAPI contract check', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    app = await buildTestApp({
      beforeReady: (a) => {
        const r = a.withTypeProvider<ZodTypeProvider>();
        const schema = {
          querystring: z.object({ as: z.string().optional() }),
          response: { 200: z.object({ name: z.string(), count: z.number().int() }) },
        };
        // A string payload is sent as it is, past the response serializer: what a buggy handler
        // building its own JSON would send.
        r.get('/probe/answer', { config: { public: true }, schema }, async (request, typed) => {
          const reply = typed as unknown as FastifyReply;
          switch (request.query.as) {
            case 'wrong-field-type':
              return reply.type('application/json').send('{"name":"ada","count":"seven"}');
            case 'missing-field':
              return reply.type('application/json').send('{"name":"ada"}');
            case 'text':
              return reply.type('text/plain').send('ada');
            case 'location':
              return reply
                .header('location', '/probe/answer/1')
                .type('application/json')
                .send('{"name":"ada","count":1}');
            case 'teapot':
              return reply.status(418).type('application/json').send('{"name":"ada","count":1}');
            default:
              return reply.type('application/json').send('{"name":"ada","count":1}');
          }
        });
      },
    });
    takeContractViolations();
  });

  const get = (url: string) => app.inject({ method: 'GET', url });

  it('passes an answer the document describes', async () => {
    expect((await get('/probe/answer')).statusCode).toBe(200);
    expect(takeContractViolations()).toEqual([]);
  });

  it('names a body that does not match the declared schema', async () => {
    await get('/probe/answer?as=wrong-field-type');
    await get('/probe/answer?as=missing-field');
    const found = takeContractViolations();
    expect(found).toHaveLength(2);
    expect(found[0]).toMatch(/^GET \/probe\/answer → 200: body does not match the declared schema: \/count/);
    expect(found[1]).toMatch(/must have required property 'count'/);
  });

  it('names a media type the document does not declare for the status', async () => {
    await get('/probe/answer?as=text');
    expect(takeContractViolations()).toEqual([
      'GET /probe/answer → 200: sent as text/plain, declared as application/json',
    ]);
  });

  it('names a header a client acts on that the document does not declare for the status', async () => {
    await get('/probe/answer?as=location');
    expect(takeContractViolations()).toEqual([
      'GET /probe/answer → 200: sends location where the document declares none',
    ]);
  });

  it('names a status the document does not declare', async () => {
    await get('/probe/answer?as=teapot');
    const [found, ...rest] = takeContractViolations();
    expect(rest).toEqual([]);
    expect(found).toMatch(
      /^GET \/probe\/answer → 418: status not declared \(declared: 200, 400, 500, 503\)$/,
    );
  });

  it('finds nothing to say about a service route’s declared error (a 401 in problem+json)', async () => {
    const res = await get('/v1/users/6f1c1f8e-3f0a-4c55-9d5e-0b8c2f4a7e21');
    expect(res.statusCode).toBe(401);
    expect(takeContractViolations()).toEqual([]);
  });
});
