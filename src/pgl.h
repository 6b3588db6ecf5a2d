/*
 * pgl.h -- shared declarations of the pglisten.core C module.
 *
 * C does I/O and conversion; policy (reconnects, routing, retries, logging)
 * lives in Lua.  Everything here is internal: the only exported symbol of the
 * module is luaopen_pglisten_core.
 */
#ifndef PGL_H
#define PGL_H

#include <stddef.h>
#include <libpq-fe.h>
#include <lua.h>
#include <lauxlib.h>

#define PGL_CONN_MT   "pglisten.conn"
#define PGL_RESULT_MT "pglisten.result"

#define PGL_MAX_NOTICES 64

/* Registry keys (addresses of these objects are the keys). */
extern const char pgl_key_encode;  /* function(table) -> json string        */
extern const char pgl_key_decode;  /* function(string) -> value | nil, err  */
extern const char pgl_key_null;    /* sentinel for SQL NULL / JSON null     */

/*
 * exec's statement cache: a parameterized statement seen a second time is
 * prepared on the server as pglisten_<id> and executed by name from then
 * on (no parse, and plans the server may cache).
 */
#define PGL_STMTS 32

typedef struct pgl_stmt {
  char *sql;          /* malloc'd copy; NULL: a free slot */
  size_t len;
  unsigned hash;
  int nparams;
  int prepared;       /* exists on the server as pglisten_<id> */
  unsigned id;
  unsigned long used; /* for least-recently-used eviction */
} pgl_stmt;

typedef struct pgl_conn {
  PGconn *pg;          /* NULL once closed */
  double timeout;      /* client-side bound for queries, seconds; 0: none */
  char *scratch;       /* buffer a notification is copied to before it is freed */
  size_t scratch_len;
  char *notices[PGL_MAX_NOTICES]; /* ring of server notices, malloc'd strings */
  int notice_head, notice_count;
  int notices_dropped;
  int stmt_cache;      /* 1: exec prepares statements it sees again */
  int stop_ends;       /* 1: in the host a stop signal ends a query's wait (conn:interruptible) */
  unsigned stmt_next;  /* the last id given */
  unsigned long stmt_clock;
  pgl_stmt stmts[PGL_STMTS];
  unsigned stale[PGL_STMTS]; /* ids to DEALLOCATE once outside a transaction block */
  int nstale;
} pgl_conn;

/* time.c-like helpers (core.c) */
double pgl_monotonic(void);
double pgl_realtime(void);
int pgl_interrupted(lua_State *L);

/* 1 once the host program was told to stop (SIGTERM/SIGINT); it stays set. */
int pgl_stopping(lua_State *L);

/* pgl_waitfd's `interruptible`: what ends the wait early in the host program. */
#define PGL_WAIT_ANY  1 /* any signal it handles (conn:wait, sleep) */
#define PGL_WAIT_STOP 2 /* only a stop signal, or one received before (connects) */

/*
 * Wait until fd is ready for `events` (POLLIN/POLLOUT), or until `deadline`
 * (monotonic seconds; < 0: no deadline).  Returns 1 when ready, 0 on timeout,
 * -1 on a poll error (errno set), -2 when the host program got a signal that
 * `interruptible` (0, PGL_WAIT_ANY or PGL_WAIT_STOP) says ends the wait.
 */
int pgl_waitfd(lua_State *L, int fd, short events, double deadline, int interruptible);
/* pgl_waitfd, and also readable `extra` (-1: none): then 3 (fd is not ready). */
int pgl_waitfd_or(lua_State *L, int fd, short events, int extra, double deadline, int interruptible);

/* idle.c: the wait hook (core.set_wait_hook).  pgl_idle runs it, if one is
 * set and it is not running already, while it has more to do and `fd` (the
 * server's socket) has no answer yet; called by exec and execmany when all
 * is written and they are about to wait for the answer.  Returns the
 * descriptor the hook asked to be called again on when it is readable (the
 * caller waits for it too, pgl_waitfd_or, and calls pgl_idle again when it
 * is), or -1.  Leaves the stack as it found it. */
int pgl_idle(lua_State *L, int fd);
int pgl_set_wait_hook(lua_State *L);

/* conn.c */
void pgl_conn_open(lua_State *L);          /* registers metatables; leaves nothing */
int pgl_conn_connect(lua_State *L);        /* core.connect(conninfo, timeout) */
pgl_conn *pgl_checkconn(lua_State *L, int idx); /* raises if closed */
/* Pushes nil, "what: libpq's message"[, "08006" when the connection is gone];
 * returns the count. */
int pgl_conn_fail(lua_State *L, pgl_conn *c, const char *what);
/* After a client-side timeout: shuts the socket down so that libpq marks the
 * connection bad, and drops what libpq still holds. */
void pgl_conn_abandon(pgl_conn *c);
/* Drives pollfn (PQconnectPoll or PQresetPoll) on pg to completion within
 * timeout s, then sets pg non-blocking.  1 when connected; otherwise pushes
 * nil, message ("interrupted" on a stop signal, "timeout: ...") and
 * returns 0.  Used by core.connect, conn:reset and core.replication_connect. */
int pgl_drive_connect(lua_State *L, PGconn *pg, PostgresPollingStatusType (*pollfn)(PGconn *),
                      double timeout);

/* json.c */
void pgl_json_open(lua_State *L);          /* adds core.json_encode to the table on top */

/* pipeline.c */
void pgl_pipeline_open(lua_State *L);      /* adds conn:execmany; leaves nothing */

/* result.c */
void pgl_result_open(lua_State *L);

/*
 * Numbers, exact both ways (number.c; result.c and json.c use them).  A float is
 * written as all its digits when it is integral and fits 64 bits ("3"),
 * "-0.0" (JSON) or "-0" (parameters) when it is negative zero, else in the
 * shortest "%.Ng" that reads back as the same double ("0.1", "1e-20").
 * Returns the length; buf holds PGL_NUMBUF bytes; x must be finite.
 */
#define PGL_NUMBUF 40
int pgl_format_float(double x, char *buf, int json);
/* What pgl_scan_number saw: no fraction nor exponent; significant digits
 * (from the first non-zero one, trailing zeros counted). */
typedef struct pgl_numscan {
  int integral;
  size_t ndig;
} pgl_numscan;
/* Scans a JSON number from *pp (before e): 1, or 0 when it is not one;
 * *pp is left at its end, or at the byte that is wrong. */
int pgl_scan_number(const char **pp, const char *e, pgl_numscan *ns);
/* Pushes the scanned number z[0..len) (z[len] is '\0'): a Lua integer when
 * it fits one ("-0": the float -0.0), a float when the shortest form of the
 * double denotes the same value as the text ("0.30", "1e20"), else the
 * text itself, so that no digit is lost (1e400, 12345678901234567890). */
void pgl_push_number(lua_State *L, const char *z, size_t len, const pgl_numscan *ns);
/* A float column's text read in the "C" locale ("Infinity", "NaN" too). */
double pgl_read_float(const char *v);
/* Creates the "C" numeric locale number.c needs; raises when out of memory
 * (pgl_result_open calls it). */
void pgl_number_open(lua_State *L);
/* Build the parameter arrays for args [first, first+n) on the stack.  Pushes
 * one userdata holding the arrays (kept alive by the stack) plus the strings;
 * returns the values array.  Returns NULL and pushes nil, message when a value
 * cannot be sent (a string with a zero byte). */
const char *const *pgl_params(lua_State *L, int first, int n, int *nerr);
/* Pushes rows for a successful result. `res` must be boxed already. */
void pgl_push_rows(lua_State *L, PGresult *res);
lua_Integer pgl_rows_append(lua_State *L, int idx, PGresult *res); /* -> the values' bytes */
/* Pushes a box that PQclears `res` when collected; returns the box slot. */
PGresult **pgl_box_result(lua_State *L, PGresult *res);
/* Frees the boxed result now (idempotent). */
void pgl_unbox_result(PGresult **box);
/* Pushes nil, message[, sqlstate] for a failed result; returns the count. */
int pgl_push_result_error(lua_State *L, const PGresult *res);
/* Pushes `s` without trailing white space. */
void pgl_push_trimmed(lua_State *L, const char *s);
/* The conninfo argument at `idx` ("" when absent and `opt`), or NULL after
 * pushing nil, message when it holds a zero byte: libpq would read only
 * the part before it, silently dropping options such as sslmode. */
const char *pgl_conninfo_arg(lua_State *L, int idx, int opt);
/* conninfo.c: core.conninfo_keys, core.conninfo_parse */
int pgl_core_conninfo_keys(lua_State *L);
int pgl_core_conninfo_parse(lua_State *L);
/* sdnotify.c: core.sd_notify */
int pgl_core_sd_notify(lua_State *L);
/*
 * Pushes the text-format value v[0..len) of a column of type `type` as exec
 * types it: integers, floats, booleans, exact numerics (pgl_push_number),
 * json/jsonb decoded (text when that fails), anything else as the text.
 * v[len] must be '\0' when pgl_text_converts(type) (PQgetvalue's are).
 */
void pgl_push_text_value(lua_State *L, const char *v, size_t len, Oid type);
/* 1 when pgl_push_text_value does more for `type` than push the text. */
int pgl_text_converts(Oid type);

/* pgoutput.c: the decoder of logical replication's CopyData messages */
#define PGL_UNCHANGED_MT "pglisten.unchanged"
extern const char pgl_key_unchanged; /* sentinel for an unchanged TOASTed value */
/*
 * Decodes one CopyData payload buf[0..len) ('w' XLogData carrying a pgoutput
 * message, or 'k' keepalive) with the relation map, a table at stack index
 * relidx (relid -> relation table; a Relation message replaces its entry).
 * Pushes the message table and returns 1, or pushes nil, message, returns 2.
 */
int pgl_pgoutput_decode(lua_State *L, const char *buf, size_t len, int relidx);
/*
 * The same, for the replication source's reading: with mi->events set, a row
 * change (Insert, Update, Delete) is pushed as the event itself, { op,
 * schema, table, new, old }, without kind, relid and the XLogData fields, and
 * mi->change is set; mi->lsn (the XLogData's start), mi->wal_end (its walEnd
 * or the keepalive's) and mi->relid are filled in for every message.  Saves
 * a table and a dozen fields per change.
 */
typedef struct pgl_msginfo {
  int events, change;
  uint64_t lsn, wal_end, relid;
} pgl_msginfo;
int pgl_pgoutput_decode_ex(lua_State *L, const char *buf, size_t len, int relidx, pgl_msginfo *mi);
/* Pushes an LSN as the server prints it, "X/Y". */
void pgl_push_lsn(lua_State *L, uint64_t lsn);
/* Adds core.pgoutput_decode, core.unchanged, core.lsn_parse, core.lsn_format
 * to the table on top. */
void pgl_pgoutput_open(lua_State *L);

/* repl.c: the replication connection */
#define PGL_REPL_MT "pglisten.replication"
void pgl_repl_open(lua_State *L);          /* registers the metatable; leaves nothing */
int pgl_repl_connect(lua_State *L);        /* core.replication_connect(conninfo, timeout) */

#endif
