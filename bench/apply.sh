#!/usr/bin/env bash
# What pglisten.apply costs a replication sync (issue 15: within 10 %).
#   bench/apply.sh            (starts its own servers through scripts/with-pg.sh)
# BENCH_N rows (50000) are inserted into source.users on the first server in
# transactions of BENCH_BATCH rows (1000) while no runner runs; then the
# runner drains the slot into target.users on the second server (which
# commits with synchronous_commit = on), a batch handler of BENCH_BATCH
# events writing one execmany per batch, either
#   plain   dst:execmany(UPSERT, rows)                       (its own transaction)
#   apply   pglisten.apply(dst, events, notes, fn) with the same execmany in fn,
#           with { savepoint = false } (BEGIN, the position statement, the
#           execmany without a subtransaction, COMMIT)
# alternately, BENCH_RUNS (3) times each, one new slot per run.  The figure is
# the consumer's own: rows/s from the first event handled to the last batch
# done.  Prints a markdown table with the medians and the ratio.
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ -z "${PGL_TEST_DIR:-}" ]; then exec "$repo/scripts/with-pg.sh" "$0" "$@"; fi
build=${BENCH_BUILD:-build}
runner=$repo/$build/lua-pglisten
N=${BENCH_N:-50000} B=${BENCH_BATCH:-1000} RUNS=${BENCH_RUNS:-3}
[ -x "$runner" ] || { echo "apply.sh: no runner at $runner (make BUILD=$build)" >&2; exit 1; }
work=$PGL_TEST_DIR/bench-apply
mkdir -p "$work"
q() { PGOPTIONS='-c client_min_messages=warning' psql -qXAt -v ON_ERROR_STOP=1 "$@"; }
T="host=127.0.0.1 port=$PGL_TEST_PORT2 dbname=target"
q -d postgres -c "CREATE DATABASE source" >/dev/null
q -d "host=127.0.0.1 port=$PGL_TEST_PORT2 dbname=postgres" -c "CREATE DATABASE target" >/dev/null
q -d source -c "CREATE TABLE users (id int PRIMARY KEY, name text, email text)" >/dev/null
q -d "$T" -c "CREATE TABLE users (id int PRIMARY KEY, name text, email text)" >/dev/null
cat >"$work/consumer.lua" <<'LUA'
local pg = require "pglisten"
local N, MODE = tonumber(os.getenv("BENCH_N")), os.getenv("BENCH_MODE")
local dst = assert(pg.connect(os.getenv("BENCH_TARGET")))
local UPSERT = "INSERT INTO users (id, name, email) VALUES ($1, $2, $3) "
  .. "ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email"
local n, first = 0, nil
local function rows(events)
  local params = {}
  for i = 1, #events do
    local r = events[i].new
    params[i] = { r.id, r.name, r.email }
  end
  return params
end
return {
  replication = { slot = os.getenv("BENCH_SLOT") },
  channels = {
    ["public.users"] = { source = "replication", batch = tonumber(os.getenv("BENCH_BATCH")),
      handler = function(events, notes)
        first = first or pg.now()
        if MODE == "apply" then
          assert(pg.apply(dst, events, notes, function(c, evs)
            return assert(c:execmany(UPSERT, rows(evs), { savepoint = false }))
          end))
        else
          assert(dst:execmany(UPSERT, rows(events)))
        end
        n = n + #events
        if n >= N then
          local secs = pg.now() - first
          local count = dst:exec("SELECT count(*) AS n FROM users")[1].n
          io.stdout:write(("RESULT mode=%s count=%d secs=%.3f rate=%.0f\n"):format(MODE, count, secs, n / secs))
          io.stdout:flush()
          os.exit(0, true)
        end
      end },
  },
}
LUA
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
run() { # mode run#: one drain of a fresh backlog
  local mode=$1 slot=bench_apply_$2_$1
  q -d source -c "TRUNCATE users" >/dev/null
  q -d "$T" -c "TRUNCATE users" -c "DROP SCHEMA IF EXISTS pglisten CASCADE" >/dev/null
  q -d source -c "CREATE PUBLICATION $slot FOR TABLE users" \
    -c "SELECT pg_create_logical_replication_slot('$slot', 'pgoutput')" >/dev/null
  q -d source >/dev/null <<SQL
DO \$\$ BEGIN FOR k IN 0..($N/$B - 1) LOOP
  INSERT INTO users SELECT g, 'user' || g, 'user' || g || '@example.com' FROM generate_series(k*$B + 1, (k+1)*$B) g;
  COMMIT; END LOOP; END \$\$;
SQL
  BENCH_N=$N BENCH_BATCH=$B BENCH_MODE=$mode BENCH_SLOT=$slot BENCH_TARGET=$T timeout 300 \
    "$runner" --db dbname=source "$work/consumer.lua" >"$work/out" 2>"$work/err" </dev/null
  local line; line=$(grep RESULT "$work/out")
  [ -n "$line" ] || { echo "apply.sh: $mode run $2 failed: $(tail -n 3 "$work/err")" >&2; return 1; }
  echo "$line" >>"$work/lines"
  echo "$line" | sed -n 's/.* rate=\([0-9]*\).*/\1/p' >>"$work/rate.$mode"
  sleep 0.5
  q -d source -c "SELECT pg_drop_replication_slot('$slot')" -c "DROP PUBLICATION $slot" >/dev/null
}
for r in $(seq "$RUNS"); do run plain "$r" || exit 1; run apply "$r" || exit 1; done
p=$(median <"$work/rate.plain") a=$(median <"$work/rate.apply")
echo "## pglisten.apply against the same replication sync without it ($N rows, batches of $B, median of $RUNS)"
echo
echo "| handler | rows/s |"
echo "|---|---|"
echo "| execmany | $p |"
echo "| pglisten.apply + the same execmany | $a |"
awk -v p="$p" -v a="$a" 'BEGIN { r = a / p; printf "\napply / plain = %.3f (goal >= 0.90: %s)\n", r, (r >= 0.9) ? "met" : "**not met**" }'
echo
echo '```'
cat "$work/lines"
echo '```'
