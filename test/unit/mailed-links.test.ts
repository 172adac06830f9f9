import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';
import { tokenLink, tokenParagraph } from '../../src/modules/auth/mailed-tokens.js';

const TOKEN = 'prs_0123456789ab_cdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ012345';

describe('mailed links', () => {
  it('puts the token in the fragment of a page without one', () => {
    expect(tokenLink('https://app.example/reset', TOKEN)).toBe(`https://app.example/reset#token=${TOKEN}`);
    expect(tokenLink('https://app.example/reset?lang=en', TOKEN)).toBe(
      `https://app.example/reset?lang=en#token=${TOKEN}`,
    );
    // An empty fragment is none.
    expect(tokenLink('https://app.example/#', TOKEN)).toBe(`https://app.example/#token=${TOKEN}`);
  });

  it('keeps the fragment of a hash-routed page and adds the token as a parameter of it', () => {
    expect(tokenLink('https://app.example/#/reset', TOKEN)).toBe(
      `https://app.example/#/reset?token=${TOKEN}`,
    );
    expect(tokenLink('https://app.example/#/reset?lang=en', TOKEN)).toBe(
      `https://app.example/#/reset?lang=en&token=${TOKEN}`,
    );
    expect(tokenLink('https://app.example/#/reset?', TOKEN)).toBe(
      `https://app.example/#/reset?token=${TOKEN}`,
    );
    expect(tokenLink('https://app.example/#/reset?lang=en&', TOKEN)).toBe(
      `https://app.example/#/reset?lang=en&token=${TOKEN}`,
    );
    expect(tokenParagraph('https://app.example/#/sign-in', TOKEN, 600, 'sign in')).toBe(
      `Open this link within 10 minutes to sign in:\n\nhttps://app.example/#/sign-in?token=${TOKEN}\n`,
    );
  });

  it('accepts link pages with a fragment, and refuses one whose fragment has a token parameter already', () => {
    const load = (env: Record<string, string>) => loadConfig(env, { generateDevSecrets: false });
    expect(load({ PASSWORD_RESET_URL: 'https://app.example/#/reset?lang=en' }).passwordReset.url).toBe(
      'https://app.example/#/reset?lang=en',
    );
    for (const name of ['PASSWORD_RESET_URL', 'EMAIL_CONFIRMATION_URL', 'EMAIL_CHANGE_URL', 'MAGIC_LINK_URL'])
      for (const value of ['https://app.example/#token=x', 'https://app.example/#/page?lang=en&token=x']) {
        const attempt = () => load({ [name]: value });
        expect(attempt, `${name}=${value}`).toThrow(ConfigError);
        expect(attempt, `${name}=${value}`).toThrow(new RegExp(`${name}: .*token parameter in its fragment`));
      }
    // `token` elsewhere (the path, the query, another parameter's name) is no clash.
    expect(
      load({ MAGIC_LINK_URL: 'https://app.example/token=1?token=2#/mytoken=3' }).magicLink.url,
    ).toBeDefined();
  });
});
