/*
 * pgoutput.h -- the bounded reader and the field helpers that pgoutput.c
 * (CopyData, transactions, dispatch) and pgoutput_rows.c (relations,
 * tuples, row changes) share.  Internal to the module.
 */
#ifndef PGL_PGOUTPUT_H
#define PGL_PGOUTPUT_H

#include <stdint.h>

#include "pgl.h"

typedef struct rd {
  const unsigned char *b, *p, *e; /* start, next byte, end */
  const char *what;               /* the message being read, for errors */
  char err[200];                  /* set on the first failure */
  pgl_msginfo *mi;                /* NULL: a message table for everything */
} rd;

/* Records "truncated <what> message at byte N" unless an error is set. */
void pgl_rd_truncated(rd *r);
/* 1 when n more bytes are there; else 0 and the error set. */
int pgl_rd_need(rd *r, size_t n);
/* A big-endian unsigned of n bytes; 0 (and the error set) when short. */
uint64_t pgl_rd_u(rd *r, int n);
/* A NUL-terminated string inside the buffer; "" (and the error) if none. */
const char *pgl_rd_str(rd *r, size_t *len);
size_t pgl_rd_left(const rd *r);

/* t[name] = v, the table t on top. */
void pgl_set_int(lua_State *L, const char *name, lua_Integer v);
void pgl_set_str(lua_State *L, const char *name, const char *s, size_t len);
/* Pushes { kind = kind } with room for nrec more fields. */
void pgl_new_msg(lua_State *L, const char *kind, int nrec);

/* pgoutput_rows.c: each pushes the message and returns 1, or returns 0
 * with r->err set (the caller resets the stack).  relidx: the map. */
int pgl_dec_relation(lua_State *L, rd *r, int relidx);
int pgl_dec_insert(lua_State *L, rd *r, int relidx);
int pgl_dec_update_delete(lua_State *L, rd *r, int relidx, int update);
int pgl_dec_truncate(lua_State *L, rd *r, int relidx);

#endif
