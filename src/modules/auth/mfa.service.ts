import { PasswordReplaced } from './password-replaced.js';
import { minutes } from './mailed-tokens.js';
import { randomBytes, randomInt } from 'node:crypto';
import { Secret, TOTP } from 'otpauth';
import type { Database, Executor } from '../../db/client.js';
import { addSeconds, type Clock } from '../../lib/clock.js';
import {
  decrypt,
  digestsEqual,
  encrypt,
  generateSecret,
  KEY_ENCRYPTION_KEY_REMEDY,
  KeyEncryptionKeyMismatchError,
  keyedHash,
  MFA_TOKEN_FORMAT,
  parseSecret,
} from '../../lib/crypto.js';
import { AppError, notFound } from '../../lib/errors.js';
import { credentialNoLongerStands } from '../../plugins/authenticate.js';
import { type AuthEvent, type EventBus, inTransaction } from '../../lib/events.js';
import type { Logger } from 'pino';
import type { MailOutbox } from '../mail/mail-outbox.js';
import type { AuditEventType, AuditService, RequestContext } from '../audit/audit.service.js';
import type { UserRow, UsersRepository } from '../users/users.repository.js';
import type { MfaFactorRow, MfaRecoveryCodeRow, MfaRepository } from './mfa.repository.js';
import type { SessionsService, SessionTokens } from './sessions.service.js';

/** RFC 6238 as every authenticator app reads it: SHA-1, six digits, 30-second steps. */
const TOTP_PARAMETERS = { algorithm: 'SHA1', digits: 6, period: 30 } as const;
/** Codes one step either side of now are accepted (RFC 6238 §5.2: clock drift, typing time). */
const TOTP_WINDOW = 1;
/** 160 bits, RFC 4226 §4's recommended secret length. */
const TOTP_SECRET_BYTES = 20;
export const RECOVERY_CODE_COUNT = 10;
/** Crockford's base32 without look-alikes: 10 characters are 50 bits, shown as two groups of five. */
const RECOVERY_ALPHABET = '0123456789abcdefghjkmnpqrstvwxyz';
const RECOVERY_CODE_LENGTH = 10;
/** Each recovery code's own salt: 128 random bits (ASVS 2.6.2 asks for 32 at least). */
const RECOVERY_SALT_BYTES = 16;
/** Wrong codes in a row that lock nothing; each further one locks the factor, for longer every time. */
export const MFA_FREE_ATTEMPTS = 5;
const MFA_MAX_LOCK_SECONDS = 3600;
/** How long a wrong code counts toward the lock. */
const FAILURE_MEMORY_MS = 24 * 3600_000;
/** At most one notice of a code sent again per user in this long, however many replays (no mail bomb). */
const REUSE_NOTICE_INTERVAL_MS = 15 * 60_000;

export type SecondFactor = 'totp' | 'recovery_code';

export interface MfaServiceDeps {
  db: Database;
  repo: MfaRepository;
  users: UsersRepository;
  sessions: SessionsService;
  audit: AuditService;
  events: EventBus;
  clock: Clock;
  pepper: Buffer;
  keyEncryptionKey: Buffer;
  /** The name authenticator apps show beside the account (MFA_ISSUER). */
  issuer: string;
  /** How long a sign-in waits for its second factor (MFA_CHALLENGE_TTL). */
  challengeTtlSeconds: number;
  /** How long a set-up waits for the code that confirms it (MFA_SETUP_TTL); then it is as if never begun. */
  setupTtlSeconds: number;
  onLogin?: (outcome: 'success' | 'failure' | 'locked') => void;
  /**
   * Whether the service can prove an address (Supabase does, or a mailer sends confirmation links):
   * then a second factor needs a confirmed address, so whoever registered someone else's address
   * first cannot lock its owner out with an authenticator of their own.
   */
  requireConfirmedEmail: boolean;
  /** MFA_REQUIRED_ROLES: while the user holds one, they do not turn their second factor off. */
  mfaRequiredRoles: readonly string[];
  /** Notices to the user when two-step verification is turned on or off (not awaited). */
  outbox: MailOutbox | undefined;
  logger?: Pick<Logger, 'warn'>;
}

/** What a sign-in's first factor adds to `amr` (RFC 8176; `email` for a mailed link, unregistered). */
const FIRST_FACTOR_AMR: Record<string, readonly string[]> = {
  'auth.login': ['pwd'],
  'auth.magic_link': ['email'],
};

export interface MfaStatus {
  enabled: boolean;
  /** An enrolment begun and not yet proven by a code. */
  pending: boolean;
  factor: {
    id: string;
    type: 'totp';
    created_at: Date;
    verified_at: Date | null;
    last_used_at: Date | null;
  } | null;
  recovery_codes_remaining: number;
}

/** A code as people type it: spaces and dashes dropped, letters in lower case. */
const normalizeCode = (code: string) => code.replace(/[\s-]/g, '').toLowerCase();

/** Seconds a factor stays locked after its `failures`-th wrong code in a row (0: not locked). */
export function lockSeconds(failures: number): number {
  if (failures <= MFA_FREE_ATTEMPTS) return 0;
  return Math.min(60 * 2 ** (failures - MFA_FREE_ATTEMPTS - 1), MFA_MAX_LOCK_SECONDS);
}

/**
 * What a recovery code is stored as: HMAC-SHA-256 under the pepper of its salt and the code as typed
 * (normalized), ASVS 2.6.2 for a secret under 112 bits. `salt` null: a code stored before salts
 * (migration 0022), hashed as it was then, of the code alone.
 */
export function recoveryCodeHash(pepper: Buffer, code: string, salt: string | null): string {
  const typed = normalizeCode(code);
  return salt === null
    ? keyedHash(pepper, `mfa-recovery:${typed}`)
    : keyedHash(pepper, `mfa-recovery-salted:${salt}:${typed}`);
}

function newRecoveryCode(): string {
  let code = '';
  for (let i = 0; i < RECOVERY_CODE_LENGTH; i++)
    code += RECOVERY_ALPHABET[randomInt(RECOVERY_ALPHABET.length)];
  return `${code.slice(0, 5)}-${code.slice(5)}`;
}

const invalidCode = (detail = 'The code is incorrect, expired or already used') =>
  new AppError('invalid_mfa_code', { detail, errors: [{ field: 'body.code', message: 'is incorrect' }] });

const invalidMfaToken = () =>
  new AppError('invalid_mfa_token', {
    detail: 'The sign-in challenge is invalid, expired or used; sign in again',
    errors: [{ field: 'body.mfa_token', message: 'is invalid, expired or used' }],
  });

type CheckOutcome =
  | { ok: true; used: SecondFactor; step: number | null }
  | {
      ok: false;
      /**
       * `code_reused`, `recovery_code_used`: a right code already used (a double submit, or the same
       * recovery code from two sign-ins), refused but not counted.
       */
      reason: 'wrong_code' | 'code_reused' | 'recovery_code_used' | 'locked';
      /** Seconds the factor is locked for now (0: not locked). */
      lockSeconds: number;
      /** The notice of a code sent again, written on the check's transaction: to `kick` once it commits. */
      mails?: string[];
    };

/**
 * TOTP second factors (RFC 6238) for every sign-in, whichever provider checked the first factor: a
 * user with a verified factor gets a challenge (`mfa_token`) instead of a session, and the session
 * opens at `verify` with a code from their app or one of their recovery codes.
 *
 * Guessing is bounded per factor, in the database (so across instances and restarts): five wrong
 * codes in a row lock nothing, each further one locks the factor for twice as long as the one before
 * (1 minute, 2, 4… up to an hour), whichever route the code came to, and a day after the last wrong
 * one the count starts again. So a thief who has the password gets about 30 guesses a day at a million
 * codes (three of them good at a time). A TOTP code is good once: the newest step used is kept and
 * older or equal ones are refused (RFC 6238 §5.2).
 */
export function createMfaService(deps: MfaServiceDeps) {
  const challengeHash = (token: string) => keyedHash(deps.pepper, `mfa-challenge:${token}`);
  /** A set-up not confirmed within MFA_SETUP_TTL: not activated, not shown, purged by the housekeeping. */
  const setUpExpired = (factor: Pick<MfaFactorRow, 'createdAt' | 'verifiedAt'>, now: Date) =>
    factor.verifiedAt === null && now.getTime() - factor.createdAt.getTime() >= deps.setupTtlSeconds * 1000;
  /**
   * What a removal (`repo.removeAll`) took: `on` (a verified factor: sign-ins asked for it), `pending`
   * (a set-up still under way), `expired` (a set-up past MFA_SETUP_TTL, as if never begun, which the
   * purge had not reached yet) or nothing.
   */
  const removedAs = (
    factor: Pick<MfaFactorRow, 'createdAt' | 'verifiedAt'> | undefined,
  ): 'on' | 'pending' | 'expired' | undefined => {
    if (!factor) return undefined;
    if (factor.verifiedAt) return 'on';
    return setUpExpired(factor, deps.clock.now()) ? 'expired' : 'pending';
  };

  const totpOf = (factor: Pick<MfaFactorRow, 'secretEncrypted'>, label: string) =>
    new TOTP({
      ...TOTP_PARAMETERS,
      issuer: deps.issuer,
      label,
      secret: Secret.fromBase32(decrypt(deps.keyEncryptionKey, factor.secretEncrypted)),
    });

  /**
   * The TOTP step a code belongs to, if it is one of the window's and newer than the last used;
   * `reused` for one of the window's already used (or older than the last used).
   */
  function totpStep(factor: MfaFactorRow, code: string, at: number): number | 'reused' | null {
    if (!/^\d{6}$/.test(code)) return null;
    const delta = totpOf(factor, '').validate({ token: code, timestamp: at, window: TOTP_WINDOW });
    if (delta === null) return null;
    const step = Math.floor(at / 1000 / TOTP_PARAMETERS.period) + delta;
    if (factor.lastUsedStep !== null && step <= factor.lastUsedStep) return 'reused';
    return step;
  }

  /**
   * Checks a code against the user's factor (locked FOR UPDATE by the caller), counting a wrong one.
   * Whatever it returns is to be committed: a wrong code's count must stay even though the request fails.
   */
  async function check(
    tx: Executor,
    factor: MfaFactorRow,
    rawCode: string,
    accept: { recoveryCodes: boolean },
    user: Pick<UserRow, 'id' | 'email'> | undefined,
  ): Promise<CheckOutcome> {
    const now = deps.clock.now();
    if (factor.lockedUntil && factor.lockedUntil > now) {
      const left = Math.max(1, Math.ceil((factor.lockedUntil.getTime() - now.getTime()) / 1000));
      return { ok: false, reason: 'locked', lockSeconds: left };
    }
    const code = normalizeCode(rawCode);
    const found = totpStep(factor, code, now.getTime());
    if (found === 'reused')
      return {
        ok: false,
        reason: 'code_reused',
        lockSeconds: 0,
        mails: await noticeReuse(tx, factor, user, now),
      };
    const step = found;
    let used: SecondFactor | null = step !== null ? 'totp' : null;
    if (used === null && accept.recoveryCodes && code.length === RECOVERY_CODE_LENGTH) {
      const match = await findRecoveryCode(tx, factor.userId, code);
      if (match?.usedAt === null && (await deps.repo.useRecoveryCode(match.id, now, tx)))
        used = 'recovery_code';
      // One of the user's own codes, spent a moment ago (the same code sent from two sign-ins, or
      // twice): not a guess, and not counted toward the lock, as an app code used again is not.
      else if (match) return { ok: false, reason: 'recovery_code_used', lockSeconds: 0 };
    }
    if (used === null) {
      // A count whose last wrong code is a day old starts again: an old typo is no step toward a lock.
      const counted =
        factor.lastFailedAt && now.getTime() - factor.lastFailedAt.getTime() < FAILURE_MEMORY_MS
          ? factor.failedAttempts
          : 0;
      const failures = counted + 1;
      const lock = lockSeconds(failures);
      await deps.repo.updateFactor(
        factor.id,
        { failedAttempts: failures, lastFailedAt: now, lockedUntil: lock ? addSeconds(now, lock) : null },
        tx,
      );
      return { ok: false, reason: 'wrong_code', lockSeconds: lock };
    }
    await deps.repo.updateFactor(
      factor.id,
      {
        failedAttempts: 0,
        lockedUntil: null,
        lastUsedAt: now,
        ...(step !== null ? { lastUsedStep: step } : {}),
      },
      tx,
    );
    return { ok: true, used, step };
  }

  /**
   * The user's recovery code that `code` is, used or not (an unused one first), if any. Each is
   * salted on its own, so the code is hashed with every row's salt and compared in constant time with
   * every row, whichever matched (ten at most): how long it takes tells nothing of which, or whether.
   */
  async function findRecoveryCode(
    tx: Executor,
    userId: string,
    code: string,
  ): Promise<MfaRecoveryCodeRow | undefined> {
    let match: MfaRecoveryCodeRow | undefined;
    for (const row of await deps.repo.recoveryCodes(userId, tx)) {
      const equal = digestsEqual(recoveryCodeHash(deps.pepper, code, row.salt), row.codeHash);
      if (equal && (match === undefined || match.usedAt !== null)) match = row;
    }
    return match;
  }

  /**
   * ASVS 2.8.5: the holder hears of an app code sent again (whoever saw it, with the password or a
   * session, may be replaying it), at most once per REUSE_NOTICE_INTERVAL_MS: the factor's row is
   * locked by the caller, so concurrent replays see each other's mark, on every instance.
   */
  async function noticeReuse(
    tx: Executor,
    factor: MfaFactorRow,
    user: Pick<UserRow, 'id' | 'email'> | undefined,
    now: Date,
  ): Promise<string[]> {
    if (!user || !deps.outbox) return [];
    if (factor.reuseNoticedAt && now.getTime() - factor.reuseNoticedAt.getTime() < REUSE_NOTICE_INTERVAL_MS)
      return [];
    await deps.repo.updateFactor(factor.id, { reuseNoticedAt: now }, tx);
    return notice.codeReused(tx, user);
  }

  /** The error of a failed check: 429 while locked (the code that locks included), else 400 naming the code. */
  function refusal(outcome: Exclude<CheckOutcome, { ok: true }>): AppError {
    if (outcome.lockSeconds > 0) {
      return new AppError('rate_limited', {
        detail: 'Too many wrong codes; try again later',
        headers: { 'retry-after': String(outcome.lockSeconds) },
      });
    }
    if (outcome.reason === 'code_reused')
      return invalidCode('This code was used already; wait for the next one');
    if (outcome.reason === 'recovery_code_used') return invalidCode('This recovery code was used already');
    return invalidCode();
  }

  /** What a refused check's audit event says: why, and how long it locked the factor. */
  const refusalData = (outcome: Exclude<CheckOutcome, { ok: true }>, prefix = '') => ({
    reason: `${prefix}${outcome.reason}`,
    ...(outcome.reason === 'wrong_code' && outcome.lockSeconds > 0
      ? { locked_for_seconds: outcome.lockSeconds }
      : {}),
    ...(outcome.mails?.length ? { user_notified: true } : {}),
  });

  /**
   * A notice to the user about their second factor, written on `tx`, the change's transaction
   * (mail-outbox.ts `notice`): the ids to `kick` once it commits (none without an outbox).
   */
  async function notify(
    tx: Executor,
    user: Pick<UserRow, 'id' | 'email'> | undefined,
    subject: string,
    text: string,
  ): Promise<string[]> {
    if (!user || !deps.outbox) return [];
    return [await deps.outbox.notice(tx, user, subject, text)];
  }
  const notice = {
    enabled: (tx: Executor, user: Pick<UserRow, 'id' | 'email'> | undefined) =>
      notify(
        tx,
        user,
        'Two-step verification is on',
        'Two-step verification was turned on for your account: signing in now asks for a code from your ' +
          'authenticator app. If this was not you, reset your password and contact support.',
      ),
    disabled: (
      tx: Executor,
      user: Pick<UserRow, 'id' | 'email'> | undefined,
      byAdministrator: boolean,
      signedOut = false,
    ) =>
      notify(
        tx,
        user,
        'Two-step verification is off',
        `Two-step verification was turned off for your account${byAdministrator ? ' by an administrator' : ''}: ` +
          'signing in asks for your password only' +
          (signedOut ? ', and every other session was signed out' : '') +
          '. If this was not you, reset your password and contact support.',
      ),
    codeReused: (tx: Executor, user: Pick<UserRow, 'id' | 'email'>) =>
      notify(
        tx,
        user,
        'A used two-step verification code was entered again',
        'A code from your authenticator app that had been used already was entered again for your account, ' +
          'and refused: each code works once. If you sent it twice yourself, there is nothing to do. If not, ' +
          'someone who saw the code may also have your password or a signed-in session: change your password, ' +
          'sign out everywhere and contact support.',
      ),
    recoveryCodes: (tx: Executor, user: Pick<UserRow, 'id' | 'email'> | undefined) =>
      notify(
        tx,
        user,
        'New recovery codes for two-step verification',
        'New recovery codes were made for your account: the earlier ones no longer work. Whoever has them ' +
          'can sign in without your authenticator app. If this was not you, sign out everywhere, make new ' +
          'recovery codes, reset your password and contact support.',
      ),
  };

  /** Serializes one user's MFA changes (two enrolments at once would both find no factor). */
  /**
   * Serializes one user's changes of their factor, and orders them with sign-ins: the user's row
   * first (FOR NO KEY UPDATE), as a sign-in opening a session takes it (FOR SHARE), so a session a
   * concurrent sign-in opens is either there to be ended or sees the factor and asks for a code.
   */
  const lockUser = (tx: Executor, userId: string) => deps.users.findByIdForUpdate(userId, tx);

  /**
   * Whether the request's credential still stands, read under the user's row lock (taken first, as
   * ending every session and a disable take it): the user active, and the session its token belongs
   * to (`sessionId`, when it has one) live, share-locked until the change commits. The request was
   * authenticated before it waited for that lock: a sign-out (everywhere or of this session), a
   * password change or reset, or a disable committed meanwhile would otherwise not stop it, and a
   * session that had just ended turned a factor on, off, or was handed new recovery codes.
   */
  async function assertStands(
    tx: Executor,
    user: UserRow | undefined,
    sessionId: string | null | undefined,
  ): Promise<void> {
    if (user?.status !== 'active') throw credentialNoLongerStands();
    if (sessionId == null) return;
    const session = await deps.sessions.liveForShare(tx, sessionId);
    if (session?.userId !== user.id) throw credentialNoLongerStands();
  }

  /** The session a user's request came with (`RequestContext.credentialId`), if any. */
  const sessionOf = (context: RequestContext) =>
    context.actorType === 'user' ? context.credentialId : undefined;

  async function removeFactor(tx: Executor, userId: string) {
    await lockUser(tx, userId);
    return removedAs(await deps.repo.removeAll(userId, tx));
  }

  async function newRecoveryCodes(tx: Executor, userId: string): Promise<string[]> {
    const codes = Array.from({ length: RECOVERY_CODE_COUNT }, newRecoveryCode);
    const stored = codes.map((code) => {
      const salt = randomBytes(RECOVERY_SALT_BYTES).toString('base64url');
      return { salt, codeHash: recoveryCodeHash(deps.pepper, code, salt) };
    });
    await deps.repo.replaceRecoveryCodes(userId, stored, deps.clock.now(), tx);
    return codes;
  }

  /**
   * Runs a management change that needs a current code: `work` runs only after the code passed, in
   * the same transaction; a wrong code is counted (committed) and refused.
   */
  async function withCode<T>(
    userId: string,
    code: string,
    accept: { recoveryCodes: boolean; verified: boolean },
    context: RequestContext,
    action: AuditEventType,
    work: (
      tx: Executor,
      factor: MfaFactorRow,
      used: SecondFactor,
      emit: (event: AuthEvent) => void,
      /** The user, as locked for the change (for its notice). */
      user: UserRow | undefined,
    ) => Promise<T>,
  ): Promise<T> {
    const outcome = await inTransaction(deps.db, deps.events, async (tx, emit) => {
      const user = await lockUser(tx, userId);
      await assertStands(tx, user, sessionOf(context));
      const factor = await deps.repo.findFactor(userId, { lock: true }, tx);
      if (!factor || (factor.verifiedAt !== null) !== accept.verified)
        return { kind: 'state' as const, factor };
      // Before the code is looked at: an expired set-up's secret proves nothing, and counts nothing.
      if (setUpExpired(factor, deps.clock.now())) return { kind: 'expired' as const };
      const checked = await check(tx, factor, code, accept, user);
      if (!checked.ok) {
        await deps.audit.record(tx, context, {
          type: action,
          outcome: 'failure',
          subjectId: userId,
          data: refusalData(checked),
        });
        return { kind: 'refused' as const, checked };
      }
      return { kind: 'done' as const, value: await work(tx, factor, checked.used, emit, user) };
    });
    if (outcome.kind === 'done') return outcome.value;
    if (outcome.kind === 'refused') {
      deps.outbox?.kick(outcome.checked.mails ?? []);
      throw refusal(outcome.checked);
    }
    if (outcome.kind === 'expired') {
      throw new AppError('conflict', {
        detail:
          `The set-up expired: it is confirmed within ${minutes(deps.setupTtlSeconds)} of its start. ` +
          'Begin again: POST /v1/auth/mfa/totp',
      });
    }
    throw new AppError('conflict', {
      detail: accept.verified
        ? 'Two-step verification is not on for this account'
        : outcome.factor
          ? 'Two-step verification is on already'
          : 'Begin the set-up first: POST /v1/auth/mfa/totp',
    });
  }

  /** Writes a sign-in's challenge on `tx` (audited) and gives the `mfa_required` refusal carrying its token. */
  async function writeChallenge(
    tx: Executor,
    user: UserRow,
    via: 'auth.login' | 'auth.exchange' | 'auth.magic_link',
    context: RequestContext,
  ): Promise<AppError> {
    const { token } = generateSecret(MFA_TOKEN_FORMAT);
    const now = deps.clock.now();
    await deps.repo.insertChallenge(
      {
        userId: user.id,
        tokenHash: challengeHash(token),
        via,
        ip: context.ip,
        userAgent: context.userAgent,
        createdAt: now,
        expiresAt: addSeconds(now, deps.challengeTtlSeconds),
      },
      tx,
    );
    // By whoever gave the first factor, not yet the user (as a wrong code then is): someone unknown in
    // the account's activity, with where from.
    await deps.audit.record(tx, context, { type: 'auth.mfa_challenge', subjectId: user.id, data: { via } });
    return new AppError('mfa_required', {
      detail: 'Enter a code from your authenticator app (or a recovery code) at POST /v1/auth/mfa/verify',
      extensions: {
        mfa_token: token,
        mfa_token_expires_in: deps.challengeTtlSeconds,
        mfa_methods: ['totp', 'recovery_code'],
      },
    });
  }

  return {
    /**
     * At start: the stored factors' secrets open with this KEY_ENCRYPTION_KEY. A changed key would
     * otherwise start a service whose users with two-step verification cannot sign in (every code an
     * error), once new signing keys had been made after the signing keys' own refusal.
     */
    async assertSecretsReadable(): Promise<void> {
      const sealed = await deps.repo.newestSecret();
      if (sealed === undefined) return;
      try {
        decrypt(deps.keyEncryptionKey, sealed);
      } catch (err) {
        throw new KeyEncryptionKeyMismatchError(
          'the secrets of two-step verification cannot be decrypted with KEY_ENCRYPTION_KEY: it is not ' +
            `the key they were encrypted with. ${KEY_ENCRYPTION_KEY_REMEDY}`,
          { cause: err },
        );
      }
    },

    async status(userId: string): Promise<MfaStatus> {
      const found = await deps.repo.findFactor(userId);
      const factor = found && !setUpExpired(found, deps.clock.now()) ? found : undefined;
      const enabled = factor?.verifiedAt != null;
      return {
        enabled,
        pending: factor !== undefined && !enabled,
        factor: factor
          ? {
              id: factor.id,
              type: factor.type,
              created_at: factor.createdAt,
              verified_at: factor.verifiedAt,
              last_used_at: factor.lastUsedAt,
            }
          : null,
        recovery_codes_remaining: enabled ? await deps.repo.countUnusedRecoveryCodes(userId) : 0,
      };
    },

    /** Whether the user's sign-ins ask for a second factor. */
    /** With `forShare` (a grant of an MFA_REQUIRED_ROLES role), the factor cannot go before `tx` ends. */
    isEnabled: (userId: string, tx?: Executor, forShare = false) =>
      deps.repo.hasVerifiedFactor(userId, tx, forShare),

    /**
     * Begins a TOTP enrolment: a new secret for the user's app (replacing one begun before and not
     * proven). The secret is shown this once; sign-ins ask for codes only after `activate`. Audited
     * (`mfa.setup_started`, never the secret): whoever holds the session and the password can begin
     * one, and the account's activity shows it.
     */
    async enroll(userId: string, sessionId: string, context: RequestContext) {
      const user = await deps.users.findById(userId);
      if (!user) throw notFound('user');
      if (deps.requireConfirmedEmail && !user.emailConfirmedAt) {
        throw new AppError('email_not_confirmed', {
          detail: 'Confirm your email address before setting up two-step verification',
        });
      }
      const secret = new Secret({ size: TOTP_SECRET_BYTES });
      const factor = await inTransaction(deps.db, deps.events, async (tx) => {
        await assertStands(tx, await lockUser(tx, user.id), sessionId);
        const started = await deps.repo.replacePending(
          {
            userId: user.id,
            type: 'totp',
            secretEncrypted: encrypt(deps.keyEncryptionKey, secret.base32),
            createdAt: deps.clock.now(),
          },
          tx,
        );
        if (started)
          await deps.audit.record(tx, context, {
            type: 'mfa.setup_started',
            subjectId: user.id,
            data: { factor_id: started.id, type: started.type },
          });
        return started;
      });
      if (!factor) {
        throw new AppError('conflict', {
          detail: 'Two-step verification is on already; turn it off first to set up another app',
        });
      }
      const totp = new TOTP({ ...TOTP_PARAMETERS, issuer: deps.issuer, label: user.email, secret });
      return {
        factor_id: factor.id,
        type: 'totp' as const,
        secret: secret.base32,
        otpauth_uri: totp.toString(),
        algorithm: TOTP_PARAMETERS.algorithm,
        digits: TOTP_PARAMETERS.digits,
        period: TOTP_PARAMETERS.period,
      };
    },

    /**
     * Proves the enrolment with a code from the app: sign-ins ask for codes from now on. Every other
     * session of the user ends (they were opened without the second factor); this one, which just
     * gave a code, carries `otp` and `mfa` in its `amr` from its next refresh.
     */
    async activate(
      userId: string,
      sessionId: string,
      code: string,
      context: RequestContext,
    ): Promise<string[]> {
      const { codes, mails } = await withCode(
        userId,
        code,
        { recoveryCodes: false, verified: false },
        context,
        'mfa.enabled',
        async (tx, factor, _used, emit, user) => {
          await deps.repo.updateFactor(factor.id, { verifiedAt: deps.clock.now() }, tx);
          const codes = await newRecoveryCodes(tx, userId);
          const ended = await deps.sessions.endAllSessions(tx, userId, 'mfa_enabled', sessionId);
          ended.forEach(emit);
          await deps.sessions.strengthen(tx, sessionId, ['otp', 'mfa']);
          await deps.audit.record(tx, context, {
            type: 'mfa.enabled',
            subjectId: userId,
            data: { factor_id: factor.id, type: factor.type, other_sessions_ended: ended.length > 0 },
          });
          return { codes, mails: await notice.enabled(tx, user) };
        },
      );
      deps.outbox?.kick(mails);
      return codes;
    },

    /**
     * Turns two-step verification off, with a current code (from the app, or a recovery code). Every
     * other session of the user ends, as when it is turned on; this one, which gave the code, stays.
     */
    async deactivate(
      userId: string,
      sessionId: string,
      code: string,
      context: RequestContext,
    ): Promise<void> {
      const mails = await withCode(
        userId,
        code,
        { recoveryCodes: true, verified: true },
        context,
        'mfa.disabled',
        async (tx, factor, used, emit, user) => {
          // A role of MFA_REQUIRED_ROLES goes only to users with a second factor; turning it off
          // while holding one would leave whoever has the password to set up a factor of their own
          // and hold the role. The factor is locked: a grant racing this waits, and is seen here.
          const held = (await deps.users.rolesAndPermissions(userId, tx)).roles.filter((r) =>
            deps.mfaRequiredRoles.includes(r),
          );
          if (held.length > 0) {
            throw new AppError('conflict', {
              detail:
                `Two-step verification stays on while you hold the ${held.join(', ')} role: ` +
                'an administrator takes the role first, or resets the factor for a lost app',
            });
          }
          await deps.repo.removeAll(userId, tx);
          const ended = await deps.sessions.endAllSessions(tx, userId, 'mfa_disabled', sessionId);
          ended.forEach(emit);
          await deps.audit.record(tx, context, {
            type: 'mfa.disabled',
            subjectId: userId,
            data: { factor_id: factor.id, with: used, other_sessions_ended: ended.length > 0 },
          });
          return notice.disabled(tx, user, false, ended.length > 0);
        },
      );
      deps.outbox?.kick(mails);
    },

    /**
     * A current code (from the app, or a recovery code, used up) for an action that must be the
     * account holder's; a wrong one counts toward the lock and is audited as a failure of `action`.
     */
    async confirm(
      userId: string,
      code: string,
      action: AuditEventType,
      context: RequestContext,
    ): Promise<void> {
      await this.confirmWithin(userId, code, action, context, async () => undefined);
    },

    /**
     * `confirm`, with the action's own writes (`work`) in the transaction that spends the code, the
     * user's row locked: an action refused there, by throwing, spends no code.
     */
    confirmWithin<T>(
      userId: string,
      code: string,
      action: AuditEventType,
      context: RequestContext,
      work: (tx: Executor) => Promise<T>,
    ): Promise<T> {
      return withCode(userId, code, { recoveryCodes: true, verified: true }, context, action, (tx) =>
        work(tx),
      );
    },

    /**
     * A new set of recovery codes (the old ones stop working), with a code from the app. The user hears
     * of it, as of the factor turned on or off: codes made by whoever held a session and one code
     * would sign in past the app for as long as they last.
     */
    async regenerateRecoveryCodes(userId: string, code: string, context: RequestContext): Promise<string[]> {
      const { codes, mails } = await withCode(
        userId,
        code,
        { recoveryCodes: false, verified: true },
        context,
        'mfa.recovery_codes_regenerated',
        async (tx, factor, _used, _emit, user) => {
          const codes = await newRecoveryCodes(tx, userId);
          await deps.audit.record(tx, context, {
            type: 'mfa.recovery_codes_regenerated',
            subjectId: userId,
            data: { factor_id: factor.id },
          });
          return { codes, mails: await notice.recoveryCodes(tx, user) };
        },
      );
      deps.outbox?.kick(mails);
      return codes;
    },

    /**
     * Removes the user's second factor without a code (the reset that first proves the mailbox): true
     * when two-step verification was on. A set-up never confirmed goes too, and is no factor turned
     * off (sign-ins never asked for it): false, so that nobody is told of one turned off.
     */
    remove: async (tx: Executor, userId: string) => (await removeFactor(tx, userId)) === 'on',

    /**
     * An administrator turns a user's two-step verification off (they lost their app and their
     * recovery codes). Audited whether or not there was one; 404 for an unknown user. Never the
     * caller's own (users.assertNotOwn, checked by the route): one's own goes with a code.
     * `authorize`: whether the administrator may (they hold all the user holds), asked first on the
     * reset's transaction; throwing refuses it, nothing changed.
     */
    async resetByAdministrator(
      userId: string,
      context: RequestContext,
      authorize: (tx: Executor) => Promise<unknown>,
    ): Promise<void> {
      const mails = await inTransaction(deps.db, deps.events, async (tx) => {
        await authorize(tx);
        // Read under the lock: an email change applying meanwhile is waited for, and the notice goes
        // to the address the account has now, not the one it left.
        const user = await lockUser(tx, userId);
        if (!user) throw notFound('user');
        const removed = removedAs(await deps.repo.removeAll(userId, tx));
        // `had_factor`: two-step verification was on. A set-up never confirmed goes too, and is said
        // as such when it was still under way (`pending_set_up_removed`): the user is told of nothing
        // turned off, since sign-ins never asked for it. One past MFA_SETUP_TTL was as if never begun
        // (not shown, not activated), waiting only for the purge: nothing is said of it.
        await deps.audit.record(tx, context, {
          type: 'mfa.disabled',
          subjectId: userId,
          data: {
            by_administrator: true,
            had_factor: removed === 'on',
            ...(removed === 'pending' ? { pending_set_up_removed: true } : {}),
          },
        });
        return removed === 'on' ? notice.disabled(tx, user, true) : [];
      });
      deps.outbox?.kick(mails);
    },

    /**
     * The notice of a factor removed without the user (the reset that first proves the mailbox),
     * written on the reset's transaction `tx`: the ids to `kick` once it commits.
     */
    noticeRemoved: (tx: Executor, user: Pick<UserRow, 'id' | 'email'>) => notice.disabled(tx, user, false),

    /**
     * The sign-in's first factor passed and the user has a second: the `mfa_required` refusal, with the
     * token that `verify` takes with a code. Audited; no session exists yet.
     */
    async challenge(
      user: UserRow,
      via: 'auth.login' | 'auth.exchange' | 'auth.magic_link',
      context: RequestContext,
      /** A password sign-in's checked hash: PasswordReplaced when it is no longer the account's. */
      checkedHash?: string,
    ): Promise<AppError> {
      return inTransaction(deps.db, deps.events, async (tx) => {
        // Under the row's share lock, as the session would be: a reset or a change committed since
        // the password was checked finds no challenge to discard, so none is made.
        const row = await deps.users.findByIdForShare(user.id, tx);
        if (checkedHash !== undefined && row?.passwordHash !== checkedHash) throw new PasswordReplaced();
        return writeChallenge(tx, user, via, context);
      });
    },

    /**
     * `challenge` on the caller's transaction, which holds the user's row from the first factor's check
     * on (a sign-in link taken under it): a reset, a password change or signing out everywhere, which
     * lock that row to discard challenges, comes before the first factor or after the challenge is
     * written, and discards it.
     */
    challengeIn: (
      tx: Executor,
      user: UserRow,
      via: 'auth.login' | 'auth.exchange' | 'auth.magic_link',
      context: RequestContext,
    ): Promise<AppError> => writeChallenge(tx, user, via, context),

    /** Completes a sign-in with its challenge's token and a code: the session opens. */
    async verify(
      mfaToken: string,
      code: string,
      context: RequestContext,
    ): Promise<{ user: UserRow; session: SessionTokens }> {
      if (!parseSecret(MFA_TOKEN_FORMAT, mfaToken)) throw invalidMfaToken();
      // Begun once a key can sign: a 503 for no key leaves the challenge and the code unspent, and no
      // session opened.
      const outcome = await deps.sessions.issuingTransaction(async (tx, emit) => {
        const now = deps.clock.now();
        const tokenHash = challengeHash(mfaToken);
        // The user's row before the challenge's, the order a reset or a disable takes them in.
        const seen = await deps.repo.findLiveChallenge(tokenHash, now, tx, { lock: false });
        if (!seen) return { kind: 'token' as const };
        const user = await deps.users.findByIdForShare(seen.userId, tx);
        const challenge = await deps.repo.findLiveChallenge(tokenHash, now, tx, { lock: true });
        if (!challenge) return { kind: 'token' as const };
        const subject = { ...context, actorType: 'user' as const, actorId: challenge.userId };
        const factor = await deps.repo.findFactor(challenge.userId, { lock: true }, tx);
        if (user?.status !== 'active' || !factor?.verifiedAt) return { kind: 'token' as const };
        const checked = await check(tx, factor, code, { recoveryCodes: true }, user);
        if (!checked.ok) {
          // Whoever knows the password, not yet the user: someone unknown in the account's activity,
          // with where from, as a failed sign-in is.
          await deps.audit.record(tx, context, {
            type: challenge.via,
            outcome: 'failure',
            subjectId: user.id,
            data: refusalData(checked, 'mfa_'),
          });
          return { kind: 'refused' as const, checked };
        }
        const factors = checked.used === 'totp' ? ['otp', 'mfa'] : ['mfa'];
        const started = await deps.sessions.start(
          tx,
          user,
          {
            ip: context.ip,
            userAgent: context.userAgent,
            amr: [...(FIRST_FACTOR_AMR[challenge.via] ?? []), ...factors],
          },
          { context, emit },
        );
        await deps.repo.completeChallenge(challenge.id, now, started.session.id, tx);
        await deps.audit.record(tx, subject, {
          type: challenge.via,
          subjectId: user.id,
          data: { session_id: started.session.id, mfa: checked.used },
        });
        return { kind: 'ok' as const, user, started };
      });
      if (outcome.kind === 'token') throw invalidMfaToken();
      if (outcome.kind === 'refused') {
        deps.outbox?.kick(outcome.checked.mails ?? []);
        deps.onLogin?.(outcome.checked.reason === 'locked' ? 'locked' : 'failure');
        throw refusal(outcome.checked);
      }
      deps.onLogin?.('success');
      const { user, started } = outcome;
      return { user, session: await deps.sessions.tokensFor(user, started.session, started.refreshToken) };
    },
  };
}

export type MfaService = ReturnType<typeof createMfaService>;
