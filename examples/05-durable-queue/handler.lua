--- Example 5: a durable queue.  Sends each e-mail queued in `emails` (see
-- schema.sql) through a "mail server" (the table sent_mail stands in for SMTP).
--
--   MAIL_URL=postgres://.../app lua-pglisten --db "$MAIL_URL" examples/05-durable-queue/handler.lua
--
-- The channel is durable: events wait in pglisten.outbox until the handler
-- succeeds.  A failure is retried from the outbox after a backoff (1 s, then
-- doubling up to 10 s here); after max_attempts failures the event becomes a
-- dead letter in pglisten.dead, which `lua-pglisten outbox dead` lists and
-- `lua-pglisten outbox replay` puts back.  Delivery is at least once, so
-- the handler is idempotent: sent_mail is keyed by the e-mail's id.

local pg = require "pglisten"

local URL = os.getenv("MAIL_URL") or error("set MAIL_URL (the database of schema.sql)", 0)
local db = assert(pg.connect(URL, { lazy = true }))

local function send(email)
  local up = assert(db:exec("SELECT up FROM mail_server"))[1]
  if not (up and up.up) then error("mail server unavailable: 421 try again later", 0) end
  assert(db:exec([[INSERT INTO sent_mail (email_id, to_addr, subject) VALUES ($1, $2, $3)
                   ON CONFLICT (email_id) DO NOTHING]], email.id, email.to_addr, email.subject))
end

return {
  channels = {
    emails = {
      durable = true,
      max_attempts = tonumber(os.getenv("MAX_ATTEMPTS")) or 5,
      retry = { backoff = tonumber(os.getenv("BACKOFF")) or 1, max_backoff = 10 },
      handler = function(event, note)
        send(event.new)
        if note.attempts > 0 then
          io.stderr:write(("sent e-mail %d after %d failed attempt(s)\n"):format(event.new.id, note.attempts))
        end
      end,
    },
  },
}
