/*
 * number.c -- numbers exact both ways, for exec parameters, numeric and
 * float columns (result.c) and JSON (json.c, jsondec.c): the shortest float
 * form that reads back as the same double, and the rules that read a number
 * text as a Lua integer, a float, or the text itself when neither holds it.
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

/* A float column's text ("C" locale, whatever the program's): "Infinity",
 * "-Infinity" and "NaN" read too. */
double pgl_read_float(const char *v) {
  locale_t old = enter_c();
  double x = strtod(v, NULL);
  leave_c(old);
  return x;
}

/* Creates the "C" numeric locale once; raises when out of memory. */
void pgl_number_open(lua_State *L) {
  if (!c_numeric && !(c_numeric = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0)))
    luaL_error(L, "cannot create the C numeric locale: out of memory");
}
