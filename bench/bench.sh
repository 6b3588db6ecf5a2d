#!/usr/bin/env bash
# lua-pglisten beside the peer consumers of ../shared/bench (make bench).
#
#   bench/bench.sh            everything below
#   bench/bench.sh capture    the capture part alone (rewrites only its section
#                             of bench/RESULTS.md)
#
# Runs a copy of ../shared/bench (read-only; copied so that `npm install` can
# put node-postgres there) with the runner added as extra consumers:
#   run.sh   lua-pglisten         bench/consumers/notes.lua   JSON decode + per-note handler
#   sync.sh  lua-pglisten-upsert  bench/consumers/upsert.lua  one conn:exec upsert per note
#            lua-pglisten-batch   bench/consumers/batch.lua   batch handler, conn:execmany
#            lua-pglisten-batch-json  bench/consumers/batch_json.lua  batch handler, one statement
#                                 per batch (rows as one JSON parameter, json_populate_recordset)
# then, on a cluster of its own, sync.sh's inserts with no listener and the
# batch consumers with every row queued before they read (their capacity);
# then what capture costs the writers:
#   capture.sh  with this checkout's schema (PGL_SQL from `lua-pglisten --sql`)
#   bench/capture-forms.sh  the trigger forms capture.sh cannot name (FOR EACH
#               STATEMENT with transition tables), and single-row transactions
#               under this schema and under BENCH_BASE_REV's
#   bench/capture-icount.sh  the same, counted in instructions (callgrind)
# then change data capture end to end against the NOTIFY batch sync:
#   bench/cdc.sh  the replication source (batch = 1000, execmany) and the
#               NOTIFY batch consumer, live and from a backlog (issue 12's goals)
# and writes the tables, the machine, the commands and the targets to
# bench/RESULTS.md.  bench/profile.sh is the callgrind profile of the hot path.
#
# Environment (defaults sized for a 2-core machine, a few minutes in all):
#   BENCH_N (200000)          notes per run.sh measurement
#   BENCH_SYNC_N (50000)      rows per sync.sh measurement
#   BENCH_RUNS (3)            runs per median
#   BENCH_BATCH (1000)        notes/rows per producer transaction
#   BENCH_RATE (2000)         notes/s in run.sh's latency run
#   BENCH_ONLY (all)          run | sync | capture | cdc: one part only
#   BENCH_CAPTURE_N (100000)  rows per capture measurement (BENCH_BATCH per transaction)
#   BENCH_SINGLE_N (10000)    single-row transactions per measurement
#   BENCH_BASE_REV (0c97c05)  the tree whose schema the single-row rows compare with
#                             (0c97c05: the schema before set-based capture)
#   BENCH_BUILD (build)       the build directory of the runner
#   BENCH_ICOUNT (1)          0: without bench/capture-icount.sh (callgrind, minutes)
#   BENCH_NO_DEPS=1           do not apt-get/npm install anything
#   BENCH_SHARED              the peer bench (default ../shared/bench)
#   BENCH_RESULTS             where to write (default bench/RESULTS.md)
# Exit status: 0 when every lua-pglisten row is lossless / complete.
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
shared=${BENCH_SHARED:-$repo/../shared/bench}
build=${BENCH_BUILD:-build}
runner=$repo/$build/lua-pglisten
results=${BENCH_RESULTS:-$here/RESULTS.md}
N=${BENCH_N:-200000} SYNC_N=${BENCH_SYNC_N:-50000} RUNS=${BENCH_RUNS:-3}
B=${BENCH_BATCH:-1000} RATE=${BENCH_RATE:-2000} ONLY=${BENCH_ONLY:-all}
CAP_N=${BENCH_CAPTURE_N:-100000} SINGLE_N=${BENCH_SINGLE_N:-10000} BASE_REV=${BENCH_BASE_REV:-0c97c05}
case ${1:-} in
  capture) ONLY=capture ;;
  "") ;;
  *) echo "usage: bench/bench.sh [capture]" >&2; exit 2 ;;
esac

[ -d "$shared" ] || { echo "bench: no peer bench at $shared (set BENCH_SHARED)" >&2; exit 1; }
shared=$(cd "$shared" && pwd)
if [ ! -x "$runner" ]; then make -C "$repo" --no-print-directory BUILD="$build" || exit 1; fi

tmp=$(mktemp -d /tmp/pglbench-lua.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
export BENCH_LUA_LOG=$tmp/lua.log   # the consumers append their RESULT lines here
say() { printf '%s\n' "$*" >&2; }

# --- The peers' runtimes (root only; whatever cannot be installed is skipped) ---
install_peer_deps() {
  [ "${BENCH_NO_DEPS:-}" = 1 ] && return
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return
  local p missing=
  for p in time bc python3-psycopg2 ruby ruby-pg nodejs npm; do
    case $p in   # a runtime from elsewhere (nodesource bundles npm) stays as it is
      nodejs) command -v node >/dev/null && continue ;;
      npm) command -v npm >/dev/null && continue ;;
    esac
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return
  say "bench: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq $missing </dev/null >"$tmp/apt.log" 2>&1 && return
  apt-get update -qq </dev/null >>"$tmp/apt.log" 2>&1
  for p in $missing; do
    apt-get install -y -qq "$p" </dev/null >>"$tmp/apt.log" 2>&1 || true   # skipped: its peer is left out
  done
}

# --- A writable copy of the peer bench, with node-postgres when npm works ---
copy_bench() {
  cp -r "$shared" "$tmp/bench" && chmod -R u+w "$tmp/bench" || return 1
  rm -rf "$tmp/bench/node_modules"
  [ "${BENCH_NO_DEPS:-}" = 1 ] && [ -d "$shared/node_modules/pg" ] && cp -r "$shared/node_modules" "$tmp/bench/"
  if [ ! -d "$tmp/bench/node_modules/pg" ] && command -v npm >/dev/null && command -v node >/dev/null; then
    if ! (cd "$tmp/bench" && npm install --no-audit --no-fund --prefer-offline --loglevel=error) \
        >"$tmp/npm.log" 2>&1; then
      say "bench: npm install failed, node-pg skipped: $(tail -n1 "$tmp/npm.log")"
      rm -rf "$tmp/bench/node_modules"
    fi
  fi
}

# --- The machine ---
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)}
machine() {
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- CPU: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1), nproc $(nproc)"
  echo "- PostgreSQL server: $("$PGBIN/postgres" --version 2>/dev/null) (throwaway cluster from pgtmp.sh: fsync, synchronous_commit, full_page_writes off)"
  echo "- libpq: $(pkg-config --modversion libpq 2>/dev/null) ($("$runner" --version 2>/dev/null))"
  echo "- peers: $(/usr/bin/python3 -c 'import sys, psycopg2; print("python", sys.version.split()[0], "psycopg2", psycopg2.__version__.split()[0])' 2>/dev/null || echo 'psycopg2 missing');" \
    "$(ruby -e 'require "pg"; print "ruby #{RUBY_VERSION} ruby-pg #{PG::VERSION}"' 2>/dev/null || echo 'ruby-pg missing');" \
    "$( [ -d "$tmp/bench/node_modules/pg" ] && echo "node $(node --version) pg $(node -p 'require(process.argv[1]).version' "$tmp/bench/node_modules/pg/package.json")" || echo 'node-pg missing')"
  echo "- kernel: $(uname -sr)"
  echo "- load average (1, 5, 15 min) at start: $load0; at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews the figures)"
  echo "- tree: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null) with $(git -C "$repo" status --porcelain -- src lua Makefile 2>/dev/null | wc -l) uncommitted change(s) under src/ lua/ Makefile; build of $(date -u -r "$(ls -t "$runner" "$repo/$build/pglisten/core.so" | head -n 1)" '+%Y-%m-%d %H:%M UTC') (the newer of the runner and core.so)"
}

# --- The runs ---
run_cmd=("lua-pglisten=$runner --log-level warn $here/consumers/notes.lua")
# sync.sh exports BENCH_SRC_DB=source; the runner's listening connection is
# its --db, which a NAME=COMMAND cannot take from the environment.  The
# consumers check that the database they listen in is $BENCH_SRC_DB.
src_db=$(sed -n 's/.*BENCH_SRC_DB=\([A-Za-z0-9_]*\).*/\1/p' "$shared/sync.sh" | head -n1)
src_db=${src_db:-source}
sync_cmd=("lua-pglisten-upsert=$runner --log-level warn --db dbname=$src_db $here/consumers/upsert.lua"
          "lua-pglisten-batch=$runner --log-level warn --db dbname=$src_db $here/consumers/batch.lua"
          "lua-pglisten-batch-json=$runner --log-level warn --db dbname=$src_db $here/consumers/batch_json.lua")

run_run() {
  say "bench: run.sh (N=$N, $RUNS runs)"
  BENCH_N=$N BENCH_RUNS=$RUNS BENCH_BATCH=$B BENCH_RATE=$RATE "$tmp/bench/run.sh" "${run_cmd[@]}" 2>"$tmp/run.err" | tee "$tmp/run.out" >&2
}
run_cdc() {
  say "bench: cdc.sh (N=$SYNC_N, $RUNS runs)"
  BENCH_SYNC_N=$SYNC_N BENCH_RUNS=$RUNS BENCH_BATCH=$B BENCH_BUILD=$build BENCH_SHARED=$shared "$here/cdc.sh" \
    2>"$tmp/cdc.err" | tee "$tmp/cdc.out" >&2
}

run_sync() {
  say "bench: sync.sh (N=$SYNC_N, $RUNS runs)"
  BENCH_N=$SYNC_N BENCH_RUNS=$RUNS BENCH_BATCH=$B "$tmp/bench/sync.sh" "${sync_cmd[@]}" 2>"$tmp/sync.err" | tee "$tmp/sync.out" >&2
}

# What capture costs the writers: capture.sh with this checkout's schema,
# then bench/capture-forms.sh for the forms capture.sh cannot name and for
# single-row transactions (also under the schema of BASE_REV, when it has one).
# capture.sh's extra readers of the slot: the replication core alone, the
# runner (source = "replication") per event and batched (consumers/repl_*.lua)
repl_readers=("lua-repl-core=env BENCH_BUILD=$build ${LUA:-lua5.4} $here/consumers/repl_drain.lua"
              "lua-pglisten-repl=$runner --log-level warn $here/consumers/repl_count.lua"
              "lua-pglisten-repl-batch=env BENCH_REPL_BATCH=1000 $runner --log-level warn $here/consumers/repl_count.lua")
run_capture() {
  "$runner" --sql >"$tmp/schema.sql" || { say "bench: $runner --sql failed"; return 1; }
  rm -f "$tmp/base.sql"
  if git -C "$repo" show "$BASE_REV:lua/pglisten/schema.lua" >"$tmp/base_schema.lua" 2>/dev/null; then
    "${LUA:-lua5.4}" - "$tmp/base_schema.lua" >"$tmp/base.sql" <<<'io.write(dofile(arg[1]).sql)' || rm -f "$tmp/base.sql"
  fi
  [ -s "$tmp/base.sql" ] || say "bench: no schema at $BASE_REV: single-row rows without the base schema"
  say "bench: capture.sh (N=$CAP_N, $RUNS runs)"
  PGL_SQL=$tmp/schema.sql BENCH_N=$CAP_N BENCH_RUNS=$RUNS BENCH_BATCH=$B "$tmp/bench/capture.sh" "${repl_readers[@]}" \
    2>"$tmp/capture.err" | tee "$tmp/capture.out" >&2
  say "bench: capture-forms.sh (N=$CAP_N, $SINGLE_N single-row transactions, $RUNS runs)"
  PGL_SQL=$tmp/schema.sql PGL_SQL_BASE=$( [ -s "$tmp/base.sql" ] && echo "$tmp/base.sql") BENCH_SHARED=$tmp/bench \
    BENCH_N=$CAP_N BENCH_RUNS=$RUNS BENCH_BATCH=$B BENCH_SINGLE_N=$SINGLE_N "$here/capture-forms.sh" \
    2>"$tmp/forms.err" | tee "$tmp/forms.out" >&2
  : >"$tmp/icount.out"
  if [ "${BENCH_ICOUNT:-1}" = 1 ] && command -v valgrind >/dev/null; then
    say "bench: capture-icount.sh (instructions, callgrind; a few minutes)"
    PGL_SQL=$tmp/schema.sql PGL_SQL_BASE=$( [ -s "$tmp/base.sql" ] && echo "$tmp/base.sql") BENCH_SHARED=$tmp/bench \
      "$here/capture-icount.sh" 2>"$tmp/icount.err" | tee "$tmp/icount.out" >&2
  fi
}

# The goals of set-based capture, from the two scripts' tables.
capture_targets() {
  awk -F'|' -v cap="$tmp/capture.out" -v forms="$tmp/forms.out" -v ic="$tmp/icount.out" '
    function t(s) { gsub(/^ +| +$/, "", s); return s }
    function row(what, got, ok) { printf "| %s | %s | %s |\n", what, got, ok ? "met" : "**not met**" }
    FILENAME == cap && /^\| / && $3 ~ /[0-9]/ && !rb { c[t($2)] = t($4) + 0; cr[t($2)] = t($3) + 0 }
    FILENAME == cap && /^## Reading/ { rb = 1 }
    FILENAME == forms && /^### Single/ { single = 1 }
    FILENAME == forms && /^\| / && $3 ~ /[0-9]/ { if (single) s[t($2)] = t($3) + 0; else f[t($2)] = t($4) + 0 }
    FILENAME == ic && /per single-row/ { isingle = 1 }
    FILENAME == ic && /^\| / && $4 ~ /[0-9]/ {
      k = t($2) " " t($3); if (isingle) is[k] = t($5) + 0; else { ib[k] = t($6) + 0; ic_[k] = t($5) + 0 } }
    END {
      print "| goal | measured | |"
      print "|---|---|---|"
      if ("notify_trigger" in c) row("capture.sh: notify_trigger (row-level) ratio >= hand-trigger ratio",
        sprintf("%.2f vs %.2f", c["notify_trigger"], c["hand-trigger"]), c["notify_trigger"] >= c["hand-trigger"])
      if ("durable_trigger" in c) row("capture.sh: durable_trigger (row-level) ratio >= 0.5",
        sprintf("%.2f", c["durable_trigger"]), c["durable_trigger"] >= 0.5)
      if ("notify_statement" in f) row("forms: notify_statement ratio >= hand-trigger ratio",
        sprintf("%.2f vs %.2f", f["notify_statement"], f["hand-trigger"]), f["notify_statement"] >= f["hand-trigger"])
      if ("durable_statement" in f) row("forms: durable_statement ratio >= 0.5",
        sprintf("%.2f", f["durable_statement"]), f["durable_statement"] >= 0.5)
      if ("notify_row this" in ib) {
        row("instructions: notify_row ratio >= hand-trigger ratio",
          sprintf("%.2f vs %.2f (%d vs %d instr/row)", ib["notify_row this"], ib["hand-trigger this"], ic_["notify_row this"], ic_["hand-trigger this"]),
          ib["notify_row this"] >= ib["hand-trigger this"])
        row("instructions: durable_statement ratio >= 0.5", sprintf("%.2f", ib["durable_statement this"]), ib["durable_statement this"] >= 0.5)
        for (k in is) if (k ~ / this$/) { b = k; sub(/ this$/, " base", b); if (b in is)
          row("instructions: single-row " k " schema not more than base", sprintf("%d vs %d instr/tx", is[k], is[b]), is[k] <= is[b]) }
      }
      for (m in s) if (m ~ /base schema/) {
        n = m; sub(/ \(base schema\)/, "", n)
        row("single-row transactions: " n " not slower than under the base schema",
          sprintf("%d vs %d rows/s (%.2f x)", s[n], s[m], s[m] > 0 ? s[n] / s[m] : 0), s[n] >= s[m])
      }
    }' "$tmp/capture.out" "$tmp/forms.out" "$tmp/icount.out"
}

# The capture section of RESULTS.md (between markers, so that
# `bench/bench.sh capture` can rewrite it alone).
capture_section() {
  echo "<!-- capture:begin (bench/bench.sh capture rewrites this section) -->"
  echo "## Capture: what it costs the writers"
  echo
  if [ "$ONLY" = capture ]; then
    echo "Measured by \`bench/bench.sh capture\` on $(date -u '+%Y-%m-%d %H:%M UTC'), tree $(git -C "$repo" rev-parse --short HEAD 2>/dev/null);"
    echo "load average at start: $load0, at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
  fi
  echo '```'
  echo "$runner --sql >schema.sql"
  echo "PGL_SQL=schema.sql BENCH_N=$CAP_N BENCH_RUNS=$RUNS BENCH_BATCH=$B \$tmp/bench/capture.sh"
  echo "PGL_SQL=schema.sql PGL_SQL_BASE=<schema of $BASE_REV> BENCH_N=$CAP_N BENCH_RUNS=$RUNS BENCH_BATCH=$B BENCH_SINGLE_N=$SINGLE_N bench/capture-forms.sh"
  echo '```'
  echo
  echo "capture.sh's own rows: \`notify_trigger\` and \`durable_trigger\` are the row-level form"
  echo "(\`FOR EACH ROW\`) of this checkout's \`pglisten.notify_trigger\`."
  echo
  sed 's/^## /### /' "$tmp/capture.out"
  echo
  echo "bench/capture-forms.sh, on a cluster of its own with capture.sh's table, trigger, listener and"
  echo "insert loop: the statement-level form (\`AFTER INSERT ... REFERENCING NEW TABLE AS new_rows FOR EACH"
  echo "STATEMENT\`), and transactions of a single INSERT. Each run measures every row once in turn;"
  echo "the ratios are to \`none\` of the same table."
  echo
  cat "$tmp/forms.out"
  if [ -s "$tmp/icount.out" ]; then
    echo
    echo "bench/capture-icount.sh: the same inserts counted in instructions by callgrind, in a"
    echo "single-user backend, so that forms compare on a machine too noisy for wall-clock ratios"
    echo "(\"vs none\": base / (base + capture), the ratio if time were instructions)."
    echo
    cat "$tmp/icount.out"
  fi
  echo
  echo "### Goals"
  echo
  capture_targets
  echo "<!-- capture:end -->"
}

# sync.sh prints no producer-alone figure, and its consumers read while the
# producer writes (on 2 cores they share the CPU with it).  On a cluster of
# our own, with sync.sh's schema and insert loop: the inserts alone, then
# the batch consumers' own capacity: all rows queued before they read
# (BENCH_GO, as run.sh's backlog mode), median of RUNS.
sync_extra() {
  (
    . "$tmp/bench/pgtmp.sh"
    pg_up >/dev/null || exit 1
    export BENCH_SRC_DB=$src_db BENCH_DST_DB=target
    psql -qX -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $src_db" -c "CREATE DATABASE target" >/dev/null
    psql -qX -v ON_ERROR_STOP=1 -d target -c "CREATE TABLE users (id int PRIMARY KEY, name text, email text)" >/dev/null
    psql -qX -v ON_ERROR_STOP=1 -d "$src_db" >/dev/null <<'SQL'
CREATE TABLE users (id int PRIMARY KEY, name text, email text);
CREATE FUNCTION users_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('users', row_to_json(NEW)::text); RETURN NEW; END $$;
CREATE TRIGGER users_notify AFTER INSERT OR UPDATE ON users FOR EACH ROW EXECUTE FUNCTION users_notify();
SQL
    insert() {
      psql -qX -v ON_ERROR_STOP=1 -d "$src_db" >/dev/null <<SQL
DO \$\$ BEGIN
  FOR k IN 0..($SYNC_N/$B - 1) LOOP
    INSERT INTO users SELECT g, 'user' || g, 'user' || g || '@example.com' FROM generate_series(k*$B + 1, (k+1)*$B) g;
    COMMIT;
  END LOOP;
END \$\$;
SQL
    }
    truncate() { psql -qX -d "$src_db" -c "TRUNCATE users" && psql -qX -d target -c "TRUNCATE users"; }
    t0=$(date +%s.%N); insert; t1=$(date +%s.%N)
    echo "sync producer alone, no listener: $(echo "$SYNC_N / ($t1 - $t0)" | bc) rows/s ($SYNC_N in transactions of $B)"
    echo
    echo "| sync consumer, rows queued before it reads | rows/s (median of $RUNS) | mean batch | peak RSS MiB | target complete |"
    echo "|---|---|---|---|---|"
    local peer name cmd r out=$tmp/extra.out
    for peer in "${sync_cmd[@]}"; do
      name=${peer%%=*} cmd=${peer#*=}
      case $name in *batch*) ;; *) continue ;; esac
      local rates=() ok=yes rss=0 mean=
      for r in $(seq "$RUNS"); do
        truncate; rm -f "$tmp/go"
        BENCH_GO=$tmp/go BENCH_N=$SYNC_N /usr/bin/time -f "RSS %M" -o "$out.time" timeout 300 $cmd >"$out" 2>"$out.err" &
        local pid=$! i
        for i in $(seq 300); do grep -q READY "$out" 2>/dev/null && break; sleep 0.1; done
        insert; touch "$tmp/go"; wait $pid
        line=$(grep RESULT "$out" || echo "RESULT failed: $(tail -n2 "$out.err" | tr '\n' ' ')")
        [ "$(echo "$line" | sed -n 's/.* count=\([0-9]*\).*/\1/p')" = "$SYNC_N" ] &&
          [ "$(echo "$line" | sed -n 's/.* sum=\([0-9]*\).*/\1/p')" = "$(( SYNC_N * (SYNC_N + 1) / 2 ))" ] || ok="NO: $line"
        rates+=("$(echo "$line" | sed -n 's/.* rate=\([0-9]*\).*/\1/p')")
        mean=$(echo "$line" | sed -n 's/.* mean_batch=\([0-9.]*\).*/\1/p')
        rss=$(awk '/RSS/{print $2}' "$out.time")
      done
      printf '| %s | %s | %s | %.1f | %s |\n' "$name" "$(printf '%s\n' "${rates[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')" \
        "$mean" "$(echo "${rss:-0} / 1024" | bc -l)" "$ok"
    done
  )
}

# --- Targets (from the issue), computed from the tables ---
# run.sh row: | name | backlog | vs drain | live | p50 | p99 | RSS MiB | lossless |
# sync.sh row: | name | rows/s | vs first | RSS MiB | complete |
targets() {
  awk -F'|' -v run="$tmp/run.out" -v sync="$tmp/sync.out" -v extra="$tmp/sync_extra.out" '
    function t(s) { gsub(/^ +| +$/, "", s); return s }
    function v(s) { return t(s) + 0 }
    function row(what, got, ok) { printf "| %s | %s | %s |\n", what, got, ok ? "met" : "**not met**" }
    FILENAME == run && /^\| / && $3 ~ /[0-9]/ {
      n = t($2); rate[n] = v($3); p50[n] = v($6); p99[n] = v($7); rss[n] = v($8); ok[n] = t($9) == "yes"
      if (n != "drain" && n !~ /^lua-pglisten/ && rate[n] > best) { best = rate[n]; bestn = n }
    }
    FILENAME == sync && /^\| / && $3 ~ /[0-9]/ { n = t($2); srate[n] = v($3); sok[n] = t($6) }
    FILENAME == extra && /^\| / && $3 ~ /[0-9]/ { n = t($2); xrate[n] = v($3); xok[n] = t($6) }
    END {
      print "| target | measured | |"
      print "|---|---|---|"
      L = "lua-pglisten"
      if (L in rate && "drain" in rate) {
        row("backlog drain >= 0.35 x bare C drain, lossless", sprintf("%.0f / %.0f = %.2f, lossless: %s", rate[L], rate["drain"], rate[L] / rate["drain"], ok[L] ? "yes" : "NO"), ok[L] && rate[L] >= 0.35 * rate["drain"])
        if (best > 0) row("backlog drain >= 2 x fastest peer (" bestn ")", sprintf("%.0f / %.0f = %.2f", rate[L], best, rate[L] / best), ok[L] && rate[L] >= 2 * best)
        row("peak RSS < 16 MiB", rss[L] " MiB", rss[L] < 16)
        row("latency p50 within 50 us of drain", sprintf("%s vs %s us (%+d)", p50[L], p50["drain"], p50[L] - p50["drain"]), p50[L] - p50["drain"] <= 50)
        row("latency p99 within 2 x drain", sprintf("%s vs %s us (%.2f x)", p99[L], p99["drain"], p99["drain"] > 0 ? p99[L] / p99["drain"] : 0), p99[L] <= 2 * p99["drain"])
      }
      B = "lua-pglisten-batch"; U = "lua-pglisten-upsert"; P = "psycopg2"
      if (B in srate) row("sync, batch handler + execmany >= 100,000 rows/s, target complete", srate[B] " rows/s, complete: " sok[B], srate[B] >= 100000 && sok[B] == "yes")
      if (U in srate && P in srate) row("sync, per-note upsert >= psycopg2", sprintf("%.0f / %.0f = %.2f x, complete: %s", srate[U], srate[P], srate[U] / srate[P], sok[U]), srate[U] >= srate[P] && sok[U] == "yes")
      if (B in xrate) row("(same, rows queued before the consumer reads: its own capacity)", xrate[B] " rows/s, complete: " xok[B], xrate[B] >= 100000 && xok[B] == "yes")
      J = "lua-pglisten-batch-json"
      if (J in srate) row("(batch handler, one statement per batch: json_populate_recordset)", srate[J] " rows/s live; " (J in xrate ? xrate[J] " rows/s queued" : "") ", complete: " sok[J], srate[J] >= 100000 && sok[J] == "yes")
      if (B in srate && P in srate) printf "| (sync, batch vs psycopg2) | %.2f x | |\n", srate[B] / srate[P]
    }' "$tmp/run.out" "$tmp/sync.out" "$tmp/sync_extra.out"
}

write_results() {
  {
    echo "# lua-pglisten beside the peer consumers"
    echo
    echo "Written by \`make bench\` (bench/bench.sh). Figures vary from run to run and machine to"
    echo "machine: compare the ratios taken within one run."
    echo
    echo "## Machine"
    echo
    machine
    echo
    echo "## Commands"
    echo
    echo '```'
    echo "cp -r $shared \$tmp/bench && cd \$tmp/bench && npm install"
    if [ "$ONLY" = all ] || [ "$ONLY" = run ]; then
      printf 'BENCH_N=%s BENCH_RUNS=%s BENCH_BATCH=%s BENCH_RATE=%s $tmp/bench/run.sh' "$N" "$RUNS" "$B" "$RATE"
      printf " \\\\\n  '%s'" "${run_cmd[@]}"; echo
    fi
    if [ "$ONLY" = all ] || [ "$ONLY" = sync ]; then
      printf 'BENCH_N=%s BENCH_RUNS=%s BENCH_BATCH=%s $tmp/bench/sync.sh' "$SYNC_N" "$RUNS" "$B"
      printf " \\\\\n  '%s'" "${sync_cmd[@]}"; echo
    fi
    echo '```'
    if [ "$ONLY" = all ] || [ "$ONLY" = run ]; then
      echo
      echo "## Receive: run.sh (JSON payloads on channel bench)"
      echo
      echo "Backlog drain: all $N notes queued before the consumer reads (median of $RUNS); vs drain: the"
      echo "bare libpq loop peers/drain.c (no JSON library). Live burst: reading while the producer sends."
      echo "Latency: $((RATE * 5)) single-note transactions at $RATE/s. Peak RSS: the last backlog run."
      echo "lua-pglisten: the runner binary, JSON decoded by the runner, a Lua handler summing ids and"
      echo "counting latencies in a histogram exact to 1 us below 10 ms, where the peers keep an array of"
      echo "every latency (in Lua, $N floats would add about 9 MiB to the peak RSS, garbage included;"
      echo "BENCH_LAT_ARRAY=1 makes consumers/notes.lua keep the array too)."
      echo
      cat "$tmp/run.out"
    fi
    if [ "$ONLY" = all ] || [ "$ONLY" = sync ]; then
      echo
      echo "## Sync: sync.sh (trigger on source.users -> upsert into target.users)"
      echo
      echo "rows/s from the first notification to the last upsert done, median of $RUNS; vs first: the"
      echo "first row of the table. lua-pglisten-upsert: one conn:exec per note; lua-pglisten-batch: a"
      echo "batch handler (batch = 1000) with conn:execmany, one pipelined transaction per batch."
      echo
      cat "$tmp/sync.out"
      echo
      echo "lua-pglisten-batch-json: a batch handler (batch = 1000) writing each batch with one statement:"
      echo "the rows as one JSON parameter, json_populate_recordset on the server, the last version of"
      echo "each id only (consumers/batch_json.lua)."
      if [ -s "$tmp/sync_extra.out" ]; then
        echo
        echo "### The producer alone, and the batch consumers' own capacity"
        echo
        echo "sync.sh's consumers read while the producer inserts, and share the CPU with it. The same"
        echo "schema and inserts on a cluster of bench.sh's own: the inserts with no listener, then each"
        echo "batch consumer with all $SYNC_N rows queued before it reads (BENCH_GO, as in run.sh's backlog mode)."
        echo
        cat "$tmp/sync_extra.out"
      fi
    fi
    if [ "$ONLY" = all ]; then
      echo
      capture_section
    fi
    if [ -s "$tmp/cdc.out" ]; then
      echo
      cat "$tmp/cdc.out"
    fi
    echo
    echo "## Targets"
    echo
    targets
    if [ -s "$tmp/lua.log" ]; then
      echo
      echo "## lua-pglisten RESULT lines"
      echo
      echo "Every RESULT line the lua-pglisten consumers printed, in order (the tables keep some fields;"
      echo "mean_batch is the mean number of notes per batch-handler call)."
      echo
      echo '```'
      cat "$tmp/lua.log"
      echo '```'
    fi
  } >"$results"
}

install_peer_deps
copy_bench || { echo "bench: cannot copy $shared" >&2; exit 1; }
: >"$tmp/run.out"; : >"$tmp/sync.out"; : >"$tmp/sync_extra.out"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
case $ONLY in all|run) run_run ;; esac
case $ONLY in all|capture) run_capture ;; esac
case $ONLY in all|cdc) run_cdc ;; esac
if [ "$ONLY" = all ] || [ "$ONLY" = sync ]; then
  run_sync
  say "bench: sync producer alone, and the batch consumers' capacity"
  sync_extra >"$tmp/sync_extra.out" 2>"$tmp/sync_extra.err"; cat "$tmp/sync_extra.out" >&2
fi
for f in run sync capture forms icount cdc; do
  [ -s "$tmp/$f.err" ] && { say "bench: $f.sh stderr:"; tail -n 20 "$tmp/$f.err" >&2; }
done
if [ "$ONLY" = capture ]; then
  # only the capture section of the existing file
  capture_section >"$tmp/capture.md"
  if [ -f "$results" ] && grep -q '^<!-- capture:begin' "$results"; then
    awk -v sec="$tmp/capture.md" '
      /^<!-- capture:begin/ { while ((getline l < sec) > 0) print l; skip = 1; next }
      /^<!-- capture:end/ { skip = 0; next }
      !skip' "$results" >"$tmp/results.md" && cp "$tmp/results.md" "$results"
  else
    { [ -f "$results" ] && cat "$results" && echo; cat "$tmp/capture.md"; } >"$tmp/results.md" && cp "$tmp/results.md" "$results"
  fi
  say "bench: wrote the capture section of $results"
  exit 0
fi
write_results
say "bench: wrote $results"

# every lua-pglisten row lossless / complete?
bad=$(grep -h '^| lua-pglisten' "$tmp/run.out" "$tmp/sync.out" "$tmp/sync_extra.out" | grep -v '| yes |$' || true)
if [ -n "$bad" ]; then
  say "bench: lua-pglisten incomplete:"; say "$bad"
  exit 1
fi
exit 0
