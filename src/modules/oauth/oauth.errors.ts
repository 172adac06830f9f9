import type { AppError, ErrorCode } from '../../lib/errors.js';
import type { ErrorRenderer } from '../../plugins/error-handler.js';

/** The RFC 6749 §5.2 errors, answered with 400 unless the RFC says otherwise (invalid_client: 401). */
const TOKEN_ENDPOINT_ERRORS = new Set([
  'invalid_request',
  'invalid_grant',
  'unauthorized_client',
  'unsupported_grant_type',
  'invalid_scope',
  'invalid_target', // RFC 8707 §2
  'unsupported_token_type', // RFC 7009 §2.2.1
]);

const BY_CODE: Partial<Record<ErrorCode, string>> = {
  validation_failed: 'invalid_request',
  invalid_json: 'invalid_request',
  bad_request: 'invalid_request',
  payload_too_large: 'invalid_request',
  unsupported_media_type: 'invalid_request',
  not_found: 'invalid_request',
  method_not_allowed: 'invalid_request',
  invalid_client: 'invalid_client',
  authentication_required: 'invalid_client',
  // A bearer token presented to introspection: RFC 6750 §3.1.
  invalid_token: 'invalid_token',
  forbidden: 'insufficient_scope',
  invalid_refresh_token: 'invalid_grant',
  rate_limited: 'temporarily_unavailable',
  internal_error: 'server_error',
};

/** The RFC 6749 error name and HTTP status an AppError answers with under /oauth. */
export function oauthErrorOf(error: AppError): { error: string; status: number } {
  const name =
    error.oauthError ??
    BY_CODE[error.code] ??
    (error.status >= 500 ? 'temporarily_unavailable' : 'invalid_request');
  if (name === 'invalid_client') return { error: name, status: 401 };
  // 404, 405, 413 and 415 say more than 400 does; every other §5.2 error is a 400.
  if (TOKEN_ENDPOINT_ERRORS.has(name) && ![404, 405, 413, 415].includes(error.status))
    return { error: name, status: 400 };
  return { error: name, status: error.status };
}

function describe(error: AppError): string {
  const first = error.errors?.[0];
  // The field named, so "grant_type must not be repeated" or "token is required" reach the client.
  const text = first
    ? `${error.detail}: ${first.field.replace(/^body\./, '')} ${first.message}`
    : error.detail;
  // RFC 6749 §5.2: error_description is limited to %x20-21 / %x23-5B / %x5D-7E.
  return text.replace(/[^\x20\x21\x23-\x5b\x5d-\x7e]/g, '').slice(0, 500);
}

/**
 * Renders errors under /oauth as RFC 6749 §5.2 JSON `{error, error_description}` instead of
 * problem+json; OAuth responses are never cached (§5.1).
 */
export const renderOAuthError: ErrorRenderer = (error, _request, reply) => {
  const { error: name, status } = oauthErrorOf(error);
  return reply
    .status(status)
    .header('cache-control', 'no-store')
    .header('pragma', 'no-cache')
    .type('application/json; charset=utf-8')
    .serializer(JSON.stringify)
    .send({ error: name, error_description: describe(error) });
};
