--- Example 6: orders copied from PostgreSQL into SQLite, with Debian's
-- lua-sql-sqlite3 (LuaSQL).  "Other databases" need not be PostgreSQL.
--
--   SQLITE_PATH=/var/lib/app/orders.db \
--     lua-pglisten --db postgres://.../shop examples/06-sqlite-target/handler.lua
--   lua-pglisten backfill --db postgres://.../shop --table public.orders \
--     --channel orders examples/06-sqlite-target/handler.lua   # the rows that exist already
--
-- Each change to orders (source.sql: a durable trigger) arrives as
-- {op, schema, table, new, old}; a batch of up to 100 is applied in one
-- SQLite transaction.  A batch that fails is rolled back and retried from
-- the outbox (durable).  Idempotent: an upsert or a delete keyed by id, so
-- handling an event twice does no harm.  A backfilled row (note.backfill)
-- is inserted only when SQLite has no row with its id: a live event for it,
-- handled before or after, carries the newer version.
--
-- LuaSQL takes no query parameters: text goes through conn:escape and is
-- quoted, numbers are formatted as numbers (%d).  total is numeric(12, 2);
-- SQLite keeps it as integer cents, exact.

local sqlite = require "luasql.sqlite3"

local PATH = os.getenv("SQLITE_PATH") or error("set SQLITE_PATH (the SQLite file to write)", 0)

local env = assert(sqlite.sqlite3())
local db = assert(env:connect(PATH))
assert(db:execute("PRAGMA busy_timeout = 5000"))
assert(db:execute([[CREATE TABLE IF NOT EXISTS orders (
  id INTEGER PRIMARY KEY, customer TEXT NOT NULL, total_cents INTEGER NOT NULL,
  status TEXT NOT NULL, updated_at TEXT NOT NULL)]]))

local function text(s) return "'" .. db:escape(tostring(s)) .. "'" end

local function int(n)
  n = math.tointeger(n)
  if not n then error("an integer was expected, got " .. tostring(n), 0) end
  return ("%d"):format(n)
end

local function cents(total) return int(math.floor(total * 100 + 0.5)) end

-- SQL for one event.
local function statement(ev, note)
  if ev.op == "DELETE" then return "DELETE FROM orders WHERE id = " .. int(ev.old.id) end
  if ev.op == "TRUNCATE" then return "DELETE FROM orders" end
  local r = ev.new
  local values = ("(%s, %s, %s, %s, %s)"):format(int(r.id), text(r.customer), cents(r.total), text(r.status),
    text(r.updated_at))
  local sql = "INSERT INTO orders (id, customer, total_cents, status, updated_at) VALUES " .. values
  if note.backfill then return sql .. " ON CONFLICT (id) DO NOTHING" end
  return sql .. [[ ON CONFLICT (id) DO UPDATE SET customer = excluded.customer,
    total_cents = excluded.total_cents, status = excluded.status, updated_at = excluded.updated_at]]
end

local function run(sql)
  local ok, err = db:execute(sql)
  if not ok then error("sqlite: " .. tostring(err), 0) end
end

return {
  channels = {
    orders = {
      durable = true,
      batch = 100,
      retry = { backoff = 0.5, max_backoff = 30 },
      handler = function(events, notes)
        run("BEGIN IMMEDIATE")
        local ok, err = pcall(function()
          for i, ev in ipairs(events) do run(statement(ev, notes[i])) end
        end)
        if not ok then
          db:execute("ROLLBACK")
          error(err, 0)
        end
        run("COMMIT")
      end,
    },
  },
}
