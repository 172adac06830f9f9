import { describe, expect, it } from 'vitest';
import { loggableUrl } from '../../src/lib/logger.js';

describe('loggableUrl', () => {
  it('redacts the mailed links’ and sign-ins’ tokens in the query, whatever the parameter is called', () => {
    for (const prefix of ['prs', 'pec', 'pce', 'pml', 'pmf', 'pak', 'prt', 'pcs']) {
      const token = `${prefix}_abcdefghijkl_secretsecretsecret`;
      expect(loggableUrl(`/v1/auth/magic-link/verify?next=${token}&page=2`), prefix).toBe(
        '/v1/auth/magic-link/verify?next=[redacted]&page=2',
      );
    }
    // Not a secret's look: kept.
    expect(loggableUrl('/v1/users?query=pretty_name')).toBe('/v1/users?query=pretty_name');
  });
});
