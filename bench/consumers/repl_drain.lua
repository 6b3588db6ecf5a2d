--- capture.sh reader (lua-repl-core): the replication core without the
-- runner -- core.replication_connect, start, read -- each change decoded
-- into a Lua table (src/pgoutput.c) and handed to a Lua function that sums
-- new.id; a Standby Status Update per 100 transactions.  The floor under
-- the runner's own reader (consumers/repl_count.lua).  Slot $BENCH_SLOT,
-- publication $BENCH_PUB, the libpq PG* environment; after BENCH_N inserts,
-- RESULT (secs from the first message to the last insert).
--   lua5.4 bench/consumers/repl_drain.lua   (BENCH_BUILD: the build, default build)
local here = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./")
local repo = here .. "../../"
package.path = repo .. "lua/?.lua;" .. repo .. "lua/?/init.lua;" .. package.path
package.cpath = repo .. (os.getenv("BENCH_BUILD") or "build") .. "/?.so;" .. package.cpath
local C = dofile(here .. "common.lua")
local pg = require "pglisten"
local core = pg.core

local slot, pub = os.getenv("BENCH_SLOT") or "bench_slot", os.getenv("BENCH_PUB") or "bench_pub"
local r = assert(core.replication_connect("", 20))
assert(r:start(slot, 0, { publication = pub }))
local n, sum, commits, first = 0, 0, 0, nil
local function handler(m)
  n = n + 1
  sum = sum + m.new.id
end
while n < C.N do
  local msgs, err = r:read(1000)
  if not msgs then C.die("read: " .. tostring(err)) end
  if #msgs == 0 then
    core.poll({ r:pollfd() }, 1)
  else
    first = first or pg.now()
    for i = 1, #msgs do
      local m = msgs[i]
      if m.op == "INSERT" then
        handler(m)
      elseif m.kind == "commit" then
        commits = commits + 1
        if commits % 100 == 0 then r:confirm(m.end_lsn_int) end
      end
    end
  end
end
local secs = pg.now() - first
r:close()
C.finish("lua-repl-core", ("RESULT count=%d sum=%d secs=%.4f rate=%.0f"):format(n, sum, secs, n / secs))
