import { AppError } from './errors.js';

/**
 * A secret rotation while the secret replaced by the last one is still in its grace is refused (409
 * `rotation_in_progress`, with Retry-After until that grace ends) unless forced: there is one slot
 * for a previous secret, so rotating again ends that grace at once, and whoever still runs on the
 * original secret (half a fleet mid-deployment) stops working. `force` ends it knowingly (a leaked
 * secret is replaced again at once).
 */
export function assertNoGraceRunning(
  previous: { hash: string | null; expiresAt: Date | null },
  now: Date,
  force: boolean,
): void {
  if (force || previous.hash === null || previous.expiresAt === null) return;
  const leftMs = previous.expiresAt.getTime() - now.getTime();
  if (leftMs <= 0) return;
  const seconds = Math.ceil(leftMs / 1000);
  throw new AppError('rotation_in_progress', {
    detail:
      `The secret the last rotation replaced keeps working for ${seconds} s more, and rotating again ` +
      'would end it now: wait, or send force: true',
    headers: { 'retry-after': String(seconds) },
  });
}
