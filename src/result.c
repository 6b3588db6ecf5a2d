/*
 * result.c -- query parameters from Lua values, and query results to Lua,
 * with numbers exact both ways (also for json.c): a float leaves in the
 * shortest form that reads back as the same double, and a number text that
 * no Lua integer or double holds exactly arrives as the text.
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
/* Numbers: exact both ways (exec parameters, json.c, numeric columns) */
/* ------------------------------------------------------------------ */

/*
 * Number texts are written and read in the "C" LC_NUMERIC whatever locale
 * the program chose (os.setlocale in a handler script, or the host): in
 * de_DE printf writes "0,5" and strtod stops at the '.' of "0.5"; in ps_AF
 * the decimal point is two bytes.  uselocale switches this thread only, and
 * nothing between enter_c and leave_c may raise.
 */
static locale_t c_numeric;

static locale_t enter_c(void) {
  return uselocale(c_numeric);
}

static void leave_c(locale_t old) {
  if (old)
    uselocale(old);
}

/*
 * The finite x in the shortest "%.Ng" that strtod reads back as the same
 * double ("C" locale: the caller's enter_c).  A normal double needs 15 to
 * 17 digits (%.15g also finds any shorter form: it drops trailing zeros); a
 * subnormal has fewer bits, so 5e-324 is searched from one digit.
 */
/* x in "%.{p}g" (p <= 17: at most 24 bytes) into buf, PGL_NUMBUF bytes. */
static int gfmt(char *buf, int p, double x) {
  return snprintf(buf, PGL_NUMBUF, "%.*g", p < 1 ? 1 : p > 17 ? 17 : p, x);
}

static int shortest_g(double x, char *buf) {
  int p = fabs(x) < DBL_MIN ? 1 : 15, n;
  for (;; p++) {
    n = gfmt(buf, p, x);
    if (p >= 17 || strtod(buf, NULL) == x)
      break;
  }
  return n;
}

int pgl_format_float(double x, char *buf, int json) {
  locale_t old;
  int n;
  if (x == 0 && signbit(x))
    return snprintf(buf, PGL_NUMBUF, "%s", json ? "-0.0" : "-0");
  if (x == floor(x) && x >= -9223372036854775808.0 && x < 9223372036854775808.0)
    return snprintf(buf, PGL_NUMBUF, "%.0f", x); /* all digits: integer columns accept it */
  old = enter_c();
  n = shortest_g(x, buf);
  leave_c(old);
  return n;
}

int pgl_scan_number(const char **pp, const char *e, pgl_numscan *ns) {
  const char *p = *pp, *int0, *frac0;
  ns->integral = 1;
  ns->ndig = 0;
  if (p < e && *p == '-')
    p++;
  int0 = p;
  if (p >= e || *p < '0' || *p > '9')
    goto bad;
  if (*p == '0')
    p++;
  else
    while (p < e && *p >= '0' && *p <= '9')
      p++;
  ns->ndig = (*int0 == '0') ? 0 : (size_t)(p - int0);
  if (p < e && *p == '.') {
    ns->integral = 0;
    frac0 = ++p;
    if (p >= e || *p < '0' || *p > '9')
      goto bad;
    while (p < e && *p >= '0' && *p <= '9')
      p++;
    if (ns->ndig == 0) /* 0.000123: the zeros before the 1 are not significant */
      while (frac0 < p && *frac0 == '0')
        frac0++;
    ns->ndig += (size_t)(p - frac0);
  }
  if (p < e && (*p == 'e' || *p == 'E')) {
    ns->integral = 0;
    p++;
    if (p < e && (*p == '+' || *p == '-'))
      p++;
    if (p >= e || *p < '0' || *p > '9')
      goto bad;
    while (p < e && *p >= '0' && *p <= '9')
      p++;
  }
  *pp = p;
  return 1;
bad:
  *pp = p;
  return 0;
}

/*
 * The significant digits of the number text s[0..e) into dig, without
 * leading or trailing zeros, and *exp such that the value is
 * +-0.DIGITS * 10^*exp.  Returns their count (0 for zero), or -1 when
 * there are more than 17, which no shortest form of a double has.
 */
static int significant(const char *s, const char *e, char dig[17], long *exp) {
  long intlen = 0, idx = 0, first = -1, x = 0;
  int n = 0, zeros = 0, point = 0, neg = 0;
  for (; s < e && *s != 'e' && *s != 'E'; s++) {
    if (*s == '.')
      point = 1;
    if (*s < '0' || *s > '9')
      continue;
    intlen += !point;
    idx++;
    if (*s == '0') {
      zeros += first >= 0; /* kept only if a non-zero digit follows */
      continue;
    }
    if (first < 0)
      first = idx - 1;
    if (n + zeros >= 17)
      return -1;
    for (; zeros > 0; zeros--)
      dig[n++] = '0';
    dig[n++] = *s;
  }
  if (first < 0)
    return 0;
  if (s < e) { /* the exponent: saturated, far beyond any double's */
    if (++s < e && (*s == '+' || *s == '-'))
      neg = *s++ == '-';
    for (; s < e; s++)
      if (x < 100000000L)
        x = x * 10 + (*s - '0');
  }
  *exp = intlen - first + (neg ? -x : x);
  return n;
}

/* 1 when a decimal of fewer than na digits reads back as ax > 0, the text
 * being +-0.a[0..na) * 10^ea.  Any such decimal near the text is at least
 * as far from it as the nearest two of na - 1 digits, below and above it,
 * and what reads back as ax is an interval holding the text: so trying
 * those two is enough. */
static int shorter_reads_back(const char *a, int na, long ea, double ax) {
  char f[64], up[17];
  int i = na - 2;
  snprintf(f, sizeof f, "0.%.*se%ld", na - 1, a, ea);
  if (strtod(f, NULL) == ax)
    return 1;
  memcpy(up, a, (size_t)(na - 1));
  while (i >= 0 && up[i] == '9')
    up[i--] = '0';
  if (i < 0) /* 0.99..9 up is 0.1 * 10^(ea + 1) */
    snprintf(f, sizeof f, "0.1e%ld", ea + 1);
  else {
    up[i]++;
    snprintf(f, sizeof f, "0.%.*se%ld", na - 1, up, ea);
  }
  return strtod(f, NULL) == ax;
}

/*
 * 1 when the shortest form of the finite x (strtod of the text s[0..e))
 * denotes exactly the value of the text.  The text has na significant
 * digits and reads back as x.  shortest_g gives the text when no shorter
 * decimal reads back (tried with strtod alone) and x's correctly rounded na
 * digits are the text's (one printf, the costly part, done last).  The one
 * case where shortest_g can miss a shorter form is a power of two, whose
 * rounding interval is narrower below than above; it is run there as it is.
 */
static int denotes(const char *s, const char *e, double x) {
  char a[17], b[17], f[PGL_NUMBUF];
  long ea = 0, eb = 0;
  int na = significant(s, e, a, &ea), nb, ex;
  if (na <= 0)
    return na == 0; /* zero is any zero; more than 17 digits never */
  if (na <= DBL_DIG && isnormal(x))
    return 1; /* DBL_DIG digits read back through a normal double */
  if (x == 0 || fabs(frexp(x, &ex)) == 0.5) {
    nb = significant(f, f + shortest_g(x, f), b, &eb);
  } else {
    if (na > 1 && shorter_reads_back(a, na, ea, fabs(x)))
      return 0;
    nb = significant(f, f + gfmt(f, na, x), b, &eb);
  }
  return na == nb && ea == eb && memcmp(a, b, (size_t)na) == 0;
}

/* Pushes the number z denotes and returns 0, or pushes nothing and returns
 * 1 when the text must be kept.  Runs in the "C" locale: raises nothing. */
static int push_exact(lua_State *L, const char *z, size_t len, const pgl_numscan *ns) {
  double x;
  if (lua_stringtonumber(L, z) != len + 1) /* pushes nothing when it fails */
    return 1;
  if (lua_isinteger(L, -1)) {
    if (lua_tointeger(L, -1) == 0 && z[0] == '-') { /* "-0": keep the sign */
      lua_pop(L, 1);
      lua_pushnumber(L, -0.0);
    }
    return 0;
  }
  x = (double)lua_tonumber(L, -1);
  /* up to 15 digits, a normal double reads back as the text (DBL_DIG) */
  if (ns->ndig == 0 || (ns->ndig <= 15 && isnormal(x)))
    return 0;
  if (isfinite(x) && denotes(z, z + len, x))
    return 0;
  lua_pop(L, 1);
  return 1;
}

void pgl_push_number(lua_State *L, const char *z, size_t len, const pgl_numscan *ns) {
  locale_t old = enter_c();
  int keep = push_exact(L, z, len, ns);
  leave_c(old);
  if (keep)
    lua_pushlstring(L, z, len);
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
        lua_pushfstring(L, "%I", (LUAI_UACINT)lua_tointeger(L, idx));
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
  case FLOAT8OID: {
    locale_t old = enter_c();
    double x = strtod(v, NULL); /* "Infinity", "NaN" parse too */
    leave_c(old);
    lua_pushnumber(L, (lua_Number)x);
    return;
  }
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
 * Pushes { row, row, ..., n = rows, affected = command tuples, command = tag }
 * where each row is keyed by column name.
 */
void pgl_push_rows(lua_State *L, PGresult *res) {
  int nrows = PQntuples(res), ncols = PQnfields(res), r, c, names, nullidx;
  const char *tuples = PQcmdTuples(res);
  lua_Integer affected = 0;

  luaL_checkstack(L, ncols + 6, "too many result columns");
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
  nullidx = lua_gettop(L);
  names = nullidx + 1;
  for (c = 0; c < ncols; c++)
    lua_pushstring(L, PQfname(res, c));

  lua_createtable(L, nrows, 3);
  for (r = 0; r < nrows; r++) {
    lua_createtable(L, 0, ncols);
    for (c = 0; c < ncols; c++) {
      lua_pushvalue(L, names + c);
      push_value(L, res, r, c, PQftype(res, c), nullidx);
      lua_rawset(L, -3);
    }
    lua_rawseti(L, -2, (lua_Integer)r + 1);
  }
  lua_pushinteger(L, nrows);
  lua_setfield(L, -2, "n");
  if (tuples && *tuples)
    parse_int(tuples, &affected);
  lua_pushinteger(L, affected);
  lua_setfield(L, -2, "affected");
  lua_pushstring(L, PQcmdStatus(res));
  lua_setfield(L, -2, "command");

  lua_replace(L, nullidx); /* rows where the null was; drop the names */
  lua_settop(L, nullidx);
}

/* ------------------------------------------------------------------ */
/* Registration                                                        */
/* ------------------------------------------------------------------ */

void pgl_result_open(lua_State *L) {
  if (!c_numeric && !(c_numeric = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0)))
    luaL_error(L, "cannot create the C numeric locale: out of memory");
  if (luaL_newmetatable(L, PGL_RESULT_MT)) {
    lua_pushcfunction(L, box_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
}
