/*
 * json.h -- internal to core.json_encode (json.c) and core.json_decode
 * (jsondec.c): the growable text buffer both write to.  A jbuf is owned by a
 * userdata of metatable JBUF_MT, whose __gc (json.c) frees it, so an error
 * while it grows leaks nothing.  The writers are static inline: they sit on
 * both hot paths.
 */
#ifndef PGL_JSON_H
#define PGL_JSON_H

#include <stdlib.h>
#include <string.h>

#include "pgl.h"

#define MAX_DEPTH 1000 /* nesting either way */
#define JBUF_MT "pglisten.jsonbuf"

typedef struct jbuf {
  char *p;
  size_t n, cap;
} jbuf;

static inline void jput(lua_State *L, jbuf *j, const char *s, size_t len) {
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

static inline void jputs(lua_State *L, jbuf *j, const char *s) {
  jput(L, j, s, strlen(s));
}

static inline void jputc(lua_State *L, jbuf *j, char c) {
  jput(L, j, &c, 1);
}

/* jsondec.c: adds core.json_decode to the module table on the top. */
void pgl_json_decode_open(lua_State *L);

#endif
