// Creates an admin, or grants `admin` to an existing user, from the command line (idempotent):
//   npm run create-admin -- --email admin@example.com [--password ...]
// The password may also come from ADMIN_PASSWORD or, on a terminal, a prompt: a --password flag is
// visible to other local users in the process list and stays in the shell history.
import { createInterface } from 'node:readline/promises';
import { Writable } from 'node:stream';
import { parseArgs } from 'node:util';
import { openScriptContext, runScript, UsageError } from './lib/script-context.js';

const USAGE = `usage: npm run create-admin -- --email <email> [--password <password>]

Creates the user with the admin role, or grants admin to the existing user with that email.
The password is needed only to create the user; it may also come from ADMIN_PASSWORD, or is asked
for when run on a terminal. Given for an existing user, it must be that user's password (otherwise
nothing changes, exit code 1); without one, the existing user is granted admin as it is.`;

async function parseInput(): Promise<{ email: string; password: string | undefined }> {
  let values: { email?: string[] | undefined; password?: string[] | undefined; help?: boolean | undefined };
  try {
    ({ values } = parseArgs({
      options: {
        // Taken as lists only to refuse a second one: parseArgs keeps the last silently, and
        // `--email a --email b` would make b an administrator whichever the operator meant.
        email: { type: 'string', multiple: true },
        password: { type: 'string', multiple: true },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  for (const name of ['email', 'password'] as const) {
    const given = values[name]?.length ?? 0;
    if (given > 1) throw new UsageError(`--${name} is given ${given} times: give it once`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const email = values.email?.[0]?.trim();
  if (!email) throw new UsageError('--email is required');
  // Registration's and sign-in's rule (at most 254 characters, RFC 5321): an admin made with an
  // address they refuse could never sign in. Loaded only now: --help and a malformed command line
  // are answered without it.
  const { EmailSchema } = await import('../src/modules/auth/auth.schema.js');
  if (!EmailSchema.safeParse(email).success) throw new UsageError(`not an email address: ${email}`);
  const password = values.password?.[0] ?? process.env.ADMIN_PASSWORD;
  return { email, password: password === '' ? undefined : password };
}

/** Reads a line from the terminal without echoing it. */
async function promptHidden(question: string): Promise<string> {
  process.stdout.write(question);
  const muted = new Writable({ write: (_chunk, _encoding, done) => done() });
  const rl = createInterface({ input: process.stdin, output: muted, terminal: true });
  rl.on('SIGINT', () => {
    process.stdout.write('\n');
    process.exit(130);
  });
  try {
    return await rl.question('');
  } finally {
    rl.close();
    process.stdout.write('\n');
  }
}

async function askPassword(email: string): Promise<string> {
  const first = await promptHidden(`Password for ${email}: `);
  const second = await promptHidden('Repeat the password: ');
  if (first !== second) throw new UsageError('the passwords do not match');
  return first;
}

async function main() {
  const input = await parseInput();
  const { systemContext } = await import('../src/modules/audit/audit.service.js');
  const { services, close } = await openScriptContext();
  try {
    let password = input.password;
    if (password === undefined && !(await services.repos.users.findByEmail(input.email.toLowerCase()))) {
      if (!process.stdin.isTTY)
        throw new UsageError(
          `a password is needed to create ${input.email}: pass --password, set ADMIN_PASSWORD or run on a terminal`,
        );
      password = await askPassword(input.email);
    }
    // The audit trail names the door the change came through.
    const context = { ...systemContext, userAgent: 'scripts/create-admin' };
    const result = await services.auth.bootstrapAdmin({ email: input.email, password, force: true }, context);
    const user = result.user;
    const who = user ? `${user.email} (id ${user.id})` : input.email;
    if (result.created) process.stdout.write(`created admin ${who}\n`);
    else if (result.granted) process.stdout.write(`granted the admin role to the existing user ${who}\n`);
    else process.stdout.write(`${who} already holds the admin role; nothing changed\n`);
    if (user && user.status !== 'active')
      process.stdout.write(`note: the account is ${user.status}; it cannot sign in until it is activated\n`);
  } finally {
    await close();
  }
}

await runScript(main, USAGE);
