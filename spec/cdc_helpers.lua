-- Shared by the replication-source specs (22, 23): databases, the handler
-- script with the README's upsert, starting the runner until it streams,
-- cleaning up slots, comparing source and target.
local H = require "spec.helpers"

local C = {}
local slotseq = 0

--- A source and a target database, a slot name.
function C.setup(prefix)
  slotseq = slotseq + 1
  local src = H.createdb(prefix .. "s")
  local dst = H.createdb(prefix .. "t")
  return src, dst, ("cdc_%d_%d"):format(os.time() % 100000, slotseq)
end

function C.sql(s, db) return H.psql(s, db) end

--- The upsert a handler runs (README, "Change data capture"): unchanged
-- TOASTed columns are left out, so the target keeps its value.
C.HANDLER = [[
local target = assert(pglisten.connect(TARGET))
local function upsert(tbl, ev)
  if ev.op == "TRUNCATE" then return assert(target:exec("TRUNCATE " .. tbl)) end
  if ev.op == "DELETE" or (ev.old and ev.new and ev.old.id ~= ev.new.id) then
    assert(target:exec("DELETE FROM " .. tbl .. " WHERE id = $1", ev.old.id))
    if ev.op == "DELETE" then return end
  end
  local cols, ph, sets, vals = {}, {}, {}, {}
  for k, v in pairs(ev.new) do
    if v ~= pglisten.unchanged then
      vals[#vals + 1] = v
      cols[#cols + 1], ph[#ph + 1] = k, "$" .. #vals
      if k ~= "id" then sets[#sets + 1] = k .. " = EXCLUDED." .. k end
    end
  end
  assert(target:exec(("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT (id) DO %s"):format(tbl,
    table.concat(cols, ", "), table.concat(ph, ", "),
    #sets > 0 and ("UPDATE SET " .. table.concat(sets, ", ")) or "NOTHING"), table.unpack(vals, 1, #vals)))
end
]]

--- A handler script: TARGET, then `body`.
function C.script(dst, body)
  return H.script(("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. body)
end

--- Starts the runner and waits until it streams (or stands by).
function C.start(path, src, args, want, env)
  local argv = { "--db", "dbname=" .. src }
  for _, a in ipairs(args or {}) do argv[#argv + 1] = a end
  local p = H.start(path, argv, env, false)
  local ok = H.eventually(function()
    local e = p.stderr()
    return e:find(want or "streaming", 1, true) or not p.running()
  end, 20)
  assert(ok and p.running(), "runner did not stream: " .. p.stderr())
  return p
end

--- Stops the runner, drops the slot and the publication.
function C.cleanup(procs, src, slot)
  for _, p in ipairs(procs) do p.stop() end
  H.eventually(function()
    return C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
  end, 10)
  C.sql(("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
  C.sql(("DROP PUBLICATION IF EXISTS %s"):format(slot), src)
end

--- A digest of a table's rows.
function C.digest(db, tbl)
  return C.sql(("SELECT count(*) || ':' || coalesce(md5(string_agg(t::text, ',' ORDER BY id)), '') FROM %s t")
    :format(tbl), db)
end

function C.same(src, dst, tbl, timeout)
  local want
  local ok = H.eventually(function()
    want = C.digest(src, tbl)
    return C.digest(dst, tbl) == want
  end, timeout or 20, 0.2)
  return ok, want, C.digest(dst, tbl)
end

--- Waits until the walsenders of `slots` (names) have sent all WAL flushed
-- so far, so that what they stream sits in the clients' sockets; at most
-- `limit` s (default 1: the fixed wait this replaces), then goes on anyway.
function C.wait_sent(slots, limit)
  local names = {}
  for i, s in ipairs(slots) do names[i] = "'" .. s .. "'" end
  local lsn = C.sql("SELECT pg_current_wal_flush_lsn()")
  H.eventually(function()
    return C.sql(("SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid "
      .. "WHERE s.slot_name IN (%s) AND r.sent_lsn >= '%s'"):format(table.concat(names, ", "), lsn)) == tostring(#names)
  end, limit or 1, 0.02)
  H.sleep(0.05) -- from the walsender's send to the client's socket
end

function C.confirmed(slot)
  return C.sql(("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
end

return C
