--- Logging for the runner: one line per event on stderr, with a UTC
-- timestamp and a level, as text (`key=value` fields) or as one JSON object
-- per line.
--
-- Every line is valid UTF-8, whatever bytes an event carries (a payload, a
-- channel name, a handler's error): a byte that is not part of valid UTF-8
-- (a lone continuation byte, an overlong form, a surrogate, a truncated
-- sequence, 0xF5..0xFF, a code point above U+10FFFF) is written as the four
-- characters `\xNN` (lowercase hex), in both formats.  Valid UTF-8 passes
-- unchanged.  Only the log line changes: handlers and pglisten.json see the
-- bytes as they came.
-- @module pglisten.log

local pg = require "pglisten"

local M = {}

M.LEVELS = { error = 1, warn = 2, info = 3, debug = 4 }

local encode = pg.json.safe.encode
local floor = math.floor
local ulen = utf8.len

-- `s` with each byte that is not part of valid UTF-8 written as \xNN.
-- utf8.len (strict) gives the position of the first such byte; a valid
-- string costs that one call.
local function clean_utf8(s)
  local n, bad = ulen(s)
  if n then return s end
  local parts, i = {}, 1
  repeat
    parts[#parts + 1] = s:sub(i, bad - 1)
    parts[#parts + 1] = ("\\x%02x"):format(s:byte(bad))
    i = bad + 1
    n, bad = ulen(s, i)
  until n
  parts[#parts + 1] = s:sub(i)
  return table.concat(parts)
end

-- Control characters as \n, \r, \t or \xNN, so that a record stays on one line.
local CONTROL = { ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
local function escape_controls(s)
  return (s:gsub("%c", function(c) return CONTROL[c] or ("\\x%02x"):format(c:byte()) end))
end

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
  if v ~= "" and not v:find("[%s\"=\\%c]") and ulen(v) then return v end
  return '"' .. clean_utf8(escape_controls((v:gsub('[\\"]', "\\%0")))) .. '"'
end

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- A copy of the encodable value v whose strings, keys too, are valid UTF-8
-- (v is not changed).  Raw iteration, as the encoder's.
local function clean_copy(v)
  local t = type(v)
  if t == "string" then return clean_utf8(v) end
  if t ~= "table" then return v end
  local c = {}
  for k, x in next, v do c[clean_copy(k)] = clean_copy(x) end
  return c
end

-- JSON rendering of a value that may not be encodable (functions, cycles).
local function json_safe(v)
  local t = type(v)
  if t == "number" or t == "boolean" then return v end
  if t == "string" then return clean_utf8(v) end
  if t == "table" and encode(v) then return clean_copy(v) end
  return clean_utf8(tostring(v))
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
      local obj = { ts = timestamp(), level = level, msg = clean_utf8(msg) }
      if fields then
        for k, v in pairs(fields) do
          if type(k) == "string" then k = clean_utf8(k) end
          if obj[k] == nil then obj[k] = json_safe(v) end
        end
      end
      line = encode(obj) or ('{"level":"error","msg":"log record could not be encoded"}')
    else
      local parts = { timestamp(), ("%-5s"):format(level:upper()), clean_utf8(escape_controls(msg)) }
      if fields then
        for _, k in ipairs(sorted_keys(fields)) do
          parts[#parts + 1] = clean_utf8(escape_controls(tostring(k))) .. "=" .. text_value(fields[k])
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
