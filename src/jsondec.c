/*
 * jsondec.c -- core.json_decode, the decoder half of json.c's JSON: strict,
 * numbers never rounded, cheap enough for the runner's hot path.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

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

/* Bad input in an escape at `at`: records it; returns NULL. */
static const char *bad_escape(jdec *d, const char *at, const char *what) {
  d->p = at;
  dfail(d, what);
  return NULL;
}

/* At a \u escape: appends its code point, or that of the surrogate pair it
 * starts, as UTF-8; returns the byte after it, or NULL on bad input. */
static const char *unescape_u(lua_State *L, jdec *d, const char *p) {
  const char *e = d->end;
  long cp, lo;
  if (e - p < 6 || (cp = hex4(p + 2)) < 0)
    return bad_escape(d, p, "invalid \\u escape");
  if (cp >= 0xD800 && cp <= 0xDBFF) {
    if (e - p < 12 || p[6] != '\\' || p[7] != 'u' || (lo = hex4(p + 8)) < 0xDC00 || lo > 0xDFFF)
      return bad_escape(d, p, "unpaired UTF-16 surrogate in a \\u escape");
    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
    p += 6;
  } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
    return bad_escape(d, p, "unpaired UTF-16 surrogate in a \\u escape");
  }
  put_utf8(L, d->buf, (unsigned long)cp);
  return p + 6;
}

/* The string from `s` has an escape (or bad input) at `p`: unescapes it
 * into the buffer and pushes it (never through the key cache); 0 on bad
 * input. */
static int dstring_escaped(lua_State *L, jdec *d, const char *s, const char *p) {
  const char *e = d->end;
  jbuf *b = d->buf;
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
    case 'u':
      if (!(p = unescape_u(L, d, p)))
        return 0;
      continue;
    default:
      d->p = p;
      return dfail(d, "invalid escape in a string");
    }
    p += 2;
  }
  d->p = e;
  return dfail(d, "unterminated string");
}

/* At the opening quote: pushes the string (through the key cache when
 * `key`); 0 on bad input.  A string without escapes is pushed straight from
 * the input. */
static int dstring(lua_State *L, jdec *d, int key) {
  const char *p = d->p + 1, *e = d->end, *s = p;
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
  return dstring_escaped(L, d, s, p);
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

/* Adds core.json_decode (a closure over the decoder's state: the unescape
 * buffer, a JBUF_MT userdata, and the key cache) to the table on the top. */
void pgl_json_decode_open(lua_State *L) {
  jstate *st = (jstate *)lua_newuserdatauv(L, sizeof *st, 1);
  memset(st, 0, sizeof *st);
  luaL_setmetatable(L, JBUF_MT);
  lua_createtable(L, KEYS, 0);
  lua_setiuservalue(L, -2, 1);
  lua_pushcclosure(L, core_json_decode, 1);
  lua_setfield(L, -2, "json_decode");
}
