--- The initial snapshot of a logical replication source: the rows the
-- tables held at the slot's consistent point, handed to the handlers as
-- INSERT events with `note.snapshot = true`, before streaming starts.
--
-- How the replication source (pglisten.sources.replication) uses it, in
-- this order; each step commits before the next:
--
--   1. `snapshot.pending(conn, slot)`: true when a snapshot of `slot` was
--      begun and never finished (a runner killed during it).  The slot is
--      then dropped (DROP_REPLICATION_SLOT) and the steps start again at 2:
--      a snapshot is all or nothing.
--   2. `snapshot.begin(conn, slot)`: records "snapshot of `slot` under way"
--      in `pglisten.slots` on the source, in its own transaction, BEFORE the
--      slot is created, so that no slot exists whose snapshot is unrecorded.
--   3. `CREATE_REPLICATION_SLOT slot LOGICAL pgoutput EXPORT_SNAPSHOT` on
--      the replication connection: consistent_point and snapshot_name.
--   4. `snapshot.run(rt, { snapshot = snapshot_name, ... })`.  Until it
--      returns, the replication connection must stay OPEN and IDLE: the
--      exported snapshot lives only while its connection runs no other
--      command (any command, START_REPLICATION included, ends it).
--   5. `snapshot.done(conn, slot)` once run() returned true.
--   6. `START_REPLICATION SLOT slot LOGICAL <consistent_point>`.
--
-- Why nothing falls between the snapshot and the stream, and nothing is
-- delivered twice: the exported snapshot sees exactly the transactions
-- that committed before the slot's consistent point, and the slot streams
-- exactly those that commit after it.
--
-- `conn` in pending/begin/done/forget is a pglisten connection to the
-- source database (not the replication one: these use parameters).  They
-- need CREATE on the database the first time (schema `pglisten`, table
-- `pglisten.slots`); nothing else of the outbox schema is needed.
--
-- Reading: one REPEATABLE READ, READ ONLY transaction on its own
-- connection imports the snapshot (SET TRANSACTION SNAPSHOT), then reads
-- each table in key order, one page of at most `page` rows per query
-- (keyset: `WHERE (k1, k2) > ($1, $2) ORDER BY k1, k2 LIMIT $3`), on the
-- primary key, or the replica identity index when the table has one, or
-- ctid when it has neither.  Each page goes to `deliver` before the next is
-- read, so memory holds one page; a page takes its rows while their values
-- stay under PAGE_BYTES (conn:exec_upto: the query's other rows are read
-- and dropped, and come with the next page), and its LIMIT follows the
-- rows' size (FIRST_PAGE rows first, then as many as the last page's row
-- size lets, up to `page`), so that few rows are read in vain.  Each table's rows are preceded by one
-- TRUNCATE event (note.snapshot set; `truncate = false` leaves it out):
-- a target that an interrupted snapshot left half filled, with rows the
-- source has deleted since, converges when the snapshot is done again.
-- A handler for tables with foreign keys truncates with CASCADE (the
-- children's snapshot follows).  The snapshot transaction itself stays open
-- for the whole snapshot: that is inherent (the snapshot lives in it), and
-- while it runs the source's VACUUM cannot remove rows it could see.
--
-- Values are typed as the stream types them: exec's rules (both use the
-- same C function), and a column of a domain type as text, as pgoutput
-- sends its domain type's OID (exec would see the base type).  Generated
-- columns are left out, as pgoutput leaves them out; with `publication`
-- set, only the publication's columns and rows (PostgreSQL 15 column lists
-- and row filters).  Tables are read parents first: a table before the
-- tables whose foreign keys point to it (otherwise in the order given), so
-- that a target with the same foreign keys accepts every page.
-- @module pglisten.snapshot

local pg = require "pglisten"

local M = {}

M.PAGE = 1000
M.FIRST_PAGE = 10
M.PAGE_BYTES = 16 * 1024 * 1024

-- Exported snapshot names: "%08X-%08X-%u" (PostgreSQL 13+), "%08X-%u" before.
local function valid_snapshot(name)
  return type(name) == "string" and #name <= 64
    and (name:match("^%x+%-%x+%-%d+$") or name:match("^%x+%-%x+$")) ~= nil
end
M.valid_snapshot = valid_snapshot

-- Types that exec converts from text (src/result.c pgl_text_converts).
local CONVERTS = { [20] = true, [21] = true, [23] = true, [26] = true, [700] = true,
  [701] = true, [1700] = true, [16] = true, [114] = true, [3802] = true }

---------------------------------------------------------------------------
-- Catalog
---------------------------------------------------------------------------

local REL = [[
SELECT c.oid::bigint AS oid, n.nspname AS schema, c.relname AS table, c.relreplident AS ident,
       c.relkind::text AS kind
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = $1::regclass]]

local COLUMNS = [[
SELECT a.attname AS name, a.atttypid::bigint AS type, t.typtype AS typtype
  FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = $1::oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
 ORDER BY a.attnum]]

-- The key columns of the replica identity index ($2) or of the primary key,
-- and the collation of each in the index (its uniqueness; the column's own
-- may be another, a nondeterministic one under which distinct keys tie);
-- `plain` is false for a column the keyset cannot page on: one the index
-- orders by another operator class than its type's default (whose equality
-- may differ, as record_image_ops's does), or of a composite type (a text
-- parameter would be an anonymous record).
local KEY = [[
SELECT a.attname AS name, cn.nspname AS coll_schema, co.collname AS coll_name,
       oc.opcdefault AND t.typtype <> 'c' AS plain
  FROM pg_catalog.pg_index i
 CROSS JOIN LATERAL unnest(i.indkey::int2[], i.indcollation::oid[], i.indclass::oid[])
       WITH ORDINALITY AS k(attnum, coll, opc, ord)
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
  JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_catalog.pg_opclass oc ON oc.oid = k.opc
  LEFT JOIN pg_catalog.pg_collation co ON co.oid = k.coll
  LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace
 WHERE i.indrelid = $1::oid AND k.ord <= i.indnkeyatts
   AND CASE WHEN $2::bool THEN i.indisreplident ELSE i.indisprimary END
 ORDER BY k.ord]]

local PUBLISHED = [[
SELECT array_to_json(attnames)::text AS attnames, rowfilter
  FROM pg_catalog.pg_publication_tables
 WHERE pubname = $1 AND schemaname = $2 AND tablename = $3]]

local function q(conn, sql, ...)
  local rows, err, code = conn:exec(sql, ...)
  if not rows then error({ err = err, code = code }, 0) end
  return rows
end

-- A page: its rows while their values stay under PAGE_BYTES (the rest of
-- the query's rows are dropped and read again with the next page).
local function q_page(conn, sql, ...)
  local rows, err, code = conn:exec_upto(M.PAGE_BYTES, sql, ...)
  if not rows then error({ err = err, code = code }, 0) end
  return rows
end

--- Describes table `name` (as the user wrote it): its columns, the key to
-- page on and the SQL of the first and later pages.
local function describe(conn, name, opts)
  local rel = q(conn, REL, name)[1]
  local cols = q(conn, COLUMNS, rel.oid)
  local keys = q(conn, KEY, rel.oid, rel.ident == "i")
  if #keys == 0 and rel.ident == "i" then keys = q(conn, KEY, rel.oid, false) end -- the index was dropped meanwhile
  for _, k in ipairs(keys) do
    if k.plain ~= true then keys = {} break end -- paged on ctid, which is unique in the snapshot
  end
  local filter
  if opts.publication then
    local p = q(conn, PUBLISHED, opts.publication, rel.schema, rel.table)[1]
    if not p then
      error({ err = ("%s.%s is not in publication %s"):format(rel.schema, rel.table, opts.publication) }, 0)
    end
    local keep = {}
    for _, a in ipairs(pg.json.decode(p.attnames)) do keep[a] = true end
    local kept = {}
    for _, c in ipairs(cols) do if keep[c.name] then kept[#kept + 1] = c end end
    cols = kept
    if p.rowfilter ~= pg.null then filter = p.rowfilter end
  end
  return rel, cols, keys, filter
end

--- A name for the key text of key `i` that no column has.
local function key_alias(taken, i)
  local a = "?k" .. i
  while taken[a] do a = "?" .. a end
  taken[a] = true
  return a
end

--- The page queries of a table: first (no key yet), next ($1.. = last keys).
local function page_sql(conn, rel, cols, keys, filter)
  local function id(s) return assert(conn:escape_identifier(s)) end
  local list, taken = {}, {}
  for _, c in ipairs(cols) do
    local qn = id(c.name)
    taken[c.name] = true
    if c.typtype == "d" and not CONVERTS[c.type] then
      -- pgoutput sends the domain's OID: text, from the output function
      list[#list + 1] = ("CASE WHEN %s IS NULL THEN NULL ELSE pg_catalog.format('%%s', %s) END AS %s")
        :format(qn, qn, qn)
    else
      list[#list + 1] = qn
    end
  end
  local order, aliases, params = {}, {}, {}
  -- no key: ctid, unique in the snapshot; (tableoid, ctid) across partitions
  local kcols = #keys > 0 and keys or rel.kind == "p" and { { sys = "tableoid", cast = "oid" },
    { sys = "ctid", cast = "tid" } } or { { sys = "ctid", cast = "tid" } }
  for i, k in ipairs(kcols) do
    local qk = k.sys or id(k.name)
    aliases[i] = key_alias(taken, i)
    -- the key as text: it reads back as the same value ($n::text input)
    list[#list + 1] = ("%s::text AS %s"):format(qk, id(aliases[i]))
    -- ordered and compared as the index makes it unique
    order[i] = k.coll_name and k.coll_name ~= pg.null
      and ("%s COLLATE %s.%s"):format(qk, id(k.coll_schema), id(k.coll_name)) or qk
    params[i] = k.cast and ("$%d::%s"):format(i, k.cast) or ("$%d"):format(i)
  end
  local from = ("SELECT %s FROM %s.%s"):format(table.concat(list, ", "), id(rel.schema), id(rel.table))
  local where = filter and ("(%s)"):format(filter) or nil
  local o = table.concat(order, ", ")
  local first = from .. (where and (" WHERE " .. where) or "") .. (" ORDER BY %s LIMIT $1"):format(o)
  local cmp = ("(%s) > (%s)"):format(o, table.concat(params, ", "))
  local nxt = from .. " WHERE " .. (where and (where .. " AND ") or "") .. cmp
    .. (" ORDER BY %s LIMIT $%d"):format(o, #kcols + 1)
  return first, nxt, aliases
end

-- The rows of the page after one of `n` rows and `bytes` (at most `page`).
local function next_limit(n, bytes, page)
  if bytes <= 0 then return page end
  return math.max(1, math.min(page, n * M.PAGE_BYTES // bytes))
end

local FKEYS = [[
SELECT conrelid::bigint AS child, confrelid::bigint AS parent
  FROM pg_catalog.pg_constraint
 WHERE contype = 'f' AND conrelid <> confrelid
   AND conrelid = ANY ($1::oid[]) AND confrelid = ANY ($1::oid[])]]

--- The tables, parents before the tables whose foreign keys point to them
-- (otherwise in the order given; a cycle keeps the order given).
local function fk_order(conn, names)
  local oid, oids = {}, {}
  for i, n in ipairs(names) do
    oid[i] = q(conn, "SELECT $1::regclass::oid::bigint AS oid", n)[1].oid
    oids[i] = tostring(oid[i])
  end
  local parents = {}
  for _, r in ipairs(q(conn, FKEYS, "{" .. table.concat(oids, ",") .. "}")) do
    parents[r.child] = parents[r.child] or {}
    parents[r.child][r.parent] = true
  end
  local out, placed = {}, {}
  while #out < #names do
    local progress = false
    for i, n in ipairs(names) do
      if not placed[i] then
        local ready = true
        for j = 1, #names do
          if not placed[j] and j ~= i and parents[oid[i]] and parents[oid[i]][oid[j]] then ready = false end
        end
        if ready then
          placed[i], progress = true, true
          out[#out + 1] = n
          break
        end
      end
    end
    if not progress then -- a cycle: the rest as given
      for i, n in ipairs(names) do if not placed[i] then placed[i] = true; out[#out + 1] = n end end
    end
  end
  return out
end

---------------------------------------------------------------------------
-- Reading
---------------------------------------------------------------------------

local function stop_requested(rt)
  return rt ~= nil and rt.stopping ~= nil and rt:stopping()
end

local function make_note(rel, opts)
  local note = { snapshot = true, schema = rel.schema, table = rel.table }
  if opts.note then for k, v in pairs(opts.note) do note[k] = v end end
  return note
end

--- Reads one table page by page and delivers each page.  Returns rows read.
local function read_table(rt, conn, name, opts)
  local rel, cols, keys, filter = describe(conn, name, opts)
  local first, nxt, aliases = page_sql(conn, rel, cols, keys, filter)
  local last, total, limit = nil, 0, math.min(opts.page, M.FIRST_PAGE)
  if opts.truncate ~= false then
    -- the target may hold rows of an interrupted snapshot: start clean
    local ok, err = opts.deliver(name, { { kind = "truncate", op = "TRUNCATE", schema = rel.schema,
      table = rel.table, relid = rel.oid, relations = { { schema = rel.schema, table = rel.table, relid = rel.oid } },
      cascade = false, restart_identity = false } }, { make_note(rel, opts) })
    if not ok then
      error({ err = ("snapshot of %s: delivery failed: %s"):format(name, tostring(err)) }, 0)
    end
  end
  while true do
    if stop_requested(rt) then error({ err = "interrupted" }, 0) end
    if last then last[#aliases + 1] = limit end
    local rows = last and q_page(conn, nxt, table.unpack(last, 1, #aliases + 1)) or q_page(conn, first, limit)
    local n = rows.n or #rows
    if n == 0 then break end
    local events, notes = {}, {}
    for i = 1, n do
      local row = rows[i]
      if i == n then
        last = {}
        for j, a in ipairs(aliases) do last[j] = row[a] end
      end
      for _, a in ipairs(aliases) do row[a] = nil end
      events[i] = { kind = "insert", op = "INSERT", schema = rel.schema, table = rel.table,
        relid = rel.oid, new = row }
      notes[i] = make_note(rel, opts)
    end
    local ok, err = opts.deliver(name, events, notes)
    if not ok then
      error({ err = ("snapshot of %s: delivery failed: %s"):format(name, tostring(err)) }, 0)
    end
    total = total + n
    if n < limit and not rows.more then break end
    limit = next_limit(n, rows.bytes, opts.page)
  end
  return total
end

--- Reads the tables in the exported snapshot and delivers their rows.
-- @param rt the runner (or nil): `rt:stopping()` ends the snapshot between
--   pages with nil, "interrupted"; `rt.log` gets one line per table
-- @tparam table opts `conninfo` (the source; or `conn`, a pglisten
--   connection of the caller's, left open), `snapshot` (the exported
--   snapshot's name), `tables` (names; read parents first, see above), `page`
--   (rows per query, default 1000), `publication` (optional: its column
--   lists and row filters apply), `truncate` (false: no TRUNCATE event
--   before each table's rows), `note` (fields copied into every note),
--   `deliver(table, events, notes) -> ok, err` (one call per page; `table`
--   is the name as given in `tables`).
-- @return true, {table = rows}; or nil, err[, sqlstate]: nothing is
--   committed anywhere by the snapshot itself, the caller starts it again
--   (drop and recreate the slot)
function M.run(rt, opts)
  if type(opts) ~= "table" then error("bad argument #2 to 'run' (table expected)", 2) end
  if type(opts.deliver) ~= "function" then error("snapshot.run: opts.deliver must be a function", 2) end
  if type(opts.tables) ~= "table" then error("snapshot.run: opts.tables must be a list of table names", 2) end
  if not valid_snapshot(opts.snapshot) then
    return nil, ("invalid snapshot name %q: expected hex digits and dashes, as CREATE_REPLICATION_SLOT "
      .. "... EXPORT_SNAPSHOT returns it"):format(tostring(opts.snapshot)), "22023"
  end
  local o = setmetatable({ page = math.tointeger(opts.page) or M.PAGE }, { __index = opts })
  if o.page < 1 then error("snapshot.run: opts.page must be a positive integer", 2) end
  local conn = opts.conn
  if not conn then
    local err
    conn, err = pg.connect(opts.conninfo, { heal = false, interruptible = rt ~= nil, timeout = opts.timeout })
    if not conn then return nil, "snapshot: cannot connect to the source: " .. tostring(err), "08001" end
  end
  local counts = {}
  local ok, e = pcall(function()
    q(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    q(conn, ("SET TRANSACTION SNAPSHOT '%s'"):format(opts.snapshot)) -- validated above
    for _, name in ipairs(fk_order(conn, opts.tables)) do
      local t0 = pg.monotonic()
      counts[name] = read_table(rt, conn, name, o)
      if rt and rt.log then
        rt.log.info("snapshot table done", { table = name, rows = counts[name],
          seconds = ("%.3f"):format(pg.monotonic() - t0) })
      end
    end
    q(conn, "COMMIT")
  end)
  if not ok and conn:txstatus() ~= "idle" then conn:exec("ROLLBACK") end
  if not opts.conn then conn:close() end
  if ok then return true, counts end
  if type(e) ~= "table" then error(e, 0) end -- a programmer error (deliver raised, say)
  return nil, e.err, e.code
end

---------------------------------------------------------------------------
-- All or nothing: pglisten.slots on the source
---------------------------------------------------------------------------

local INSTALL = [[
SELECT pg_catalog.pg_advisory_xact_lock(1885826153, 2);
CREATE SCHEMA IF NOT EXISTS pglisten;
CREATE TABLE IF NOT EXISTS pglisten.slots (
  slot          text PRIMARY KEY,
  snapshot_done boolean NOT NULL DEFAULT false,
  started_at    timestamptz NOT NULL DEFAULT now(),
  done_at       timestamptz
);
COMMENT ON TABLE pglisten.slots IS 'lua-pglisten: replication slots whose initial snapshot was begun; '
  'snapshot_done false = never finished: the runner drops the slot and takes the snapshot again']]

local function in_tx(conn, fn)
  return conn:transaction(function(c)
    local ok, err, code = fn(c)
    if not ok then return nil, err, code end
    return ok
  end)
end

--- True when a snapshot of `slot` was begun and not finished: drop the
-- slot and start again.  False when it finished, or none was recorded.
-- @return bool, or nil, err, sqlstate
function M.pending(conn, slot)
  local rows, err, code = conn:exec("SELECT snapshot_done FROM pglisten.slots WHERE slot = $1", slot)
  if not rows then
    if code == "42P01" or code == "3F000" then return false end -- never installed: nothing begun
    return nil, err, code
  end
  return rows[1] ~= nil and rows[1].snapshot_done == false
end

--- Records that a snapshot of `slot` begins (committed when it returns).
-- Call it before the slot is created.
-- @return true, or nil, err, sqlstate
function M.begin(conn, slot)
  return in_tx(conn, function(c)
    local ok, err, code = c:exec(INSTALL)
    if not ok then return nil, err, code end
    return c:exec([[INSERT INTO pglisten.slots (slot) VALUES ($1)
      ON CONFLICT (slot) DO UPDATE SET snapshot_done = false, started_at = now(), done_at = NULL]], slot)
  end)
end

--- Records that the snapshot of `slot` is complete (committed when it
-- returns).  Call it after run() returned true, before START_REPLICATION.
-- @return true, or nil, err, sqlstate
function M.done(conn, slot)
  local rows, err, code = conn:exec(
    "UPDATE pglisten.slots SET snapshot_done = true, done_at = now() WHERE slot = $1", slot)
  if not rows then return nil, err, code end
  if rows.affected ~= 1 then return nil, ("no snapshot of slot %s was begun"):format(slot), "P0002" end
  return true
end

--- Forgets `slot` (after its slot was dropped, e.g. by --drop-slot).
function M.forget(conn, slot)
  local rows, err, code = conn:exec("DELETE FROM pglisten.slots WHERE slot = $1", slot)
  if not rows and code ~= "42P01" and code ~= "3F000" then return nil, err, code end
  return true
end

return M
