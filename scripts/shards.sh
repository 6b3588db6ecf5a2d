#!/usr/bin/env bash
# shards.sh N [SPEC...]: runs the busted spec files in N busted processes at
# once, each against throwaway servers of its own (with-pg.sh), so that the
# suite's waits (servers restarting, retries backing off, runners being
# killed) overlap.  The files are dealt out heaviest first to the shard with
# the least work so far, by the seconds each took alone (WEIGHTS below;
# a file not listed counts 10 s).  Each shard's output is printed once it is
# done, then the totals: "busted: N passed, N failed".  Exits 0 only when
# every shard passed.  N = 1, or a single file, runs as with-pg.sh busted.sh.
set -u
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.." || exit 1
n=${1:-1}
shift
[ $# -gt 0 ] || set -- spec
files=()
for a in "$@"; do
  if [ -d "$a" ]; then
    for f in "$a"/*_spec.lua; do files+=("$f"); done
  else
    files+=("$a")
  fi
done
[ "$n" -gt "${#files[@]}" ] && n=${#files[@]} # no shard without files (busted alone runs all of spec/)
if [ "$n" -le 1 ]; then
  exec scripts/with-pg.sh scripts/busted.sh "${files[@]}"
fi

# seconds alone (scripts/with-pg.sh scripts/busted.sh FILE), 2026-12-01
WEIGHTS="01:6 02:8 03:29 04:14 05:4 06:7 07:16 08:1 09:2 10:4 11:5 12:8 13:41 14:19 15:7 16:1 17:5 18:3 19:15
20:6 21:12 22:9 23:15 24:21 25:7 26:8 27:4 28:6 29:5 30:26 31:9 32:26 33:1 34:18 35:2 36:1 37:26
38:11 39:4 40:37 41:1 42:24 43:3 44:1 45:7 46:7 47:1 48:6 49:52 50:23 51:30"
weight() {
  local num w
  num=$(basename "$1" | sed -n 's/^\([0-9][0-9]*\)-.*/\1/p')
  for w in $WEIGHTS; do
    [ "${w%%:*}" = "$num" ] && { echo "${w#*:}"; return; }
  done
  echo 10
}

# deal: heaviest first, each to the lightest shard
declare -a load lists
for ((i = 0; i < n; i++)); do load[i]=0; lists[i]=""; done
while read -r w f; do
  best=0
  for ((i = 1; i < n; i++)); do [ "${load[i]}" -lt "${load[best]}" ] && best=$i; done
  load[best]=$((load[best] + w))
  lists[best]="${lists[best]} $f"
done < <(for f in "${files[@]}"; do echo "$(weight "$f") $f"; done | sort -rn -k1,1)

logs=$(mktemp -d "${TMPDIR:-/tmp}/pglisten-shards.XXXXXX") || exit 1
pids=()
# each shard is a process group of its own (setsid): a stop ends its busted,
# the runners it started and, through with-pg.sh's own traps, its servers
cleanup() {
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
  wait
  if [ "${#pids[@]}" -gt 0 ]; then # stopped before the end: what the shards printed so far
    for f in "$logs"/*; do [ -f "$f" ] && { echo "== shard $(( $(basename "$f") + 1 )) (stopped)"; cat "$f"; }; done
  fi
  rm -rf "$logs"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
for ((i = 0; i < n; i++)); do
  # shellcheck disable=SC2086 # the list is file names without blanks
  setsid scripts/with-pg.sh scripts/busted.sh ${lists[i]} >"$logs/$i" 2>&1 </dev/null &
  pids[i]=$!
done
rc=0 passed=0 failed=0
for ((i = 0; i < n; i++)); do
  wait "${pids[i]}" || rc=1
  echo "== shard $((i + 1))/$n (~${load[i]} s alone):${lists[i]}"
  cat "$logs/$i"
  line=$(grep '^busted: [0-9]* passed, [0-9]* failed' "$logs/$i" | tail -n1)
  rm -f "$logs/$i" # printed: not again should the rest be stopped
  if [ -z "$line" ]; then
    echo "shards: shard $((i + 1)) printed no summary"
    rc=1
    continue
  fi
  set -- $line
  passed=$((passed + $2)) failed=$((failed + $4))
done
pids=()
echo "busted: $passed passed, $failed failed ($n shards)"
[ "$rc" = 0 ] && [ "$failed" = 0 ] && [ "$passed" -gt 0 ]
