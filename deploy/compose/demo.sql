-- Run by docker-compose.yaml's `provision` job as the schema owner, after `migrate`.
-- Idempotent: `docker compose up` may run it again on every start.

-- The login role `init` and `serve` use (README "Security model": least privilege, not the owner).
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nats_pg_auth') THEN
    CREATE ROLE nats_pg_auth LOGIN PASSWORD 'nats_pg_auth' IN ROLE nats_pg_auth_service;
  END IF;
END $$;

-- The demo tenant: account acme, role sensor, user alice / s3cret, token demo-token.
INSERT INTO nats.accounts (name, max_connections) VALUES ('acme', 100) ON CONFLICT (name) DO NOTHING;
INSERT INTO nats.roles (account_id, name, publish_permissions, subscribe_permissions)
  SELECT id, 'sensor', '{sensors.>}', '{sensors.>,_INBOX.>}' FROM nats.accounts WHERE name = 'acme'
  ON CONFLICT DO NOTHING;
INSERT INTO nats.users (account_id, role_id, username, password_hash)
  SELECT a.id, r.id, 'alice', crypt('s3cret', gen_salt('bf', 10))
  FROM nats.accounts a JOIN nats.roles r ON r.account_id = a.id AND r.name = 'sensor' WHERE a.name = 'acme'
  ON CONFLICT (username) DO NOTHING;
INSERT INTO nats.user_tokens (user_id, token_sha256, description)
  SELECT id, digest('demo-token', 'sha256'), 'docker-compose demo token' FROM nats.users WHERE username = 'alice'
  ON CONFLICT (token_sha256) DO NOTHING;
