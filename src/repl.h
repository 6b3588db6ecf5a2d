/*
 * repl.h -- the replication connection's struct and the helpers that
 * repl.c (connect, commands, start, life cycle) and replstream.c (read,
 * confirm, finish) share.  Internal to the module.
 */
#ifndef PGL_REPL_H
#define PGL_REPL_H

#include "pgl.h"

#define PG_EPOCH_UNIX 946684800.0

typedef struct pgl_repl {
  PGconn *pg;       /* NULL once closed */
  char *pending;    /* PQgetCopyData's buffer while it is decoded (freed on close) */
  int copying;      /* 1 between a successful start() and the end of the stream */
  double timeout;   /* bound for commands, start and finish, seconds */
  char *end_msg;    /* the stream's end, to report at the next read() (malloc'd) */
  char end_state[6];
} pgl_repl;

pgl_repl *pgl_repl_check(lua_State *L, int idx);  /* raises if closed */
/* nil, "what: libpq's message"[, "08006" when the connection is gone]. */
int pgl_repl_fail(lua_State *L, pgl_repl *c, const char *what);
/* After a timeout: shuts the socket so that libpq marks the connection bad. */
void pgl_repl_abandon(pgl_repl *c);
/* pgl_repl_abandon, then pushes nil, "timeout: ...", "08006"; returns 3. */
int pgl_repl_timedout(lua_State *L, pgl_repl *c, const char *what);
/* Flushes and waits until a result is ready: 1, 0 on timeout, -1 failed. */
int pgl_repl_await(lua_State *L, pgl_repl *c, double deadline);
/* The LSN argument at idx: an integer or an "X/Y" string (raises if neither). */
lua_Integer pgl_repl_checklsn(lua_State *L, int idx);

/* replstream.c: methods */
int pgl_repl_read(lua_State *L);
int pgl_repl_confirm(lua_State *L);
int pgl_repl_finish(lua_State *L);

#endif
