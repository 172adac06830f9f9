import { type IncomingMessage, METHODS, type ServerResponse, STATUS_CODES } from 'node:http';
import type { Duplex } from 'node:stream';
import type {
  FastifyError,
  FastifyInstance,
  FastifyReply,
  FastifyRequest,
  onRequestHookHandler,
} from 'fastify';
import fp from 'fastify-plugin';
import { hasZodFastifySchemaValidationErrors } from 'fastify-type-provider-zod';
import {
  AppError,
  type ErrorCode,
  type FieldError,
  invalidFields,
  isAppError,
  isDatabaseUnavailable,
  pgErrorCode,
} from '../lib/errors.js';
import { API_SECURITY_HEADERS, NO_STORE_HEADERS } from './security-headers.js';
import { ResponseSchemaError } from '../lib/serializer.js';

/** Renders an AppError for one part of the URL space (RFC 9457 by default; RFC 6749 under /oauth). */
export type ErrorRenderer = (error: AppError, request: FastifyRequest, reply: FastifyReply) => unknown;

export const PROBLEM_CONTENT_TYPE = 'application/problem+json; charset=utf-8';

export function problemType(code: string) {
  return `urn:paservices:auth:problem:${code}`;
}

/** The RFC 9457 members every problem carries; a request adds where it happened. */
function problemBody(error: AppError): Record<string, unknown> {
  return {
    type: problemType(error.code),
    title: error.title,
    status: error.status,
    detail: error.detail,
    code: error.code,
  };
}

/**
 * RFC 9457 problem+json. `instance` is the request's path as the client sent it: under `basePath`
 * (PUBLIC_URL's path, which a proxy strips before the request arrives here), as a 201's Location is.
 * Never stored, with RFC 6749 §5.1's Pragma too, whatever refused the request: a credential route's
 * own no-store hook has not run for a refusal of the router or of the first onRequest hook, and a
 * documentation page's header set (or a JWKS answer's Cache-Control) says nothing of no-store.
 */
export const problemRenderer =
  (basePath = ''): ErrorRenderer =>
  (error, request, reply) => {
    const body: Record<string, unknown> = {
      ...error.extensions,
      ...problemBody(error),
      // Not a URL the answer is about because it is too long: it is not written back.
      ...(error.code === 'uri_too_long' ? {} : { instance: basePath + request.url.split('?')[0] }),
      request_id: request.id,
    };
    if (error.errors) body.errors = error.errors;
    return reply
      .status(error.status)
      .headers(NO_STORE_HEADERS)
      .type(PROBLEM_CONTENT_TYPE)
      .serializer(JSON.stringify)
      .send(body);
  };

/** Fastify's names of the request's parts, as a client reads them in `errors[].field`. */
const PART_NAMES: Record<string, string> = { querystring: 'query', params: 'path' };

function fieldErrors(err: FastifyError & { validationContext?: string }): FieldError[] {
  const context = PART_NAMES[err.validationContext ?? 'body'] ?? err.validationContext ?? 'body';
  if (hasZodFastifySchemaValidationErrors(err)) {
    return err.validation.flatMap((v) => {
      const path = v.instancePath.replace(/^\//, '').replace(/\//g, '.');
      const field = path ? `${context}.${path}` : context;
      // A strict object's unknown fields: one error naming each, as for every other field.
      const unknown = v.keyword === 'unrecognized_keys' ? (v.params as { keys?: unknown }).keys : undefined;
      if (Array.isArray(unknown) && unknown.length > 0)
        return unknown.map((key) => ({ field: `${field}.${String(key)}`, message: 'is not accepted' }));
      return [{ field, message: v.message ?? 'invalid' }];
    });
  }
  return (err.validation ?? []).map((v) => ({
    field: `${context}${v.instancePath.replace(/\//g, '.')}`,
    message: v.message ?? 'invalid',
  }));
}

/** SQLSTATEs of class 22 that only a value from the request can cause. */
const INPUT_DATA_EXCEPTIONS = new Set([
  '22001', // string_data_right_truncation
  '22003', // numeric_value_out_of_range
  '22007', // invalid_datetime_format
  '22008', // datetime_field_overflow
  '22021', // character_not_in_repertoire (a NUL)
  '22P02', // invalid_text_representation (e.g. not a UUID)
  '22P05', // untranslatable_character
]);

/**
 * The codes of the 4xx statuses Fastify and its plugins answer with (the router, the body parsers,
 * @fastify/static serving Swagger UI: 412, 416), each agreeing with its status. (Its 403, for a path
 * out of its folder, is answered as a 404: toAppError.)
 */
const FRAMEWORK_CLIENT_ERRORS: Partial<Record<number, ErrorCode>> = {
  401: 'authentication_required',
  404: 'not_found',
  405: 'method_not_allowed',
  408: 'request_timeout',
  409: 'conflict',
  412: 'precondition_failed',
  413: 'payload_too_large',
  415: 'unsupported_media_type',
  416: 'range_not_satisfiable',
  422: 'unprocessable',
  429: 'rate_limited',
  431: 'headers_too_large',
};

/** Turns anything thrown into an AppError; the cause of a 5xx stays in the log, never in the body. */
export function toAppError(err: unknown, request: FastifyRequest): AppError {
  if (isAppError(err)) return err;
  const e = err as FastifyError & { validationContext?: string };
  if (e && Array.isArray(e.validation)) {
    return invalidFields(fieldErrors(e));
  }
  if (err instanceof ResponseSchemaError) {
    request.log.error({ err }, 'response did not match its schema');
    return new AppError('internal_error');
  }
  switch (e?.code) {
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new AppError('payload_too_large');
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return new AppError('unsupported_media_type', {
        detail: 'Send application/json (or application/x-www-form-urlencoded to /oauth)',
      });
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return new AppError('invalid_json', { detail: 'The body is not valid JSON' });
  }
  if (e instanceof SyntaxError || e?.code === 'FST_ERR_CTP_INVALID_TYPE') {
    return new AppError('invalid_json');
  }
  // A value PostgreSQL refuses as data (the schemas and lib/nul-characters.ts refuse these first; this
  // keeps one that slips past them a 400, and the log says which).
  const sqlState = pgErrorCode(err);
  if (sqlState !== undefined && INPUT_DATA_EXCEPTIONS.has(sqlState)) {
    request.log.warn({ err }, 'input the database cannot store');
    return new AppError('bad_request', { detail: 'The request holds a value that cannot be stored' });
  }
  // A row the change refers to was removed by a concurrent request (the services lock what they
  // refer to; this keeps any race they miss a 409 rather than a 500).
  // A row the change would duplicate was made meanwhile by a concurrent request (unique_violation):
  // as above, a 409 rather than a 500 for a race a service misses.
  if (sqlState === '23505') {
    request.log.warn({ err }, 'a row the change would duplicate was made meanwhile');
    return new AppError('conflict', {
      detail: 'Something this request would create exists already; read it again and retry',
    });
  }
  if (sqlState === '23503') {
    request.log.warn({ err }, 'a row the change refers to was removed meanwhile');
    return new AppError('conflict', {
      detail: 'Something this request refers to was removed meanwhile; read it again and retry',
    });
  }
  // A status Fastify gave is about the request, and comes before the database check: a client that
  // closes its connection before its body has arrived is an ECONNRESET too ('aborted', a 400).
  const status = typeof e?.statusCode === 'number' ? e.statusCode : 500;
  if (status >= 400 && status < 500) {
    if (e.code === 'ECONNRESET') {
      request.log.info('the client closed the connection before its body arrived');
      return new AppError('bad_request', { detail: 'The body broke off before it was complete' });
    }
    // The router's message repeats the whole URL.
    if (status === 414)
      return new AppError('uri_too_long', { detail: 'A path segment is over 200 characters' });
    // The one 403 a plugin gives is @fastify/static's, for a path that climbs out of Swagger UI's folder
    // (`/docs/static/../../package.json`): no decision about who asks (the catalogue's 403 is a missing
    // permission), and nothing is served there, so it is answered as a file that is not there is.
    if (status === 403)
      return new AppError('not_found', { detail: `Nothing is at ${request.url.split('?')[0]}` });
    const code = FRAMEWORK_CLIENT_ERRORS[status];
    // RFC 9110 §15.5.17: a 416 says the representation's length (@fastify/send hands it over).
    const range = (e as { headers?: Record<string, unknown> }).headers?.['Content-Range'];
    if (code === 'range_not_satisfiable' && typeof range === 'string')
      return new AppError(code, { headers: { 'content-range': range } });
    if (code) return new AppError(code);
    // A 4xx without a code of its own is a 400: the code, the title and the status always agree.
    return new AppError('bad_request', { detail: e.message });
  }
  if (isDatabaseUnavailable(err)) {
    request.log.warn({ err }, 'database unavailable');
    return new AppError('service_unavailable', { headers: { 'retry-after': '1' }, cause: err });
  }
  request.log.error({ err }, 'unhandled error');
  return new AppError('internal_error');
}

const CLIENT_ERRORS: Record<string, ErrorCode> = {
  ERR_HTTP_REQUEST_TIMEOUT: 'request_timeout',
  HPE_HEADER_OVERFLOW: 'headers_too_large',
};

/**
 * Fastify's `clientErrorHandler`: what Node's HTTP parser refuses before there is a request (bad HTTP
 * syntax, headers over 16 KiB, REQUEST_TIMEOUT_MS passed) gets a problem+json answer with the API's
 * security headers, like every other error, and the connection is closed. Fastify's default writes
 * its own JSON shape.
 */
/** A request target under /oauth/: origin form, or absolute form (`http://host/oauth/…`). */
const OAUTH_TARGET = /^(?:[Hh][Tt][Tt][Pp][Ss]?:\/\/[^/\s]*)?\/oauth\//;

/**
 * The method and target of the refused request's line, from the bytes the parser had (empty when it
 * had none). The method is one of HTTP's or `other`, so a metric's label stays bounded.
 */
function requestLine(
  err: NodeJS.ErrnoException & { rawPacket?: unknown },
  socket: Duplex,
): { method: string; target: string } {
  const known = (method: unknown) =>
    typeof method === 'string' && METHODS.includes(method) ? method : 'other';
  // A request whose head was parsed and whose body broke off (a half-close before Content-Length was
  // reached): the packet is the body's, and the request is the one the socket's parser was reading.
  // (Node keeps the last request there once it is complete: a malformed one pipelined behind it is
  // read from its own packet.)
  const incoming = (
    socket as Duplex & {
      parser?: { incoming?: { url?: unknown; method?: unknown; complete?: boolean } | null } | null;
    }
  ).parser?.incoming;
  if (incoming?.complete === false && typeof incoming.url === 'string')
    return { method: known(incoming.method), target: incoming.url };
  if (!Buffer.isBuffer(err.rawPacket)) return { method: 'other', target: '' };
  const line = err.rawPacket.subarray(0, 8192).toString('latin1');
  const end = line.indexOf('\r\n');
  const [method, target = ''] = (end < 0 ? line : line.slice(0, end)).split(' ');
  return { method: known(method), target };
}

/** A header line naming the Origin (RFC 6454 §7), its value trimmed. */
const ORIGIN_LINE = /^origin:[ \t]*(.*?)[ \t]*$/i;

/**
 * The Origin of the refused request, when it can be read: from the head Node had parsed (a body that
 * broke off or took too long), or else from the bytes the parser had when it refused (headers over
 * the limit), in the first head there, present once. A head that reached Node in pieces has its
 * earlier pieces gone, the Origin line with them: then none. It only ever chooses between CORS
 * headers for a listed origin and none (answerClientError), and a browser compares those with the
 * page's own origin, which a page cannot write into its request: a wrong reading makes no answer
 * readable where the CORS policy would not.
 */
function refusedOrigin(err: NodeJS.ErrnoException & { rawPacket?: unknown }, socket: Duplex) {
  const incoming = (
    socket as Duplex & {
      parser?: { incoming?: { headers?: Record<string, unknown>; complete?: boolean } | null } | null;
    }
  ).parser?.incoming;
  if (incoming?.complete === false && incoming.headers !== undefined) {
    const origin = incoming.headers.origin;
    return typeof origin === 'string' ? origin : undefined;
  }
  if (!Buffer.isBuffer(err.rawPacket)) return undefined;
  const bytes = err.rawPacket.subarray(0, 65_536).toString('latin1');
  const end = bytes.indexOf('\r\n\r\n');
  const origins = (end < 0 ? bytes : bytes.slice(0, end))
    .split('\r\n')
    .slice(1)
    .flatMap((line) => ORIGIN_LINE.exec(line)?.[1] ?? []);
  return origins.length === 1 ? origins[0] : undefined;
}

/** An answer answerClientError wrote: for the metrics and the log, as a request's would be. */
export interface ClientErrorAnswer {
  status: number;
  /** One of HTTP's methods, or `other`. */
  method: string;
  /** The request line's target as sent (empty when the parser had none). */
  target: string;
  /** Node's reason (`HPE_INVALID_METHOD`, `HPE_HEADER_OVERFLOW`, `ERR_HTTP_REQUEST_TIMEOUT`…). */
  reason: string | undefined;
  remoteAddress: string | undefined;
}

/**
 * The headers (but the framing ones) and body of a refusal written without Fastify, which no request
 * reached: under /oauth RFC 6749 §5.2's error, elsewhere problem+json; both never stored (with §5.1's
 * Pragma, as every error answer), with the API's security headers, and a listed origin's CORS headers
 * (none for an origin not listed).
 */
function refusalWithoutFastify(
  error: AppError,
  target: string,
  origin: string | undefined,
  corsHeaders: ((origin: string) => Readonly<Record<string, string>> | undefined) | undefined,
): { headers: Record<string, string>; body: string } {
  const oauth = OAUTH_TARGET.test(target);
  const body = JSON.stringify(
    oauth ? { error: 'invalid_request', error_description: error.detail } : problemBody(error),
  );
  const cors = origin !== undefined && corsHeaders ? corsHeaders(origin) : undefined;
  return {
    headers: {
      ...API_SECURITY_HEADERS,
      ...cors,
      ...error.headers,
      ...NO_STORE_HEADERS,
      'content-type': oauth ? 'application/json; charset=utf-8' : PROBLEM_CONTENT_TYPE,
    },
    body,
  };
}

export function answerClientError(
  err: NodeJS.ErrnoException,
  socket: Duplex,
  onAnswered?: (answer: ClientErrorAnswer) => void,
  /** The CORS headers of an answer to this Origin (none for an origin not listed). */
  corsHeaders?: (origin: string) => Readonly<Record<string, string>> | undefined,
): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const code = CLIENT_ERRORS[err.code ?? ''] ?? 'bad_request';
  const error = new AppError(
    code,
    code === 'bad_request' ? { detail: 'The request is not valid HTTP/1.1' } : {},
  );
  // The target says the error's format: RFC 6749 §5.2's under /oauth, whatever refused the request.
  const { method, target } = requestLine(err, socket);
  // As Node's own handler does: no answer into a connection whose current response has started
  // (a malformed request pipelined behind a good one), which would corrupt that response.
  const inFlight = (socket as Duplex & { _httpMessage?: { headersSent?: boolean } | null })._httpMessage;
  if (socket.writable && !inFlight?.headersSent) {
    // A listed origin's page reads the refusal (a 431 for its cookies) as any other error.
    const origin = corsHeaders && refusedOrigin(err, socket);
    const { headers, body } = refusalWithoutFastify(error, target, origin || undefined, corsHeaders);
    const head = Object.entries(headers)
      .map(([name, value]) => `${name}: ${value}\r\n`)
      .join('');
    socket.write(
      `HTTP/1.1 ${error.status} ${STATUS_CODES[error.status]}\r\n${head}` +
        `content-length: ${Buffer.byteLength(body)}\r\n` +
        `connection: close\r\n\r\n${body}`,
    );
    onAnswered?.({
      status: error.status,
      method,
      target,
      reason: err.code,
      remoteAddress: (socket as Duplex & { remoteAddress?: string }).remoteAddress,
    });
  }
  socket.destroy(err);
}

/**
 * Node's `checkExpectation`: an HTTP/1.1 request whose `Expect` is not `100-continue` (RFC 9110
 * §10.1.1) never reaches Fastify; without a listener Node answers it 417 with no body and none of
 * the API's headers. It gets the 417 in the error format of its path, with the API's security
 * headers and a listed origin's CORS headers, and the connection is closed (the body the client may
 * send anyway is not read). Only such requests reach it: no other request pays for it.
 */
export function answerExpectationFailed(
  request: IncomingMessage,
  response: ServerResponse,
  onAnswered?: (answer: ClientErrorAnswer) => void,
  corsHeaders?: (origin: string) => Readonly<Record<string, string>> | undefined,
): void {
  const error = new AppError('expectation_failed', {
    detail: 'Expect can only be 100-continue: no other expectation is met here',
  });
  const target = request.url ?? '';
  const { headers, body } = refusalWithoutFastify(error, target, request.headers.origin, corsHeaders);
  response.writeHead(error.status, {
    ...headers,
    'content-length': Buffer.byteLength(body),
    connection: 'close',
  });
  response.end(body);
  onAnswered?.({
    status: error.status,
    method: METHODS.includes(request.method ?? '') ? (request.method as string) : 'other',
    target,
    reason: 'expectation_failed',
    remoteAddress: request.socket.remoteAddress,
  });
}

/**
 * The path a request's route was matched on, for decisions by prefix (the /oauth error format and
 * headers). The router matches the decoded path, so `/%6Fauth/token` and the absolute form
 * `http://host/oauth/token` reach /oauth/token too, and must be answered as it is. A URL that is a
 * plain path already is what was matched, and is taken as it is: no object made per request.
 */
export function routePathOf(request: FastifyRequest): string {
  const url = request.url;
  if (url.charCodeAt(0) === 47 && !url.includes('%')) return url;
  return request.routeOptions.url ?? url;
}

/** The methods a route of this API may take, in the order an Allow header lists them. */
const ROUTABLE_METHODS = ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'] as const;

/**
 * The methods of the resource at `path`: those whose route matches it with the fewest path
 * parameters. A literal path beside a parametrised one is a resource of its own (the router prefers
 * it too): `/v1/api-keys/verify` takes POST, and is not `/v1/api-keys/{id}` with the id `verify` for
 * the methods it does not take.
 */
function resourceMethods(app: FastifyInstance, path: string): string[] {
  let fewest = Number.POSITIVE_INFINITY;
  let methods: string[] = [];
  for (const method of ROUTABLE_METHODS) {
    const found = app.findRoute({ method, url: path });
    if (found === null) continue;
    const count = Object.keys(found.params ?? {}).length;
    if (count < fewest) {
      fewest = count;
      methods = [method];
    } else if (count === fewest) methods.push(method);
  }
  return methods;
}

/** The route pattern of `method` that, with `params` put in, is `path` (undefined when none is). */
function patternOf(
  routes: ReadonlyArray<{ method: string; url: string }>,
  method: string,
  params: Record<string, string | undefined>,
  path: string,
): string | undefined {
  return routes.find(
    (route) =>
      route.method === method &&
      route.url.replace(/:(\w+)|\*/g, (token, name?: string) => params[name ?? '*'] ?? token) === path,
  )?.url;
}

/**
 * A method a literal path does not take, on a path a parametrised route of that method also matches
 * (`GET /v1/api-keys/verify`, matched by `GET /v1/api-keys/:id` with the id `verify`), is answered by
 * the not-found handler, as a method no route of the path takes is: a 405 with the literal path's
 * Allow, rather than the parametrised route's 400 about an id no one meant. Those pairs are found once
 * the routes are all in (onReady); the onRequest hook this puts on each parametrised route compares the
 * matched route and its parameters with them, before any credential is checked (the not-found handler
 * asks for none). Route hooks run after the global ones, CORS's among them, so a listed origin's
 * browser reads the 405 as any other. Call it before the routes are registered.
 */
export function refuseOtherMethodsOfLiteralPaths(
  app: FastifyInstance,
  routes: ReadonlyArray<{ method: string; url: string }>,
): void {
  /** The parametrised pattern → the methods and parameters with which it matches a literal path. */
  const shadowed = new Map<string, Array<{ method: string; params: Record<string, string | undefined> }>>();
  app.addHook('onReady', (done) => {
    const literal = new Set(routes.map((r) => r.url).filter((url) => !/[:*]/.test(url)));
    for (const path of literal) {
      const taken = resourceMethods(app, path);
      for (const method of ROUTABLE_METHODS) {
        if (taken.includes(method)) continue;
        const found = app.findRoute({ method, url: path });
        if (found === null) continue;
        const params = found.params as Record<string, string | undefined>;
        // HEAD is GET's, unless a route declares one of its own.
        const pattern =
          patternOf(routes, method, params, path) ??
          (method === 'HEAD' ? patternOf(routes, 'GET', params, path) : undefined);
        if (pattern === undefined) continue;
        const entries = shadowed.get(pattern) ?? [];
        entries.push({ method, params });
        shadowed.set(pattern, entries);
      }
    }
    done();
  });
  // One per route, its pattern bound (request.routeOptions would build an object on every request).
  const refuseOn = (pattern: string): onRequestHookHandler =>
    function refuse(request, reply, done) {
      const entries = shadowed.get(pattern);
      if (entries === undefined) return done();
      const params = request.params as Record<string, string | undefined>;
      const literal = entries.some(
        (e) => e.method === request.method && Object.entries(e.params).every(([k, v]) => params[k] === v),
      );
      // No route of this method is at the path: answered (and counted) as an unmatched request.
      if (literal) reply.callNotFound();
      else done();
    };
  // Only a parametrised route can match a literal path it was not meant for: the hook goes on those
  // alone, first of their own hooks (before the rate limit and the credential check, which add theirs
  // after), so the paths other services call on every request (JWKS, introspection, verification,
  // /me) run no hook for it.
  app.addHook('onRoute', (route) => {
    if (!/[:*]/.test(route.url)) return;
    const refuse = refuseOn(route.url);
    const existing = route.onRequest;
    route.onRequest =
      existing === undefined ? [refuse] : [refuse, ...(Array.isArray(existing) ? existing : [existing])];
  });
}

export interface ErrorHandlerOptions {
  /** The first renderer whose prefix the URL starts with wins; the default is problem+json. */
  renderers?: Array<{ prefix: string; render: ErrorRenderer }>;
  /** PUBLIC_URL's path without its trailing slash (`/auth`, or empty): problem+json's `instance` starts with it. */
  basePath?: string;
  /**
   * The CORS headers of an answer to this Origin (none for an origin not listed), for the errors
   * raised where @fastify/cors has not written them: the router's refusals, and a hook that runs
   * before its own (the first global onRequest hook's 503 while closing, its 415 and its 400).
   * Absent when CORS_ORIGINS lists none.
   */
  corsHeaders?: ((origin: string) => Readonly<Record<string, string>> | undefined) | undefined;
}

/**
 * Writes the CORS headers of a listed origin onto an error answer that lacks them, so its page reads
 * the problem rather than a network error. An answer @fastify/cors wrote them on is left as it is;
 * a request without an Origin costs one property read. Vary keeps what it named already.
 */
function addMissingCorsHeaders(
  request: FastifyRequest,
  reply: FastifyReply,
  corsHeaders: (origin: string) => Readonly<Record<string, string>> | undefined,
): void {
  const origin = request.headers.origin;
  if (origin === undefined || reply.hasHeader('access-control-allow-origin')) return;
  const headers = corsHeaders(origin);
  if (headers === undefined) return;
  const vary = reply.getHeader('vary');
  reply.headers(headers);
  if (vary !== undefined && vary !== '')
    reply.header('vary', /(?:^|,)\s*origin\s*(?:,|$)/i.test(String(vary)) ? vary : `${vary}, Origin`);
}

async function errorHandlerPlugin(app: FastifyInstance, options: ErrorHandlerOptions) {
  const renderers = options.renderers ?? [];
  const renderProblem = problemRenderer(options.basePath);
  const corsHeaders = options.corsHeaders;
  const rendererFor = (url: string) =>
    renderers.find((r) => url.startsWith(r.prefix))?.render ?? renderProblem;

  app.setErrorHandler((err, request, reply) => {
    const error = toAppError(err, request);
    if (error.status >= 500 && error.code === 'internal_error') {
      // Already logged with the cause above; the body stays generic.
    } else if (error.status >= 500 && err === error && error.cause !== undefined) {
      // A dependency's failure a service turned into a 503 (the identity provider down, or refusing
      // the service's key): the body stays generic, the log says why.
      request.log.warn({ err: error.cause, code: error.code }, 'dependency failed');
    } else if (err === error && error.cause !== undefined) {
      // A refusal a dependency gave its reasons for (Supabase refusing a sign-up for a CAPTCHA, a
      // domain it does not mail, a closed project): the client gets the service's words, the log
      // the dependency's.
      request.log.info(
        { err: error.cause, code: error.code, status: error.status },
        'request refused by a dependency',
      );
    } else if (error.status === 401 || error.status === 403) {
      request.log.info({ code: error.code, status: error.status }, 'request refused');
    }
    // A handler that failed after naming its document's validator (the JWKS's ETag, set before the
    // key set is read) answers with an error, not that document: a cache would file the error under it.
    reply.removeHeader('etag');
    for (const [name, value] of Object.entries(error.headers)) reply.header(name, value);
    if (corsHeaders) addMissingCorsHeaders(request, reply, corsHeaders);
    return rendererFor(routePathOf(request))(error, request, reply);
  });

  // A path that exists under other methods is a 405 with Allow (RFC 9110 §15.5.6), not a 404: the
  // router is asked for each method, on unmatched requests only. A route of the request's own method
  // that found nothing (@fastify/static's wildcard, for a file Swagger UI does not have) called this
  // handler itself: a 404, not a 405 naming its GET/HEAD twin. One of that method that matched the
  // path only as a parameter (refuseOtherMethodsOfLiteralPaths) is no route of the path: a 405.
  app.setNotFoundHandler((request, reply) => {
    const path = request.url.split('?')[0] ?? '/';
    const taken = resourceMethods(app, path);
    if (taken.includes(request.method)) {
      const error = new AppError('not_found', { detail: `Nothing is at ${path}` });
      return rendererFor(request.url)(error, request, reply);
    }
    if (taken.length > 0) {
      // OPTIONS when a route answers it at this path (@fastify/cors's preflight route, with
      // CORS_ORIGINS set): Allow names every method the resource takes (RFC 9110 §10.2.1), and a
      // client told "POST" alone would not know its preflight is answered. Only unmatched requests
      // pay for the lookup.
      if (app.findRoute({ method: 'OPTIONS', url: path }) !== null) taken.push('OPTIONS');
      const error = new AppError('method_not_allowed', {
        detail: `${request.method} is not allowed on ${path}; it takes ${taken.join(', ')}`,
        headers: { allow: taken.join(', ') },
      });
      for (const [name, value] of Object.entries(error.headers)) reply.header(name, value);
      return rendererFor(request.url)(error, request, reply);
    }
    const error = new AppError('not_found', { detail: `No route ${request.method} ${path}` });
    return rendererFor(request.url)(error, request, reply);
  });
}

export default fp(errorHandlerPlugin, { name: 'error-handler', fastify: '5.x' });
