/*
 * conninfo.c -- reading a conninfo string with libpq's own parser:
 * core.conninfo_keys (the keywords it sets, never the values) and
 * core.conninfo_parse (keyword, value and libpq's display hints: the facade
 * masks secrets with them), and the check every conninfo argument gets.
 */
#include <string.h>

#include "pgl.h"

const char *pgl_conninfo_arg(lua_State *L, int idx, int opt) {
  size_t len;
  const char *s = opt ? luaL_optlstring(L, idx, "", &len) : luaL_checklstring(L, idx, &len);
  if (strlen(s) != len) {
    lua_pushnil(L);
    lua_pushliteral(L, "invalid conninfo: it contains a zero byte (libpq would read only the part before it)");
    return NULL;
  }
  return s;
}

/*
 * core.conninfo_keys(conninfo) -> { keyword = true, ... } for the keywords
 * the string sets (keyword/value or URI), or nil, err when libpq cannot
 * parse it.  The values are not returned: they may hold a password.
 */
int pgl_core_conninfo_keys(lua_State *L) {
  const char *s = pgl_conninfo_arg(L, 1, 0);
  char *err = NULL;
  PQconninfoOption *opts, *o;
  if (!s)
    return 2;
  opts = PQconninfoParse(s, &err);
  if (!opts) {
    lua_pushnil(L);
    if (err) {
      pgl_push_trimmed(L, err);
      PQfreemem(err);
    } else {
      lua_pushliteral(L, "out of memory parsing a conninfo");
    }
    return 2;
  }
  /* Collect the keywords and free the options before any Lua allocation
   * (which may raise and would leak them).  libpq copies the option structs
   * from its static PQconninfoOptions table, so `keyword` points to static
   * strings that outlive PQconninfoFree; only `val` is allocated. */
  {
    int n = 0, i = 0;
    const char *keys[128];
    for (o = opts; o->keyword; o++)
      if (o->val && *o->val && n < 128)
        keys[n++] = o->keyword; /* keywords are static strings inside libpq */
    PQconninfoFree(opts);
    lua_createtable(L, 0, n);
    for (i = 0; i < n; i++) {
      lua_pushboolean(L, 1);
      lua_setfield(L, -2, keys[i]);
    }
  }
  return 1;
}

/*
 * core.conninfo_parse(conninfo) -> array of {keyword=, value=, dispchar=}
 * for every option libpq knows, in libpq's order (value nil when the string
 * does not set it; dispchar "*" marks a secret such as password or
 * sslpassword, "D" a debug option, "" the others), or nil, err when libpq
 * cannot parse the string.  `conninfo_parse("")` lists every keyword.  The
 * values are the ones libpq will use (URI percent escapes and keyword/value
 * quotes already decoded): the facade masks secrets with them.
 *
 * The options and libpq's error message live in a box whose __gc frees
 * them, so that a Lua memory error while copying them out leaks nothing.
 */
#define PGL_CONNINFO_BOX "pglisten.conninfo_box"

typedef struct conninfo_box {
  PQconninfoOption *opts;
  char *err;
} conninfo_box;

static void conninfo_box_free(conninfo_box *b) {
  if (b->opts)
    PQconninfoFree(b->opts); /* also frees every val */
  if (b->err)
    PQfreemem(b->err);
  b->opts = NULL;
  b->err = NULL;
}

static int conninfo_box_gc(lua_State *L) {
  conninfo_box_free((conninfo_box *)luaL_checkudata(L, 1, PGL_CONNINFO_BOX));
  return 0;
}

static conninfo_box *conninfo_box_new(lua_State *L) {
  conninfo_box *b = (conninfo_box *)lua_newuserdatauv(L, sizeof *b, 0);
  b->opts = NULL;
  b->err = NULL;
  if (luaL_newmetatable(L, PGL_CONNINFO_BOX)) {
    lua_pushcfunction(L, conninfo_box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_setmetatable(L, -2);
  return b;
}

int pgl_core_conninfo_parse(lua_State *L) {
  const char *s = pgl_conninfo_arg(L, 1, 0);
  conninfo_box *b;
  PQconninfoOption *o;
  lua_Integer i = 0;
  if (!s)
    return 2;
  b = conninfo_box_new(L); /* at index 2 */
  b->opts = PQconninfoParse(s, &b->err);
  if (!b->opts) {
    lua_pushnil(L);
    if (b->err)
      pgl_push_trimmed(L, b->err);
    else
      lua_pushliteral(L, "out of memory parsing a conninfo");
    conninfo_box_free(b);
    return 2;
  }
  lua_newtable(L);
  for (o = b->opts; o->keyword; o++) {
    lua_createtable(L, 0, 3);
    lua_pushstring(L, o->keyword);
    lua_setfield(L, -2, "keyword");
    if (o->val) {
      lua_pushstring(L, o->val);
      lua_setfield(L, -2, "value");
    }
    lua_pushstring(L, o->dispchar ? o->dispchar : "");
    lua_setfield(L, -2, "dispchar");
    lua_rawseti(L, -2, ++i);
  }
  conninfo_box_free(b); /* now, rather than at the next collection */
  return 1;
}
