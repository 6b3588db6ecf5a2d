/*
 * result.c -- query parameters from Lua values, and query results to Lua,
 * with numbers exact both ways (number.c's rules, also for json.c): a float
 * leaves in the shortest form that reads back as the same double, and a
 * number text that no Lua integer or double holds exactly arrives as the text.
 *
 * Every PGresult that is held while Lua code may run (an allocation can raise
 * a memory error) is kept in a "box" userdata whose __gc clears it, so an
 * error in the middle of a conversion cannot leak it.
 */
#include <errno.h>
#include <float.h>
#include <locale.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgl.h"

/* Type OIDs from the server's catalog (src/include/catalog/pg_type.dat). */
#define BOOLOID    16
#define INT8OID    20
#define INT2OID    21
#define INT4OID    23
#define OIDOID     26
#define JSONOID    114
#define FLOAT4OID  700
#define FLOAT8OID  701
#define NUMERICOID 1700
#define JSONBOID   3802

/* ------------------------------------------------------------------ */
/* Result boxes                                                        */
/* ------------------------------------------------------------------ */

PGresult **pgl_box_result(lua_State *L, PGresult *res) {
  PGresult **box = (PGresult **)lua_newuserdatauv(L, sizeof *box, 0);
  *box = res;
  luaL_setmetatable(L, PGL_RESULT_MT);
  return box;
}

void pgl_unbox_result(PGresult **box) {
  if (*box) {
    PQclear(*box);
    *box = NULL;
  }
}

static int box_gc(lua_State *L) {
  pgl_unbox_result((PGresult **)luaL_checkudata(L, 1, PGL_RESULT_MT));
  return 0;
}

/* ------------------------------------------------------------------ */
/* Errors                                                              */
/* ------------------------------------------------------------------ */

void pgl_push_trimmed(lua_State *L, const char *s) {
  size_t n = strlen(s);
  while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == ' ' || s[n - 1] == '\r'))
    n--;
  lua_pushlstring(L, s, n);
}

int pgl_push_result_error(lua_State *L, const PGresult *res) {
  const char *msg = PQresultErrorMessage(res);
  const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  lua_pushnil(L);
  if (msg && *msg)
    pgl_push_trimmed(L, msg);
  else
    lua_pushfstring(L, "query failed: %s", PQresStatus(PQresultStatus(res)));
  if (state) {
    lua_pushstring(L, state);
    return 3;
  }
  return 2;
}

/* ------------------------------------------------------------------ */
/* Parameters                                                          */
/* ------------------------------------------------------------------ */

/* A float as a text parameter: "NaN", "Infinity" and "-Infinity" as the
 * server spells them, any other in the shortest form (pgl_format_float). */
static void push_float(lua_State *L, lua_Number x) {
  char buf[PGL_NUMBUF];
  if (isnan(x))
    lua_pushliteral(L, "NaN");
  else if (isinf(x))
    lua_pushstring(L, x > 0 ? "Infinity" : "-Infinity");
  else
    lua_pushlstring(L, buf, pgl_format_float((double)x, buf, 0));
}

/* The decimal text of v, by hand: lua_pushfstring's "%I" goes through the
 * format parser and snprintf, once per integer parameter of every tuple. */
static void push_int_text(lua_State *L, lua_Integer v) {
  char buf[24], *p = buf + sizeof buf;
  lua_Unsigned u = v < 0 ? (lua_Unsigned)0 - (lua_Unsigned)v : (lua_Unsigned)v;
  do {
    *--p = (char)('0' + (int)(u % 10));
    u /= 10;
  } while (u);
  if (v < 0)
    *--p = '-';
  lua_pushlstring(L, p, (size_t)(buf + sizeof buf - p));
}

/*
 * Converts args [first, first + n) to text parameters.  Pushes a userdata that
 * holds the pointer array, then one string per non-NULL parameter (the stack
 * keeps them alive until the caller pops them).  Returns NULL, with *nerr set
 * to the 1-based parameter number, for a value that text format cannot carry
 * (a string with a zero byte); nothing is left pushed in that case.
 * Raises (argument error) for a value of a type that has no SQL meaning.
 */
const char *const *pgl_params(lua_State *L, int first, int n, int *nerr) {
  int top = lua_gettop(L), i;
  const char **vals;
  luaL_checkstack(L, n + 4, "too many query parameters");
  vals = (const char **)lua_newuserdatauv(L, (size_t)(n > 0 ? n : 1) * sizeof *vals, 0);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
  for (i = 0; i < n; i++) {
    int idx = first + i;
    size_t len;
    const char *s;
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
    case LUA_TNONE:
      vals[i] = NULL;
      continue;
    case LUA_TBOOLEAN:
      lua_pushstring(L, lua_toboolean(L, idx) ? "true" : "false");
      break;
    case LUA_TNUMBER:
      if (lua_isinteger(L, idx))
        push_int_text(L, lua_tointeger(L, idx));
      else
        push_float(L, lua_tonumber(L, idx));
      break;
    case LUA_TSTRING:
      lua_pushvalue(L, idx);
      break;
    case LUA_TTABLE:
      lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_encode);
      lua_pushvalue(L, idx);
      lua_call(L, 1, 1); /* a value JSON cannot carry raises: a programmer error */
      if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "JSON encoder returned %s for parameter $%d", luaL_typename(L, -1), i + 1);
      break;
    case LUA_TLIGHTUSERDATA:
      if (lua_rawequal(L, idx, top + 2)) { /* pglisten.null */
        vals[i] = NULL;
        continue;
      }
      /* fall through */
    default:
      luaL_argerror(L, idx, lua_pushfstring(L, "cannot send a %s as parameter $%d",
                                            luaL_typename(L, idx), i + 1));
      return NULL; /* not reached */
    }
    s = lua_tolstring(L, -1, &len);
    if (strlen(s) != len) {
      lua_settop(L, top);
      *nerr = i + 1;
      return NULL;
    }
    vals[i] = s;
  }
  return vals;
}

/* ------------------------------------------------------------------ */
/* Values                                                              */
/* ------------------------------------------------------------------ */

/* Parses a decimal integer that fits lua_Integer; returns 0 otherwise. */
static int parse_int(const char *s, lua_Integer *out) {
  char *end;
  long long v;
  errno = 0;
  v = strtoll(s, &end, 10);
  if (errno || end == s || *end)
    return 0;
  *out = (lua_Integer)v;
  return 1;
}

/* numeric: by the rule of JSON numbers (pgl_push_number); NaN, Infinity
 * and -Infinity stay strings. */
static void push_numeric(lua_State *L, const char *s, size_t len) {
  const char *end = s;
  pgl_numscan ns;
  if (pgl_scan_number(&end, s + len, &ns) && end == s + len)
    pgl_push_number(L, s, len, &ns);
  else
    lua_pushlstring(L, s, len);
}

int pgl_text_converts(Oid type) {
  switch (type) {
  case INT2OID:
  case INT4OID:
  case INT8OID:
  case OIDOID:
  case FLOAT4OID:
  case FLOAT8OID:
  case NUMERICOID:
  case BOOLOID:
  case JSONOID:
  case JSONBOID:
    return 1;
  default:
    return 0;
  }
}

static void push_value(lua_State *L, const PGresult *res, int row, int col, Oid type, int nullidx) {
  if (PQgetisnull(res, row, col)) {
    lua_pushvalue(L, nullidx);
    return;
  }
  pgl_push_text_value(L, PQgetvalue(res, row, col), (size_t)PQgetlength(res, row, col), type);
}

void pgl_push_text_value(lua_State *L, const char *v, size_t len, Oid type) {
  lua_Integer iv;
  switch (type) {
  case INT2OID:
  case INT4OID:
  case INT8OID:
  case OIDOID:
    if (parse_int(v, &iv))
      lua_pushinteger(L, iv);
    else /* oid above INT64_MAX cannot happen; keep the text if it ever did */
      lua_pushlstring(L, v, len);
    return;
  case FLOAT4OID:
  case FLOAT8OID:
    lua_pushnumber(L, (lua_Number)pgl_read_float(v)); /* "Infinity", "NaN" parse too */
    return;
  case NUMERICOID:
    push_numeric(L, v, len);
    return;
  case BOOLOID:
    lua_pushboolean(L, v[0] == 't');
    return;
  case JSONOID:
  case JSONBOID:
    lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_decode);
    lua_pushlstring(L, v, len);
    lua_call(L, 1, 1); /* the safe decoder: nil on failure (e.g. too deep) */
    if (lua_isnil(L, -1)) {
      lua_pop(L, 1);
      lua_pushlstring(L, v, len);
    }
    return;
  default:
    lua_pushlstring(L, v, len);
  }
}

/*
 * Appends the rows of `res` to the array at `idx` (after its last element),
 * each keyed by column name; returns the values' bytes as the server sent
 * them.
 */
lua_Integer pgl_rows_append(lua_State *L, int idx, PGresult *res) {
  int nrows = PQntuples(res), ncols = PQnfields(res), r, c, names, nullidx;
  lua_Integer bytes = 0, at;
  idx = lua_absindex(L, idx);
  at = (lua_Integer)lua_rawlen(L, idx);
  luaL_checkstack(L, ncols + 6, "too many result columns");
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
  nullidx = lua_gettop(L);
  names = nullidx + 1;
  for (c = 0; c < ncols; c++)
    lua_pushstring(L, PQfname(res, c));
  for (r = 0; r < nrows; r++) {
    lua_createtable(L, 0, ncols);
    for (c = 0; c < ncols; c++) {
      lua_pushvalue(L, names + c);
      push_value(L, res, r, c, PQftype(res, c), nullidx);
      lua_rawset(L, -3);
      bytes += PQgetlength(res, r, c);
    }
    lua_rawseti(L, idx, ++at);
  }
  lua_settop(L, nullidx - 1);
  return bytes;
}

/*
 * Pushes { row, row, ..., n = rows, affected = command tuples, command = tag,
 * bytes = the values' bytes as the server sent them } where each row is
 * keyed by column name.
 */
void pgl_push_rows(lua_State *L, PGresult *res) {
  const char *tuples = PQcmdTuples(res);
  lua_Integer affected = 0, bytes;
  lua_createtable(L, PQntuples(res), 4);
  bytes = pgl_rows_append(L, -1, res);
  lua_pushinteger(L, PQntuples(res));
  lua_setfield(L, -2, "n");
  if (tuples && *tuples)
    parse_int(tuples, &affected);
  lua_pushinteger(L, affected);
  lua_setfield(L, -2, "affected");
  lua_pushstring(L, PQcmdStatus(res));
  lua_setfield(L, -2, "command");
  lua_pushinteger(L, bytes);
  lua_setfield(L, -2, "bytes");
}

/* ------------------------------------------------------------------ */
/* Registration                                                        */
/* ------------------------------------------------------------------ */

void pgl_result_open(lua_State *L) {
  pgl_number_open(L);
  if (luaL_newmetatable(L, PGL_RESULT_MT)) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
