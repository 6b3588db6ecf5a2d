--- The slot and the publication of the replication source: the start-up
-- checks, creating what is missing, and `lua-pglisten --drop-slot`.
--
-- Every function takes a plain connection (pglisten.conn) to the source
-- database.  A failure returns `nil, message, fatal`: `fatal` when waiting
-- cannot fix it (a setting, a privilege, a table's replica identity); the
-- message says what to change.
--
-- The runner marks a publication it created with a COMMENT beginning
-- `M.MARK`: `--drop-slot` drops only such a publication, never one the
-- user made.
-- @module pglisten.replication.slot

local M = {}

M.MARK = "lua-pglisten: created for replication slot "

--- The replication part of a spec: slot, publication, snapshot, create,
-- `tables` (sorted "schema.table" list), `by_table` (table -> channel
-- entry) and `max_batch` (the largest `batch`); nil when no channel streams
-- from the WAL.
function M.config(spec)
  local r = spec.replication
  if not r then return nil end
  local cfg = { slot = r.slot, publication = r.publication, snapshot = r.snapshot, create = r.create,
    tables = {}, by_table = {}, max_batch = 1 }
  for _, n in ipairs(spec.names) do
    local e = spec.channels[n]
    if e.source == "replication" then
      cfg.tables[#cfg.tables + 1] = e.table
      cfg.by_table[e.table] = e
      cfg.max_batch = math.max(cfg.max_batch, e.batch or 1)
    end
  end
  table.sort(cfg.tables)
  return cfg
end

local function split(t)
  return t:match("^([^.]+)%.(.+)$")
end

-- "schema"."table", quoted.
local function quoted_table(conn, t)
  local s, n = split(t)
  local qs, err = conn:escape_identifier(s)
  if not qs then return nil, err end
  local qn
  qn, err = conn:escape_identifier(n)
  if not qn then return nil, err end
  return qs .. "." .. qn
end

local function query(conn, sql, ...)
  local r, err, state = conn:exec(sql, ...)
  if not r then return nil, err, state end
  return r
end

---------------------------------------------------------------------------
-- Checks
---------------------------------------------------------------------------

local ROLE = [[
SELECT current_user AS who, rolreplication OR rolsuper AS ok, current_setting('wal_level') AS wal_level,
       current_setting('max_replication_slots')::int AS max_slots,
       (SELECT count(*) FROM pg_replication_slots)::int AS used
  FROM pg_roles WHERE rolname = current_user]]

local IDENTITY = [[
SELECT c.relreplident::text AS ident, c.relkind::text AS kind,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) AS has_pk
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = $1 AND c.relname = $2]]

-- A table's replica identity lets its UPDATEs and DELETEs be streamed.
local function check_table(conn, t)
  local s, n = split(t)
  local r, err = query(conn, IDENTITY, s, n)
  if not r then return nil, err end
  local row = r[1]
  if not row then
    return nil, ("table %s does not exist: create it, or change the channel's table"):format(t), true
  end
  if row.kind ~= "r" and row.kind ~= "p" then
    return nil, ("%s is not a table (relkind %s): only tables can be streamed"):format(t, row.kind), true
  end
  if row.ident == "n" then
    return nil, ("table %s has REPLICA IDENTITY NOTHING, so its UPDATEs and DELETEs cannot be streamed: "
      .. "ALTER TABLE %s REPLICA IDENTITY DEFAULT (with a primary key) or REPLICA IDENTITY FULL"):format(t, t), true
  end
  if row.ident == "d" and not row.has_pk then
    return nil, ("table %s has no primary key, so its UPDATEs and DELETEs carry no replica identity: "
      .. "add a primary key, or ALTER TABLE %s REPLICA IDENTITY FULL (or USING INDEX a unique index)"):format(t, t),
      true
  end
  return true
end

--- The start-up checks: wal_level, the role's REPLICATION attribute, a
-- free slot when `slot_missing`, every table's replica identity.
-- @return true, or nil, message, fatal
function M.check(conn, cfg, slot_missing)
  local r, err = query(conn, ROLE)
  if not r then return nil, err end
  local row = r[1]
  if not row then return nil, "cannot read the current role from pg_roles" end
  if row.wal_level ~= "logical" then
    return nil, ("wal_level is %s, and logical replication needs wal_level = logical: set it in "
      .. "postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart the server"):format(row.wal_level), true
  end
  if not row.ok then
    return nil, ("role %s lacks the REPLICATION attribute: ALTER ROLE %s REPLICATION, or connect as a role "
      .. "that has it"):format(row.who, row.who), true
  end
  if slot_missing and row.used >= row.max_slots then
    return nil, M.slots_exhausted(row.max_slots), true
  end
  for _, t in ipairs(cfg.tables) do
    local ok, terr, fatal = check_table(conn, t)
    if not ok then return nil, terr, fatal end
  end
  return M.check_dead(conn, cfg)
end

--- A channel with on_failure = "dead" needs pglisten.dead on the source.
function M.check_dead(conn, cfg)
  local dead = {}
  for _, t in ipairs(cfg.tables) do
    if cfg.by_table[t].on_failure == "dead" then dead[#dead + 1] = cfg.by_table[t].name end
  end
  if #dead == 0 then return true end
  local r, err = query(conn, "SELECT to_regclass('pglisten.dead') IS NOT NULL AS has")
  if not r then return nil, err end
  if not r[1].has then
    return nil, ('on_failure = "dead" (channel %s) records failed events in pglisten.dead on the source '
      .. "database, and it has no schema pglisten: run lua-pglisten --install --db CONNINFO (the source) first")
      :format(table.concat(dead, ", ")), true
  end
  return true
end

--- The message for a server whose replication slots are all in use.
function M.slots_exhausted(max)
  return ("all %s replication slots (max_replication_slots) are in use: drop unused ones "
    .. "(SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active) "
    .. "or raise max_replication_slots and restart the server"):format(tostring(max or "the"))
end

---------------------------------------------------------------------------
-- The publication
---------------------------------------------------------------------------

local PUBLICATION = [[
SELECT p.puballtables AS all_tables, obj_description(p.oid, 'pg_publication') AS comment,
       ARRAY(SELECT schemaname || '.' || tablename FROM pg_publication_tables t WHERE t.pubname = p.pubname)::text
         AS tables
  FROM pg_publication p WHERE p.pubname = $1]]

-- The tables of a text[] literal of plain names ({a.b,c.d}).
local function array_set(lit)
  local set = {}
  for item in (lit or ""):gsub("^{", ""):gsub("}$", ""):gmatch('[^,]+') do
    set[(item:gsub('^"', ""):gsub('"$', ""))] = true
  end
  return set
end

--- The publication: { all_tables, created (by the runner), has = set of tables }, or nil when missing.
function M.publication(conn, name)
  local r, err = query(conn, PUBLICATION, name)
  if not r then return nil, err end
  local row = r[1]
  if not row then return false end
  local comment = row.comment
  return { all_tables = row.all_tables, has = array_set(row.tables),
    created = type(comment) == "string" and comment:sub(1, #M.MARK) == M.MARK }
end

local function quoted_list(conn, tables)
  local q = {}
  for i, t in ipairs(tables) do
    local s, err = quoted_table(conn, t)
    if not s then return nil, err end
    q[i] = s
  end
  return table.concat(q, ", ")
end

local function create_publication(conn, cfg, qname)
  local list, err = quoted_list(conn, cfg.tables)
  if not list then return nil, err end
  -- a literal of plain characters: slot names are [a-z0-9_] (pglisten.script)
  assert(cfg.slot:match("^[a-z0-9_]+$"), "slot name")
  local lit = "'" .. M.MARK .. cfg.slot .. "'"
  local ok, state
  ok, err, state = conn:exec(("CREATE PUBLICATION %s FOR TABLE %s; COMMENT ON PUBLICATION %s IS %s")
    :format(qname, list, qname, lit))
  if not ok then
    return nil, ("cannot create publication %s: %s"):format(cfg.publication, err), state ~= "40001"
  end
  return true, "created"
end

--- Makes sure the publication exists and covers every table of `cfg`
-- (creating or altering it unless `cfg.create` is false).
-- @return true[, "created"|"altered"], or nil, message, fatal
function M.ensure_publication(conn, cfg)
  local pub, err = M.publication(conn, cfg.publication)
  if pub == nil then return nil, err end
  local qname
  qname, err = conn:escape_identifier(cfg.publication)
  if not qname then return nil, err end
  if not pub then
    if cfg.create == false then
      return nil, ("publication %s does not exist (replication.create = false): CREATE PUBLICATION %s FOR TABLE %s, "
        .. "or remove create = false"):format(cfg.publication, cfg.publication, table.concat(cfg.tables, ", ")), true
    end
    return create_publication(conn, cfg, qname)
  end
  if pub.all_tables then return true end
  local missing = {}
  for _, t in ipairs(cfg.tables) do
    if not pub.has[t] then missing[#missing + 1] = t end
  end
  if #missing == 0 then return true end
  -- a table without a replica identity in a publication would make the
  -- writers' UPDATEs and DELETEs of it fail (a reload adds tables unchecked)
  for _, t in ipairs(missing) do
    local ok, terr = check_table(conn, t)
    if not ok then return nil, terr, true end
  end
  if cfg.create == false then
    return nil, ("publication %s does not include %s (replication.create = false): ALTER PUBLICATION %s ADD TABLE %s")
      :format(cfg.publication, table.concat(missing, ", "), cfg.publication, table.concat(missing, ", ")), true
  end
  local list
  list, err = quoted_list(conn, missing)
  if not list then return nil, err end
  local ok, aerr = conn:exec(("ALTER PUBLICATION %s ADD TABLE %s"):format(qname, list))
  if not ok then return nil, ("cannot add %s to publication %s: %s"):format(table.concat(missing, ", "),
    cfg.publication, aerr), true end
  return true, "altered", missing
end

--- While streaming: the channels' tables the publication no longer has.
-- DROP TABLE takes a table out of its publications, and the table created
-- again under the name is not in them: its changes would not be sent, in
-- silence.  Those that exist with a replica identity are added back (not
-- with replication.create = false; one without would make the writers'
-- UPDATEs and DELETEs fail).  Returns added, missing (`{ table, why }`:
-- not there, no replica identity, or not added), or nil, err.
function M.watch_publication(conn, cfg)
  local pub, err = M.publication(conn, cfg.publication)
  if not pub then return nil, err or ("publication %s does not exist"):format(cfg.publication) end
  local add, missing = {}, {}
  if pub.all_tables then return add, missing end
  for _, t in ipairs(cfg.tables) do
    if not pub.has[t] then
      local ok, why, fatal = check_table(conn, t)
      if not ok and not fatal then return nil, why end
      if ok and cfg.create ~= false then
        add[#add + 1] = t
      else
        missing[#missing + 1] = { t, why or "replication.create = false: ALTER PUBLICATION ... ADD TABLE " .. t }
      end
    end
  end
  if #add > 0 then
    local qname, list
    qname, err = conn:escape_identifier(cfg.publication)
    if qname then list, err = quoted_list(conn, add) end
    if not list then return nil, err end
    local ok, aerr = conn:exec(("ALTER PUBLICATION %s ADD TABLE %s"):format(qname, list))
    if not ok then return nil, aerr end
  end
  return add, missing
end

---------------------------------------------------------------------------
-- The slot
---------------------------------------------------------------------------

local SLOT = [[
SELECT s.plugin, s.slot_type, s.database::text AS database, current_database()::text AS here, s.active,
       s.active_pid, s.confirmed_flush_lsn::text AS confirmed_flush_lsn
  FROM pg_replication_slots s WHERE s.slot_name = $1]]

--- The slot's row of pg_replication_slots, false when missing, or nil, err.
function M.slot(conn, name)
  local r, err = query(conn, SLOT, name)
  if not r then return nil, err end
  return r[1] or false
end

--- Checks that an existing slot can be streamed here.
-- @return true, or nil, message, true
function M.usable(row, name)
  if row.slot_type ~= "logical" or row.plugin ~= "pgoutput" then
    return nil, ("replication slot %s exists but is not a logical pgoutput slot (%s %s): "
      .. "name another slot, or drop this one"):format(name, tostring(row.slot_type), tostring(row.plugin)), true
  end
  if row.database ~= row.here then
    return nil, ("replication slot %s belongs to database %s, not %s: name another slot"):format(name,
      tostring(row.database), tostring(row.here)), true
  end
  return true
end

local LAG = [[
SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8 AS lag_bytes,
       confirmed_flush_lsn::text AS confirmed_flush_lsn
  FROM pg_replication_slots WHERE slot_name = $1]]

--- Lag in bytes (the server's WAL position minus the slot's confirmed
-- one) and the slot's confirmed_flush_lsn, or nil, err.
function M.lag(conn, name)
  local r, err = query(conn, LAG, name)
  if not r then return nil, err end
  local row = r[1]
  if not row then return nil, "no such slot" end
  return row.lag_bytes, row.confirmed_flush_lsn
end

--- `lua-pglisten --drop-slot`: drops the slot and, when the runner created
-- it, the publication.  Returns a list of lines saying what was done, or
-- nil, err.
function M.drop(conn, cfg)
  local done = {}
  local row, err = M.slot(conn, cfg.slot)
  if row == nil then return nil, err end
  if row then
    if row.active then
      return nil, ("replication slot %s is in use by process %s: stop the runner that streams it first")
        :format(cfg.slot, tostring(row.active_pid))
    end
    local ok, derr = conn:exec("SELECT pg_drop_replication_slot($1)", cfg.slot)
    if not ok then return nil, ("cannot drop replication slot %s: %s"):format(cfg.slot, derr) end
    done[#done + 1] = "dropped replication slot " .. cfg.slot
  else
    done[#done + 1] = "no replication slot " .. cfg.slot
  end
  local sok, snap = pcall(require, "pglisten.snapshot")
  if sok then snap.forget(conn, cfg.slot) end -- its snapshot record, if any
  local pub
  pub, err = M.publication(conn, cfg.publication)
  if pub == nil then return nil, err end
  if pub and pub.created then
    local q = assert(conn:escape_identifier(cfg.publication))
    local ok, derr = conn:exec("DROP PUBLICATION " .. q)
    if not ok then return nil, ("cannot drop publication %s: %s"):format(cfg.publication, derr) end
    done[#done + 1] = "dropped publication " .. cfg.publication
  elseif pub then
    done[#done + 1] = "kept publication " .. cfg.publication .. " (lua-pglisten did not create it)"
  end
  return done
end

return M
