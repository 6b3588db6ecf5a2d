-- Example 3, the target database: one table per channel, and failed_events
-- for what could not be handled.
--
--   psql -d TARGET -f examples/03-routing/schema.sql

-- orders: one row per order; a replayed notification changes nothing.
CREATE TABLE IF NOT EXISTS orders_log (
  order_id    bigint PRIMARY KEY,
  customer    text NOT NULL,
  total       numeric(12, 2) NOT NULL,
  payload     jsonb NOT NULL,
  received_at timestamptz NOT NULL DEFAULT now()
);

-- audit: the payload exactly as sent (decode = "raw").
CREATE TABLE IF NOT EXISTS audit_log (
  id          bigserial PRIMARY KEY,
  line        text NOT NULL,
  sender_pid  integer,
  received_at timestamptz NOT NULL DEFAULT now()
);

-- metrics: many small rows, written a batch at a time.
CREATE TABLE IF NOT EXISTS metrics (
  id    bigserial PRIMARY KEY,
  name  text NOT NULL,
  value double precision NOT NULL,
  at    timestamptz NOT NULL DEFAULT now()
);

-- Notifications that were rejected (kind "decode"), failed their handler
-- (kind "handler") or carried an invalid item (kind "invalid").
CREATE TABLE IF NOT EXISTS failed_events (
  id         bigserial PRIMARY KEY,
  channel    text NOT NULL,
  kind       text NOT NULL,
  error      text NOT NULL,
  payload    text,
  sender_pid integer,
  failed_at  timestamptz NOT NULL DEFAULT now()
);
