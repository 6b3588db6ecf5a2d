/*
 * json.c -- core.json_encode and core.json_decode: JSON that keeps Lua
 * integers exact, and a decoder cheap enough for the runner's hot path.
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

#include "pgl.h"

#include <stdlib.h>

#define MAX_DEPTH 1000
#define JBUF_MT "pglisten.jsonbuf"

typedef struct jbuf {
  char *p;
  size_t n, cap;
} jbuf;

static int jbuf_gc(lua_State *L) {
  jbuf *j = (jbuf *)luaL_checkudata(L, 1, JBUF_MT);
  free(j->p);
  j->p = NULL;
  j->n = j->cap = 0;
  return 0;
}

static void jput(lua_State *L, jbuf *j, const char *s, size_t len) {
  if (len == 0)
    return; /* memcpy to a NULL buffer, even of 0 bytes, is undefined */
  if (len > j->cap - j->n) {
    size_t cap = j->cap ? j->cap : 256;
    char *np;
    while (cap - j->n < len)
      cap *= 2;
    np = (char *)realloc(j->p, cap);
    if (!np)
      luaL_error(L, "not enough memory to encode JSON");
    j->p = np;
    j->cap = cap;
  }
  memcpy(j->p + j->n, s, len);
  j->n += len;
}

static void jputs(lua_State *L, jbuf *j, const char *s) {
  jput(L, j, s, strlen(s));
}

static void jputc(lua_State *L, jbuf *j, char c) {
  jput(L, j, &c, 1);
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
  case LUA_TTABLE: {
    lua_Integer n, i;
    int first = 1;
    if (depth >= MAX_DEPTH)
      luaL_error(L, "cannot encode as JSON: nested deeper than %d (a cycle?)", MAX_DEPTH);
    luaL_checkstack(L, 6, "JSON value nested too deeply");
    n = array_length(L, idx);
    if (n > 0) {
      jputc(L, b, '[');
      for (i = 1; i <= n; i++) {
        if (i > 1)
          jputc(L, b, ',');
        lua_rawgeti(L, idx, i);
        encode(L, b, lua_gettop(L), depth + 1, nullidx);
        lua_pop(L, 1);
      }
      jputc(L, b, ']');
      return;
    }
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
    return;
  }
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
/* Decoding                                                            */
/* ------------------------------------------------------------------ */

/*
 * core.json_decode(s) -> value | nil, "invalid JSON: what at byte N"
 *
 * Strict RFC 8259: one value, white space around it, nothing else (no NaN,
 * no comments, no trailing commas, no control characters inside strings, no
 * lone UTF-16 surrogates).  Objects become tables, arrays sequences, null the
 * null sentinel.  Numbers are never rounded (pgl_push_number): one written
 * without fraction or exponent that fits in 64 bits is a Lua integer ("-0"
 * the float -0.0); any other is a float when the double's shortest form
 * denotes the same value ("0.30", "1e20"), else the string as written
 * (12345678901234567890, 1e400).  Duplicate keys: the last one wins.
 *
 * A container's elements are pushed on the Lua stack as they are parsed and
 * moved into a table created with their exact count, so no table is ever
 * rehashed (large containers are flushed every CHUNK elements).  Strings
 * without escapes are pushed straight from the input; escaped ones are
 * unescaped in the upvalue's buffer.  Bad input unwinds by return codes, so
 * the only error this raises is running out of memory, and the buffer
 * belongs to a userdata: nothing leaks either way.
 */

#define CHUNK 256           /* elements kept on the stack before a flush */
#define KEEP_BUF (64 * 1024) /* a larger unescape buffer is freed after use */

/*
 * Object keys repeat from one payload to the next, and interning a string
 * (hash, look-up, compare) is the decoder's largest cost.  KEYS recently
 * seen keys are kept in a direct-mapped cache: the strings live in a Lua
 * table (the state's user value), which anchors them, so `p` (their bytes:
 * Lua 5.4 never moves a string) stays valid while the slot holds them.
 */
#define KEYS 64
#define KEY_MAX 40 /* Lua's short strings */

typedef struct jstate {
  jbuf buf; /* first: JBUF_MT's __gc frees it */
  struct {
    const char *p;
    size_t len;
  } keys[KEYS];
} jstate;

typedef struct jdec {
  const char *start, *p, *end;
  jstate *st;
  jbuf *buf;
  int nullidx, keysidx;
  const char *err; /* what is wrong, at p */
} jdec;

static int dfail(jdec *d, const char *what) {
  if (!d->err)
    d->err = what;
  return 0;
}

static void skip_ws(jdec *d) {
  const char *p = d->p, *e = d->end;
  while (p < e && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
    p++;
  d->p = p;
}

static int hex4(const char *p) {
  int v = 0, i;
  for (i = 0; i < 4; i++) {
    int c = (unsigned char)p[i], h;
    if (c >= '0' && c <= '9')
      h = c - '0';
    else if (c >= 'a' && c <= 'f')
      h = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F')
      h = c - 'A' + 10;
    else
      return -1;
    v = v * 16 + h;
  }
  return v;
}

static void put_utf8(lua_State *L, jbuf *b, unsigned long cp) {
  char u[4];
  size_t n;
  if (cp < 0x80) {
    u[0] = (char)cp;
    n = 1;
  } else if (cp < 0x800) {
    u[0] = (char)(0xC0 | (cp >> 6));
    u[1] = (char)(0x80 | (cp & 0x3F));
    n = 2;
  } else if (cp < 0x10000) {
    u[0] = (char)(0xE0 | (cp >> 12));
    u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    u[2] = (char)(0x80 | (cp & 0x3F));
    n = 3;
  } else {
    u[0] = (char)(0xF0 | (cp >> 18));
    u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    u[3] = (char)(0x80 | (cp & 0x3F));
    n = 4;
  }
  jput(L, b, u, n);
}

/* Pushes the key s[0..len), from the cache when it was seen lately. */
static void push_key(lua_State *L, jdec *d, const char *s, size_t len) {
  unsigned h;
  if (len == 0 || len > KEY_MAX) {
    lua_pushlstring(L, s, len);
    return;
  }
  h = ((unsigned)len * 131u + (unsigned char)s[0] * 31u + (unsigned char)s[len - 1] * 7u +
       (unsigned char)s[len / 2]) & (KEYS - 1);
  if (d->st->keys[h].len == len && memcmp(d->st->keys[h].p, s, len) == 0) {
    lua_rawgeti(L, d->keysidx, (lua_Integer)h + 1);
    return;
  }
  lua_pushlstring(L, s, len);
  lua_pushvalue(L, -1);
  lua_rawseti(L, d->keysidx, (lua_Integer)h + 1);
  d->st->keys[h].p = lua_tostring(L, -1);
  d->st->keys[h].len = len;
}

/* 1 for the bytes that end a plain run inside a string: '"', '\\' and the
 * control characters. */
static const unsigned char special[256] = {
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
  1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
  0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* '"' */
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, /* '\\' */
};

/* At the opening quote: pushes the string (through the key cache when
 * `key`); 0 on bad input. */
static int dstring(lua_State *L, jdec *d, int key) {
  const char *p = d->p + 1, *e = d->end, *s = p;
  jbuf *b = d->buf;
  while (p < e && !special[(unsigned char)*p])
    p++;
  while (p < e) {
    unsigned char c = (unsigned char)*p;
    if (c == '"') {
      if (key)
        push_key(L, d, s, (size_t)(p - s));
      else
        lua_pushlstring(L, s, (size_t)(p - s));
      d->p = p + 1;
      return 1;
    }
    if (c == '\\' || c < 0x20)
      break;
    p++;
  }
  /* escapes (or an error): unescape into the buffer */
  b->n = 0;
  jput(L, b, s, (size_t)(p - s));
  while (p < e) {
    unsigned char c = (unsigned char)*p;
    if (c == '"') {
      lua_pushlstring(L, b->p, b->n);
      d->p = p + 1;
      return 1;
    }
    if (c < 0x20) {
      d->p = p;
      return dfail(d, "control character in a string");
    }
    if (c != '\\') {
      const char *q = p + 1;
      while (q < e && *q != '"' && *q != '\\' && (unsigned char)*q >= 0x20)
        q++;
      jput(L, b, p, (size_t)(q - p));
      p = q;
      continue;
    }
    if (p + 1 >= e)
      break;
    switch (p[1]) {
    case '"': jputc(L, b, '"'); break;
    case '\\': jputc(L, b, '\\'); break;
    case '/': jputc(L, b, '/'); break;
    case 'b': jputc(L, b, '\b'); break;
    case 'f': jputc(L, b, '\f'); break;
    case 'n': jputc(L, b, '\n'); break;
    case 'r': jputc(L, b, '\r'); break;
    case 't': jputc(L, b, '\t'); break;
    case 'u': {
      long cp;
      if (e - p < 6 || (cp = hex4(p + 2)) < 0) {
        d->p = p;
        return dfail(d, "invalid \\u escape");
      }
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        long lo;
        if (e - p < 12 || p[6] != '\\' || p[7] != 'u' || (lo = hex4(p + 8)) < 0xDC00 || lo > 0xDFFF) {
          d->p = p;
          return dfail(d, "unpaired UTF-16 surrogate in a \\u escape");
        }
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        p += 6;
      } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        d->p = p;
        return dfail(d, "unpaired UTF-16 surrogate in a \\u escape");
      }
      put_utf8(L, b, (unsigned long)cp);
      p += 6;
      continue;
    }
    default:
      d->p = p;
      return dfail(d, "invalid escape in a string");
    }
    p += 2;
  }
  d->p = e;
  return dfail(d, "unterminated string");
}

/* Pushes the number at d->p; 0 on bad input. */
static int dnumber(lua_State *L, jdec *d) {
  const char *s = d->p, *p = s;
  pgl_numscan ns;
  if (!pgl_scan_number(&p, d->end, &ns)) {
    d->p = p;
    return dfail(d, "invalid number");
  }
  d->p = p;
  if (ns.integral && ns.ndig <= 18) { /* fits in 63 bits: no overflow check */
    lua_Integer v = 0;
    const char *q;
    for (q = (*s == '-') ? s + 1 : s; q < p; q++)
      v = v * 10 + (*q - '0');
    if (*s != '-')
      lua_pushinteger(L, v);
    else if (v != 0)
      lua_pushinteger(L, -v);
    else
      lua_pushnumber(L, -0.0); /* "-0": keep the sign */
    return 1;
  }
  /* exact 64-bit integers, floats that read back as the text, else the text */
  {
    char small[64];
    size_t len = (size_t)(p - s);
    const char *z;
    if (len < sizeof small) {
      memcpy(small, s, len);
      small[len] = '\0';
      z = small;
    } else {
      jbuf *b = d->buf;
      b->n = 0;
      jput(L, b, s, len);
      jputc(L, b, '\0');
      z = b->p;
    }
    pgl_push_number(L, z, len, &ns);
  }
  return 1;
}

static int dvalue(lua_State *L, jdec *d, int depth);

static int literal(jdec *d, const char *word, size_t n) {
  if ((size_t)(d->end - d->p) >= n && memcmp(d->p, word, n) == 0) {
    d->p += n;
    return 1;
  }
  return dfail(d, "unexpected character");
}

/*
 * Moves the `n` pending elements above `slot` into the table at `slot`
 * (created first, sized for them, when the slot still holds nil).  Object
 * elements are key, value pairs; array elements go to indexes first+1...
 */
static void flush(lua_State *L, int slot, int n, int object, lua_Integer first) {
  int i;
  if (lua_isnil(L, slot)) {
    if (object)
      lua_createtable(L, 0, n);
    else
      lua_createtable(L, n, 0);
    lua_replace(L, slot);
  }
  if (object) {
    for (i = 0; i < n; i++) { /* in order: the last of duplicate keys wins */
      lua_pushvalue(L, slot + 1 + 2 * i);
      lua_pushvalue(L, slot + 2 + 2 * i);
      lua_rawset(L, slot);
    }
    lua_settop(L, slot);
  } else {
    for (i = n; i > 0; i--)
      lua_rawseti(L, slot, first + i);
  }
}

static int dcontainer(lua_State *L, jdec *d, int depth, int object) {
  char close = object ? '}' : ']';
  int slot, n = 0;
  lua_Integer done = 0;
  if (depth >= MAX_DEPTH)
    return dfail(d, "nested deeper than 1000 levels");
  d->p++;
  skip_ws(d);
  if (d->p < d->end && *d->p == close) {
    d->p++;
    lua_createtable(L, 0, 0);
    return 1;
  }
  if (!lua_checkstack(L, 4))
    return dfail(d, "too large to decode");
  lua_pushnil(L);
  slot = lua_gettop(L);
  for (;;) {
    if (!lua_checkstack(L, 4))
      return dfail(d, "too large to decode");
    if (object) {
      skip_ws(d);
      if (d->p >= d->end || *d->p != '"')
        return dfail(d, d->p >= d->end ? "unexpected end" : "expected a string key");
      if (!dstring(L, d, 1))
        return 0;
      skip_ws(d);
      if (d->p >= d->end || *d->p != ':')
        return dfail(d, d->p >= d->end ? "unexpected end" : "expected ':'");
      d->p++;
    }
    if (!dvalue(L, d, depth + 1))
      return 0;
    if (++n == CHUNK) {
      flush(L, slot, n, object, done);
      done += n;
      n = 0;
    }
    skip_ws(d);
    if (d->p >= d->end)
      return dfail(d, "unexpected end");
    if (*d->p == ',') {
      d->p++;
      continue;
    }
    if (*d->p == close) {
      d->p++;
      break;
    }
    return dfail(d, object ? "expected ',' or '}'" : "expected ',' or ']'");
  }
  flush(L, slot, n, object, done);
  return 1;
}

static int dvalue(lua_State *L, jdec *d, int depth) {
  skip_ws(d);
  if (d->p >= d->end)
    return dfail(d, "unexpected end");
  switch (*d->p) {
  case '{': return dcontainer(L, d, depth, 1);
  case '[': return dcontainer(L, d, depth, 0);
  case '"': return dstring(L, d, 0);
  case 't':
    if (!literal(d, "true", 4)) return 0;
    lua_pushboolean(L, 1);
    return 1;
  case 'f':
    if (!literal(d, "false", 5)) return 0;
    lua_pushboolean(L, 0);
    return 1;
  case 'n':
    if (!literal(d, "null", 4)) return 0;
    lua_pushvalue(L, d->nullidx);
    return 1;
  default:
    if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9'))
      return dnumber(L, d);
    return dfail(d, "unexpected character");
  }
}

/* Decodes s[0..len) onto the stack: 1 with the value pushed, or 0 with
 * nil, message pushed. */
static int decode_string(lua_State *L, const char *s, size_t len, int stidx) {
  jdec d;
  jstate *st = (jstate *)lua_touserdata(L, stidx);
  jbuf *b = &st->buf;
  int base = lua_gettop(L), ok;
  lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null); /* base + 1 */
  lua_getiuservalue(L, stidx, 1);                   /* base + 2: the key strings */
  d.start = d.p = s;
  d.end = s + len;
  d.st = st;
  d.buf = b;
  d.nullidx = base + 1;
  d.keysidx = base + 2;
  d.err = NULL;
  ok = dvalue(L, &d, 0);
  if (ok) {
    skip_ws(&d);
    if (d.p < d.end)
      ok = dfail(&d, "unexpected data after the value");
  }
  if (b->cap > KEEP_BUF) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
  }
  if (ok) {
    lua_replace(L, base + 1);
    lua_settop(L, base + 1);
    return 1;
  }
  lua_settop(L, base);
  lua_pushnil(L);
  if (d.p < d.end) {
    unsigned char c = (unsigned char)*d.p;
    char shown[8];
    if (c >= 0x20 && c < 0x7f)
      snprintf(shown, sizeof shown, "'%c'", c);
    else
      snprintf(shown, sizeof shown, "0x%02x", c);
    lua_pushfstring(L, "invalid JSON: %s at byte %d (%s)", d.err, (int)(d.p - d.start) + 1, shown);
  } else if (len == 0) {
    lua_pushliteral(L, "invalid JSON: empty input");
  } else {
    if (strcmp(d.err, "unexpected end") == 0)
      lua_pushfstring(L, "invalid JSON: unexpected end of input (byte %d)", (int)len + 1);
    else
      lua_pushfstring(L, "invalid JSON: %s at the end of the input (byte %d)", d.err, (int)len + 1);
  }
  return 0;
}

/* core.json_decode(s) -> value | nil, err; upvalue 1: the decoder's state. */
static int core_json_decode(lua_State *L) {
  size_t len;
  const char *s = luaL_checklstring(L, 1, &len);
  lua_settop(L, 1);
  return decode_string(L, s, len, lua_upvalueindex(1)) ? 1 : 2;
}

/* Adds core.json_encode and core.json_decode to the module table on the top
 * of the stack. */
void pgl_json_open(lua_State *L) {
  jstate *st;
  if (luaL_newmetatable(L, JBUF_MT)) {
    lua_pushcfunction(L, jbuf_gc);
    lua_setfield(L, -2, "__gc");
  }
  lua_pop(L, 1);
  lua_pushcfunction(L, core_json_encode);
  lua_setfield(L, -2, "json_encode");
  st = (jstate *)lua_newuserdatauv(L, sizeof *st, 1);
  memset(st, 0, sizeof *st);
  luaL_setmetatable(L, JBUF_MT);
  lua_createtable(L, KEYS, 0);
  lua_setiuservalue(L, -2, 1);
  lua_pushcclosure(L, core_json_decode, 1);
  lua_setfield(L, -2, "json_decode");
}
