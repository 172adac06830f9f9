/*
 * `npm run bench`: the hot paths of the service against a bare Fastify hello world on this machine.
 *
 * It starts the service (`node --import tsx src/server.ts`) on a fresh database and the baseline
 * (scripts/bench-baseline.ts) as child processes on loopback, seeds through the HTTP API, then measures
 * each endpoint in five rounds, each right after a baseline run, so a ratio compares two runs seconds
 * apart, and reports the round with the median ratio. Then the
 * argon2id capacity of the machine with the service's parameters, logins against it, and logins at
 * twice that capacity while introspection runs alongside. It prints a table and writes it as JSON and
 * Markdown under bench-results/. It is a measurement, not a gate: a missed target is a FAIL row, and
 * the exit code is 0 unless the run itself could not be made.
 *
 * Besides req/s and latency it reports the server's CPU time per request (from /proc, all its
 * threads) and how busy the rest of the machine was: on a shared 2-core machine a neighbour's load
 * moves the ratios by tens of percent, while CPU per request says what the code costs.
 * BENCH_CALLGRIND=<dir> counts instructions per request instead (see CALLGRIND_DIR below).
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import { createServer } from 'node:net';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import argon2 from 'argon2';
import autocannon from 'autocannon';
import pg from 'pg';
import { loadConfig } from '../src/config.js';
import { ARGON2_OPTIONS } from '../src/identity/passwords.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const CONNECTIONS = 10;
const MEASURE_SECONDS = 2;
/** Logins run at ~30–60/s here: long enough for a few hundred. */
const LOGIN_SECONDS = 5;
/** Baseline-then-endpoint pairs per endpoint; the median pair is reported. Odd. */
const ROUNDS = 5;
const WARMUP_SECONDS = 1;
const ARGON2_SECONDS = 3;
/** Logins alone first, so the hashing queue is full and shedding when introspection is measured. */
const OVERLOAD_LEAD_SECONDS = 2;
const OVERLOAD_SECONDS = 6;

/** Issue 7, at 10 connections on a 2-core machine. */
const targets = {
  jwks: 0.7,
  introspect: 0.5,
  verify: 0.5,
  me: 0.4,
  clientCredentials: 0.25,
  login: 0.9,
  hotP99Ms: 10,
  overloadP99Ms: 20,
};

// ——— processes ———

interface Child {
  name: string;
  process: ChildProcess;
  /** The last lines it wrote, shown when it fails. */
  tail: string[];
  exited: Promise<number | null>;
  env: NodeJS.ProcessEnv;
  /** The callgrind output file when it runs under `BENCH_CALLGRIND`, with `%p` for its pid. */
  callgrindOut?: string;
}

/**
 * BENCH_CALLGRIND=<dir>: the service, the baseline and the floor run under valgrind's callgrind,
 * instrumented only while a measured batch of requests runs, and each endpoint is measured in
 * instructions per request instead of req/s. Instructions do not depend on what else the machine is
 * doing (V8's state still does, on the order things happened: see the README). `--perf-basic-prof`
 * writes /tmp/perf-<pid>.map, which names the JIT code in the callgrind files.
 */
const CALLGRIND_DIR = process.env.BENCH_CALLGRIND ? resolve(process.env.BENCH_CALLGRIND) : undefined;

function startChild(name: string, args: string[], env: NodeJS.ProcessEnv): Child {
  const callgrindOut = CALLGRIND_DIR ? join(CALLGRIND_DIR, `${name}.%p`) : undefined;
  const [command, argv] = callgrindOut
    ? [
        'valgrind',
        [
          '--tool=callgrind',
          '--instr-atstart=no',
          '--smc-check=all-non-file',
          `--callgrind-out-file=${callgrindOut}`,
          process.execPath,
          '--perf-basic-prof',
          // V8's memory reducer starts major GCs when allocation looks slow by the wall clock, which
          // under callgrind (~40× slower) it always does; at full speed none runs during the rounds.
          '--no-memory-reducer',
          ...args,
        ],
      ]
    : [process.execPath, args];
  const child = spawn(command, argv, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
  const tail: string[] = [];
  const keep = (chunk: Buffer) => {
    for (const line of chunk.toString('utf8').split('\n')) {
      if (!line.trim()) continue;
      tail.push(line);
      if (tail.length > 40) tail.shift();
    }
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  const exited = new Promise<number | null>((done) => child.on('exit', (code) => done(code)));
  return { name, process: child, tail, exited, env, ...(callgrindOut ? { callgrindOut } : {}) };
}

async function stopChild(child: Child | undefined) {
  if (!child || child.process.exitCode !== null) return;
  child.process.kill('SIGTERM');
  const timer = setTimeout(() => child.process.kill('SIGKILL'), 10_000);
  await child.exited;
  clearTimeout(timer);
}

async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const server = createServer();
    server.once('error', fail);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => done(port));
    });
  });
}

/** Under callgrind a start takes several times longer. */
const START_TIMEOUT_MS = CALLGRIND_DIR ? 600_000 : 90_000;

async function waitFor(child: Child, url: string, timeoutMs = START_TIMEOUT_MS) {
  return waitForStatus(child, url, 200, timeoutMs);
}

async function waitForStatus(child: Child, url: string, status: number, timeoutMs = START_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.process.exitCode !== null) break;
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(1000) });
      if (res.status === status) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`${child.name} did not come up at ${url}:\n${child.tail.join('\n')}`);
}

// ——— database ———

interface FreshDatabase {
  kind: 'postgres' | 'pglite';
  env: Record<string, string>;
  drop(): Promise<void>;
}

/** A new PostgreSQL database for this run when the server answers; an embedded PGlite otherwise. */
async function freshDatabase(): Promise<FreshDatabase> {
  const adminUrl = process.env.BENCH_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres';
  const name = `auth_bench_${randomBytes(6).toString('hex')}`;
  const admin = new pg.Client({ connectionString: adminUrl, connectionTimeoutMillis: 2000 });
  try {
    await admin.connect();
    await admin.query(`CREATE DATABASE "${name}"`);
    await admin.end();
    const url = new URL(adminUrl);
    url.pathname = `/${name}`;
    return {
      kind: 'postgres',
      env: { DATABASE_URL: url.toString() },
      async drop() {
        const client = new pg.Client({ connectionString: adminUrl, connectionTimeoutMillis: 2000 });
        await client.connect();
        try {
          await client.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
        } finally {
          await client.end();
        }
      },
    };
  } catch (err) {
    await admin.end().catch(() => undefined);
    const dataDir = mkdtempSync(join(os.tmpdir(), 'auth-bench-'));
    progress(`PostgreSQL at ${redactUrl(adminUrl)} unavailable (${(err as Error).message}); using PGlite`);
    return {
      kind: 'pglite',
      env: { DATA_DIR: dataDir },
      async drop() {
        rmSync(dataDir, { recursive: true, force: true });
      },
    };
  }
}

function redactUrl(url: string) {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return '(unparseable URL)';
  }
}

// ——— measuring ———

interface Measurement {
  rps: number;
  p50: number;
  p99: number;
  non2xx: number;
  errors: number;
  requests: number;
  /** CPU time of the server process (all its threads) per request, in µs; Linux only. */
  cpuUsPerRequest: number | null;
  /**
   * Cores kept busy meanwhile by everything but the server and this process (PostgreSQL included);
   * anything well above what the endpoint itself makes PostgreSQL do means a neighbour disturbed the run.
   */
  otherCores: number | null;
}

/** Busy and total jiffies of the whole machine, from /proc/stat (undefined elsewhere). */
function machineJiffies(): { busy: number; total: number } | undefined {
  try {
    const cpu = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1).map(Number);
    const total = cpu.slice(0, 8).reduce((a, b) => a + b, 0);
    const idle = (cpu[3] ?? 0) + (cpu[4] ?? 0);
    return { busy: total - idle, total };
  } catch {
    return undefined;
  }
}

const CLOCK_TICKS = (() => {
  try {
    return Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
  } catch {
    return 100;
  }
})();

/** User plus system CPU seconds a process has used so far, from /proc (undefined elsewhere). */
function cpuSeconds(pid: number | undefined): number | undefined {
  if (pid === undefined) return undefined;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
  } catch {
    return undefined;
  }
}

/** Resident set now and at its peak (VmRSS, VmHWM) of a process, in MiB, from /proc (undefined elsewhere). */
function memoryMiB(pid: number | undefined): { rss: number; peak: number } | undefined {
  if (pid === undefined) return undefined;
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1]);
    const rss = kib('VmRSS');
    const peak = kib('VmHWM');
    return Number.isFinite(rss) && Number.isFinite(peak) ? { rss: rss / 1024, peak: peak / 1024 } : undefined;
  } catch {
    return undefined;
  }
}

interface Target {
  method?: 'GET' | 'POST';
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

function percentile(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]!;
}

/** One autocannon run; latencies are kept at full precision (autocannon's histogram keeps whole ms). */
/** autocannon's options for `target` at CONNECTIONS connections, one request at a time on each. */
function requestOptions(base: string, target: Target) {
  return {
    url: base + target.path,
    method: target.method ?? 'GET',
    headers: target.headers ?? {},
    ...(target.body !== undefined ? { body: target.body } : {}),
    connections: CONNECTIONS,
    pipelining: 1,
  } satisfies autocannon.Options;
}

async function load(base: string, target: Target, seconds: number, server?: Child) {
  const latencies: number[] = [];
  const pid = server?.process.pid;
  const cpuBefore = cpuSeconds(pid);
  const machineBefore = machineJiffies();
  const selfBefore = process.cpuUsage();
  const started = performance.now();
  const result = await new Promise<autocannon.Result>((done, fail) => {
    const instance = autocannon(
      { ...requestOptions(base, target), duration: seconds, timeout: 10 },
      (err: Error | null, res: autocannon.Result) => (err ? fail(err) : done(res)),
    );
    instance.on('response', (_client, _status, _bytes, responseTime) => {
      latencies.push(responseTime);
    });
  });
  const elapsed = (performance.now() - started) / 1000;
  const cpuAfter = cpuSeconds(pid);
  const machineAfter = machineJiffies();
  const self = process.cpuUsage(selfBefore);
  const sorted = Float64Array.from(latencies).sort();
  const serverCpu = cpuBefore === undefined || cpuAfter === undefined ? undefined : cpuAfter - cpuBefore;
  return {
    otherCores:
      machineBefore === undefined || machineAfter === undefined || serverCpu === undefined
        ? null
        : Math.max(
            0,
            ((machineAfter.busy - machineBefore.busy) / CLOCK_TICKS -
              serverCpu -
              (self.user + self.system) / 1e6) /
              elapsed,
          ),
    cpuUsPerRequest:
      serverCpu === undefined || latencies.length === 0 ? null : (serverCpu * 1e6) / latencies.length,
    rps: latencies.length / elapsed,
    p50: percentile(sorted, 50),
    p99: percentile(sorted, 99),
    non2xx: result.non2xx,
    errors: result.errors,
    requests: latencies.length,
  } satisfies Measurement;
}

interface LoginOverload {
  offeredRate: number;
  sent: number;
  ok: number;
  shed: number;
  shedWithoutRetryAfter: number;
  otherStatus: number;
  errors: number;
  okRps: number;
  okP50: number;
  okP99: number;
}

/**
 * Logins at a fixed rate, whatever the answers' latency (open loop). autocannon's rate limit is per
 * connection and waits for each answer, so once answers slow down it offers less than asked and a
 * queue never overflows; a real crowd of users does not wait for each other.
 */
async function openLoopLogins(base: string, body: string, rate: number, seconds: number) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });
  const url = new URL('/v1/auth/login', base);
  const stats: LoginOverload = {
    offeredRate: rate,
    sent: 0,
    ok: 0,
    shed: 0,
    shedWithoutRetryAfter: 0,
    otherStatus: 0,
    errors: 0,
    okRps: 0,
    okP50: 0,
    okP99: 0,
  };
  const okLatencies: number[] = [];
  const inFlight = new Set<Promise<void>>();
  const send = () => {
    const start = performance.now();
    stats.sent++;
    const done = new Promise<void>((finish) => {
      const req = http.request(
        url,
        {
          method: 'POST',
          agent,
          headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
          timeout: 30_000,
        },
        (res) => {
          res.resume();
          res.on('end', () => {
            if (res.statusCode === 200) {
              stats.ok++;
              okLatencies.push(performance.now() - start);
            } else if (res.statusCode === 503) {
              stats.shed++;
              if (!res.headers['retry-after']) stats.shedWithoutRetryAfter++;
            } else stats.otherStatus++;
            finish();
          });
        },
      );
      req.on('timeout', () => req.destroy(new Error('timeout')));
      req.on('error', () => {
        stats.errors++;
        finish();
      });
      req.end(body);
    });
    inFlight.add(done);
    void done.then(() => inFlight.delete(done));
  };
  const started = performance.now();
  const interval = 1000 / rate;
  await new Promise<void>((finished) => {
    const tick = () => {
      const now = performance.now();
      if (now - started >= seconds * 1000) return finished();
      // Catch up on every send that is due, so a busy event loop does not lower the offered rate.
      while (stats.sent < Math.floor((now - started) / interval) + 1) send();
      setTimeout(tick, Math.max(1, interval / 2));
    };
    tick();
  });
  await Promise.all(inFlight);
  const elapsed = (performance.now() - started) / 1000;
  agent.destroy();
  const sorted = Float64Array.from(okLatencies).sort();
  stats.okRps = stats.ok / elapsed;
  stats.okP50 = percentile(sorted, 50);
  stats.okP99 = percentile(sorted, 99);
  return stats;
}

/** Hashes per second this machine does with the service's argon2id parameters and concurrency. */
async function argon2Capacity(concurrency: number, seconds: number): Promise<number> {
  const password = randomBytes(12).toString('base64url');
  const hash = await argon2.hash(password, ARGON2_OPTIONS);
  // Login verifies, so that is what is timed; a verification costs one hash.
  await argon2.verify(hash, password);
  let done = 0;
  const started = performance.now();
  const end = started + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end) {
        await argon2.verify(hash, password);
        done++;
      }
    }),
  );
  return done / ((performance.now() - started) / 1000);
}

// ——— HTTP seeding ———

async function call<T>(
  base: string,
  method: string,
  path: string,
  options: { token?: string; json?: unknown; headers?: Record<string, string>; body?: string } = {},
): Promise<{ status: number; body: T }> {
  const headers: Record<string, string> = { ...(options.headers ?? {}) };
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  let body = options.body;
  if (options.json !== undefined) {
    headers['content-type'] = 'application/json';
    body = JSON.stringify(options.json);
  }
  const res = await fetch(base + path, { method, headers, ...(body !== undefined ? { body } : {}) });
  const text = await res.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON
  }
  return { status: res.status, body: parsed as T };
}

async function expectStatus<T>(what: string, response: Promise<{ status: number; body: T }>, status: number) {
  const res = await response;
  if (res.status !== status) {
    throw new Error(`${what}: expected ${status}, got ${res.status} ${JSON.stringify(res.body)}`);
  }
  return res.body;
}

// ——— reporting ———

interface Row {
  endpoint: string;
  rps: number;
  p50: number | null;
  p99: number | null;
  non2xx: number | null;
  errors: number | null;
  /** Against the adjacent baseline run (or the argon2 capacity for login). */
  ratio: number | null;
  /** The floor's ratio: bare Fastify answering the same request with the same recorded answer. */
  floorRatio?: number | null;
  /** The floor's CPU time per request in the same round, in µs: what Node and Fastify alone cost. */
  floorCpuUsPerRequest?: number | null;
  /** CPU time of the server per request (all its threads), in µs. */
  cpuUsPerRequest?: number | null;
  target: string;
  pass: boolean | null;
  note?: string;
}

const progressStart = performance.now();
function progress(message: string) {
  const t = ((performance.now() - progressStart) / 1000).toFixed(0).padStart(3);
  process.stdout.write(`[bench ${t}s] ${message}\n`);
}

const fmt = {
  integer: (n: number) => Math.round(n).toLocaleString('en-US'),
  rps: (n: number) => fmt.integer(n),
  ms: (n: number | null) => (n === null || Number.isNaN(n) ? '–' : n.toFixed(2)),
  ratio: (n: number | null) => (n === null ? '–' : `${n.toFixed(2)}×`),
  count: (n: number | null) => (n === null ? '–' : String(n)),
  pass: (p: boolean | null) => (p === null ? '' : p ? 'PASS' : 'FAIL'),
  cpu: (m: Measurement) =>
    (m.cpuUsPerRequest === null ? 'server CPU n/a' : `server CPU ${m.cpuUsPerRequest.toFixed(1)} µs/req`) +
    (m.otherCores === null ? '' : `, other processes ${m.otherCores.toFixed(2)} cores`),
};

function tableRows(rows: Row[]): string[][] {
  return rows.map((r) => [
    r.endpoint,
    fmt.rps(r.rps),
    fmt.ms(r.p50),
    fmt.ms(r.p99),
    fmt.count(r.non2xx),
    fmt.count(r.errors),
    fmt.ratio(r.ratio),
    fmt.ratio(r.floorRatio ?? null),
    r.cpuUsPerRequest === undefined || r.cpuUsPerRequest === null ? '–' : r.cpuUsPerRequest.toFixed(1),
    r.floorCpuUsPerRequest === undefined || r.floorCpuUsPerRequest === null
      ? '–'
      : r.floorCpuUsPerRequest.toFixed(1),
    r.target,
    fmt.pass(r.pass),
  ]);
}

const HEADER = [
  'endpoint',
  'req/s',
  'p50 ms',
  'p99 ms',
  'non-2xx',
  'errors',
  'ratio',
  'floor',
  'server CPU µs/req',
  'floor CPU µs/req',
  'target',
  'result',
];
/** Text columns; the others are figures, aligned right. */
const TEXT_COLUMNS = new Set([0, 10, 11]);

function markdownGrid(header: string[], cells: string[][], textColumns: Set<number>): string {
  const lines = [
    `| ${header.join(' | ')} |`,
    `|${header.map((_, i) => (textColumns.has(i) ? '---' : '---:')).join('|')}|`,
  ];
  for (const row of cells) lines.push(`| ${row.join(' | ')} |`);
  return lines.join('\n');
}

function alignedTable(header: string[], cells: string[][], textColumns: Set<number>): string {
  const all = [header, ...cells];
  const widths = header.map((_, i) => Math.max(...all.map((r) => r[i]!.length)));
  return all
    .map((row, line) => {
      const text = row.map((c, i) => (textColumns.has(i) ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)));
      return line === 0
        ? `${text.join('  ')}\n${widths.map((w) => '-'.repeat(w)).join('  ')}`
        : text.join('  ');
    })
    .join('\n');
}

const markdownTable = (rows: Row[]) => markdownGrid(HEADER, tableRows(rows), TEXT_COLUMNS);
const textTable = (rows: Row[]) => alignedTable(HEADER, tableRows(rows), TEXT_COLUMNS);

// ——— the run ———

interface Servers {
  service: Child;
  baseline: Child;
  floor: Child;
  base: string;
  baselineBase: string;
  floorBase: string;
  passwordHashing: { concurrency: number; queue: number };
  admin: { email: string; password: string };
}

/** The service on a fresh database and the baseline, both listening on loopback. */
async function startServers(database: FreshDatabase, cleanups: Cleanups): Promise<Servers> {
  const [servicePort, baselinePort, floorPort] = [await freePort(), await freePort(), await freePort()];
  const admin = { email: 'bench-admin@example.com', password: randomBytes(18).toString('base64url') };
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const name of ['DATABASE_URL', 'DATA_DIR', 'REDIS_URL', 'SUPABASE_URL', 'NODE_ENV', 'PUBLIC_URL'])
    delete env[name];
  Object.assign(env, database.env, {
    PORT: String(servicePort),
    HOST: '127.0.0.1',
    AUTH_PROVIDER: 'local',
    KEY_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
    SECRET_PEPPER: randomBytes(32).toString('base64'),
    RATE_LIMIT_ENABLED: 'false',
    LOG_LEVEL: 'warn',
    BOOTSTRAP_ADMIN_EMAIL: admin.email,
    BOOTSTRAP_ADMIN_PASSWORD: admin.password,
  });
  // The hashing concurrency and queue are the service's own (defaults unless set in the environment).
  const { passwordHashing } = loadConfig(env, { generateDevSecrets: false });

  // BENCH_CPU_PROF=<dir> writes a V8 CPU profile of the service (open it in Chrome DevTools).
  const profile = process.env.BENCH_CPU_PROF
    ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}`]
    : [];
  const service = startChild('service', [...profile, '--import', 'tsx', 'src/server.ts'], env);
  cleanups.push(() => stopChild(service));
  const baseline = startChild('baseline', ['--import', 'tsx', 'scripts/bench-baseline.ts'], {
    ...process.env,
    PORT: String(baselinePort),
  });
  cleanups.push(() => stopChild(baseline));
  const floorProfile = process.env.BENCH_CPU_PROF
    ? ['--cpu-prof', `--cpu-prof-dir=${process.env.BENCH_CPU_PROF}/floor`]
    : [];
  const floor = startChild('floor', [...floorProfile, '--import', 'tsx', 'scripts/bench-floor.ts'], {
    ...process.env,
    PORT: String(floorPort),
  });
  cleanups.push(() => stopChild(floor));
  const base = `http://127.0.0.1:${servicePort}`;
  const baselineBase = `http://127.0.0.1:${baselinePort}`;
  const floorBase = `http://127.0.0.1:${floorPort}`;
  await Promise.all([
    waitFor(service, `${base}/health/ready`),
    waitFor(baseline, `${baselineBase}/`),
    // Unknown names answer 404; anything else means it is not up yet.
    waitForStatus(floor, `${floorBase}/_floor/none`, 404),
  ]);
  return { service, baseline, floor, base, baselineBase, floorBase, passwordHashing, admin };
}

interface Seed {
  /** HTTP Basic credentials of an app client holding tokens:introspect and api_keys:verify. */
  basic: string;
  /** A client_credentials token of that client. */
  serviceToken: string;
  /** An API key of the admin, scoped to account:read. */
  apiKey: string;
  user: { email: string; password: string };
  userToken: string;
}

/** Everything the measured requests need, made through the API as a client would. */
async function seed({ base, admin }: Servers): Promise<Seed> {
  type Session = { session: { access_token: string } };
  const adminToken = (
    await expectStatus('admin login', call<Session>(base, 'POST', '/v1/auth/login', { json: admin }), 200)
  ).session.access_token;
  const client = await expectStatus(
    'create client',
    call<{ client_id: string; client_secret: string }>(base, 'POST', '/v1/clients', {
      token: adminToken,
      json: { name: 'bench', scopes: ['tokens:introspect', 'api_keys:verify'] },
    }),
    201,
  );
  // RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined.
  const basic = `Basic ${Buffer.from(
    `${encodeURIComponent(client.client_id)}:${encodeURIComponent(client.client_secret)}`,
  ).toString('base64')}`;
  const apiKey = await expectStatus(
    'create API key',
    call<{ key: string }>(base, 'POST', '/v1/api-keys', {
      token: adminToken,
      json: { name: 'bench', scopes: ['account:read'] },
    }),
    201,
  );
  const user = { email: 'bench-user@example.com', password: randomBytes(18).toString('base64url') };
  const registered = await expectStatus(
    'register user',
    call<Session>(base, 'POST', '/v1/auth/register', { json: user }),
    201,
  );
  const serviceToken = await expectStatus(
    'client_credentials token',
    call<{ access_token: string }>(base, 'POST', '/oauth/token', {
      headers: { ...FORM, authorization: basic },
      body: 'grant_type=client_credentials',
    }),
    200,
  );
  return {
    basic,
    serviceToken: serviceToken.access_token,
    apiKey: apiKey.key,
    user,
    userToken: registered.session.access_token,
  };
}

const FORM = { 'content-type': 'application/x-www-form-urlencoded' };

interface Endpoint {
  name: string;
  target: Target;
  /** The least req/s, as a share of the adjacent baseline run. */
  minRatio: number;
  maxP99Ms?: number;
  /** What a correct answer looks like; checked once before the run, so a 200 of the wrong kind fails. */
  check: (body: unknown) => boolean;
}

function endpoints(s: Seed, adminEmail: string): Endpoint[] {
  const userEmailIs = (email: string) => (b: unknown) =>
    (b as { user?: { email?: string } }).user?.email === email;
  return [
    {
      name: 'GET /.well-known/jwks.json',
      target: { path: '/.well-known/jwks.json' },
      minRatio: targets.jwks,
      check: (b) => Array.isArray((b as { keys?: unknown }).keys),
    },
    {
      name: 'POST /oauth/introspect',
      target: {
        method: 'POST',
        path: '/oauth/introspect',
        headers: { ...FORM, authorization: s.basic },
        body: `token=${encodeURIComponent(s.userToken)}`,
      },
      minRatio: targets.introspect,
      maxP99Ms: targets.hotP99Ms,
      check: (b) => (b as { active?: boolean }).active === true,
    },
    {
      name: 'POST /v1/api-keys/verify',
      target: {
        method: 'POST',
        path: '/v1/api-keys/verify',
        headers: { 'content-type': 'application/json', authorization: `Bearer ${s.serviceToken}` },
        body: JSON.stringify({ key: s.apiKey }),
      },
      minRatio: targets.verify,
      maxP99Ms: targets.hotP99Ms,
      check: (b) => (b as { valid?: boolean }).valid === true,
    },
    {
      name: 'GET /v1/auth/me (JWT)',
      target: { path: '/v1/auth/me', headers: { authorization: `Bearer ${s.userToken}` } },
      minRatio: targets.me,
      check: userEmailIs(s.user.email),
    },
    {
      name: 'GET /v1/auth/me (API key)',
      target: { path: '/v1/auth/me', headers: { 'x-api-key': s.apiKey } },
      minRatio: targets.me,
      check: userEmailIs(adminEmail),
    },
    {
      name: 'POST /oauth/token (client_credentials)',
      target: {
        method: 'POST',
        path: '/oauth/token',
        headers: { ...FORM, authorization: s.basic },
        body: 'grant_type=client_credentials',
      },
      minRatio: targets.clientCredentials,
      check: (b) => typeof (b as { access_token?: unknown }).access_token === 'string',
    },
  ];
}

const HELLO_WORLD: Target = { path: '/' };

/** Headers Node writes by itself; everything else of the service's answer is replayed by the floor. */
const TRANSPORT_HEADERS = new Set([
  'content-length',
  'date',
  'connection',
  'keep-alive',
  'transfer-encoding',
]);

/** An endpoint's name as a path segment or file name: `POST /oauth/introspect` → `POST-oauth-introspect`. */
const slug = (name: string) => name.replace(/[^A-Za-z0-9]+/g, '-');

/**
 * Records the service's answer to an endpoint on the floor server (scripts/bench-floor.ts) and
 * returns the same request aimed at the floor, which replays that answer: the endpoint's shape with
 * none of its work.
 */
async function recordFloor(servers: Servers, e: Endpoint, sample: Response, body: string): Promise<Target> {
  const headers: Record<string, string> = {};
  sample.headers.forEach((value, name) => {
    if (!TRANSPORT_HEADERS.has(name)) headers[name] = value;
  });
  const path = `/_floor/${encodeURIComponent(slug(e.name))}`;
  const put = await fetch(servers.floorBase + path, {
    method: 'PUT',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ status: sample.status, headers, body }),
  });
  if (put.status !== 204) throw new Error(`the floor refused ${e.name}: ${put.status}`);
  const target = { ...e.target, path };
  const check = await fetch(servers.floorBase + path, {
    method: target.method ?? 'GET',
    headers: target.headers ?? {},
    ...(target.body !== undefined ? { body: target.body } : {}),
  });
  if (check.status !== sample.status || (await check.text()) !== body) {
    throw new Error(`the floor does not replay ${e.name}`);
  }
  return target;
}

/** Checks the service's answer to an endpoint, records it on the floor, and returns the floor's request. */
async function checkedFloor(servers: Servers, e: Endpoint): Promise<Target> {
  const sample = await fetch(servers.base + e.target.path, {
    method: e.target.method ?? 'GET',
    headers: e.target.headers ?? {},
    ...(e.target.body !== undefined ? { body: e.target.body } : {}),
  });
  const text = await sample.text();
  let parsed: unknown = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // reported below
  }
  if (sample.status !== 200 || !e.check(parsed)) {
    throw new Error(`${e.name} answered ${sample.status} ${text.slice(0, 500)}`);
  }
  return recordFloor(servers, e, sample, text);
}

/**
 * Each endpoint in rounds of (baseline, endpoint, floor), so ratios compare runs seconds apart. The
 * floor is bare Fastify answering the same request with the endpoint's recorded answer.
 */
async function measureEndpoints(servers: Servers, list: Endpoint[], report: Report) {
  progress('warming up the baseline');
  await load(servers.baselineBase, HELLO_WORLD, WARMUP_SECONDS);
  for (const e of list) {
    const step = report.step();
    const floor = await checkedFloor(servers, e);
    // ROUNDS pairs of (baseline, endpoint), back to back; the row is the pair with the median ratio.
    // On a shared VM a neighbour's burst can halve one run: one pair is an anecdote, three a figure.
    await load(servers.base, e.target, WARMUP_SECONDS);
    await load(servers.floorBase, floor, WARMUP_SECONDS);
    const pairs: {
      before: Measurement;
      m: Measurement;
      ratio: number;
      floorRatio: number;
      floorCpu: number | null;
    }[] = [];
    for (let round = 1; round <= ROUNDS; round++) {
      const before = await load(servers.baselineBase, HELLO_WORLD, MEASURE_SECONDS, servers.baseline);
      const m = await load(servers.base, e.target, MEASURE_SECONDS, servers.service);
      const f = await load(servers.floorBase, floor, MEASURE_SECONDS, servers.floor);
      pairs.push({
        before,
        m,
        ratio: m.rps / before.rps,
        floorRatio: f.rps / before.rps,
        floorCpu: f.cpuUsPerRequest,
      });
      progress(
        `${step} round ${round}/${ROUNDS}: baseline ${fmt.rps(before.rps)} req/s, ${e.name} ` +
          `${fmt.rps(m.rps)} req/s, ${fmt.ratio(m.rps / before.rps)}, ${fmt.cpu(m)}; floor ` +
          `${fmt.rps(f.rps)} req/s, ${fmt.ratio(f.rps / before.rps)}, ${fmt.cpu(f)}`,
      );
    }
    const median = (values: number[]) => [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
    const floorRatio = median(pairs.map((p) => p.floorRatio));
    const { before, m, ratio, floorCpu } = [...pairs].sort((a, b) => a.ratio - b.ratio)[
      Math.floor(ROUNDS / 2)
    ]!;
    report.baselines.push(before);
    report.disturbance.push(m.otherCores);
    // Any failed request in any round fails the row.
    const non2xx = pairs.reduce((sum, p) => sum + p.m.non2xx, 0);
    const errors = pairs.reduce((sum, p) => sum + p.m.errors, 0);
    report.rows.push({
      endpoint: e.name,
      ...m,
      non2xx,
      errors,
      ratio,
      floorRatio,
      floorCpuUsPerRequest: floorCpu,
      target: `≥ ${e.minRatio}× baseline${e.maxP99Ms !== undefined ? `, p99 ≤ ${e.maxP99Ms} ms` : ''}`,
      pass:
        ratio >= e.minRatio &&
        (e.maxP99Ms === undefined || m.p99 <= e.maxP99Ms) &&
        non2xx === 0 &&
        errors === 0,
    });
    report.raw[e.name] = {
      ...m,
      non2xx,
      errors,
      baselineRps: before.rps,
      baselineCpuUsPerRequest: before.cpuUsPerRequest,
      rounds: pairs.map((p) => ({
        baselineRps: p.before.rps,
        rps: p.m.rps,
        ratio: p.ratio,
        floorRatio: p.floorRatio,
      })),
    };
    progress(
      `${step} ${e.name}: median ${fmt.ratio(ratio)} baseline (${fmt.rps(m.rps)} req/s, p99 ` +
        `${fmt.ms(m.p99)} ms), floor ${fmt.ratio(floorRatio)}, non-2xx ${non2xx}, errors ${errors}, ${fmt.cpu(m)}`,
    );
    sampleMemory(report, servers, `after ${e.name}`);
  }
}

// ——— instructions per request (BENCH_CALLGRIND) ———

/** Requests per measured batch under callgrind (each process runs ~40× slower there). */
const CALLGRIND_REQUESTS = 3000;
/** Counted batches per server and endpoint; the lowest is reported. */
const CALLGRIND_BATCHES = 3;

/** Exactly `count` requests at CONNECTIONS connections; any non-2xx or error fails the run. */
async function requests(base: string, target: Target, count: number) {
  const result = await autocannon({ ...requestOptions(base, target), amount: count, timeout: 60 });
  if (result.non2xx > 0 || result.errors > 0 || result.timeouts > 0) {
    throw new Error(`${base}${target.path}: ${result.non2xx} non-2xx, ${result.errors} errors`);
  }
}

/** How many dumps callgrind has written for each process: its files are numbered in that order. */
const callgrindDumps = new Map<Child, number>();

/** Instructions per request of one server answering `target`, counted by callgrind in all its threads. */
async function instructionsPerRequest(child: Child, base: string, target: Target, label: string) {
  const pid = child.process.pid;
  if (!child.callgrindOut || pid === undefined) throw new Error(`${child.name} is not under callgrind`);
  const control = (...args: string[]) =>
    execFileSync('callgrind_control', [...args, String(pid)], { env: child.env, stdio: 'pipe' });
  // Warm with instrumentation off (the JIT's tiers settle; functions run once per connection take
  // longest), then on (valgrind translates the hot code), then count batches from zero.
  await requests(base, target, 4 * CALLGRIND_REQUESTS);
  control('--instr=on');
  await requests(base, target, CALLGRIND_REQUESTS);
  const batches: Array<{ instructions: number; file: string }> = [];
  for (let batch = 1; batch <= CALLGRIND_BATCHES; batch++) {
    control('--zero');
    await requests(base, target, CALLGRIND_REQUESTS);
    control(`--dump=${label}-${batch}`);
    const dumps = (callgrindDumps.get(child) ?? 0) + 1;
    callgrindDumps.set(child, dumps);
    const file = `${child.callgrindOut.replace('%p', String(pid))}.${dumps}`;
    // callgrind_control exits 0 even when it could not reach the process: no file is the sign.
    if (!existsSync(file))
      throw new Error(`callgrind wrote no ${file}: callgrind_control could not reach ${pid}`);
    const summary = /^summary:\s+(\d+)/m.exec(readFileSync(file, 'utf8'));
    if (!summary) throw new Error(`no instruction count in ${file}`);
    batches.push({ instructions: Number(summary[1]) / CALLGRIND_REQUESTS, file });
  }
  control('--instr=off');
  // A major GC's marking and sweeping, or a function compiled again, lands in some batches and not
  // others (one batch read 2.3× another): the lowest is the request path itself.
  const lowest = batches.reduce((a, b) => (b.instructions < a.instructions ? b : a));
  return { ...lowest, batches: batches.map((b) => b.instructions) };
}

/**
 * Self instructions per request of each function in a callgrind dump, by name: callgrind_annotate's
 * list, with JIT code (an address to callgrind) named from the process's --perf-basic-prof map.
 */
function functionsPerRequest(file: string, pid: number): Map<string, number> {
  const jit: Array<[start: number, end: number, name: string]> = [];
  try {
    for (const line of readFileSync(`/tmp/perf-${pid}.map`, 'utf8').split('\n')) {
      const [start, size, ...name] = line.split(' ');
      if (start && size)
        jit.push([
          Number.parseInt(start, 16),
          Number.parseInt(start, 16) + Number.parseInt(size, 16),
          name.join(' '),
        ]);
    }
  } catch {
    // no map: JIT code stays an address
  }
  // Code is written at reused addresses as the JIT goes; the latest entry covering an address wins.
  const nameAt = (address: number) => jit.findLast(([start, end]) => start <= address && address < end)?.[2];
  const annotated = execFileSync('callgrind_annotate', ['--threshold=100', file], {
    encoding: 'utf8',
    maxBuffer: 64 * 2 ** 20,
  });
  const perFunction = new Map<string, number>();
  for (const line of annotated.split('\n')) {
    const m = /^\s*([\d,]+) \([\s\d.]+%\)\s+(.+)$/.exec(line);
    if (!m || m[2]!.includes('PROGRAM TOTALS')) continue;
    const address = /^\?\?\?:0x([0-9a-f]+) \[\?\?\?\]$/.exec(m[2]!);
    const name = address
      ? (nameAt(Number.parseInt(address[1]!, 16)) ?? m[2]!)
      : m[2]!.replace(/^\?\?\?:/, '').replace(/\(.*$/, '');
    perFunction.set(
      name,
      (perFunction.get(name) ?? 0) + Number(m[1]!.replaceAll(',', '')) / CALLGRIND_REQUESTS,
    );
  }
  return perFunction;
}

/** Where the service's instructions per request differ most from the floor's, function by function. */
function functionDifferences(service: Map<string, number>, floor: Map<string, number>, top = 30): string {
  const names = [...new Set([...service.keys(), ...floor.keys()])];
  const diff = (name: string) => (service.get(name) ?? 0) - (floor.get(name) ?? 0);
  names.sort((a, b) => diff(b) - diff(a));
  const row = (name: string) => [
    name.slice(0, 140),
    fmt.integer(service.get(name) ?? 0),
    fmt.integer(floor.get(name) ?? 0),
    `${diff(name) >= 0 ? '+' : ''}${fmt.integer(diff(name))}`,
  ];
  const header = ['function (self instructions per request)', 'service', 'floor', 'difference'];
  return [
    'The service more than the floor:',
    alignedTable(header, names.slice(0, top).map(row), new Set([0])),
    '',
    'The floor more than the service:',
    alignedTable(header, names.slice(-10).reverse().map(row), new Set([0])),
    '',
  ].join('\n');
}

async function measureInstructions(servers: Servers, list: Endpoint[]) {
  const rows: Array<{
    endpoint: string;
    service: number;
    floor: number;
    batches: { service: number[]; floor: number[] };
    files: string[];
  }> = [];
  progress('hello world under callgrind');
  const baseline = await instructionsPerRequest(servers.baseline, servers.baselineBase, HELLO_WORLD, 'hello');
  for (const [i, e] of list.entries()) {
    const floorTarget = await checkedFloor(servers, e);
    const label = slug(e.name);
    const service = await instructionsPerRequest(servers.service, servers.base, e.target, label);
    const floor = await instructionsPerRequest(servers.floor, servers.floorBase, floorTarget, label);
    writeFileSync(
      join(CALLGRIND_DIR!, `${label}.functions.txt`),
      `${e.name}\n\n${functionDifferences(
        functionsPerRequest(service.file, servers.service.process.pid!),
        functionsPerRequest(floor.file, servers.floor.process.pid!),
      )}`,
    );
    rows.push({
      endpoint: e.name,
      service: service.instructions,
      floor: floor.instructions,
      batches: { service: service.batches, floor: floor.batches },
      files: [service.file, floor.file],
    });
    progress(
      `${i + 1}/${list.length} ${e.name}: ${fmt.integer(service.instructions)} instructions/request, floor ${fmt.integer(floor.instructions)}`,
    );
  }
  const header = [
    'endpoint',
    'service instr/req',
    'floor instr/req',
    'service / floor',
    'service / hello world',
    'floor / hello world',
  ];
  const cells = [
    ['hello world (baseline)', fmt.integer(baseline.instructions), '–', '–', '1.00×', '–'],
    ...rows.map((r) => [
      r.endpoint,
      fmt.integer(r.service),
      fmt.integer(r.floor),
      `${(r.service / r.floor).toFixed(2)}×`,
      `${(r.service / baseline.instructions).toFixed(2)}×`,
      `${(r.floor / baseline.instructions).toFixed(2)}×`,
    ]),
  ];
  const date = new Date().toISOString();
  process.stdout.write(
    `\n${date}, the lowest of ${CALLGRIND_BATCHES} batches of ${CALLGRIND_REQUESTS} requests at ${CONNECTIONS} connections; user-space instructions of all threads\n\n` +
      `${alignedTable(header, cells, new Set([0]))}\n\n`,
  );
  const out = join(CALLGRIND_DIR!, 'instructions.json');
  writeFileSync(
    out,
    `${JSON.stringify({ date, requests: CALLGRIND_REQUESTS, batches: CALLGRIND_BATCHES, baseline: baseline.instructions, rows }, null, 2)}\n`,
  );
  progress(`written to ${out}`);
}

/** argon2id capacity around a login run, then logins at twice that capacity beside introspection. */
async function measureLogins(servers: Servers, s: Seed, introspect: Endpoint, report: Report) {
  const { concurrency } = servers.passwordHashing;
  let step = report.step();
  const params = `m=${ARGON2_OPTIONS.memoryCost} KiB, t=${ARGON2_OPTIONS.timeCost}, p=${ARGON2_OPTIONS.parallelism}`;
  progress(`${step} argon2id capacity (${params}) with ${concurrency} in parallel`);
  const capacityBefore = await argon2Capacity(concurrency, ARGON2_SECONDS);
  progress(`${step} argon2id: ${capacityBefore.toFixed(1)} verifications/s`);

  step = report.step();
  const login: Target = {
    method: 'POST',
    path: '/v1/auth/login',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(s.user),
  };
  await load(servers.base, login, WARMUP_SECONDS);
  const logins = await load(servers.base, login, LOGIN_SECONDS, servers.service);
  report.disturbance.push(logins.otherCores);
  // Measured on both sides of the logins, like the baseline beside an endpoint: the reference is what
  // the machine could hash during those seconds, not a minute earlier.
  const capacityAfter = await argon2Capacity(concurrency, ARGON2_SECONDS);
  const capacity = (capacityBefore + capacityAfter) / 2;
  const loginRatio = logins.rps / capacity;
  progress(
    `${step} POST /v1/auth/login: ${logins.rps.toFixed(1)} req/s; argon2id ${capacityAfter.toFixed(1)}/s after ` +
      `it; ${fmt.ratio(loginRatio)} their mean capacity; ${fmt.cpu(logins)}`,
  );

  step = report.step();
  const rate = Math.max(1, Math.round(2 * capacity));
  progress(
    `${step} overload: logins at ${rate}/s (2× capacity), introspection at ${CONNECTIONS} connections`,
  );
  const offered = openLoopLogins(servers.base, login.body!, rate, OVERLOAD_LEAD_SECONDS + OVERLOAD_SECONDS);
  await new Promise((r) => setTimeout(r, OVERLOAD_LEAD_SECONDS * 1000));
  const beside = await load(servers.base, introspect.target, OVERLOAD_SECONDS, servers.service);
  const overload = await offered;
  report.disturbance.push(beside.otherCores);
  progress(
    `${step} overload: introspection p99 ${fmt.ms(beside.p99)} ms; logins ${overload.ok} served, ` +
      `${overload.shed} shed with 503, ${overload.otherStatus} other statuses, ${overload.errors} errors`,
  );

  report.rows.push(
    {
      endpoint: `argon2id capacity, ${concurrency} in parallel (hashes/s)`,
      rps: capacity,
      p50: null,
      p99: null,
      non2xx: null,
      errors: null,
      ratio: null,
      target: '',
      pass: null,
    },
    {
      endpoint: 'POST /v1/auth/login',
      ...logins,
      ratio: loginRatio,
      target: `≥ ${targets.login}× argon2 capacity`,
      pass: loginRatio >= targets.login && logins.non2xx === 0 && logins.errors === 0,
    },
    {
      endpoint: 'POST /oauth/introspect beside logins at 2× capacity',
      ...beside,
      // The server's CPU went mostly to argon2 here; per introspection it would mean nothing.
      cpuUsPerRequest: null,
      ratio: null,
      target: `p99 ≤ ${targets.overloadP99Ms} ms`,
      pass: beside.p99 <= targets.overloadP99Ms && beside.non2xx === 0 && beside.errors === 0,
    },
    {
      endpoint: `POST /v1/auth/login offered at ${rate}/s (2× capacity)`,
      rps: overload.okRps,
      p50: overload.okP50,
      p99: overload.okP99,
      // Shed logins (503 with Retry-After) are the expected answer here, not errors.
      non2xx: overload.otherStatus,
      errors: overload.errors,
      ratio: overload.okRps / capacity,
      target: 'excess shed: 503 + Retry-After',
      pass:
        overload.shed > 0 &&
        overload.shedWithoutRetryAfter === 0 &&
        overload.otherStatus === 0 &&
        overload.errors === 0,
      note:
        `${overload.shed} of ${overload.sent} shed with 503 (${overload.shedWithoutRetryAfter} without ` +
        'Retry-After); the ratio is the served logins against the argon2 capacity',
    },
  );
  report.raw.argon2 = { capacityBefore, capacityAfter, ...ARGON2_OPTIONS, concurrency };
  report.raw.login = logins;
  report.raw.overload = { introspection: beside, logins: overload };
}

type Cleanups = Array<() => Promise<void>>;

type ProcessName = 'service' | 'baseline' | 'floor';

/** Samples the three servers' memory after a stage of the run. */
function sampleMemory(report: Report, servers: Servers, stage: string) {
  report.memory.push({
    stage,
    service: memoryMiB(servers.service.process.pid),
    baseline: memoryMiB(servers.baseline.process.pid),
    floor: memoryMiB(servers.floor.process.pid),
  });
}

/**
 * The memory table: each server's resident set after seeding (idle), after the last endpoint and at
 * the end, and its peak; the service's against the baseline's. The service's caches are bounded LRUs
 * and argon2 takes its memory cost per hash in flight, so the figures should level off, not grow.
 */
function memoryTable(report: Report): string[][] {
  const first = report.memory[0];
  const last = report.memory[report.memory.length - 1];
  const lastEndpoint = [...report.memory]
    .reverse()
    .find((m) => m.stage.startsWith('after ') && !m.stage.includes('login'));
  const mib = (m: { rss: number } | undefined) => (m ? m.rss.toFixed(0) : '–');
  return (['service', 'baseline', 'floor'] as const).map((name) => {
    const peak = last?.[name]?.peak;
    const baselinePeak = last?.baseline?.peak;
    return [
      name === 'service' ? 'service' : name === 'baseline' ? 'baseline (hello world)' : 'floor',
      mib(first?.[name]),
      mib(lastEndpoint?.[name]),
      mib(last?.[name]),
      peak === undefined ? '–' : peak.toFixed(0),
      peak === undefined || baselinePeak === undefined ? '–' : `${(peak / baselinePeak).toFixed(2)}×`,
    ];
  });
}

const MEMORY_HEADER = [
  'process',
  'RSS after seeding, MiB',
  'RSS after the endpoints',
  'RSS at the end',
  'peak RSS',
  'peak vs baseline',
];

class Report {
  rows: Row[] = [];
  baselines: Measurement[] = [];
  /** The cores other processes kept busy during each measured run. */
  disturbance: Array<number | null> = [];
  raw: Record<string, unknown> = {};
  /** Each process's memory after each stage (after seeding, after each endpoint, after the logins). */
  memory: Array<{ stage: string } & Record<ProcessName, { rss: number; peak: number } | undefined>> = [];
  private done = 0;
  constructor(private readonly steps: number) {}
  step() {
    this.done++;
    return `${this.done}/${this.steps}`;
  }
}

/** Above this many cores busy elsewhere during a run, the figures say more about the neighbours. */
const DISTURBED_CORES = 0.25;

function writeReport(report: Report, database: FreshDatabase) {
  const meanBaseline = report.baselines.reduce((a, b) => a + b.rps, 0) / Math.max(1, report.baselines.length);
  const others = report.disturbance.filter((d): d is number => d !== null);
  const meanOthers = others.length ? others.reduce((a, b) => a + b, 0) / others.length : null;
  const date = new Date().toISOString();
  const machine = {
    cpus: os.availableParallelism(),
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGiB: Math.round(os.totalmem() / 2 ** 30),
    node: process.version,
    platform: `${os.platform()} ${os.release()}`,
    database: database.kind,
  };
  const notes = report.rows.filter((r) => r.note).map((r) => `${r.endpoint}: ${r.note}`);
  if (meanOthers !== null && meanOthers > DISTURBED_CORES) {
    notes.push(
      `Other processes kept ${meanOthers.toFixed(2)} of ${machine.cpus} cores busy on average during the ` +
        'runs: the machine was not quiet, and the figures are lower and noisier than it can do.',
    );
  }
  const summary =
    `${date.slice(0, 10)}, ${machine.cpus} × ${machine.cpuModel}, Node ${machine.node}, ` +
    `${machine.database === 'postgres' ? 'PostgreSQL' : 'PGlite'}; ${CONNECTIONS} connections, ` +
    `${ROUNDS} rounds of ${MEASURE_SECONDS} s per endpoint, each after a baseline run, median round shown; ` +
    `baseline (bare Fastify hello world) ${fmt.rps(meanBaseline)} req/s on average.`;

  const memory = memoryTable(report);
  process.stdout.write(
    `\n${summary}\n\n${textTable(report.rows)}\n\n${alignedTable(MEMORY_HEADER, memory, new Set([0]))}\n`,
  );
  for (const note of notes) process.stdout.write(`  ${note}\n`);
  const failed = report.rows.filter((r) => r.pass === false);
  process.stdout.write(
    failed.length === 0
      ? '\nEvery target met.\n'
      : `\nFAIL: ${failed.length} target(s) missed: ${failed.map((r) => r.endpoint).join('; ')}\n`,
  );

  const dir = join(ROOT, 'bench-results');
  mkdirSync(dir, { recursive: true });
  const stamp = date.replace(/[:.]/g, '-');
  const json = JSON.stringify(
    {
      date,
      machine,
      connections: CONNECTIONS,
      seconds: MEASURE_SECONDS,
      rounds: ROUNDS,
      meanBaseline,
      meanOtherCores: meanOthers,
      targets,
      rows: report.rows,
      memoryMiB: report.memory,
      raw: report.raw,
    },
    null,
    2,
  );
  const markdown =
    `${summary}\n\n${markdownTable(report.rows)}\n${notes.map((n) => `\n- ${n}`).join('')}\n\n` +
    `Memory (resident set, MiB):\n\n${markdownGrid(MEMORY_HEADER, memory, new Set([0]))}\n`;
  for (const name of [`bench-${stamp}`, 'latest']) {
    writeFileSync(join(dir, `${name}.json`), `${json}\n`);
    writeFileSync(join(dir, `${name}.md`), markdown);
  }
  progress(`written to bench-results/latest.json and bench-results/latest.md (and bench-${stamp}.*)`);
}

async function main() {
  const cleanups: Cleanups = [];
  const cleanup = async () => {
    for (let next = cleanups.pop(); next; next = cleanups.pop()) await next().catch(() => undefined);
  };
  process.once('SIGINT', () => {
    void cleanup().then(() => process.exit(130));
  });
  try {
    if (CALLGRIND_DIR) {
      try {
        execFileSync('valgrind', ['--version'], { stdio: 'pipe' });
      } catch {
        throw new Error(
          'BENCH_CALLGRIND needs valgrind (Debian package valgrind), which is not on this machine',
        );
      }
      mkdirSync(CALLGRIND_DIR, { recursive: true });
    }
    const database = await freshDatabase();
    cleanups.push(() => database.drop());
    progress(`database: ${database.kind === 'postgres' ? 'a fresh PostgreSQL database' : 'PGlite'}`);
    progress('starting the service and the baseline');
    const servers = await startServers(database, cleanups);
    progress('seeding through the API: admin login, app client, API key, user');
    const s = await seed(servers);
    const all = endpoints(s, servers.admin.email);
    // BENCH_ONLY=introspect,me runs only the endpoints whose name contains one of the words ('login'
    // for the argon2, login and overload steps): for working on one path, never for the README.
    const only = process.env.BENCH_ONLY?.split(',').filter(Boolean);
    const selected = all.filter((e) => !only || only.some((o) => e.name.includes(o)));
    const withLogins = !only || only.includes('login');
    const report = new Report(selected.length + (withLogins ? 3 : 0));
    if (CALLGRIND_DIR) {
      await measureInstructions(servers, selected);
      return;
    }
    sampleMemory(report, servers, 'seeded');
    await measureEndpoints(servers, selected, report);
    if (withLogins) {
      await measureLogins(servers, s, all.find((e) => e.name.includes('introspect'))!, report);
      sampleMemory(report, servers, 'after the logins');
    }
    writeReport(report, database);
  } finally {
    progress('stopping the children and dropping the database');
    await cleanup();
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    process.stderr.write(`bench failed: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exit(1);
  },
);
