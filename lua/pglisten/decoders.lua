--- The table of payload decoders: what a channel's `decode = NAME` means.
--
-- A decoder is `fn(payload) -> value` or `nil, message`; it never raises.
-- Built in: `json` (our strict decoder, src/json.c), `cjson` (lua-cjson) and
-- `raw` (the payload string).  The JSON decoders hand over objects and arrays
-- only.  A script adds its own at its top, before it returns its table:
--
--     require("pglisten.decoders").register("kv", function(payload)
--       ... return t          -- or: return nil, "why it cannot be decoded"
--     end)
--
-- Registrations last for the process; registering a name again replaces it,
-- so a script that registers its decoders can be reloaded (SIGHUP).
-- @module pglisten.decoders

local pg = require "pglisten"

local json_decode, cjson_decode = pg.json.safe.decode, pg.json.cjson_decode

local M = {}

--- The message for a payload that is JSON but not an object or array.
-- @param v the decoded value (pglisten.null for JSON null)
function M.not_container(v)
  return ("payload is JSON but not an object or array (%s)"):format(type(v) == "userdata" and "null" or type(v))
end
local not_container = M.not_container

-- name -> decoder; `builtin` names cannot be replaced (the runner's fast path
-- calls the C decoder itself for "json").
local registry, builtin = {}, {}

registry.json = function(payload)
  local v, err = json_decode(payload)
  if v == nil then return nil, err end
  if type(v) ~= "table" then return nil, not_container(v) end
  return v
end

registry.cjson = function(payload)
  local v, err = cjson_decode(payload)
  if v == nil then return nil, err end
  if type(v) ~= "table" then return nil, not_container(v) end
  return v
end

registry.raw = function(payload) return payload end

for name in pairs(registry) do builtin[name] = true end

--- The decoder registered under `name`.
-- @treturn function|nil `fn(payload) -> value | nil, err`, or nil and a message
function M.get(name)
  local fn = registry[name]
  if fn then return fn end
  return nil, ("no decoder %q"):format(tostring(name))
end

--- Registers `fn` as the decoder `name` (replacing an earlier registration
-- of that name).  `fn(payload)` returns the value for the handler, or nil and
-- a message: the note is then a decode failure (logged, passed to on_error).
-- A decoder that raises, or returns nothing, is a decode failure too.
-- Raises on a built-in name, an empty name or a non-function.
function M.register(name, fn)
  if type(name) ~= "string" or name == "" then
    error(("decoder name must be a non-empty string, got %s"):format(type(name)), 2)
  end
  if builtin[name] then error(("decoder %q is built in and cannot be replaced"):format(name), 2) end
  if type(fn) ~= "function" then
    error(("decoder %q must be a function, got %s"):format(name, type(fn)), 2)
  end
  registry[name] = function(payload)
    local ok, v, err = pcall(fn, payload)
    if not ok then return nil, ("decoder %q raised: %s"):format(name, tostring(v)) end
    if v == nil then return nil, err ~= nil and tostring(err) or ("decoder %q returned nothing"):format(name) end
    return v
  end
end

--- The names of every decoder, sorted.
function M.names()
  local t = {}
  for name in pairs(registry) do t[#t + 1] = name end
  table.sort(t)
  return t
end

return M
