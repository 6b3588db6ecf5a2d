#!/bin/sh
# busted.sh [SPEC...]: runs the busted specs with Lua 5.4 and prints a closing
# line "busted: N passed, N failed" (errors count as failed).
set -u
cd "$(dirname "$0")/.."
out=${PGL_TEST_DIR:-/tmp}/busted.out
busted --lua=lua5.4 -o utfTerminal "$@" 2>&1 | tee "$out"
rc=$(awk '/successes? \/ .*failures? \/ .*errors? \//{print}' "$out" | tail -n1)
ok=$(echo "$rc" | sed -n 's/^\([0-9]*\) success.*/\1/p')
fail=$(echo "$rc" | sed -n 's/.* \([0-9]*\) failures\{0,1\} \/ \([0-9]*\) errors\{0,1\}.*/\1 \2/p')
if [ -z "$ok" ] || [ -z "$fail" ]; then
  echo "busted: no summary line; the run did not complete"
  exit 1
fi
set -- $fail
echo "busted: $ok passed, $(( $1 + $2 )) failed"
[ "$(( $1 + $2 ))" = 0 ] && [ "$ok" -gt 0 ]
