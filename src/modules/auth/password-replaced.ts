import { AppError } from '../../lib/errors.js';

/**
 * A sign-in's password was replaced (a reset, a change) while it was checked: it opens no session
 * and no second-factor challenge. Answered as a wrong password (401), audited `password_changed`.
 */
export class PasswordReplaced extends AppError {
  constructor() {
    super('invalid_credentials', { detail: 'The email or password is incorrect' });
  }
}
