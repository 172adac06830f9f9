import { Ajv2020 } from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';

/*
 * The whole suite as a contract test of the OpenAPI document: every answer any test receives from an
 * app built by buildTestApp is checked against what the document says the operation answers — the
 * status is declared, the media type is one declared for that status, and the body validates against
 * the declared schema (JSON Schema 2020-12, as OpenAPI 3.1 uses), and each header a client acts on
 * (`Location`, `ETag`, `Retry-After`, `WWW-Authenticate`) that the answer carries is declared on that
 * status. What a developer reads in Swagger UI, and what a client generated from the document reads,
 * is then what the service does, for every status the tests reach, not only the ones a test names.
 *
 * Violations are collected per test file and asserted by test/support/setup.ts when the file ends,
 * so a drifting answer fails the file that produced it, with the request that showed it.
 */

type Schema = Record<string, unknown>;

interface MediaType {
  schema?: Schema;
}
interface ResponseObject {
  content?: Record<string, MediaType>;
  headers?: Record<string, unknown>;
}
interface Operation {
  responses?: Record<string, ResponseObject>;
}
interface Document {
  paths: Record<string, Record<string, Operation>>;
}

const violations = new Set<string>();

/** The headers a client acts on, which the document must declare where they are sent (lower case). */
const DECLARED_HEADERS = ['location', 'etag', 'retry-after', 'www-authenticate'];
const documents = new WeakMap<FastifyInstance, Checker>();

/** Fastify's `/v1/users/:id` as the document's `/v1/users/{id}`. */
const documentPath = (url: string) => url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
/** JSON pointer escaping, for a path used as a key. */
const pointer = (segment: string) => segment.replace(/~/g, '~0').replace(/\//g, '~1');

class Checker {
  private readonly ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: true });
  private readonly compiled = new Map<string, ReturnType<Ajv2020['compile']> | null>();

  constructor(private readonly doc: Document) {
    addFormats.default(this.ajv);
    this.ajv.addSchema(doc as unknown as Schema, 'openapi');
  }

  check(method: string, url: string, status: number, headers: Record<string, unknown>, payload: unknown) {
    const contentType = headers['content-type'] as string | undefined;
    const path = documentPath(url);
    const operation = this.doc.paths[path]?.[method.toLowerCase()];
    // Routes outside the document (Swagger UI's files) and probe routes a test adds (under /test/) are
    // not its contract.
    if (!operation || path.startsWith('/test/')) return;
    const where = `${method} ${path} → ${status}`;
    const responses = operation.responses ?? {};
    const key = [String(status), `${String(status)[0]}XX`, 'default'].find((k) => k in responses);
    if (!key) {
      violations.add(`${where}: status not declared (declared: ${Object.keys(responses).join(', ')})`);
      return;
    }
    const declaredHeaders = new Set(Object.keys(responses[key]?.headers ?? {}).map((h) => h.toLowerCase()));
    for (const header of DECLARED_HEADERS)
      if (headers[header] !== undefined && !declaredHeaders.has(header))
        violations.add(`${where}: sends ${header} where the document declares none`);
    const content = responses[key]?.content;
    const body = payload === undefined || payload === null ? '' : String(payload);
    // Fastify drops a 204's or a 304's body on the way out, whatever the handler gave.
    if (status === 204 || status === 304) return;
    if (!content) {
      if (body.length > 0)
        violations.add(`${where}: a body (${contentType}) where the document declares none`);
      return;
    }
    const mediaType = (contentType ?? '').split(';')[0]!.trim().toLowerCase();
    if (!(mediaType in content)) {
      violations.add(
        `${where}: sent as ${mediaType || 'no content type'}, declared as ${Object.keys(content).join(', ')}`,
      );
      return;
    }
    if (!content[mediaType]?.schema || !/json/.test(mediaType)) return;
    const ref = `openapi#/paths/${pointer(path)}/${method.toLowerCase()}/responses/${key}/content/${pointer(mediaType)}/schema`;
    let validate = this.compiled.get(ref);
    if (validate === undefined) {
      try {
        validate = this.ajv.compile({ $ref: ref });
      } catch (error) {
        violations.add(`${where}: the declared schema does not compile: ${(error as Error).message}`);
        validate = null;
      }
      this.compiled.set(ref, validate);
    }
    if (!validate) return;
    let parsed: unknown;
    try {
      parsed = JSON.parse(body);
    } catch {
      violations.add(`${where}: ${mediaType} that is not JSON: ${body.slice(0, 80)}`);
      return;
    }
    if (!validate(parsed)) {
      const errors = (validate.errors ?? [])
        .slice(0, 3)
        .map((e) => `${e.instancePath || '(root)'} ${e.message}`)
        .join('; ');
      violations.add(
        `${where}: body does not match the declared schema: ${errors}; body ${body.slice(0, 200)}`,
      );
    }
  }
}

/** Records every answer of the app, checked against its own OpenAPI document once the app is ready. */
export function recordContract(app: FastifyInstance): void {
  app.addHook('onSend', (request: FastifyRequest, reply: FastifyReply, payload: unknown, done) => {
    const url = request.routeOptions.url;
    if (
      url &&
      request.method !== 'HEAD' &&
      (typeof payload === 'string' || Buffer.isBuffer(payload) || payload == null)
    ) {
      let checker = documents.get(app);
      if (!checker) {
        checker = new Checker(structuredClone(app.swagger()) as unknown as Document);
        documents.set(app, checker);
      }
      checker.check(request.method, url, reply.statusCode, reply.getHeaders(), payload);
    }
    done(null, payload);
  });
}

/** The violations seen since the last call, emptied. */
export function takeContractViolations(): string[] {
  const out = [...violations];
  violations.clear();
  return out;
}
