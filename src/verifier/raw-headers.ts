/**
 * Whether raw headers (Node's `rawHeaders`: name, value, …) hold more than one Authorization field
 * line. RFC 9110 §5.3 allows one (it is no list); Node keeps the first and drops the others unseen,
 * so a request with two (two users' tokens, a Bearer and a Basic) would act for whichever came first.
 * A walk over the names: no allocation but for a name of the right length. Imports nothing, so the
 * verifier (a package export of its own) and the service share it.
 */
export function repeatedAuthorization(raw: readonly string[]): boolean {
  let seen = false;
  for (let i = 0; i < raw.length; i += 2) {
    const name = raw[i]!;
    if (name.length === 13 && name.toLowerCase() === 'authorization') {
      if (seen) return true;
      seen = true;
    }
  }
  return false;
}
