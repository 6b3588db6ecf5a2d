#!/usr/bin/env bash
# The capture trigger's forms beside no capture (bench/bench.sh capture runs it
# after ../shared/bench/capture.sh).
#
#   PGL_SQL=schema.sql [PGL_SQL_BASE=old-schema.sql] bench/capture-forms.sh
#
# The writer half of ../shared/bench/capture.sh: the same throwaway cluster
# (its pgtmp.sh), table public.users (id bigint primary key, name text, email
# text), hand-written trigger, never-reading listener and insert loop (BENCH_N
# rows in transactions of BENCH_BATCH, one psql session), with the forms that
# capture.sh cannot name:
#   none               no trigger: the writers' own speed
#   hand-trigger       capture.sh's hand-written pg_notify(json_build_object(...)) trigger
#   notify_row         FOR EACH ROW pglisten.notify_trigger('users', 'notify')
#   durable_row        FOR EACH ROW pglisten.notify_trigger('users', 'durable')
#   notify_statement   AFTER INSERT ... REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT, 'notify'
#   durable_statement  the same, 'durable'
# Then single-row transactions (BENCH_SINGLE_N of them, one INSERT and COMMIT
# each): none, hand-trigger, notify_row and durable_row, and, when
# PGL_SQL_BASE is given, notify_row and durable_row under that schema (in a
# second database of the same cluster).
# After one uncounted warm-up, each run measures every form once, in turn (so
# that the machine's drift spreads over all of them); the tables give the
# median of BENCH_RUNS runs and the ratio to `none` in the same run.
# Markdown on stdout.
# Environment: BENCH_N (100000), BENCH_BATCH (1000), BENCH_RUNS (3),
# BENCH_SINGLE_N (10000), BENCH_SHARED (../shared/bench, for pgtmp.sh).
set -u
here=$(cd "$(dirname "$0")" && pwd)
shared=${BENCH_SHARED:-$here/../../shared/bench}
[ -f "$shared/pgtmp.sh" ] || { echo "capture-forms: no $shared/pgtmp.sh (set BENCH_SHARED)" >&2; exit 1; }
[ -f "${PGL_SQL:-}" ] || { echo "capture-forms: set PGL_SQL to the schema file" >&2; exit 1; }
. "$shared/pgtmp.sh"
N=${BENCH_N:-100000} B=${BENCH_BATCH:-1000} RUNS=${BENCH_RUNS:-3} SN=${BENCH_SINGLE_N:-10000}
work=$(mktemp -d /tmp/pglforms.XXXXXX)
lpids=()
cleanup() { for p in "${lpids[@]}"; do kill "$p" 2>/dev/null; done; pg_down; rm -rf "$work"; }

pg_up >/dev/null || { rm -rf "$work"; exit 1; }
trap cleanup EXIT
q() { psql -qXAt -v ON_ERROR_STOP=1 "$@"; }
setup_db() { # db schema-file
  q -d postgres -c "CREATE DATABASE $1" >/dev/null || return 1
  q -d "$1" -f "$2" >/dev/null || return 1
  q -d "$1" >/dev/null <<'SQL' || return 1
CREATE TABLE users (id bigint PRIMARY KEY, name text, email text);
CREATE FUNCTION hand_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('users', json_build_object('op', TG_OP, 'id', NEW.id, 'name', NEW.name, 'email', NEW.email)::text);
  RETURN NULL;
END $$;
SQL
  # a listener keeps NOTIFY's queue in play, as in capture.sh (it never reads)
  q -d "$1" -c "LISTEN users" -c "SELECT pg_sleep(100000)" >/dev/null 2>&1 & lpids+=($!)
}
setup_db cur "$PGL_SQL" || exit 1
dbs=(cur)
if [ -n "${PGL_SQL_BASE:-}" ]; then setup_db base "$PGL_SQL_BASE" || exit 1; dbs+=(base); fi

trigger_ddl() { # form -> CREATE TRIGGER ... (empty for none)
  local row="CREATE TRIGGER cap AFTER INSERT OR UPDATE OR DELETE ON users FOR EACH ROW EXECUTE FUNCTION"
  local stmt="CREATE TRIGGER cap AFTER INSERT ON users REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION"
  case $1 in
    none) ;;
    hand-trigger) echo "$row hand_notify()" ;;
    notify_row) echo "$row pglisten.notify_trigger('users', 'notify')" ;;
    durable_row) echo "$row pglisten.notify_trigger('users', 'durable')" ;;
    notify_statement) echo "$stmt pglisten.notify_trigger('users', 'notify')" ;;
    durable_statement) echo "$stmt pglisten.notify_trigger('users', 'durable')" ;;
  esac
}
# measure db form rows batch: prints rows/s
measure() {
  local db=$1 ddl n=$3 b=$4 t0 t1 loop
  ddl=$(trigger_ddl "$2")
  q -d "$db" -c "DROP TRIGGER IF EXISTS cap ON users" -c "TRUNCATE users" -c "TRUNCATE pglisten.outbox" >/dev/null 2>&1
  [ -n "$ddl" ] && { q -d "$db" -c "$ddl" >/dev/null || return 1; }
  if [ "$b" = 1 ]; then
    loop="FOR k IN 1..$n LOOP INSERT INTO users (id, name, email) VALUES (k, 'user' || k, 'user' || k || '@example.com'); COMMIT; END LOOP;"
  else
    loop="FOR k IN 0..($n/$b - 1) LOOP INSERT INTO users (id, name, email)
      SELECT g, 'user' || g, 'user' || g || '@example.com' FROM generate_series(k*$b + 1, (k+1)*$b) g; COMMIT; END LOOP;"
  fi
  t0=$(date +%s.%N)
  q -d "$db" -c "DO \$\$ BEGIN $loop END \$\$" >/dev/null || return 1
  t1=$(date +%s.%N)
  q -d "$db" -c "DROP TRIGGER IF EXISTS cap ON users" >/dev/null 2>&1
  awk -v a="$t0" -v b="$t1" -v n="$n" 'BEGIN { printf "%.0f\n", n / (b - a) }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# name=db:form lists for the two tables
BATCH=(none=cur:none hand-trigger=cur:hand-trigger notify_row=cur:notify_row durable_row=cur:durable_row
       notify_statement=cur:notify_statement durable_statement=cur:durable_statement)
SINGLE=(none=cur:none hand-trigger=cur:hand-trigger notify_row=cur:notify_row durable_row=cur:durable_row)
[ -n "${PGL_SQL_BASE:-}" ] && SINGLE+=("notify_row (base schema)=base:notify_row" "durable_row (base schema)=base:durable_row")

run_table() { # key n batch entries...
  local key=$1 n=$2 b=$3 r e name db form; shift 3
  for db in "${dbs[@]}"; do measure "$db" none "$n" "$b" >/dev/null; done # warm-up, not counted
  for r in $(seq "$RUNS"); do
    for e in "$@"; do
      name=${e%%=*} db=${e#*=}; form=${db#*:} db=${db%%:*}
      echo "$(measure "$db" "$form" "$n" "$b")" >>"$work/$key.$(echo "$name" | tr -c 'A-Za-z0-9_\n-' _)"
    done
  done
}
print_table() { # key title entries...
  local key=$1 e name base v; shift 1
  base=$(median <"$work/$key.none")
  echo "| capture | writer rows/s | vs none | runs (rows/s) |"
  echo "|---|---|---|---|"
  for e in "$@"; do
    name=${e%%=*}
    f="$work/$key.$(echo "$name" | tr -c 'A-Za-z0-9_\n-' _)"
    v=$(median <"$f")
    awk -v m="$name" -v r="${v:-0}" -v b="${base:-1}" -v all="$(tr '\n' ' ' <"$f")" \
      'BEGIN { printf "| %s | %d | %.2f | %s|\n", m, r, r / b, all }'
  done
}

run_table batch "$N" "$B" "${BATCH[@]}"
run_table single "$SN" 1 "${SINGLE[@]}"
for p in "${lpids[@]}"; do kill "$p" 2>/dev/null; done; lpids=()

echo "### The trigger's forms ($N rows, $B per transaction, median of $RUNS)"
echo
print_table batch "${BATCH[@]}"
echo
echo "### Single-row transactions ($SN transactions of one INSERT, median of $RUNS)"
echo
print_table single "${SINGLE[@]}"
