rockspec_format = "3.0"
package = "lua-pglisten"
version = "scm-1"
source = {
  url = "git+https://github.com/lua-pglisten/lua-pglisten.git",
}
description = {
  summary = "PostgreSQL LISTEN/NOTIFY for Lua 5.4 on libpq, and a runner for handler scripts",
  detailed = [[
    pglisten: a libpq connection with a non-blocking listener (socket exposed,
    wait with timeout), LISTEN/UNLISTEN/NOTIFY, and parameterized queries.
    lua-pglisten: a host program that runs a Lua handler script per channel,
    with JSON payloads decoded, reconnects, retries and durable delivery.
  ]],
  license = "MIT",
}
dependencies = {
  "lua >= 5.4, < 5.5",
  "lua-cjson >= 2.1.0",
  "luasocket >= 3.0", -- --metrics (loaded only when metrics are served)
}
external_dependencies = {
  -- libpq-fe.h lives in /usr/include/postgresql on Debian, where LuaRocks
  -- does not look; the Makefile finds it with pkg-config (or PQ_INCDIR).
  PQ = { library = "pq" },
}
build = {
  type = "make",
  build_target = "all",
  build_variables = {
    CFLAGS = "$(CFLAGS)",
    LIBFLAG = "$(LIBFLAG)",
    LUA_INCDIR = "$(LUA_INCDIR)",
    PQ_INCDIR = "$(PQ_INCDIR)",
    PQ_LIBDIR = "$(PQ_LIBDIR)",
    PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
  install_target = "install",
  -- The man page: `make install` puts it in $(PREFIX)/share/man/man1, which
  -- under LuaRocks is the rock's own directory; read it with
  --   man -l "$(luarocks show --rock-dir lua-pglisten)/share/man/man1/lua-pglisten.1"
  -- or add that share/man to MANPATH.  doc/ is copied beside it too.
  copy_directories = { "doc" },
  install_variables = {
    PREFIX = "$(PREFIX)",
    LUADIR = "$(LUADIR)",
    LIBDIR = "$(LIBDIR)",
    BINDIR = "$(BINDIR)",
  },
}
