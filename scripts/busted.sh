#!/bin/sh
# busted.sh [SPEC...]: runs the busted specs with Lua 5.4 and prints a closing
# line "busted: N passed, N failed" (errors count as failed).
set -u
cd "$(dirname "$0")/.."
out=${PGL_TEST_DIR:-/tmp}/busted.out
if [ "${PGL_SANITIZE:-}" = 1 ]; then
  # make check: the C module is built with ASan+UBSan, the interpreter is not,
  # so the runtimes must be loaded first.  Any report aborts the process
  # (-fno-sanitize-recover, halt_on_error) and so fails the spec that hit it;
  # the log is searched for reports at the end as well.
  LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  ASAN_OPTIONS="detect_leaks=${PGL_DETECT_LEAKS:-0}:halt_on_error=1:abort_on_error=0:log_path=${PGL_TEST_DIR:-/tmp}/asan"
  UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=${PGL_TEST_DIR:-/tmp}/ubsan"
  export LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS
  # other programs the specs start (psql) run without the sanitizer runtime
  wrap=${PGL_TEST_DIR:-/tmp}/nosan
  mkdir -p "$wrap"
  printf '#!/bin/sh\nunset LD_PRELOAD\nexec %s "$@"\n' "$(command -v psql)" >"$wrap/psql"
  chmod 755 "$wrap/psql"
  PATH=$wrap:$PATH
fi
busted --lua=lua5.4 -o utfTerminal "$@" 2>&1 | tee "$out"
rc=$(awk '/success(es)? \/ .*failures? \/ .*errors? \//{print}' "$out" | tail -n1)
ok=$(echo "$rc" | sed -n 's/^\([0-9]*\) success.*/\1/p')
fail=$(echo "$rc" | sed -n 's/.* \([0-9]*\) failures\{0,1\} \/ \([0-9]*\) errors\{0,1\}.*/\1 \2/p')
if [ -z "$ok" ] || [ -z "$fail" ]; then
  echo "busted: no summary line; the run did not complete"
  exit 1
fi
set -- $fail
reports=$(cat "${PGL_TEST_DIR:-/tmp}"/asan.* "${PGL_TEST_DIR:-/tmp}"/ubsan.* 2>/dev/null | grep -c "ERROR: AddressSanitizer\|runtime error:\|ERROR: LeakSanitizer")
if [ "${PGL_SANITIZE:-}" = 1 ]; then
  echo "sanitizer reports: $reports"
  [ "$reports" = 0 ] || { cat "${PGL_TEST_DIR:-/tmp}"/asan.* "${PGL_TEST_DIR:-/tmp}"/ubsan.* 2>/dev/null | head -60; exit 1; }
fi
echo "busted: $ok passed, $(( $1 + $2 )) failed"
[ "$(( $1 + $2 ))" = 0 ] && [ "$ok" -gt 0 ]
