/*
 * Another process holding the embedded database's lock (src/db/directory-lock.ts), for the tests:
 * `lock-holder.ts <lock path> <then>` takes the lock, writes "locked <pid>", then
 * - `block`: blocks its event loop for good, as PGlite's start does for seconds: nothing refreshes
 *   the lock any more;
 * - `hold`: idles, its event loop free;
 * - `exit`: exits at once, normally.
 */
import { acquireDirectoryLock } from '../../src/db/directory-lock.js';

const [lockPath, then] = process.argv.slice(2);
if (!lockPath || !['block', 'hold', 'exit'].includes(then ?? '')) {
  console.error('usage: lock-holder.ts <lock path> block|hold|exit');
  process.exit(2);
}
const attempt = await acquireDirectoryLock(lockPath, {
  onCompromised: (err) => console.log(`compromised: ${err.message}`),
});
if (!attempt.acquired) {
  console.log(`held by ${attempt.holder}`);
  process.exit(1);
}
console.log(`locked ${process.pid}`);
if (then === 'exit') process.exit(0);
if (then === 'block') {
  // The line above is out (writes to a pipe are synchronous). Blocked, without spinning a core.
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);
}
setInterval(() => undefined, 60_000);
