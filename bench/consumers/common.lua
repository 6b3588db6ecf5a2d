--- What the bench consumers share: the ../shared/bench consumer contract.
--
-- A consumer prints READY once listening (from on_connect, which the runner
-- calls after its LISTEN), reads nothing in backlog mode until the file
-- $BENCH_GO exists (on_connect blocks, so notifications queue on the server
-- meanwhile), handles BENCH_N notes and prints one RESULT line, then exits.
-- Loaded by the consumers with dofile(), next to them.

local pg = require "pglisten"

local M = {}

--- Notes to handle (BENCH_N; the peers' default when unset).
M.N = math.tointeger(tonumber(os.getenv("BENCH_N") or "")) or 100000

--- A message on stderr, then exit 1 (on_connect's errors would only be logged).
function M.die(msg)
  io.stderr:write("bench consumer: ", msg, "\n")
  io.stderr:flush()
  os.exit(1, true)
end

--- READY on stdout, flushed: the bench starts producing when it sees it.
function M.ready()
  io.stdout:write("READY\n")
  io.stdout:flush()
end

--- Backlog mode (BENCH_GO set and non-empty): blocks until $BENCH_GO exists.
function M.wait_go()
  local go = os.getenv("BENCH_GO")
  if not go or go == "" then return end
  while true do
    local f = io.open(go, "r")
    if f then
      f:close()
      return
    end
    pg.sleep(0.005)
  end
end

--- Prints the RESULT line and exits 0 (closing the state: connections too).
-- With BENCH_LUA_LOG set (bench/bench.sh sets it), the line is also appended
-- there with the consumer's name: the bench scripts keep only some fields.
-- cpu_s: the runner's CPU time so far (os.clock: user + system), start-up
-- included, so that the client's share of a run can be told from the servers'.
function M.finish(name, line)
  line = line .. (" cpu_s=%.3f"):format(os.clock())
  io.stdout:write(line, "\n")
  io.stdout:flush()
  local log = os.getenv("BENCH_LUA_LOG")
  if log and log ~= "" then
    local f = io.open(log, "a")
    if f then
      local go = os.getenv("BENCH_GO")
      f:write(name, " ", (go and go ~= "") and "backlog" or "live", " ", line, "\n")
      f:close()
    end
  end
  os.exit(0, true)
end

--- Fails unless the runner listens in database `want` (sync.sh's BENCH_SRC_DB;
-- the runner's --db must name it).
function M.check_db(db, want)
  if not want or want == "" then return end
  local rows, err = db:exec("SELECT current_database() AS d")
  if not rows then M.die("cannot read current_database(): " .. tostring(err)) end
  if rows[1].d ~= want then
    M.die(("listening in database %q but BENCH_SRC_DB is %q: pass --db dbname=%s"):format(
      rows[1].d, want, want))
  end
end

--- A connection to $BENCH_DST_DB (libpq's PG* environment for the rest).
function M.connect_dst()
  local name = os.getenv("BENCH_DST_DB")
  if not name or name == "" then M.die("BENCH_DST_DB is not set") end
  local conn, err = pg.connect("dbname=" .. name)
  if not conn then M.die("cannot connect to " .. name .. ": " .. tostring(err)) end
  return conn
end

--- The target's row count and id sum, as integers.
function M.target_totals(dst)
  local rows, err = dst:exec("SELECT count(*)::bigint AS c, coalesce(sum(id), 0)::bigint AS s FROM users")
  if not rows then M.die("cannot count the target: " .. tostring(err)) end
  return math.tointeger(tonumber(rows[1].c)), math.tointeger(tonumber(rows[1].s))
end

--- The upsert every sync consumer runs (the peers' statement).
M.UPSERT = "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) "
  .. "ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email"

--- A sync.sh batch consumer: channel "users" with batch = BENCH_LUA_BATCH
-- (1000), handing each batch to write(dst, rows) -> ok, err, sqlstate.
-- After BENCH_N notes: RESULT with the target's row count and id sum, secs
-- from the first note to the last batch done, and the mean batch size.
-- BENCH_LUA_DRAIN sets the script's batch_size (notes taken per read).
function M.batch_consumer(name, write)
  local now = pg.now
  local batch = math.tointeger(tonumber(os.getenv("BENCH_LUA_BATCH") or "")) or 1000
  local dst
  local n, failed, calls, first = 0, 0, 0, 0.0
  local function report()
    local secs = now() - first
    local count, sum = M.target_totals(dst)
    M.finish(name, ("RESULT count=%d sum=%d secs=%.4f rate=%.0f failed=%d calls=%d mean_batch=%.1f"):format(
      count, sum, secs, secs > 0 and n / secs or 0, failed, calls, n / calls))
  end
  return {
    batch_size = math.tointeger(tonumber(os.getenv("BENCH_LUA_DRAIN") or "")),
    channels = {
      users = {
        batch = batch,
        handler = function(rows)
          if n == 0 then first = now() end
          local ok, err, code = write(dst, rows)
          if not ok then
            failed = failed + #rows
            io.stderr:write(name, ": write failed: ", tostring(err), " ", tostring(code), "\n")
          end
          n, calls = n + #rows, calls + 1
          if n >= M.N then report() end
        end,
      },
    },
    on_connect = function(db)
      M.check_db(db, os.getenv("BENCH_SRC_DB"))
      dst = dst or M.connect_dst()
      M.ready()
      M.wait_go()   -- sync.sh sets no BENCH_GO; bench.sh's backlog run does
    end,
  }
end

return M
