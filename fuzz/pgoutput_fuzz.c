/*
 * pgoutput_fuzz.c -- a libFuzzer target for the replication decoder
 * (src/pgoutput.c, src/pgoutput_rows.c): each input is one CopyData
 * payload, decoded against a relation map that holds the relations of the
 * seed corpus (fuzz/corpus: real messages captured from a PostgreSQL 15
 * walsender).  The decoder must return a message or nil, err; anything
 * the sanitizers see is a bug.  `make fuzz` builds and runs it.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <lualib.h>

#include "../src/pgl.h"

int luaopen_pglisten_core(lua_State *L);

static lua_State *L;

/* The relation of the seed corpus (relid 16467: id int4 key, j jsonb,
 * n numeric), put in the map by the decoder itself at start-up. */
static const char seed_relation[] =
  "w" "\0\0\0\0\0\0\0\0" "\0\0\0\0\0\0\0\0" "\0\0\0\0\0\0\0\0"
  "R" "\0\0\x40\x53" "public\0" "t\0" "d" "\0\3"
  "\1" "id\0" "\0\0\0\x17" "\xff\xff\xff\xff"
  "\0" "j\0" "\0\0\x0e\xda" "\xff\xff\xff\xff"
  "\0" "n\0" "\0\0\x06\xa4" "\xff\xff\xff\xff";

/* Decodes the (lightuserdata, length) on the stack with the map at 3:
 * first as the replication source reads (events mode: a row change is its
 * event, without kind), then as messages.  Both must agree on whether the
 * input is valid; the messages are returned. */
static int decode(lua_State *S) {
  const char *buf = (const char *)lua_touserdata(S, 1);
  size_t len = (size_t)lua_tointeger(S, 2);
  pgl_msginfo mi;
  int events_ok;
  lua_settop(S, 3);
  mi.events = 1;
  events_ok = pgl_pgoutput_decode_ex(S, buf, len, 3, &mi) == 1;
  if (events_ok && (!lua_istable(S, -1) || (lua_getfield(S, -1, "kind") == LUA_TNIL) != mi.change))
    __builtin_trap(); /* a change and only a change comes without kind */
  lua_settop(S, 3);
  if ((pgl_pgoutput_decode(S, buf, len, 3) == 1) != events_ok)
    __builtin_trap();
  return events_ok ? 1 : 2;
}

static void setup(void) {
  L = luaL_newstate();
  luaL_openlibs(L);
  luaL_requiref(L, "pglisten.core", luaopen_pglisten_core, 0);
  lua_pop(L, 1);
  /* as the facade does: the JSON codec for json/jsonb columns, a null */
  if (luaL_dostring(L, "local c = require 'pglisten.core' c.setup(c.json_encode, c.json_decode, {})"))
    __builtin_trap();
  lua_newtable(L); /* 1: the seed map */
  lua_pushcfunction(L, decode);
  lua_pushlightuserdata(L, (void *)seed_relation);
  lua_pushinteger(L, (lua_Integer)(sizeof seed_relation - 1));
  lua_pushvalue(L, 1);
  lua_call(L, 3, LUA_MULTRET);
  lua_settop(L, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L)
    setup();
  lua_settop(L, 1);
  lua_pushcfunction(L, decode);
  lua_pushlightuserdata(L, (void *)data);
  lua_pushinteger(L, (lua_Integer)size);
  lua_newtable(L); /* a copy of the seed map: every input starts alike */
  lua_pushnil(L);
  while (lua_next(L, 1)) {
    lua_pushvalue(L, -2);
    lua_insert(L, -2);
    lua_rawset(L, -4);
  }
  if (lua_pcall(L, 3, 2, 0) != LUA_OK)
    __builtin_trap(); /* the decoder raises only on a memory error */
  if (lua_isnil(L, -2) ? !lua_isstring(L, -1) : !lua_istable(L, -2))
    __builtin_trap();
  lua_settop(L, 1);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
