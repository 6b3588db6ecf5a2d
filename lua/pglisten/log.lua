--- Logging for the runner: one line per event on stderr, with a UTC
-- timestamp and a level, as text (`key=value` fields) or as one JSON object
-- per line.
-- @module pglisten.log

local pg = require "pglisten"

local M = {}

M.LEVELS = { error = 1, warn = 2, info = 3, debug = 4 }

local encode = pg.json.safe.encode
local floor = math.floor

local function timestamp()
  local t = pg.now()
  local s = floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", s) .. (".%03dZ"):format(floor((t - s) * 1000))
end

-- A text field value: bare when it is a plain word, quoted (newlines and
-- quotes escaped) otherwise, so that every event stays on one line.
local function text_value(v)
  if type(v) ~= "string" then
    if type(v) == "table" then v = encode(v) or tostring(v) else v = tostring(v) end
  end
  if v ~= "" and not v:find("[%s\"=\\%c]") then return v end
  return '"' .. v:gsub('[\\"]', "\\%0"):gsub("\n", "\\n"):gsub("\r", "\\r"):gsub("\t", "\\t")
    :gsub("%c", function(c) return ("\\x%02x"):format(c:byte()) end) .. '"'
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- JSON rendering of a value that may not be encodable (functions, cycles).
local function json_safe(v)
  local t = type(v)
  if t == "string" or t == "number" or t == "boolean" then return v end
  if t == "table" then
    if encode(v) then return v end
    return tostring(v)
  end
  return tostring(v)
end

--- Creates a logger.
-- @tparam table opts `level` ("error"|"warn"|"info"|"debug"), `format`
--   ("text"|"json"), `out` (a file, default io.stderr)
function M.new(opts)
  opts = opts or {}
  local self = {
    level = M.LEVELS[opts.level or "info"],
    format = opts.format or "text",
    out = opts.out or io.stderr,
  }
  assert(self.level, "unknown log level")

  --- The line `log` would write, without its newline.
  function self.render(level, msg, fields)
    local line
    if self.format == "json" then
      local obj = { ts = timestamp(), level = level, msg = msg }
      if fields then
        for k, v in pairs(fields) do
          if obj[k] == nil then obj[k] = json_safe(v) end
        end
      end
      line = encode(obj) or ('{"level":"error","msg":"log record could not be encoded"}')
    else
      local parts = { timestamp(), ("%-5s"):format(level:upper()), (msg:gsub("\n", "\\n")) }
      if fields then
        for _, k in ipairs(sorted_keys(fields)) do
          parts[#parts + 1] = k .. "=" .. text_value(fields[k])
        end
      end
      line = table.concat(parts, " ")
    end
    return line
  end

  function self.log(level, msg, fields)
    if M.LEVELS[level] > self.level then return end
    local line = self.render(level, msg, fields)
    self.out:write(line, "\n")
    self.out:flush()
  end

  function self.enabled(level) return M.LEVELS[level] <= self.level end
  function self.error(msg, fields) self.log("error", msg, fields) end
  function self.warn(msg, fields) self.log("warn", msg, fields) end
  function self.info(msg, fields) self.log("info", msg, fields) end
  function self.debug(msg, fields) self.log("debug", msg, fields) end
  return self
end

return M
