#!/usr/bin/env bash
# Where the runner's hot path spends its instructions: callgrind on a backlog drain.
#
#   bench/profile.sh
#
# Starts a throwaway PostgreSQL (../shared/bench/pgtmp.sh), starts the runner
# (build/lua-pglisten with bench/consumers/notes.lua: JSON decoding and the
# per-note handler) under valgrind --tool=callgrind in backlog mode, queues
# PROFILE_N JSON notifications as run.sh does, releases it, and prints the
# total instruction count (Ir), Ir per notification, Ir by shared object and
# the top functions by inclusive cost (callgrind_annotate).
#
# Debian's liblua5.4.so is stripped, so its
# internal functions have no names in that profile.  When liblua5.4.a is
# there (liblua5.4-dev) a second run profiles the same src/main.c linked
# statically against it (built in a temp dir; same modules, same scripts) to
# name the interpreter's functions.  A last native run counts the Lua lines
# the runner executes per note (consumers/notes_lines.lua, a line hook).
#
# Environment: PROFILE_N (100000), PROFILE_BASE_N (1000: a second, short run
#   whose Ir is subtracted to get the cost of one more note), PROFILE_TOP (15),
#   PROFILE_STATIC (1: the symbolized run), PROFILE_LINES (1: the line count),
#   PROFILE_DIR (where the callgrind files are kept; default a new /tmp dir).
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
shared=${BENCH_SHARED:-$repo/../shared/bench}
runner=$repo/build/lua-pglisten
N=${PROFILE_N:-100000} BASE_N=${PROFILE_BASE_N:-1000} TOP=${PROFILE_TOP:-15} B=1000
dir=${PROFILE_DIR:-$(mktemp -d /tmp/pglprofile.XXXXXX)}
mkdir -p "$dir"
command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null ||
  { echo "profile: needs valgrind (apt-get install valgrind)" >&2; exit 1; }
if [ ! -x "$runner" ]; then make -C "$repo" --no-print-directory || exit 1; fi
. "$shared/pgtmp.sh"   # read-only is fine: it is only sourced
pg_up || exit 1
trap pg_down EXIT

produce() {   # $1 notifications on channel bench, B per transaction (run.sh's burst)
  psql -qX -v ON_ERROR_STOP=1 >/dev/null <<SQL
DO \$\$ BEGIN
  FOR k IN 0..($1/$B - 1) LOOP
    PERFORM pg_notify('bench', json_build_object('id', g, 'ts', (extract(epoch from clock_timestamp())*1e6)::bigint,
      'name', 'user' || g, 'email', 'user' || g || '@example.com', 'active', true)::text)
      FROM generate_series(k*$B + 1, (k+1)*$B) g;
    COMMIT;
  END LOOP;
END \$\$;
SQL
}

# backlog <n> <name> <command...>: the command reads nothing until n notes are queued
backlog() {
  local n=$1 name=$2 i; shift 2
  local out=$dir/$name.stdout go=$dir/$name.go
  rm -f "$go"
  BENCH_GO=$go BENCH_N=$n "$@" >"$out" 2>"$dir/$name.stderr" &
  local pid=$!
  for i in $(seq 1200); do grep -q READY "$out" 2>/dev/null && break; sleep 0.1; done
  produce "$n"
  touch "$go"
  wait $pid || { echo "profile: $name failed:" >&2; tail -n5 "$dir/$name.stderr" >&2; return 1; }
  grep RESULT "$out" >&2
}

total_ir() { sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$1"; }

# callgrind_annotate's function list: "Ir (pct)  file:function [object]" lines
listing() {   # listing FILE yes|no
  callgrind_annotate --auto=no --threshold=100 --inclusive="$2" "$1" 2>/dev/null |
    awk '/file:function/ { f = 1; next } f && /^ *[0-9,]+ \(/ { print } f && /^$/ && n++ { exit }'
}

# Ir by shared object (self cost)
by_object() {
  listing "$1" no | awk -v total="$(total_ir "$1")" '
    { ir = $1; gsub(",", "", ir); obj = "(unnamed)"
      if (match($0, /\[[^]]*\]$/)) { obj = substr($0, RSTART + 1, RLENGTH - 2); n = split(obj, p, "/"); obj = p[n] }
      sum[obj] += ir }
    END { for (o in sum) printf "%6.1f%%  %15.0f Ir  %s\n", 100 * sum[o] / total, sum[o], o }' | sort -rn | head -n 8
}

top() {   # top functions of a callgrind file: $2 = yes (inclusive) | no (self)
  listing "$1" "$2" | head -n "$TOP"
}

# Inclusive Ir per notification of the functions that make up the hot path
# (they overlap: conn_drain includes push_notify, the GC runs inside others).
where() {   # where FILE N
  { listing "$1" yes | sed 's/^/I /'; listing "$1" no | sed 's/^/S /'; } | awk -v n="$2" '
    function add(label, kind, re) { L[++k] = label; K[k] = kind; R[k] = re }
    BEGIN {
      add("JSON decode: core.json_decode (src/json.c: tokens, tables, strings)", "I", ":core_json_decode( |$)")
      add("  tables: flush (created at their size, filled)", "I", ":flush( |$)")
      add("  strings: dstring (scan, key cache, interning)", "I", ":dstring( |$)")
      add("receive: conn:drain (src/conn.c conn_drain)", "I", ":conn_drain( |$)")
      add("  note tables: push_notify (4 fields, 2 strings)", "I", ":push_notify( |$)")
      add("  libpq: PQnotifies (parses the input)", "I", ":PQnotifies( |$)")
      add("receive: conn:wait (src/conn.c conn_wait)", "I", ":conn_wait( |$)")
      add("timestamps: pglisten.now (src/core.c core_now)", "I", ":core_now( |$)")
      add("Lua VM: luaV_execute self (runner loop + handler bytecode)", "S", ":luaV_execute(.2)? \\[")
      add("Lua tables growing: luaH_resize", "I", ":luaH_resize \\[")
      add("Lua GC: luaC_step", "I", ":luaC_step \\[")
      add("malloc + free (libc)", "S", "malloc.c:(_int_malloc|_int_free|malloc|free|realloc|_int_realloc|malloc_consolidate|unlink_chunk[.a-z0-9]*) \\[")
      add("histogram sort at the end (bench harness): auxsort", "I", ":auxsort \\[")
    }
    { ir = $2; gsub(",", "", ir); kind = $1
      # inclusive: the largest match (a function may be listed twice, with and without
      # its object); self: the sum (luaV_execute and its recursion level, the parts of malloc)
      for (i = 1; i <= k; i++) if (K[i] == kind && $0 ~ R[i]) v[i] = kind == "S" ? v[i] + ir : (ir + 0 > v[i] ? ir + 0 : v[i]) }
    END {
      for (i = 1; i <= k; i++) if (v[i] > 0) printf "%8.0f Ir  %s\n", v[i] / n, L[i]
    }'
}

profile() {   # profile <label> <binary>
  local label=$1 bin=$2 ir ir_base
  echo "== $label: $bin"
  backlog "$N" "$label" valgrind --tool=callgrind --callgrind-out-file="$dir/$label.callgrind" \
    "$bin" --log-level warn "$here/consumers/notes.lua" || return 1
  backlog "$BASE_N" "$label-base" valgrind --tool=callgrind --callgrind-out-file="$dir/$label-base.callgrind" \
    "$bin" --log-level warn "$here/consumers/notes.lua" || return 1
  ir=$(total_ir "$dir/$label.callgrind") ir_base=$(total_ir "$dir/$label-base.callgrind")
  echo
  echo "total Ir: $ir for $N notifications = $((ir / N)) Ir per notification (start-up included)"
  echo "one more notification: $(( (ir - ir_base) / (N - BASE_N) )) Ir (($ir - $ir_base) / ($N - $BASE_N); start-up excluded)"
  echo
  echo "-- Ir by object (self cost)"
  by_object "$dir/$label.callgrind"
  echo
  echo "-- where it goes: inclusive Ir per notification (items overlap; unnamed in a stripped library: left out)"
  where "$dir/$label.callgrind" "$N"
  echo
  echo "-- top $TOP functions by inclusive cost"
  top "$dir/$label.callgrind" yes
  echo
  echo "-- top $TOP functions by self cost"
  top "$dir/$label.callgrind" no
  echo
}

profile runner "$runner" || exit 1

if [ "${PROFILE_STATIC:-1}" = 1 ] && [ -f /usr/lib/x86_64-linux-gnu/liblua5.4.a ]; then
  # same flags as the Makefile's runner, but the interpreter linked in with its symbols
  lua_cflags=$(pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)
  if cc -O2 -g -std=c99 -D_POSIX_C_SOURCE=200809L -DPGL_VERSION='"profile"' $lua_cflags \
      -DPGL_LPATH="\"$repo/lua/?.lua;$repo/lua/?/init.lua\"" -DPGL_CPATH="\"$repo/build/?.so\"" \
      -o "$dir/lua-pglisten-static" "$repo/src/main.c" -Wl,-E /usr/lib/x86_64-linux-gnu/liblua5.4.a -lm -ldl; then
    profile static-lua "$dir/lua-pglisten-static"
  fi
fi

if [ "${PROFILE_LINES:-1}" = 1 ]; then
  ln=$((N / 5))
  echo "== Lua VM instructions per notification, by Lua function (count hook, $ln notes, native)"
  PROFILE_LINES_OUT=$dir/lines.txt backlog "$ln" lines "$runner" --log-level warn "$here/consumers/notes_lines.lua" &&
    head -n 32 "$dir/lines.txt"
fi
echo
echo "callgrind files kept in $dir (callgrind_annotate --inclusive=yes FILE)"
