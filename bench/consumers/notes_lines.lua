--- bench/profile.sh only: notes.lua under a Lua count hook, to see which
-- Lua functions the runner executes per note (callgrind sees only C
-- functions: the Lua code is all inside luaV_execute).
--
-- The hook is set once the backlog is released (after on_connect, so the
-- set-up does not count) and fires on every VM instruction and every call;
-- instructions and calls are counted per function.  When notes.lua exits
-- (os.exit closes the state) a __gc sentinel writes them, per note, to
-- $PROFILE_LINES_OUT (default stderr).  The hook slows everything down:
-- the counts are what matters, not the rates.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local spec = dofile(here .. "notes.lua")
local C = dofile(here .. "common.lua")

local getinfo, sethook = debug.getinfo, debug.sethook
local ops, calls, names, total = {}, {}, {}, 0

-- "count" every VM instruction (charged to the running Lua function);
-- "call"/"tail call" once per call (a C function's key is its name).
local function hook(event)
  local info = getinfo(2, "S")
  local key
  if info.what == "C" then
    local n = getinfo(2, "n")
    key = "[C] " .. (n and n.name or "?")
  else
    key = info.short_src .. ":" .. info.linedefined
  end
  if event == "count" then
    ops[key] = (ops[key] or 0) + 1
    total = total + 1
  else
    calls[key] = (calls[key] or 0) + 1
  end
  if not names[key] then
    local n = getinfo(2, "n")
    names[key] = n and n.name or "?"
  end
end

local function write_counts()
  sethook()
  local keys = {}
  for k in pairs(names) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b)
    local x, y = ops[a] or 0, ops[b] or 0
    if x ~= y then return x > y end
    return (calls[a] or 0) > (calls[b] or 0)
  end)
  local path = os.getenv("PROFILE_LINES_OUT")
  local out = path and path ~= "" and io.open(path, "w") or io.stderr
  local ncalls = 0
  for _, c in pairs(calls) do ncalls = ncalls + c end
  out:write(("Lua VM instructions: %.1f per note, calls: %.1f per note (N=%d)\n"):format(
    total / C.N, ncalls / C.N, C.N))
  out:write("  instr/note  calls/note  share  function (Lua: file:line where defined; [C]: name)\n")
  for _, k in ipairs(keys) do
    local o, c = (ops[k] or 0) / C.N, (calls[k] or 0) / C.N
    if o >= 0.01 or c >= 0.01 then
      out:write(("  %10.2f  %10.2f  %4.1f%%  %s (%s)\n"):format(o, c, 100 * (ops[k] or 0) / total, k, names[k]))
    end
  end
  if out ~= io.stderr then out:close() end
end

local on_connect = spec.on_connect
spec.on_connect = function(...)
  on_connect(...)
  -- the sentinel lives until lua_close, which os.exit(0, true) runs
  package.loaded["bench.lines_sentinel"] = setmetatable({}, { __gc = write_counts })
  sethook(hook, "c", 1)
end

return spec
