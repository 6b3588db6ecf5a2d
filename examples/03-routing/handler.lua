--- Example 3: one script, several channels, each routed to its own handler.
--
--   TARGET_URL=postgres://.../reports \
--     lua-pglisten --db postgres://.../app examples/03-routing/handler.lua
--
--   orders   JSON objects {"id": 7, "customer": "...", "total": 12.30}
--            -> one row of orders_log (a replay changes nothing)
--   audit    any text, decode = "raw" -> audit_log, byte for byte
--   metrics  JSON objects {"name": "...", "value": 1.5, "at": "..."?},
--            batch = 100: up to 100 queued notifications reach the handler
--            together and become one multi-row INSERT
--
-- What cannot be handled lands in failed_events: payloads that are not JSON
-- and handlers that raised (through on_error), and single metrics that are
-- invalid (written by the metrics handler itself, so that one bad metric
-- does not cost the other 99 of its batch).
--
-- Send some from psql:
--   SELECT pg_notify('orders', '{"id": 1, "customer": "ada", "total": 12.30}');
--   NOTIFY audit, 'user 7 signed in';
--   SELECT pg_notify('metrics', json_build_object('name', 'cpu', 'value', random())::text)
--     FROM generate_series(1, 1000);

local pg = require "pglisten"

local TARGET_URL = os.getenv("TARGET_URL")
if not TARGET_URL then error("set TARGET_URL to the database that receives the rows", 0) end

-- The target connection, lazy: it connects on the first query (the script
-- loads while the target is down) and heals itself after a broken
-- connection.
local target = assert(pg.connect(TARGET_URL, { lazy = true }))

-- Runs a query on the target; raises on error.
local function exec(sql, ...)
  local rows, err, code = target:exec(sql, ...)
  if not rows then error(("target: %s%s"):format(err, code and (" [" .. code .. "]") or ""), 0) end
  return rows
end

local function record_failure(channel, kind, err, payload, pid)
  exec([[INSERT INTO failed_events (channel, kind, error, payload, sender_pid)
         VALUES ($1, $2, $3, $4, $5)]], channel, kind, tostring(err), payload, pid)
end

---------------------------------------------------------------------------
-- orders
---------------------------------------------------------------------------

-- The total is read from the JSON text by the server: 12.30 stays 12.30
-- (in Lua it would be the double nearest to it).
local INSERT_ORDER = [[
INSERT INTO orders_log (order_id, customer, total, payload)
VALUES ($1, $2, ($3::jsonb ->> 'total')::numeric, $3::jsonb)
ON CONFLICT (order_id) DO NOTHING]]

local function order(o, note)
  if math.type(o.id) ~= "integer" then error("order without an integer id", 0) end
  if type(o.customer) ~= "string" then error(("order %d: customer must be a string"):format(o.id), 0) end
  if type(o.total) ~= "number" then error(("order %d: total must be a number"):format(o.id), 0) end
  exec(INSERT_ORDER, o.id, o.customer, note.payload)
end

---------------------------------------------------------------------------
-- audit
---------------------------------------------------------------------------

local function audit(line, note)
  exec("INSERT INTO audit_log (line, sender_pid) VALUES ($1, $2)", line, note.pid)
end

---------------------------------------------------------------------------
-- metrics
---------------------------------------------------------------------------

-- Only the placeholders are generated; the values are parameters.  Three
-- per row, so 100 rows use 300 of the 65535 a statement may have.
-- Returns rows, or nil, err, sqlstate.
local function insert_metrics(list)
  local values, params = {}, {}
  for i, m in ipairs(list) do
    local b = (i - 1) * 3
    values[i] = ("($%d::text, $%d::float8, coalesce($%d::timestamptz, now()))"):format(b + 1, b + 2, b + 3)
    params[b + 1], params[b + 2], params[b + 3] = m.name, m.value, m.at
  end
  return target:exec("INSERT INTO metrics (name, value, at) VALUES " .. table.concat(values, ", "),
    table.unpack(params, 1, #list * 3))
end

local function metrics(batch, notes)
  local good = {}
  for i, m in ipairs(batch) do
    local n, at = notes[i], m.at
    if at == pg.null then at = nil end
    if type(m.name) == "string" and type(m.value) == "number" and (at == nil or type(at) == "string") then
      good[#good + 1] = { name = m.name, value = m.value, at = at, note = n }
    else
      record_failure(n.channel, "invalid", "a metric needs a string name and a numeric value",
        n.payload, n.pid)
    end
  end
  if #good == 0 then return end
  local ok, err, code = insert_metrics(good)
  if ok then return end
  -- SQLSTATE class 22, data exception (say "at" is not a timestamp): find
  -- the culprits one row at a time.  Anything else fails the whole batch.
  if not (code and code:sub(1, 2) == "22") then
    error(("target: %s%s"):format(err, code and (" [" .. code .. "]") or ""), 0)
  end
  for _, m in ipairs(good) do
    ok, err, code = insert_metrics({ m })
    if not ok then
      record_failure(m.note.channel, "invalid", ("%s [%s]"):format(err, code), m.note.payload, m.note.pid)
    end
  end
end

return {
  channels = {
    orders = order,
    audit = { handler = audit, decode = "raw" },
    metrics = { handler = metrics, batch = 100 },
  },

  -- A payload that was not JSON (info.kind "decode") or a handler that
  -- failed (info.kind "handler"); for a batch, once per notification.
  on_error = function(err, note, info)
    record_failure(note.channel, info.kind, err, note.payload, note.pid)
  end,
}
