#!/usr/bin/env bash
# End-to-end change data capture against today's NOTIFY batch sync, on one
# throwaway cluster with wal_level = logical (../shared/bench/pgtmp.sh).
#   bench/cdc.sh
# BENCH_SYNC_N rows are inserted into source.users (id int primary key, name,
# email) in transactions of BENCH_BATCH rows by one psql session, and synced
# into target.users by:
#   notify-batch  sync.sh's trigger (pg_notify(row_to_json(NEW))) and the runner
#                 with consumers/batch.lua (batch = 1000, conn:execmany)
#   repl-batch    no trigger; the runner streaming a slot, source = "replication",
#                 consumers/repl_batch.lua (batch = 1000, the same execmany)
# each live (the consumer reads while the writer inserts: rows/s from the first
# insert to the target complete, and the writer's own rows/s) and from a
# backlog (every row queued before the consumer reads: NOTIFY with BENCH_GO,
# the slot with the runner started after the inserts; rows/s from the first
# event handled to the last, the consumer's own figure).  `none` is the writer
# with no trigger, no slot and no consumer.  Prints markdown tables, then the
# targets of issue 12 with their ratios.
# Environment: BENCH_SYNC_N (50000), BENCH_BATCH (1000), BENCH_RUNS (3),
# BENCH_BUILD (build), BENCH_SHARED (../shared/bench), BENCH_MODES (the
# modes above, in the order run in each round; a target whose modes were not
# run reads 0).
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
shared=${BENCH_SHARED:-$repo/../shared/bench}
build=${BENCH_BUILD:-build}
runner=$repo/$build/lua-pglisten
N=${BENCH_SYNC_N:-50000} B=${BENCH_BATCH:-1000} RUNS=${BENCH_RUNS:-3}
[ -x "$runner" ] || { echo "cdc.sh: no runner at $runner (make BUILD=$build)" >&2; exit 1; }
. "$shared/pgtmp.sh"
work=$(mktemp -d /tmp/pglcdc.XXXXXX)
cpid=
cleanup() { [ -n "$cpid" ] && kill "$cpid" 2>/dev/null; pg_down; rm -rf "$work"; }
pg_up >/dev/null || { rm -rf "$work"; exit 1; }
trap cleanup EXIT
cat >>"$PGTMP/data/postgresql.conf" <<CONF
wal_level = logical
max_wal_senders = 8
max_replication_slots = 8
CONF
pg_restart || exit 1
export BENCH_SRC_DB=source BENCH_DST_DB=target BENCH_N=$N BENCH_SLOT=bench_cdc BENCH_PUB=bench_cdc
q() { PGOPTIONS='-c client_min_messages=warning' psql -qXAt -v ON_ERROR_STOP=1 "$@"; }
q -d postgres -c "CREATE DATABASE source" -c "CREATE DATABASE target" >/dev/null
q -d target -c "CREATE TABLE users (id int PRIMARY KEY, name text, email text)" >/dev/null
q -d source >/dev/null <<'SQL'
CREATE TABLE users (id int PRIMARY KEY, name text, email text);
CREATE FUNCTION users_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('users', row_to_json(NEW)::text); RETURN NEW; END $$;
CREATE PUBLICATION bench_cdc FOR TABLE users;
SQL
trigger() { # on | off
  if [ "$1" = on ]; then
    q -d source -c "CREATE TRIGGER users_notify AFTER INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_notify()"
  else
    q -d source -c "DROP TRIGGER IF EXISTS users_notify ON users"
  fi >/dev/null
}
drop_slot() { q -d source -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_cdc'" >/dev/null; }
insert() { # prints the writer's rows/s
  local t0 t1; t0=$(date +%s.%N)
  q -d source >/dev/null <<SQL
DO \$\$ BEGIN FOR k IN 0..($N/$B - 1) LOOP
  INSERT INTO users SELECT g, 'user' || g, 'user' || g || '@example.com' FROM generate_series(k*$B + 1, (k+1)*$B) g;
  COMMIT; END LOOP; END \$\$;
SQL
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v n="$N" 'BEGIN { printf "%.0f\n", n / (b - a) }'
}
truncate() { q -d source -c "TRUNCATE users" && q -d target -c "TRUNCATE users"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
notify_cmd=("$runner" --log-level info --db dbname=source "$here/consumers/batch.lua")
repl_cmd=("$runner" --log-level info --db dbname=source "$here/consumers/repl_batch.lua")
# starts a consumer; waits until it says READY (NOTIFY) or "streaming" (the slot)
start() {
  "$@" >"$work/out" 2>"$work/err" </dev/null & cpid=$!
  local i
  for i in $(seq 300); do
    grep -q READY "$work/out" 2>/dev/null && return 0
    grep -q " streaming" "$work/err" 2>/dev/null && return 0
    kill -0 "$cpid" 2>/dev/null || break
    sleep 0.1
  done
  echo "cdc.sh: the consumer did not start: $(tail -n 3 "$work/err")" >&2
  return 1
}
finish() { # waits for the consumer; prints "<consumer rate> <complete yes/no>"
  local i
  for i in $(seq 3000); do kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
  kill "$cpid" 2>/dev/null; wait "$cpid" 2>/dev/null; cpid=
  local line; line=$(grep RESULT "$work/out" | tail -n 1)
  echo "$MODE $line" >>"$work/lines"
  local rate; rate=$(echo "$line" | sed -n 's/.* rate=\([0-9.]*\).*/\1/p')
  local complete=no
  echo "$line" | grep -q "count=$N sum=$((N * (N + 1) / 2)) " && complete=yes
  echo "${rate:-0} $complete"
}
declare -A W E C OK
run() { # mode: prints nothing; fills W (writer), E (end to end), C (consumer's own)
  local m=$1 t0 t1 w res
  MODE=$m
  truncate >/dev/null; rm -f "$work/go"
  case $m in
    none)
      trigger off; w=$(insert); echo "$w" >>"$work/W.$m"; return ;;
    notify-live)
      trigger on; start "${notify_cmd[@]}" || return
      t0=$(date +%s.%N); w=$(insert); res=$(finish); t1=$(date +%s.%N); trigger off ;;
    repl-live)
      trigger off; drop_slot; start "${repl_cmd[@]}" || return
      t0=$(date +%s.%N); w=$(insert); res=$(finish); t1=$(date +%s.%N); drop_slot ;;
    notify-backlog)
      trigger on; BENCH_GO=$work/go start "${notify_cmd[@]}" || return
      w=$(insert); t0=$(date +%s.%N); touch "$work/go"; res=$(finish); t1=$(date +%s.%N); trigger off ;;
    repl-backlog)
      trigger off; drop_slot
      q -d source -c "SELECT pg_create_logical_replication_slot('bench_cdc', 'pgoutput')" >/dev/null
      w=$(insert); t0=$(date +%s.%N); start "${repl_cmd[@]}" || return; res=$(finish); t1=$(date +%s.%N); drop_slot ;;
  esac
  echo "$w" >>"$work/W.$m"
  awk -v a="$t0" -v b="$t1" -v n="$N" 'BEGIN { printf "%.0f\n", n / (b - a) }' >>"$work/E.$m"
  echo "${res% *}" >>"$work/C.$m"
  echo "${res#* }" >>"$work/OK.$m"
}
MODES=(${BENCH_MODES:-none notify-live repl-live notify-backlog repl-backlog})
for r in $(seq "$RUNS"); do for m in "${MODES[@]}"; do run "$m"; done; done
for m in "${MODES[@]}"; do
  W[$m]=$(median <"$work/W.$m" 2>/dev/null)
  E[$m]=$( [ -s "$work/E.$m" ] && median <"$work/E.$m" || echo 0)
  C[$m]=$( [ -s "$work/C.$m" ] && median <"$work/C.$m" || echo 0)
  OK[$m]=$( [ -s "$work/OK.$m" ] && { grep -qv yes "$work/OK.$m" && echo no || echo yes; } || echo -)
done

echo "## Change data capture end to end ($N rows, $B per transaction, median of $RUNS)"
echo
echo "| sync | writer rows/s | writer vs none | end to end rows/s | consumer rows/s | target complete |"
echo "|---|---|---|---|---|---|"
for m in "${MODES[@]}"; do
  awk -v m="$m" -v w="${W[$m]:-0}" -v b="${W[none]:-1}" -v e="${E[$m]:--}" -v c="${C[$m]:--}" -v ok="${OK[$m]}" \
    'BEGIN { if (m == "none") { e = "-"; c = "-" }; printf "| %s | %d | %.2f | %s | %s | %s |\n", m, w, w / b, e, c, ok }'
done
echo
echo "The consumers' RESULT lines (secs: first event to last batch done; mean_batch: events per handler call):"
echo
echo '```'
cat "$work/lines" 2>/dev/null
echo '```'
echo
echo "| target (issue 12) | measured | |"
echo "|---|---|---|"
awk -v rl="${E[repl-live]:-0}" -v nl="${E[notify-live]:-0}" -v rb="${C[repl-backlog]:-0}" -v nb="${C[notify-backlog]:-0}" \
    -v wr="${W[repl-live]:-0}" -v wn="${W[none]:-1}" -v okr="${OK[repl-live]}" -v okb="${OK[repl-backlog]}" '
  function row(what, got, ok) { printf "| %s | %s | %s |\n", what, got, ok ? "met" : "**not met**" }
  BEGIN {
    row("end to end, live: replication batch + execmany >= NOTIFY batch sync", sprintf("%.0f / %.0f = %.2f x, complete: %s", rl, nl, nl ? rl / nl : 0, okr), rl >= nl && okr == "yes")
    row("from a backlog (the consumer alone): replication >= NOTIFY", sprintf("%.0f / %.0f = %.2f x, complete: %s", rb, nb, nb ? rb / nb : 0, okb), rb >= nb && okb == "yes")
    row("writers with the slot and its runner streaming >= 0.8 x none", sprintf("%.0f / %.0f = %.2f x", wr, wn, wr / wn), wr >= 0.8 * wn)
  }'
