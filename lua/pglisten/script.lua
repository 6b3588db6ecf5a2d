--- Loading and validating a handler script.
--
-- A script returns a table: `channels` (required) maps channel names to a
-- handler function or to `{ handler = fn, decode = "json"|"raw"|"cjson", retry =
-- { attempts = N, backoff = s }, batch = N, durable = true, max_attempts = N }`;
-- optional `on_connect(db, info)`, `on_error(err, note, info)`, `reconnect =
-- { min = s, max = s }`, `heartbeat`, `heartbeat_timeout`, `stats_interval`,
-- `poll_interval`, `single_active`.  Errors name the file, and the line
-- where one is known.
-- @module pglisten.script

local pg = require "pglisten"

local M = {}

local function where(path, fn)
  if type(fn) == "function" then
    local info = debug.getinfo(fn, "S")
    if info and info.linedefined and info.linedefined > 0 and info.short_src then
      return ("%s:%d"):format(info.short_src, info.linedefined)
    end
  end
  return path
end

local function num(v, what, path, min, int)
  if v == nil then return nil end
  if type(v) ~= "number" or v ~= v or v < min or (int and math.type(v) ~= "integer") then
    error(("%s: %s must be %s >= %s, got %s"):format(path, what, int and "an integer" or "a number",
      tostring(min), type(v) == "number" and tostring(v) or type(v)), 0)
  end
  return v
end

local function check_channel_name(name, path)
  if type(name) ~= "string" then
    error(("%s: channels: keys must be channel names (strings), got %s"):format(path, type(name)), 0)
  end
  if name == "" or #name > pg.MAX_CHANNEL or name:find("\0", 1, true) then
    error(("%s: channels: invalid channel name %q (1 to %d bytes, no zero byte)"):format(
      path, name, pg.MAX_CHANNEL), 0)
  end
end

--- Normalizes one channel entry; raises a message naming file and line.
local function channel_entry(name, v, path)
  local e
  if type(v) == "function" then
    e = { handler = v }
  elseif type(v) == "table" then
    e = {}
    for k, x in pairs(v) do e[k] = x end
  else
    error(("%s: channels[%q]: expected a function or a table with a handler, got %s"):format(
      path, name, type(v)), 0)
  end
  local at = where(path, e.handler)
  local label = ("%s: channels[%q]"):format(at, name)
  if type(e.handler) ~= "function" then
    error(("%s: handler must be a function, got %s"):format(label, type(e.handler)), 0)
  end
  e.decode = e.decode or "json"
  if e.decode ~= "json" and e.decode ~= "raw" and e.decode ~= "cjson" then
    error(("%s: decode must be \"json\", \"raw\" or \"cjson\", got %s"):format(label, tostring(e.decode)), 0)
  end
  if e.retry ~= nil then
    if type(e.retry) ~= "table" then
      error(("%s: retry must be a table { attempts = N, backoff = seconds }"):format(label), 0)
    end
    e.retry = {
      attempts = num(e.retry.attempts, "retry.attempts", label, 1, true) or 3,
      backoff = num(e.retry.backoff, "retry.backoff", label, 0) or 1,
    }
  end
  e.batch = num(e.batch, "batch", label, 1, true)
  if e.durable ~= nil and type(e.durable) ~= "boolean" then
    error(("%s: durable must be a boolean"):format(label), 0)
  end
  e.max_attempts = num(e.max_attempts, "max_attempts", label, 1, true)
  e.name = name
  return e
end

--- Validates the table a script returned; returns the normalized spec.
function M.validate(t, path)
  if type(t) ~= "table" then
    error(("%s: the script must return a table with a 'channels' table, got %s"):format(path, type(t)), 0)
  end
  if type(t.channels) ~= "table" then
    error(("%s: the script must return a table with a 'channels' table, got channels = %s"):format(
      path, type(t.channels)), 0)
  end
  local spec = { path = path, channels = {}, names = {} }
  for name, v in pairs(t.channels) do
    check_channel_name(name, path)
    spec.channels[name] = channel_entry(name, v, path)
    spec.names[#spec.names + 1] = name
  end
  if #spec.names == 0 then
    error(("%s: 'channels' is empty: name at least one channel"):format(path), 0)
  end
  table.sort(spec.names)
  for _, hook in ipairs({ "on_connect", "on_error" }) do
    if t[hook] ~= nil and type(t[hook]) ~= "function" then
      error(("%s: %s must be a function, got %s"):format(path, hook, type(t[hook])), 0)
    end
    spec[hook] = t[hook]
  end
  if t.reconnect ~= nil then
    if type(t.reconnect) ~= "table" then
      error(("%s: reconnect must be a table { min = seconds, max = seconds }"):format(path), 0)
    end
    spec.reconnect = {
      min = num(t.reconnect.min, "reconnect.min", path, 0.001),
      max = num(t.reconnect.max, "reconnect.max", path, 0.001),
    }
  end
  spec.heartbeat = num(t.heartbeat, "heartbeat", path, 0)
  spec.heartbeat_timeout = num(t.heartbeat_timeout, "heartbeat_timeout", path, 0.001)
  spec.stats_interval = num(t.stats_interval, "stats_interval", path, 0)
  spec.poll_interval = num(t.poll_interval, "poll_interval", path, 0.01)
  spec.batch_size = num(t.batch_size, "batch_size", path, 1, true)
  if t.single_active ~= nil and type(t.single_active) ~= "boolean" and type(t.single_active) ~= "string" then
    error(("%s: single_active must be a boolean or a lock name (string)"):format(path), 0)
  end
  spec.single_active = t.single_active
  return spec
end

--- Loads and runs a script file, and validates what it returns.
-- @return spec, or nil and a message naming the file (and line)
function M.load(path)
  local chunk, err = loadfile(path, "t")
  if not chunk then return nil, err end
  local ok, res = xpcall(chunk, function(e)
    local msg = type(e) == "string" and e or ("(error object is a %s value)"):format(type(e))
    return debug.traceback(msg, 2)
  end)
  if not ok then return nil, res end
  local vok, spec = pcall(M.validate, res, path)
  if not vok then return nil, spec end
  return spec
end

return M
