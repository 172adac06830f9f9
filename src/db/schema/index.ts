export * from './audit.js';
export * from './credentials.js';
export * from './sessions.js';
export * from './signing.js';
export * from './users.js';
export * from './mfa.js';
export * from './mail.js';
