--- The command-line parser of every lua-pglisten command: the runner's
-- options (pglisten.cli) and the subcommands' (pglisten.commands.*).
--
-- `--name VALUE`, `--name=VALUE` (an empty VALUE is a value), `-x VALUE`,
-- `-xVALUE` for an option that takes a value, flags, `--` ending the options,
-- and positional arguments anywhere.  A value is taken as it is, even when it
-- starts with `-`.  It does no I/O and knows no command: each command passes
-- its table of options and checks what the options mean together itself.
-- @module pglisten.argv

local M = {}

local function find(options, name, short)
  for _, o in ipairs(options) do
    if (short and o.short == name) or (not short and o.long == name) then return o end
  end
end

-- A number >= 0 (`number`), and > 0 (`positive`) from 0.001 to a finite one.
local function number(o, val)
  local n = tonumber(val)
  if not n or n < 0 or n ~= n then return nil, "option --" .. o.long .. " needs a number >= 0, got " .. val end
  -- a reconnect delay of 0 (or 1e-300: a thousand doublings to reach a
  -- millisecond) would reconnect in a busy loop; the script's reconnect keys
  -- start at 0.001 too, and an infinite one would never reconnect
  if o.positive and (n < 0.001 or n == math.huge) then
    return nil, "option --" .. o.long .. " needs a number > 0 (from 0.001 to a finite number of seconds), got " .. val
  end
  return n
end

-- A whole number >= 1 written in digits (`integer`).
local function integer(o, val)
  local n = math.tointeger(tonumber(val))
  if not n or n < 1 or not val:match("^%d+$") then
    return nil, ("option --%s needs a whole number >= 1, got %q"):format(o.long, val)
  end
  return n
end

-- The items of a `list` value: comma-separated, empty items dropped.
local function items(o, val)
  local l = {}
  for v in val:gmatch("[^,]+") do l[#l + 1] = v end
  if #l == 0 then return nil, ("option --%s needs at least one value, got %q"):format(o.long, val) end
  return l
end

-- A value as the option wants it.
local function convert(o, val)
  if o.number then return number(o, val) end
  if o.integer then return integer(o, val) end
  if o.list then return items(o, val) end
  return val
end

-- Stores a value: a `list` or `many` option grows; another one given twice
-- is refused unless the table says `twice = "last"` (the later one wins).
local function store(options, opts, o, val)
  if o.list or o.many then
    local t = opts[o.long] or {}
    if o.list then
      for _, v in ipairs(val) do t[#t + 1] = v end
    else
      t[#t + 1] = val
    end
    opts[o.long] = t
    return true
  end
  if opts[o.long] ~= nil and options.twice ~= "last" then return nil, "option --" .. o.long .. " given twice" end
  opts[o.long] = val
  return true
end

-- The option an argument names and the value glued to it (nil: none), or
-- nil and an error; `positional` when the argument is not an option.
local function option_of(options, a)
  if a:sub(1, 2) == "--" then
    local name, val = a:match("^%-%-([^=]+)=(.*)$")
    name = name or a:sub(3)
    local o = find(options, name, false)
    if not o then return nil, "unknown option --" .. name end
    if val ~= nil and not o.arg then return nil, "option --" .. o.long .. " takes no value" end
    return o, val
  elseif a:sub(1, 1) == "-" and #a > 1 then
    local o = find(options, a:sub(2, 2), true)
    if not o then return nil, "unknown option " .. a:sub(1, 2) end
    if #a == 2 then return o end
    if not o.arg then return nil, "option -" .. o.short .. " takes no value" end
    return o, a:sub(3)
  end
  return "positional"
end

--- Parses `argv[first..]` against `options`, an array of
-- `{long=, short=, arg=, number=, positive=, integer=, list=, many=}`:
-- `arg` takes a value; `number` (>= 0, `positive`: > 0) and `integer`
-- (>= 1) convert it; `list` splits it at commas and `many` keeps each
-- value, both growing when repeated.  `options.twice = "last"` lets an
-- option given twice take the later value; otherwise that is an error.
-- @tparam table options the command's options
-- @tparam table argv the arguments
-- @tparam[opt=1] integer first where to start in argv
-- @return opts keyed by long name (`true` for a flag), with `opts[1..]` the
-- positional arguments; or nil and a usage error
function M.parse(options, argv, first)
  local opts, i = {}, first or 1
  while i <= #argv do
    local a = argv[i]
    if a == "--" then
      for j = i + 1, #argv do opts[#opts + 1] = argv[j] end
      break
    end
    local o, val = option_of(options, a)
    if not o then return nil, val end
    if o == "positional" then
      opts[#opts + 1] = a
    else
      if o.arg and val == nil then
        i = i + 1
        val = argv[i]
        if val == nil then return nil, "option --" .. o.long .. " needs a value" end
      end
      local err
      if o.arg then
        val, err = convert(o, val)
        if val == nil then return nil, err end
      else
        val = true
      end
      val, err = store(options, opts, o, val)
      if not val then return nil, err end
    end
    i = i + 1
  end
  return opts
end

return M
