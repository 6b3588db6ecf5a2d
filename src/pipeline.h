/*
 * pipeline.h -- the batch that pipeline.c (results, the transport,
 * conn:execmany) and pipeline_send.c (what is queued, and closing the
 * pipeline) share.  Internal to the module.
 */
#ifndef PGL_PIPELINE_H
#define PGL_PIPELINE_H

#include "pgl.h"

#define PGL_SAVEPOINT "pgl_execmany"

enum { B_OK, B_LOST, B_TIMEOUT, B_SEND };

typedef struct batch {
  lua_State *L;
  pgl_conn *c;
  PGconn *pg;
  const char *sql;
  int own_tx;             /* 1: BEGIN/COMMIT; 0: inside the caller's transaction */
  int nosave;             /* inside the caller's transaction, without a savepoint */
  lua_Integer first;      /* ordinal of tuple 1's command */
  lua_Integer ntuples;    /* #list */
  lua_Integer sent;       /* tuples queued */
  lua_Integer affected;   /* sum of PQcmdTuples over the tuples' commands */
  lua_Integer queued;     /* commands queued, the Syncs not counted */
  lua_Integer done;       /* commands whose results have all been taken */
  lua_Integer err_at;     /* ordinal of the first command that failed, -1 */
  lua_Integer commit_at;  /* ordinal of the batch's own COMMIT once queued, else 0 */
  int syncs, synced;      /* Syncs queued / their results taken */
  lua_Integer zero_tuple; /* tuple with a string holding a zero byte (not sent), 0 */
  int zero_param;         /* ... and its parameter number */
  int fail;               /* B_*: the transport failed, the batch was not completed */
  const char *what;       /* what could not be sent, for B_SEND */
  double deadline;        /* monotonic; < 0: none */
  PGresult **err;         /* box holding the first error result */
} batch;

/* pipeline.c: moves the pipeline on (writes, reads, takes results).  With
 * `all`, returns once every queued Sync has come back; otherwise once
 * libpq's output is written.  Returns 1, or 0 with b->fail set. */
int pgl_batch_drive(batch *b, int all);

/* pipeline_send.c */
/* Whether the first keyword of `sql`, after white space and comments, is COPY. */
int pgl_batch_is_copy(const char *sql);
/* Protected (lua_pcall), stack: 1 the batch (light userdata), 2 the list.
 * Queues the opening, the Parse and one Bind/Execute per tuple; may raise. */
int pgl_batch_send(lua_State *L);
/* Closes the pipeline pgl_batch_send filled (`raised`: it raised): commits
 * or rolls back, ends a failed transaction block, leaves pipeline mode.
 * Returns 1 when the batch failed (raised, a zero byte, an error result). */
int pgl_batch_close(batch *b, int raised);

#endif
