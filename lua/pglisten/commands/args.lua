--- Argument parsing for the subcommands (`lua-pglisten outbox ...`,
-- `lua-pglisten backfill ...`): `--name VALUE`, `--name=VALUE`, `-x VALUE`,
-- flags, repeatable options, `--` and positional arguments.
-- @module pglisten.commands.args

local M = {}

local function find(options, name, short)
  for _, o in ipairs(options) do
    if (short and o.short == name) or (not short and o.long == name) then return o end
  end
end

-- A value as the option wants it: a positive integer for `integer` ones.
local function convert(o, val)
  if o.integer then
    local n = math.tointeger(tonumber(val))
    if not n or n < 1 or not val:match("^%d+$") then
      return nil, ("option --%s needs a whole number >= 1, got %q"):format(o.long, val)
    end
    return n
  end
  return val
end

local function store(opts, o, val)
  if o.many then
    opts[o.long] = opts[o.long] or {}
    local t = opts[o.long]
    t[#t + 1] = val
  else
    if opts[o.long] ~= nil then return nil, "option --" .. o.long .. " given twice" end
    opts[o.long] = val
  end
  return true
end

--- Parses `argv[first..]` against `options` (`{long=, short=, arg=,
-- integer=, many=}`); returns opts (with `opts[1..]` the positional
-- arguments), or nil and a usage error.
function M.parse(options, argv, first)
  local opts, i = {}, first or 1
  while i <= #argv do
    local a = argv[i]
    local o, val
    if a == "--" then
      for j = i + 1, #argv do opts[#opts + 1] = argv[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, v = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      o, val = find(options, name, false), v
      if not o then return nil, "unknown option --" .. name end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      o = find(options, a:sub(2, 2), true)
      if not o then return nil, "unknown option " .. a:sub(1, 2) end
      if #a > 2 then val = a:sub(3) end
    else
      opts[#opts + 1] = a
    end
    if o then
      if o.arg then
        if val == nil then
          i = i + 1
          val = argv[i]
          if val == nil then return nil, "option --" .. o.long .. " needs a value" end
        end
        local err
        val, err = convert(o, val)
        if val == nil then return nil, err end
      elseif val ~= nil then
        return nil, "option --" .. o.long .. " takes no value"
      else
        val = true
      end
      local ok, err = store(opts, o, val)
      if not ok then return nil, err end
    end
    i = i + 1
  end
  return opts
end

--- The database to use: --db, else $DATABASE_URL, else libpq's environment.
function M.db(opts)
  return opts.db or os.getenv("DATABASE_URL") or ""
end

--- Writes "lua-pglisten: ..." and a newline to stderr.
function M.printerr(...)
  io.stderr:write("lua-pglisten: ", ...)
  io.stderr:write("\n")
end

return M
