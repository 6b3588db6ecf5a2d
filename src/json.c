/*
 * json.c -- core.json_encode and core.json_decode: JSON that keeps Lua
 * integers exact, and a decoder cheap enough for the runner's hot path.
 * This file is the encoder and the registration; the decoder is jsondec.c,
 * the buffer both write to json.h.
 *
 * lua-cjson 2.1.0 (Debian 12) formats every number with "%.14g", so the
 * integer 123456789012345 leaves as 1.2345678901234e+14 and comes back
 * changed: unacceptable for ids.  Its decoder returns every number as a
 * double (a bigint id above 2^53 is rounded) and grows each table by
 * rehashing; it was about 40% of the runner's instructions per note.
 *
 * The encoder writes integers with all their digits and floats in the
 * shortest form that reads back as the same double (pgl_format_float: 0.1,
 * 1e-20, -0.0; an integral float that fits 64 bits as an integer, 3.0 as 3);
 * NaN and infinities, which JSON cannot hold, as null.  The text grows in a
 * malloc'd buffer owned by a userdata with __gc, so an error anywhere (a bad
 * value, out of memory) leaks nothing; luaL_Buffer cannot be used because
 * the encoder pushes keys and values between its additions.
 *
 * Tables: a table whose keys are exactly 1..n is an array (an empty table is
 * {}); any other table is an object whose keys must be strings or numbers
 * (a float key in the shortest form; a number key whose text is also a
 * string key of the table raises: {[1] = a, ["1"] = b} would hold "1" twice).
 * The null sentinel (pglisten.null) is null.  Nesting beyond 1000 levels
 * (or a cycle) raises, as do values JSON cannot carry (functions, ...).
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "json.h"

static int jbuf_gc(lua_State *L) {
  jbuf *j = (jbuf *)luaL_checkudata(L, 1, JBUF_MT);
  free(j->p);
  j->p = NULL;
  j->n = j->cap = 0;
  return 0;
}

static void put_string(lua_State *L, jbuf *b, const char *s, size_t len) {
  static const char hex[] = "0123456789abcdef";
  size_t i, start = 0;
  jputc(L, b, '"');
  for (i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)s[i];
    const char *esc = NULL;
    char u[7];
    if (ch >= 0x20 && ch != '"' && ch != '\\' && ch != 0x7f)
      continue;
    switch (ch) {
    case '"': esc = "\\\""; break;
    case '\\': esc = "\\\\"; break;
    case '\n': esc = "\\n"; break;
    case '\r': esc = "\\r"; break;
    case '\t': esc = "\\t"; break;
    case '\b': esc = "\\b"; break;
    case '\f': esc = "\\f"; break;
    default:
      u[0] = '\\'; u[1] = 'u'; u[2] = '0'; u[3] = '0';
      u[4] = hex[ch >> 4]; u[5] = hex[ch & 15]; u[6] = '\0';
      esc = u;
    }
    jput(L, b, s + start, i - start);
    jputs(L, b, esc);
    start = i + 1;
  }
  jput(L, b, s + start, len - start);
  jputc(L, b, '"');
}

static void put_number(lua_State *L, jbuf *b, int idx) {
  char buf[PGL_NUMBUF];
  int n;
  if (lua_isinteger(L, idx)) {
    n = snprintf(buf, sizeof buf, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
  } else {
    double x = (double)lua_tonumber(L, idx);
    if (isnan(x) || isinf(x)) {
      jputs(L, b, "null");
      return;
    }
    n = pgl_format_float(x, buf, 1); /* 1.0 -> 1, as JSON readers expect; -0.0 keeps its sign */
  }
  jput(L, b, buf, (size_t)n);
}

/*
 * The key at idx of the table at t: a string as it is, an integer with all
 * its digits, a finite float in the shortest form (Lua's tostring has 14
 * digits, so 0.3 and 0.1 + 0.2 would both be "0.3", and follows the
 * locale).  A number key whose text is also a string key of the table
 * raises: the object would hold that key twice and a reader keep one value.
 */
static void put_key(lua_State *L, jbuf *b, int t, int idx) {
  char buf[PGL_NUMBUF];
  size_t len;
  const char *k;
  if (lua_type(L, idx) != LUA_TNUMBER) {
    k = lua_tolstring(L, idx, &len);
    put_string(L, b, k, len);
    return;
  }
  if (!lua_isinteger(L, idx) && isfinite(lua_tonumber(L, idx)))
    lua_pushlstring(L, buf, (size_t)pgl_format_float((double)lua_tonumber(L, idx), buf, 1));
  else {
    lua_pushvalue(L, idx); /* a copy: tolstring would change a number key in place */
    lua_tolstring(L, -1, NULL);
  }
  lua_pushvalue(L, -1);
  if (lua_rawget(L, t) != LUA_TNIL)
    luaL_error(L, "cannot encode as JSON: the number key %s and the string key \"%s\" are both the key \"%s\"",
               lua_tostring(L, -2), lua_tostring(L, -2), lua_tostring(L, -2));
  lua_pop(L, 1);
  k = lua_tolstring(L, -1, &len);
  put_string(L, b, k, len);
  lua_pop(L, 1);
}

/* The length n when the table's keys are exactly 1..n, else -1. */
static lua_Integer array_length(lua_State *L, int idx) {
  lua_Integer n = 0, max = 0;
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    lua_pop(L, 1);
    if (lua_isinteger(L, -1) && lua_tointeger(L, -1) >= 1) {
      lua_Integer k = lua_tointeger(L, -1);
      if (k > max)
        max = k;
      n++;
    } else {
      lua_pop(L, 1);
      return -1;
    }
  }
  return (n > 0 && n == max) ? n : -1;
}

/* Whether the table at idx is pglisten.unchanged (a table with a metatable:
 * an empty object, were it encoded, would alter the value in silence). */
static int is_unchanged(lua_State *L, int idx) {
  int is;
  if (!lua_getmetatable(L, idx))
    return 0; /* the usual case: no metatable, no lookup */
  lua_pop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_unchanged);
  is = lua_rawequal(L, idx, -1);
  lua_pop(L, 1);
  return is;
}

static void encode(lua_State *L, jbuf *b, int idx, int depth, int nullidx);

/* The table at idx, whose keys are exactly 1..n, as a JSON array. */
static void encode_array(lua_State *L, jbuf *b, int idx, lua_Integer n, int depth, int nullidx) {
  lua_Integer i;
  jputc(L, b, '[');
  for (i = 1; i <= n; i++) {
    if (i > 1)
      jputc(L, b, ',');
    lua_rawgeti(L, idx, i);
    encode(L, b, lua_gettop(L), depth + 1, nullidx);
    lua_pop(L, 1);
  }
  jputc(L, b, ']');
}

/* Any other table at idx as a JSON object; raises on a key that is
 * neither a string nor a number. */
static void encode_object(lua_State *L, jbuf *b, int idx, int depth, int nullidx) {
  int first = 1;
  jputc(L, b, '{');
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    int kt = lua_type(L, -2);
    if (kt != LUA_TSTRING && kt != LUA_TNUMBER)
      luaL_error(L, "cannot encode as JSON: a table key of type %s", lua_typename(L, kt));
    if (!first)
      jputc(L, b, ',');
    first = 0;
    put_key(L, b, idx, lua_gettop(L) - 1);
    jputc(L, b, ':');
    encode(L, b, lua_gettop(L), depth + 1, nullidx);
    lua_pop(L, 1);
  }
  jputc(L, b, '}');
}

/* The table at idx, `depth` levels down: an array or an object. */
static void encode_table(lua_State *L, jbuf *b, int idx, int depth, int nullidx) {
  lua_Integer n;
  if (depth >= MAX_DEPTH)
    luaL_error(L, "cannot encode as JSON: nested deeper than %d (a cycle?)", MAX_DEPTH);
  luaL_checkstack(L, 6, "JSON value nested too deeply");
  n = array_length(L, idx);
  if (n > 0)
    encode_array(L, b, idx, n, depth, nullidx);
  else
    encode_object(L, b, idx, depth, nullidx);
}

/* Encodes the value at idx (absolute); the buffer sits below the work. */
static void encode(lua_State *L, jbuf *b, int idx, int depth, int nullidx) {
  switch (lua_type(L, idx)) {
  case LUA_TNIL:
    jputs(L, b, "null");
    return;
  case LUA_TBOOLEAN:
    jputs(L, b, lua_toboolean(L, idx) ? "true" : "false");
    return;
  case LUA_TNUMBER:
    put_number(L, b, idx);
    return;
  case LUA_TSTRING: {
    size_t len;
    const char *s = lua_tolstring(L, idx, &len);
    put_string(L, b, s, len);
    return;
  }
  case LUA_TLIGHTUSERDATA:
    if (lua_rawequal(L, idx, nullidx)) {
      jputs(L, b, "null");
      return;
    }
    break;
  case LUA_TTABLE:
    if (is_unchanged(L, idx))
      luaL_error(L, "cannot encode pglisten.unchanged as JSON (a TOASTed value the UPDATE did not touch, "
                    "which the server did not send: leave the column out, or use REPLICA IDENTITY FULL)");
    encode_table(L, b, idx, depth, nullidx);
    return;
  default:
    break;
  }
  luaL_error(L, "cannot encode a %s as JSON", luaL_typename(L, idx));
}

/* core.json_encode(v) -> string; raises on values JSON cannot carry. */
static int core_json_encode(lua_State *L) {
  jbuf *b;
  luaL_checkany(L, 1);
  lua_settop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null); /* 2 */
  b = (jbuf *)lua_newuserdatauv(L, sizeof *b, 0);   /* 3 */
  b->p = NULL;
  b->n = b->cap = 0;
  luaL_setmetatable(L, JBUF_MT);
  encode(L, b, 1, 0, 2);
  lua_pushlstring(L, b->p ? b->p : "", b->n);
  free(b->p);
  b->p = NULL;
  b->n = b->cap = 0;
  return 1;
}

/* ------------------------------------------------------------------ */
/* Registration                                                        */
/* ------------------------------------------------------------------ */

/* Adds core.json_encode and core.json_decode to the module table on the top
 * of the stack. */
void pgl_json_open(lua_State *L) {
  if (luaL_newmetatable(L, JBUF_MT)) {
    lua_pushcfunction(L, jbuf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, core_json_encode);
  lua_setfield(L, -2, "json_encode");
  pgl_json_decode_open(L);
}
