--- bench/profile.sh only: notes.lua under a Lua count hook, to see which
-- Lua functions the runner executes per note (callgrind sees only C
-- functions: the Lua code is all inside luaV_execute).
--
-- The hook is set once the backlog is released (after on_connect, so the
-- set-up does not count) and fires on every VM instruction; instructions
-- and distinct lines are counted per Lua function.  When notes.lua exits
-- (os.exit closes the state) a __gc sentinel writes them, per note, to
-- $PROFILE_LINES_OUT (default stderr).  The hook slows everything down:
-- the counts are what matters, not the rates.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local spec = dofile(here .. "notes.lua")
local C = dofile(here .. "common.lua")

local getinfo, sethook = debug.getinfo, debug.sethook
local ops, lines, names, total = {}, {}, {}, 0
local last_line = {}

local function hook(event, line)
  local info = getinfo(2, "Sl")
  local key = info.short_src .. ":" .. info.linedefined
  if event == "count" then
    ops[key] = (ops[key] or 0) + 1
    total = total + 1
    local l = info.currentline
    if l ~= last_line[key] then   -- a new line (the "line" event misses loops on one line)
      lines[key] = (lines[key] or 0) + 1
      last_line[key] = l
    end
  end
  if not names[key] then
    local n = getinfo(2, "n")
    names[key] = n and n.name or "?"
  end
end

local function write_counts()
  sethook()
  local keys = {}
  for k in pairs(ops) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return ops[a] > ops[b] end)
  local path = os.getenv("PROFILE_LINES_OUT")
  local out = path and path ~= "" and io.open(path, "w") or io.stderr
  out:write(("Lua VM instructions: %.1f per note (N=%d); by function (file:line where defined):\n"):format(
    total / C.N, C.N))
  out:write("  instr/note  lines/note  share  function\n")
  for _, k in ipairs(keys) do
    if ops[k] / C.N >= 0.01 then
      out:write(("  %10.2f  %10.2f  %4.1f%%  %s (%s)\n"):format(
        ops[k] / C.N, (lines[k] or 0) / C.N, 100 * ops[k] / total, k, names[k]))
    end
  end
  if out ~= io.stderr then out:close() end
end

local on_connect = spec.on_connect
spec.on_connect = function(...)
  on_connect(...)
  -- the sentinel lives until lua_close, which os.exit(0, true) runs
  package.loaded["bench.lines_sentinel"] = setmetatable({}, { __gc = write_counts })
  sethook(hook, "", 1)
end

return spec
