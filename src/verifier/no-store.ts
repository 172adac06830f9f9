/**
 * RFC 6749 §5.1 for every answer holding a credential (a token, a client secret, an API key), and
 * RFC 9111 for every error answer: never stored by a browser or a proxy (`Pragma` for HTTP/1.0 caches).
 * Imports nothing, so the verifier (a package export of its own) and the service share it.
 */
export const NO_STORE_HEADERS: Readonly<Record<string, string>> = Object.freeze({
  'cache-control': 'no-store',
  pragma: 'no-cache',
});
