import { z } from 'zod';

/*
 * Request bodies are form-encoded (or JSON) and deliberately not closed: RFC 6749 §3.2 requires the
 * server to ignore parameters it does not recognise, repeated or not. Repeated single-valued
 * parameters of these schemas are refused before validation (oauth.routes.ts), as §3.1 requires.
 */

/**
 * Bounded as a Basic header is (1024 characters): within that, a credential of the wrong length is a
 * failed client authentication (401 invalid_client, counted and audited), whichever way it came.
 */
const ClientAuthFields = {
  client_id: z.string().max(1024).optional().describe('client_secret_post (or a public client’s id)'),
  client_secret: z.string().max(1024).optional().describe('client_secret_post; prefer HTTP Basic'),
};

const OneOrMany = z.union([z.string().max(2048), z.array(z.string().max(2048)).max(10)]);

export const TokenBodySchema = z.object({
  grant_type: z
    .string()
    .max(128)
    .optional()
    .describe('`client_credentials` or `refresh_token`')
    .meta({ example: 'client_credentials' }),
  scope: z
    .string()
    .max(4000)
    .optional()
    .describe('Space-separated permissions, a subset of the client’s (default: all of them)'),
  audience: OneOrMany.optional().describe('The `aud` wanted; one of the client’s registered audiences'),
  resource: OneOrMany.optional().describe('RFC 8707 resource indicator(s); same rule as `audience`'),
  refresh_token: z.string().max(512).optional().describe('For `grant_type=refresh_token`'),
  ...ClientAuthFields,
});

export const TokenResponseSchema = z
  .object({
    access_token: z.string().describe('RFC 9068 JWT'),
    token_type: z.literal('Bearer'),
    expires_in: z.number().int(),
    scope: z.string(),
    refresh_token: z.string().optional().describe('refresh_token grant only; rotates on every use'),
  })
  .meta({ id: 'TokenResponse' });

const TokenParamFields = {
  // No length limit here: an oversized token is just inactive (RFC 7662 §2.2), never an error.
  token: z.string().optional().describe('An access token, refresh token or API key'),
  token_type_hint: z
    .string()
    .max(64)
    .optional()
    .describe('`access_token`, `refresh_token` or `api_key`; only a hint, the token is found either way'),
  ...ClientAuthFields,
};

export const IntrospectBodySchema = z.object(TokenParamFields);
export const RevokeBodySchema = z.object(TokenParamFields);

export const IntrospectionSchema = z
  .object({
    active: z.boolean(),
    scope: z.string().optional(),
    client_id: z.string().optional(),
    sub: z.string().optional(),
    aud: z.union([z.string(), z.array(z.string())]).optional(),
    iss: z.string().optional(),
    exp: z.number().int().optional(),
    iat: z.number().int().optional(),
    nbf: z.number().int().optional(),
    jti: z.string().optional(),
    token_type: z.string().optional(),
    token_use: z.enum(['access_token', 'refresh_token', 'api_key']).optional(),
    roles: z.array(z.string()).optional(),
    sid: z.string().optional(),
    amr: z
      .array(z.string())
      .optional()
      .describe(
        'RFC 8176: how the user signed in (`pwd`, `email` for a sign-in link; `mfa` after a second factor)',
      ),
    key_id: z.string().optional(),
  })
  .meta({ id: 'Introspection', description: 'RFC 7662 §2.2; only `{active: false}` for anything inactive' });

export const OAuthErrorSchema = z
  .object({ error: z.string(), error_description: z.string().optional() })
  .meta({ id: 'OAuthError', description: 'RFC 6749 §5.2' });

/** What each status means on every OAuth endpoint (RFC 6749 §5.2, RFC 7662, RFC 7009). */
const OAUTH_ERROR_MEANINGS: Record<number, string> = {
  413: '`invalid_request`: body over the size limit',
  415: '`invalid_request`: send application/x-www-form-urlencoded (or JSON)',
  503: '`temporarily_unavailable`: a dependency is down; see `Retry-After`',
};

/**
 * The error answers of an OAuth endpoint: each status described by `meanings` (the errors that
 * endpoint answers with it), or else by what it means on every endpoint.
 */
export const oauthErrors = <K extends number>(codes: K[], meanings: Partial<Record<K, string>> = {}) =>
  Object.fromEntries(
    codes.map((c) => [
      c,
      OAuthErrorSchema.describe(meanings[c] ?? OAUTH_ERROR_MEANINGS[c] ?? 'An RFC 6749 error'),
    ]),
  ) as Record<K, typeof OAuthErrorSchema>;
