--- Helpers shared by `pglisten.outbox` and `pglisten.outbox_finish`:
-- argument checks (raising at the public caller's level), PostgreSQL array
-- literals, SQL NULL as nil, and the rollback after a failure.  Internal.
-- @module pglisten.outbox_util

local pg = require "pglisten"

local null = pg.null
local concat, mtype = table.concat, math.type

---------------------------------------------------------------------------
-- Arguments
---------------------------------------------------------------------------

local function check_conn(conn, fname)
  local t = type(conn)
  if (t ~= "userdata" and t ~= "table") or type(conn.exec) ~= "function" then
    error(("bad argument #1 to '%s' (pglisten connection expected, got %s)"):format(fname, t), 3)
  end
end

local function argerror(n, fname, msg)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), 3)
end

-- A PostgreSQL array literal of text: every element double-quoted, with
-- backslashes and double quotes escaped, so that no element can be read as
-- NULL, split at a comma or trimmed.
local function text_array(list, n, fname)
  if type(list) ~= "table" then argerror(n, fname, "array of strings expected, got " .. type(list)) end
  local parts = {}
  for i = 1, #list do
    local s = list[i]
    if type(s) ~= "string" then
      argerror(n, fname, ("element %d must be a string, got %s"):format(i, type(s)))
    end
    parts[i] = '"' .. s:gsub('[\\"]', "\\%0") .. '"'
  end
  return "{" .. concat(parts, ",") .. "}"
end

local function bigint_array(list, n, fname)
  if list == nil then return "{}", 0 end
  if type(list) ~= "table" then argerror(n, fname, "array of integer ids expected, got " .. type(list)) end
  local parts = {}
  for i = 1, #list do
    local id = list[i]
    if mtype(id) ~= "integer" then
      argerror(n, fname, ("element %d must be an integer id, got %s"):format(i, mtype(id) or type(id)))
    end
    parts[i] = ("%d"):format(id)
  end
  return "{" .. concat(parts, ",") .. "}", #parts
end

local function opt_string(v, n, fname, what)
  if v ~= nil and type(v) ~= "string" then
    argerror(n, fname, what .. " must be a string or nil, got " .. type(v))
  end
  return v
end

-- SQL NULL as nil in the tables handed to callers.
local function nonull(v)
  if v == null then return nil end
  return v
end

-- Rolls back what the outbox began; the caller gets the first error.
local function abort(conn, err, code)
  -- also on a lost connection: the facade fails every call of a lost
  -- transaction until it is ended, and answers this ROLLBACK itself
  if conn:status() ~= "ok" or conn:txstatus() ~= "idle" then conn:exec("ROLLBACK") end
  return nil, err, code
end

return {
  check_conn = check_conn,
  argerror = argerror,
  text_array = text_array,
  bigint_array = bigint_array,
  opt_string = opt_string,
  nonull = nonull,
  abort = abort,
}
