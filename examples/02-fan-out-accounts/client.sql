-- Example 2, each client database: its copy of accounts.  Only the handler
-- writes here.
--
--   psql -d CLIENT -f examples/02-fan-out-accounts/client.sql

CREATE TABLE IF NOT EXISTS accounts (
  id         bigint PRIMARY KEY,
  name       text NOT NULL,
  plan       text NOT NULL,
  balance    numeric(14, 2) NOT NULL,
  active     boolean NOT NULL,
  updated_at timestamptz NOT NULL
);
