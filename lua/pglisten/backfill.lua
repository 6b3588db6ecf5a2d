--- Backfill, the data side: a table's rows in primary-key order, in keyset
-- pages, as the INSERT events the capture trigger would have sent, and the
-- progress recorded in `pglisten.backfill` (keyed by table, channel and
-- WHERE text) so that a killed backfill resumes after its last finished page.
--
-- Each page is one short statement in autocommit: no transaction stays open
-- between pages, and none while the handlers run.  Identifiers go through
-- `escape_identifier`, the page's start key and the schema and table names
-- as `$n` parameters; the WHERE text is SQL the operator gives and is
-- trusted as such (it is put in parentheses, never mixed with input).
--
-- Runtime failures return `nil, err[, sqlstate]`; wrong argument types raise.
-- @module pglisten.backfill

local pg = require "pglisten"

local M = {}

local concat = table.concat

---------------------------------------------------------------------------
-- The table
---------------------------------------------------------------------------

local TABLE_INFO = [[
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       (SELECT json_agg(json_build_object('name', a.attname, 'type', format_type(a.atttypid, a.atttypmod))
                        ORDER BY k.ord)::text
          FROM pg_catalog.pg_index i
          CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary) AS keys
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass($1)]]

--- Looks up a table ("schema.table", or a name on the search_path) and its
-- primary key.
-- @param conn a pglisten connection
-- @tparam string name
-- @return `{schema, name, qualified, keys = {{name, type}, ...}, sql}` (sql:
--   the quoted relation), or nil, err
function M.table(conn, name)
  if type(name) ~= "string" then error("bad argument #2 to 'table' (string expected)", 2) end
  local rows, err, code = conn:exec(TABLE_INFO, name)
  if not rows then return nil, err, code end
  local r = rows[1]
  if not r then return nil, ("table %s does not exist"):format(name) end
  if r.kind ~= "r" and r.kind ~= "p" then return nil, ("%s is not a table"):format(name) end
  if r.keys == pg.null then
    return nil, ("table %s.%s has no primary key: backfill reads in primary-key order"):format(r.schema, r.name)
  end
  local t = { schema = r.schema, name = r.name, qualified = r.schema .. "." .. r.name, keys = pg.json.decode(r.keys) }
  t.sql = assert(conn:escape_identifier(r.schema)) .. "." .. assert(conn:escape_identifier(r.name))
  for _, k in ipairs(t.keys) do k.sql = assert(conn:escape_identifier(k.name)) end
  return t
end

--- The page query of table `t` (from M.table): rows after the key `$3..`
-- (all from the start when `after` is false), `$1` rows at most.  Each row
-- gives `payload`, the event's JSON text, written as notify_trigger writes
-- it, and `k`, its key as a JSON array of texts.
-- @return sql
function M.page_sql(t, where, after)
  local cols, params, casts = {}, {}, {}
  for i, k in ipairs(t.keys) do
    cols[i] = "t." .. k.sql
    params[i] = ("$%d::%s"):format(i + 3, k.type) -- a type name from format_type: the catalog's own text
    casts[i] = cols[i] .. "::text"
  end
  local cond = {}
  if where and where ~= "" then cond[#cond + 1] = "(" .. where .. "\n)" end
  if after then cond[#cond + 1] = ("(%s) > (%s)"):format(concat(cols, ", "), concat(params, ", ")) end
  return ([[
SELECT '{"op":"INSERT","schema":' || to_json($2::text) || ',"table":' || to_json($3::text)
       || ',"new":' || to_json(t)::text || ',"old":null}' AS payload,
       json_build_array(%s)::text AS k
  FROM %s AS t%s
 ORDER BY %s
 LIMIT $1]]):format(concat(casts, ", "), t.sql, #cond > 0 and ("\n WHERE " .. concat(cond, "\n   AND ")) or "",
    concat(cols, ", "))
end

--- Reads one page: up to `limit` rows after `last` (an array of key texts,
-- or nil for the first page).
-- @return array of `{payload, key}` (key: array of texts), or nil, err, sqlstate
function M.page(conn, t, where, last, limit)
  local sql = M.page_sql(t, where, last ~= nil)
  local rows, err, code = conn:exec(sql, limit, t.schema, t.name, table.unpack(last or {}))
  if not rows then return nil, err, code end
  local out = {}
  for i = 1, rows.n do
    out[i] = { payload = rows[i].payload, key = pg.json.decode(rows[i].k) }
  end
  return out
end

--- The planner's estimate of the rows to read (for the ETA): no query runs.
-- @return integer, or nil
function M.estimate(conn, t, where)
  local sql = "EXPLAIN (FORMAT JSON) SELECT 1 FROM " .. t.sql .. " AS t"
    .. ((where and where ~= "") and (" WHERE (" .. where .. "\n)") or "")
  local rows = conn:exec(sql)
  local plan = rows and rows[1] and rows[1]["QUERY PLAN"]
  if type(plan) == "string" then plan = pg.json.safe.decode(plan) end -- json columns may come decoded
  local n = plan and plan[1] and plan[1].Plan and plan[1].Plan["Plan Rows"]
  return math.tointeger(n) or (type(n) == "number" and math.floor(n)) or nil
end

---------------------------------------------------------------------------
-- Progress
---------------------------------------------------------------------------

--- The recorded progress of a backfill, or a new one.
-- @return `{last = keys or nil, rows = n, finished = text or nil}`, or nil, err, sqlstate
function M.progress(conn, tname, channel, where)
  local rows, err, code = conn:exec([[
SELECT last_key::text AS last_key, rows_done, finished_at::text AS finished_at
  FROM pglisten.backfill WHERE table_name = $1 AND channel = $2 AND where_sql = $3]], tname, channel, where or "")
  if not rows then return nil, err, code end
  local r = rows[1]
  if not r then return { rows = 0 } end
  return { rows = r.rows_done, finished = r.finished_at ~= pg.null and r.finished_at or nil,
    last = r.last_key ~= pg.null and pg.json.decode(r.last_key) or nil }
end

--- Records a finished page: its last key and the rows done so far
-- (`finished` true: the whole table).  One short statement.
-- @return true, or nil, err, sqlstate
function M.record(conn, tname, channel, where, last, rows_done, finished)
  local ok, err, code = conn:exec([[
INSERT INTO pglisten.backfill AS b (table_name, channel, where_sql, last_key, rows_done, finished_at)
VALUES ($1, $2, $3, $4::jsonb, $5, CASE WHEN $6::boolean THEN now() END)
ON CONFLICT (table_name, channel, where_sql) DO UPDATE
   SET last_key = excluded.last_key, rows_done = excluded.rows_done, updated_at = now(),
       finished_at = excluded.finished_at]],
    tname, channel, where or "", last and pg.json.encode(last) or nil, rows_done, finished and true or false)
  if not ok then return nil, err, code end
  return true
end

--- Forgets a backfill's progress (for --restart).
function M.forget(conn, tname, channel, where)
  local ok, err, code = conn:exec(
    "DELETE FROM pglisten.backfill WHERE table_name = $1 AND channel = $2 AND where_sql = $3",
    tname, channel, where or "")
  if not ok then return nil, err, code end
  return true
end

return M
