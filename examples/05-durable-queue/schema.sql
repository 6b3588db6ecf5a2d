-- Example 5: a durable queue of e-mails.  Load after `lua-pglisten --install`
-- (schema pglisten: the outbox, dead letters, the capture trigger).
--
--   emails        what the application queues: one row per message
--   sent_mail     what the "mail server" accepted (stands in for SMTP here)
--   mail_server   one row: is the mail server up?  (switch it to see retries,
--                 dead letters and a replay)

CREATE TABLE IF NOT EXISTS emails (
  id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  to_addr    text NOT NULL,
  subject    text NOT NULL,
  queued_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS sent_mail (
  email_id   bigint PRIMARY KEY,        -- idempotent: an e-mail is sent once
  to_addr    text NOT NULL,
  subject    text NOT NULL,
  sent_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS mail_server (
  up         boolean NOT NULL
);
INSERT INTO mail_server SELECT true WHERE NOT EXISTS (SELECT 1 FROM mail_server);

-- Each new e-mail becomes a durable event on channel "emails": a row in
-- pglisten.outbox written in the application's own transaction, so that a
-- committed e-mail is never lost, whether a runner is up or not.
DROP TRIGGER IF EXISTS emails_queue ON emails;
CREATE TRIGGER emails_queue
  AFTER INSERT ON emails
  FOR EACH ROW EXECUTE FUNCTION pglisten.notify_trigger('emails', 'durable');
