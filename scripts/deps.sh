#!/bin/sh
# Installs the Debian 12 packages lua-pglisten needs to build, test and demo,
# and only those that are missing.  Needs root (or sudo) only when something
# is missing.  Set PGL_NO_DEPS=1 to skip (for machines set up another way).
set -eu
[ "${PGL_NO_DEPS:-}" = 1 ] && exit 0
PKGS="lua5.4 lua-socket liblua5.4-dev libpq-dev lua-cjson lua-busted lua-check luarocks postgresql pkg-config gcc make lua-sql-sqlite3 sqlite3"
command -v dpkg-query >/dev/null 2>&1 || {
  echo "deps: not a Debian system; install: $PKGS (or set PGL_NO_DEPS=1)" >&2
  exit 0
}
missing=
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "deps: installing$missing" >&2
SUDO=
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "deps: run as root or install:$missing" >&2; exit 1; }
  SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq </dev/null
$SUDO apt-get install -y -qq --no-install-recommends $missing </dev/null
