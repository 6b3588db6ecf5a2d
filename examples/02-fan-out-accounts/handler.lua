--- Example 2: every change to the central accounts table, applied to each
-- client database.
--
--   CLIENT_URLS="postgres://host-a/app postgres://host-b/app" \
--     lua-pglisten --db postgres://central/app examples/02-fan-out-accounts/handler.lua
--
-- CLIENT_URLS is a space-separated list, so each entry must be a URI or a
-- conninfo without spaces ("dbname=client_a").
--
-- A change is applied to every client, even when one of them fails; then,
-- if any failed, the handler raises an error that names them.  The runner
-- retries the whole change (3 attempts, 0.5 s then 1 s apart: the upsert is
-- idempotent, so clients that already have it are not written again), then
-- logs it and calls on_error.  Notifications sent while the runner is away
-- are lost: example 1 shows how to resync on every (re)connect.

local pg = require "pglisten"
local logmod = require "pglisten.log"

local log = logmod.new()

-- Each client's connection is lazy: it connects on the first change (a
-- client that is down at start-up does not stop the script from loading,
-- and is tried again on every change), and heals itself after that.
local clients = {}
for url in (os.getenv("CLIENT_URLS") or ""):gmatch("%S+") do
  clients[#clients + 1] = {
    label = pg.safe_conninfo(url),
    conn = assert(pg.connect(url, { lazy = true, timeout = 5 })),
  }
end
if #clients == 0 then
  error("set CLIENT_URLS to a space-separated list of client database URLs", 0)
end

-- Rows travel as JSON text that the client's server parses, so numeric
-- balances and timestamps keep every digit.
local UPSERT = [[
INSERT INTO accounts (id, name, plan, balance, active, updated_at)
SELECT id, name, plan, balance, active, updated_at
  FROM json_populate_record(NULL::accounts, $1::json -> 'row')
ON CONFLICT (id) DO UPDATE
   SET name = EXCLUDED.name, plan = EXCLUDED.plan, balance = EXCLUDED.balance,
       active = EXCLUDED.active, updated_at = EXCLUDED.updated_at
 WHERE (accounts.name, accounts.plan, accounts.balance, accounts.active, accounts.updated_at)
       IS DISTINCT FROM
       (EXCLUDED.name, EXCLUDED.plan, EXCLUDED.balance, EXCLUDED.active, EXCLUDED.updated_at)]]

local DELETE = "DELETE FROM accounts WHERE id = $1::bigint"

-- Applies one change to one client: true, or nil, err.
local function apply_to(client, ev, payload)
  local conn = client.conn
  local ok, err, code
  if ev.op == "DELETE" then
    ok, err, code = conn:exec(DELETE, ev.id)
  else
    ok, err, code = conn:exec(UPSERT, payload)
  end
  if not ok then return nil, err .. (code and (" [" .. code .. "]") or "") end
  return true
end

local function account_changed(ev, note)
  if type(ev.id) ~= "string" or not (ev.op == "INSERT" or ev.op == "UPDATE" or ev.op == "DELETE") then
    error("account_changed: unexpected payload " .. note.payload, 0)
  end
  local failed = {}
  for _, client in ipairs(clients) do
    local ok, err = apply_to(client, ev, note.payload)
    if not ok then failed[#failed + 1] = client.label .. ": " .. err end
  end
  if #failed > 0 then
    error(("account %s: %s not applied on %d of %d clients: %s"):format(
      ev.id, ev.op, #failed, #clients, table.concat(failed, "; ")), 0)
  end
end

return {
  channels = {
    account_changed = {
      handler = account_changed,
      retry = { attempts = 3, backoff = 0.5 },
    },
  },

  -- After the last attempt (the runner has logged the error already): the
  -- line an operator greps for to replay the change by hand.
  on_error = function(err, note, info)
    log.error("account change not delivered to every client", {
      channel = info.channel, kind = info.kind, attempts = info.attempts,
      error = tostring(err), payload = note and note.payload,
    })
  end,
}
