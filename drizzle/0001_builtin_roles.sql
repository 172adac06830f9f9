-- Built-in roles. `admin` holds every permission; `user` is what every registered user gets.
-- Their permission lists may be edited through /v1/roles, but the roles cannot be deleted.
INSERT INTO "roles" ("name", "description", "permissions", "builtin")
VALUES
  ('admin', 'Full access to every resource', ARRAY['*']::text[], true),
  ('user', 'A registered user: their own account, profile, sessions and API keys', ARRAY['account:read', 'account:write', 'api_keys:own']::text[], true)
ON CONFLICT ("name") DO UPDATE SET "builtin" = true;
