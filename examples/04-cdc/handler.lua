--- Example 4: change data capture.  Keeps users and orders (orders.user_id
-- references users) of TARGET_URL equal to those of the runner's database,
-- from the WAL: no trigger on the source, nothing lost while the runner is
-- down (the slot keeps the changes), the source's existing rows copied
-- first (the initial snapshot).
--
--   TARGET_URL=postgres://.../copy lua-pglisten --db postgres://.../app \
--     examples/04-cdc/handler.lua
--
-- Each channel is a table (source = "replication") with a batch handler:
-- up to 500 events of one table, in commit order, applied in one target
-- transaction with one execmany per run of upserts or deletes.  Delivery is
-- at least once (after a crash the events since the slot's confirmed
-- position come again): pglisten.apply keeps the source position in the
-- target's transaction and skips what is applied already, so each change
-- is applied once; the writes are idempotent as well (an upsert keyed by
-- id, a delete that may find nothing).
--
-- An UPDATE that left a TOASTed column (here users.bio, when large) alone
-- carries pglisten.unchanged for it: the upsert then keeps the target's
-- value (the $n flag below).  With REPLICA IDENTITY FULL on the source
-- the old row is whole and the value is taken from ev.old instead.
--
-- The initial snapshot (snapshot = true) hands each table's rows as INSERT
-- events with note.snapshot = true, users before orders, each table
-- preceded by a TRUNCATE event: a target left half filled by an interrupted
-- snapshot starts clean.

local pg = require "pglisten"

local TARGET_URL = os.getenv("TARGET_URL")
if not TARGET_URL then error("set TARGET_URL (a conninfo string or a postgres:// URI)", 0) end
local SLOT = os.getenv("CDC_SLOT") or "pglisten_cdc_example"
local BATCH = math.tointeger(tonumber(os.getenv("CDC_BATCH") or "")) or 500

-- Lazy: the script loads while the target is down; the first batch
-- connects (08001 when it cannot: the channel's retry tries again), and a
-- broken connection reconnects on its next use.
local target = assert(pg.connect(TARGET_URL, { lazy = true }))

local unchanged = pg.unchanged

---------------------------------------------------------------------------
-- The tables: columns (key first) and which may arrive unchanged
---------------------------------------------------------------------------

local TABLES = {
  users = { cols = { "id", "email", "name", "bio", "updated_at" }, toasted = { bio = true },
    truncate = "TRUNCATE users CASCADE" }, -- the source could only truncate users with its orders
  orders = { cols = { "id", "user_id", "amount", "status", "created_at" }, toasted = {},
    truncate = "TRUNCATE orders" },
}

-- INSERT ... ON CONFLICT (id) DO UPDATE; a toasted column gets a boolean
-- parameter after the values: true keeps the target's value.
for name, t in pairs(TABLES) do
  local ph, sets, n = {}, {}, #t.cols
  t.flags = {}
  for i, c in ipairs(t.cols) do
    ph[i] = "$" .. i
    if i > 1 then
      if t.toasted[c] then
        n = n + 1
        t.flags[#t.flags + 1] = i -- the flag of column i
        sets[#sets + 1] = ("%s = CASE WHEN $%d::boolean THEN %s.%s ELSE EXCLUDED.%s END"):format(c, n, name, c, c)
      else
        sets[#sets + 1] = ("%s = EXCLUDED.%s"):format(c, c)
      end
    end
  end
  t.upsert = ("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (id) DO UPDATE SET %s"):format(
    name, table.concat(t.cols, ", "), table.concat(ph, ", "), table.concat(sets, ", "))
  t.delete = ("DELETE FROM %s WHERE id = $1"):format(name)
end

---------------------------------------------------------------------------
-- Applying a batch
---------------------------------------------------------------------------

-- The upsert's parameters for an INSERT/UPDATE event.
local function upsert_tuple(t, ev)
  local new, old, tuple = ev.new, ev.old, { n = #t.cols + #t.flags }
  for i, c in ipairs(t.cols) do
    local v = new[c]
    if v == unchanged and old and old[c] ~= nil and old[c] ~= unchanged then
      v = old[c] -- REPLICA IDENTITY FULL: the old row is whole
    end
    tuple[i] = v
  end
  for j, i in ipairs(t.flags) do
    local keep = tuple[i] == unchanged
    if keep then tuple[i] = pg.null end -- not written: the flag keeps the target's value
    tuple[#t.cols + j] = keep
  end
  return tuple
end

local function check(n, err, code)
  if not n then error(("target: %s%s"):format(err, code and (" [" .. code .. "]") or ""), 0) end
  return n
end

-- The batch as runs of one statement, in order: { sql, tuples } (a
-- TRUNCATE has no tuples).
local function runs_of(t, events)
  local runs = {}
  local function add(sql, tuple)
    local last = runs[#runs]
    if last and last.sql == sql then
      last.list[#last.list + 1] = tuple
    else
      runs[#runs + 1] = { sql = sql, list = { tuple } }
    end
  end
  for _, ev in ipairs(events) do
    local op = ev.op
    if op == "TRUNCATE" then
      runs[#runs + 1] = { sql = t.truncate }
    elseif op == "DELETE" then
      add(t.delete, { ev.old.id })
    else
      -- an UPDATE that changed the key: the old key goes first
      if ev.old and ev.old.id ~= nil and ev.old.id ~= ev.new.id then add(t.delete, { ev.old.id }) end
      add(t.upsert, upsert_tuple(t, ev))
    end
  end
  return runs
end

--- A handler for table `name`: its batch in one target transaction,
-- through pglisten.apply, which records the source position in the same
-- transaction and skips what was applied already.  Upserts alone would not
-- do after a crash: the changes sent again can be older than the target
-- (an order inserted again for a user a later change deleted: the foreign
-- key refuses it, every time).
local NOSAVE = { savepoint = false }

local function handler(name)
  local t = TABLES[name]
  return function(events, notes)
    check(pg.apply(target, events, notes, function(conn, evs)
      for _, r in ipairs(runs_of(t, evs)) do
        -- no savepoint per run: any failure rolls the whole apply back anyway
        if r.list then check(conn:execmany(r.sql, r.list, NOSAVE)) else check(conn:exec(r.sql)) end
      end
      return true
    end))
  end
end

return {
  replication = { slot = SLOT, publication = SLOT, snapshot = true },
  channels = {
    ["public.users"] = { source = "replication", batch = BATCH, handler = handler("users"),
      retry = { attempts = 5, backoff = 0.2 } },
    ["public.orders"] = { source = "replication", batch = BATCH, handler = handler("orders"),
      retry = { attempts = 5, backoff = 0.2 } },
  },
}
