import { spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort, type SpawnedProcess, spawnServer } from '../../support/spawn-server.js';
import { redisAnswers } from '../../support/redis.js';

/**
 * A throwaway redis-server of the fault suite's own, on a free port of 127.0.0.1, keeping nothing on
 * disk: the suite stops (SIGSTOP), kills and restarts it. The machine's shared Redis is never touched.
 */
export class RedisServer {
  private constructor(
    readonly port: number,
    private process: SpawnedProcess,
  ) {}

  get url() {
    return `redis://127.0.0.1:${this.port}`;
  }

  /** Why the suite cannot start one here, or undefined when it can. */
  static missing(): string | undefined {
    const found = spawnSync('redis-server', ['--version'], { stdio: 'ignore' });
    return found.error || found.status !== 0 ? 'no redis-server on PATH' : undefined;
  }

  static async start(port?: number): Promise<RedisServer> {
    const chosen = port ?? (await freePort());
    return new RedisServer(chosen, await RedisServer.spawn(chosen));
  }

  private static async spawn(port: number): Promise<SpawnedProcess> {
    const process = await spawnServer({
      command: 'redis-server',
      args: ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
    });
    const url = `redis://127.0.0.1:${port}`;
    const deadline = performance.now() + 10_000;
    while (!(await redisAnswers(url))) {
      if (!process.isRunning() || performance.now() > deadline)
        throw new Error(`redis-server on ${port} did not answer:\n${process.output}`);
      await sleep(50);
    }
    return process;
  }

  /** SIGSTOP: connections stay open and are accepted, nothing is answered. */
  hang() {
    this.process.kill('SIGSTOP');
  }

  /** SIGCONT: it answers what it was sent meanwhile, and goes on. */
  resume() {
    this.process.kill('SIGCONT');
  }

  /** SIGKILL (nothing kept), then a new one on the same port. */
  async restart(): Promise<void> {
    await this.kill();
    this.process = await RedisServer.spawn(this.port);
  }

  async kill(): Promise<void> {
    this.process.kill('SIGKILL');
    await this.process.exited.catch(() => undefined);
  }

  async stop(): Promise<void> {
    this.resume();
    await this.process.stop(2000);
  }
}
