const sharedAnswers = new WeakSet<object>();

/**
 * Marks an answer the service builds once and shares between requests (the introspection of a cached
 * token, the verification of a cached API key): it is frozen all the way down, so no request can
 * change it for the others, and the serializer writes it once per route and status and reuses the
 * text (src/lib/serializer.ts). Only answers marked here are remembered; an object frozen for any
 * other reason is written anew like every other answer.
 */
export function sharedAnswer<T extends object>(answer: T): T {
  deepFreeze(answer);
  sharedAnswers.add(answer);
  return answer;
}

/** Whether `value` was marked by `sharedAnswer`. */
export function isSharedAnswer(value: unknown): value is object {
  return sharedAnswers.has(value as object);
}

/** Answers are JSON-shaped (no cycles), so a plain walk reaches everything they hold. */
function deepFreeze(value: object): void {
  for (const inner of Object.values(value)) {
    if (typeof inner === 'object' && inner !== null) deepFreeze(inner);
  }
  Object.freeze(value);
}
