/*
 * conn.c -- the pglisten.conn object: a libpq connection in non-blocking
 * mode, with an async notification listener and queries bounded by time.
 *
 * Shape after Lua's liolib.c: the userdata is created closed and gets its
 * metatable before libpq is called, one idempotent close backs close(),
 * __gc and __close, and a closed object raises on use.
 *
 * Notifications are libpq's business until we copy them out: libpq parses
 * them into its own queue whenever it reads input, also while a query runs,
 * so none is lost or reordered by exec(); wait() hands them out in server
 * order and only reads the socket when that queue is empty, which keeps the
 * client's memory bounded by the socket buffer however long the server's
 * queue is.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "pgl.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

pgl_conn *pgl_checkconn(lua_State *L, int idx) {
  pgl_conn *c = (pgl_conn *)luaL_checkudata(L, idx, PGL_CONN_MT);
  if (c->pg == NULL)
    luaL_error(L, "attempt to use a closed connection");
  return c;
}

/* Deadline `secs` from now, or -1 for none (secs < 0). */
static double deadline_in(double secs) {
  return secs < 0 ? -1 : pgl_monotonic() + secs;
}

/*
 * Pushes nil, message, "08006" for a failure of the connection itself (libpq's
 * message; 08006 is SQLSTATE connection_failure, set when the connection is
 * gone so that Lua policy can tell "reconnect" from "query was wrong"), or
 * nil, message when it is still up.
 */
int pgl_conn_fail(lua_State *L, pgl_conn *c, const char *what) {
  const char *msg = PQerrorMessage(c->pg);
  lua_pushnil(L);
  if (msg && *msg) {
    if (what)
      lua_pushfstring(L, "%s: ", what);
    pgl_push_trimmed(L, msg);
    if (what)
      lua_concat(L, 2);
  } else {
    lua_pushstring(L, what ? what : "connection failed");
  }
  if (PQstatus(c->pg) == CONNECTION_BAD) {
    lua_pushliteral(L, "08006");
    return 3;
  }
  return 2;
}

/*
 * Kills the transport after a client-side timeout: shutting the socket down
 * makes libpq read EOF and mark the connection bad, while libpq still owns the
 * descriptor (it closes it on reset or finish).
 */
void pgl_conn_abandon(pgl_conn *c) {
  PGresult *r;
  int fd = PQsocket(c->pg);
  if (fd >= 0)
    shutdown(fd, SHUT_RDWR);
  (void)PQconsumeInput(c->pg); /* fails on EOF: status becomes CONNECTION_BAD */
  while ((r = PQgetResult(c->pg)) != NULL)
    PQclear(r);
}

/* Server notices land here (from inside libpq: no Lua, just a copy). */
static void notice_cb(void *arg, const char *message) {
  pgl_conn *c = (pgl_conn *)arg;
  char *copy = strdup(message);
  int slot;
  if (!copy)
    return;
  if (c->notice_count == PGL_MAX_NOTICES) { /* full: drop the oldest */
    free(c->notices[c->notice_head]);
    c->notice_head = (c->notice_head + 1) % PGL_MAX_NOTICES;
    c->notice_count--;
    c->notices_dropped++;
  }
  slot = (c->notice_head + c->notice_count) % PGL_MAX_NOTICES;
  c->notices[slot] = copy;
  c->notice_count++;
}

static void clear_notices(pgl_conn *c) {
  while (c->notice_count > 0) {
    free(c->notices[c->notice_head]);
    c->notices[c->notice_head] = NULL;
    c->notice_head = (c->notice_head + 1) % PGL_MAX_NOTICES;
    c->notice_count--;
  }
  c->notice_head = 0;
}

/*
 * Drives PQconnectPoll / PQresetPoll to completion or the deadline.
 * Returns 1 when connected; otherwise pushes nil, message and returns 0.
 * In the host program a stop signal (TERM/INT) ends the wait at once with
 * the message "interrupted", as does one that came before the connect
 * began: a program on its way out opens no new session.  HUP and USR1 do
 * not end it (their flags wait for the host).  The name lookup is libpq's
 * own, blocking, inside PQconnectStart and not covered.
 */
static int drive_connect(lua_State *L, pgl_conn *c, PostgresPollingStatusType (*pollfn)(PGconn *),
                         double timeout) {
  double deadline = deadline_in(timeout);
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  for (;;) {
    int r;
    if (st == PGRES_POLLING_OK)
      break;
    if (st == PGRES_POLLING_FAILED) {
      lua_pushnil(L);
      pgl_push_trimmed(L, PQerrorMessage(c->pg));
      return 0;
    }
    r = pgl_waitfd(L, PQsocket(c->pg), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline,
                   PGL_WAIT_STOP);
    if (r == -2) {
      lua_pushnil(L);
      lua_pushliteral(L, "interrupted");
      return 0;
    }
    if (r == 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "timeout: could not connect to the server within %f s", timeout);
      return 0;
    }
    if (r < 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "could not connect: poll failed: %s", strerror(errno));
      return 0;
    }
    st = pollfn(c->pg);
  }
  if (PQsetnonblocking(c->pg, 1) != 0) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    return 0;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Queries                                                             */
/* ------------------------------------------------------------------ */

/* What an error of a named statement says about whether it ran. */
enum { PGL_RAN = 0, PGL_UNRUN_GONE, PGL_UNRUN_STALE };

/*
 * Was `res` raised before the statement ran?  Decided on fields that no
 * lc_messages translates: the SQLSTATE, the server function that raised it
 * (PG_DIAG_SOURCE_FUNCTION), and the absence of a CONTEXT, which an error
 * raised inside a function the statement called always carries.  26000 from
 * FetchPreparedStatement (or with no source at all: a pooler's own error):
 * the session has no such statement.  0A000 from RevalidateCachedQuery: the
 * plan's result type changed ("cached plan must not change result type").
 */
static int unrun_kind(const PGresult *res) {
  const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  const char *fn = PQresultErrorField(res, PG_DIAG_SOURCE_FUNCTION);
  if (!code || PQresultErrorField(res, PG_DIAG_CONTEXT))
    return PGL_RAN;
  if (strcmp(code, "26000") == 0 && (!fn || strcmp(fn, "FetchPreparedStatement") == 0))
    return PGL_UNRUN_GONE;
  if (strcmp(code, "0A000") == 0 && fn && strcmp(fn, "RevalidateCachedQuery") == 0)
    return PGL_UNRUN_STALE;
  return PGL_RAN;
}

/*
 * Sends `sql` (with params when nparams > 0, else as a simple query that may
 * hold several statements) and collects the results.  With `stmt`, prepares
 * `sql` under that name (`prepare`) or executes the statement of that name.
 * On success returns 1 with the last result boxed on the stack.  On failure
 * pushes nil, message[, sqlstate] and returns -(count); `unrun` (when not
 * NULL) gets unrun_kind() of the error that failed it, else PGL_RAN.
 */
static int run_query_x(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                       int nparams, const char *const *values, double timeout, int *unrun) {
  PGconn *pg = c->pg;
  double deadline = timeout > 0 ? deadline_in(timeout) : -1;
  PGresult **box, **err;
  int sent, fd, n, copy_out = 0;
  int stop = c->stop_ends ? PGL_WAIT_STOP : 0; /* conn:interruptible */

  if (unrun)
    *unrun = PGL_RAN;
  if (stmt && prepare)
    sent = PQsendPrepare(pg, stmt, sql, nparams, NULL);
  else if (stmt)
    sent = PQsendQueryPrepared(pg, stmt, nparams, values, NULL, NULL, 0);
  else if (nparams > 0)
    sent = PQsendQueryParams(pg, sql, nparams, NULL, values, NULL, NULL, 0);
  else
    sent = PQsendQuery(pg, sql);
  if (!sent)
    return -pgl_conn_fail(L, c, "could not send query");

  box = pgl_box_result(L, NULL);  /* the last result */
  err = pgl_box_result(L, NULL);  /* the first error, which wins */
  fd = PQsocket(pg);
  for (;;) { /* flush what libpq could not write at once */
    int f = PQflush(pg), r;
    if (f == 0)
      break;
    if (f < 0)
      goto lost;
    r = pgl_waitfd(L, fd, POLLIN | POLLOUT, deadline, stop);
    if (r == 0)
      goto timedout;
    if (r == -2)
      goto interrupted;
    if (r < 0 || !PQconsumeInput(pg))
      goto lost;
  }
  for (;;) {
    PGresult *res;
    while (PQisBusy(pg)) {
      int r = pgl_waitfd(L, fd, POLLIN, deadline, stop);
      if (r == 0)
        goto timedout;
      if (r == -2)
        goto interrupted;
      if (r < 0 || !PQconsumeInput(pg))
        goto lost;
    }
    res = PQgetResult(pg);
    if (res == NULL)
      break;
    switch (PQresultStatus(res)) {
    case PGRES_COPY_IN: /* refuse: the server answers PQputCopyEnd with an error */
      PQclear(res);
      if (PQputCopyEnd(pg, "COPY FROM STDIN is not supported by pglisten") < 0)
        goto lost;
      continue;
    case PGRES_COPY_OUT: { /* discard the data */
      char *buf;
      int got;
      PQclear(res);
      copy_out = 1;
      while ((got = PQgetCopyData(pg, &buf, 1)) != -1) {
        if (got == -2)
          goto lost;
        if (got > 0) {
          PQfreemem(buf);
        } else {
          int r = pgl_waitfd(L, fd, POLLIN, deadline, stop);
          if (r == 0)
            goto timedout;
          if (r == -2)
            goto interrupted;
          if (r < 0 || !PQconsumeInput(pg))
            goto lost;
        }
      }
      continue;
    }
    case PGRES_BAD_RESPONSE:
    case PGRES_NONFATAL_ERROR:
    case PGRES_FATAL_ERROR:
      if (!*err)
        *err = res;
      else
        PQclear(res);
      continue;
    default:
      pgl_unbox_result(box);
      *box = res;
    }
  }
  if (*err) {
    if (unrun)
      *unrun = unrun_kind(*err);
    n = pgl_push_result_error(L, *err);
    pgl_unbox_result(err);
    pgl_unbox_result(box);
    lua_rotate(L, -(n + 2), n); /* results under the boxes: drop the boxes */
    lua_pop(L, 2);
    return -n;
  }
  if (copy_out) {
    pgl_unbox_result(box);
    pgl_unbox_result(err);
    lua_pop(L, 2);
    lua_pushnil(L);
    lua_pushliteral(L, "COPY TO STDOUT is not supported by pglisten (its data was discarded)");
    return -2;
  }
  if (!*box) { /* an empty query string */
    pgl_unbox_result(err);
    lua_pop(L, 1);
    *box = PQmakeEmptyPGresult(pg, PGRES_EMPTY_QUERY);
    if (!*box)
      luaL_error(L, "out of memory");
    return 1;
  }
  lua_pop(L, 1); /* the error box, empty */
  return 1;

timedout:
  pgl_conn_abandon(c);
  pgl_unbox_result(box);
  pgl_unbox_result(err);
  lua_pop(L, 2);
  lua_pushnil(L);
  lua_pushfstring(L, "timeout: no answer from the server within %f s; connection closed", timeout);
  lua_pushliteral(L, "08006");
  return -3;
interrupted: /* a stop signal of the host: the session is dropped, as on a timeout */
  pgl_conn_abandon(c);
  pgl_unbox_result(box);
  pgl_unbox_result(err);
  lua_pop(L, 2);
  lua_pushnil(L);
  lua_pushliteral(L, "interrupted");
  lua_pushliteral(L, "08006");
  return -3;
lost:
  pgl_unbox_result(box);
  pgl_unbox_result(err);
  lua_pop(L, 2);
  return -pgl_conn_fail(L, c, "connection lost");
}

static int run_query(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                     int nparams, const char *const *values, double timeout) {
  return run_query_x(L, c, sql, stmt, prepare, nparams, values, timeout, NULL);
}

/* ------------------------------------------------------------------ */
/* The statement cache                                                 */
/* ------------------------------------------------------------------ */

/* Forgets every entry (a new session, or the server dropped them). */
static void stmts_forget(pgl_conn *c) {
  int i;
  for (i = 0; i < PGL_STMTS; i++) {
    free(c->stmts[i].sql);
    memset(&c->stmts[i], 0, sizeof c->stmts[i]);
  }
  c->nstale = 0;
}

static void stmt_drop(pgl_stmt *s) {
  free(s->sql);
  memset(s, 0, sizeof *s);
}

static unsigned stmt_hash(const char *sql, size_t len) {
  unsigned h = 2166136261u; /* FNV-1a */
  size_t i;
  for (i = 0; i < len; i++)
    h = (h ^ (unsigned char)sql[i]) * 16777619u;
  return h;
}

static void stmt_name(char *buf, size_t size, unsigned id) {
  snprintf(buf, size, "pglisten_%u", id);
}

/* Runs `sql` with no result wanted, bounded by the connection's query
 * timeout; 1 when it worked.  Leaves nothing. */
static int run_quiet(lua_State *L, pgl_conn *c, const char *sql) {
  int top = lua_gettop(L), r = run_query(L, c, sql, NULL, 0, 0, NULL, c->timeout);
  if (r > 0)
    pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
  lua_settop(L, top);
  return r > 0;
}

/* DEALLOCATEs statement `id`; 1 when it worked (or is gone). */
static int stmt_deallocate(lua_State *L, pgl_conn *c, unsigned id) {
  char cmd[48];
  snprintf(cmd, sizeof cmd, "DEALLOCATE pglisten_%u", id);
  return run_quiet(L, c, cmd) || PQstatus(c->pg) == CONNECTION_OK;
}

/* Outside a transaction block: deallocates the statements that went stale
 * inside one (a failed DEALLOCATE there would have aborted it). */
static void stmts_sweep(lua_State *L, pgl_conn *c) {
  while (c->nstale > 0 && PQtransactionStatus(c->pg) == PQTRANS_IDLE) {
    if (!stmt_deallocate(L, c, c->stale[c->nstale - 1]))
      return; /* the connection is gone: so are they */
    c->nstale--;
  }
}

/* A prepared statement that can no longer run: deallocated now when outside
 * a transaction block, else queued for stmts_sweep; its slot is freed. */
static void stmt_retire(lua_State *L, pgl_conn *c, pgl_stmt *s) {
  if (s->prepared) {
    if (PQtransactionStatus(c->pg) == PQTRANS_IDLE)
      stmt_deallocate(L, c, s->id);
    else if (c->nstale < PGL_STMTS)
      c->stale[c->nstale++] = s->id;
  }
  stmt_drop(s);
}

/*
 * Remembers a statement seen for the first time: in a free slot, else in
 * place of the least recently used entry that was never prepared, else of
 * the least recently used prepared one, which is deallocated first.  That
 * only happens outside a transaction block (a failed DEALLOCATE would abort
 * the caller's transaction); otherwise the statement is not remembered.
 */
static void stmt_remember(lua_State *L, pgl_conn *c, const char *sql, size_t len, int nparams,
                          unsigned hash) {
  pgl_stmt *victim = NULL;
  char *copy;
  int i;
  for (i = 0; i < PGL_STMTS; i++) {
    pgl_stmt *s = &c->stmts[i];
    if (!s->sql) {
      victim = s;
      break;
    }
    if (!victim || (victim->prepared && !s->prepared) ||
        (victim->prepared == s->prepared && s->used < victim->used))
      victim = s;
  }
  if (victim->sql && victim->prepared && PQtransactionStatus(c->pg) != PQTRANS_IDLE)
    return;
  if ((copy = (char *)malloc(len + 1)) == NULL)
    return; /* not cached: no harm done */
  memcpy(copy, sql, len + 1);
  if (victim->sql && victim->prepared && !stmt_deallocate(L, c, victim->id)) {
    free(copy);
    return;
  }
  stmt_drop(victim);
  victim->sql = copy;
  victim->len = len;
  victim->hash = hash;
  victim->nparams = nparams;
  victim->used = ++c->stmt_clock;
}

/* Case-insensitive: does `*sql`, after white space, start with the word
 * `word`?  Moves *sql past it when it does. */
static int take_word(const char **sql, const char *word) {
  const char *p = *sql;
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
    p++;
  for (; *word; word++, p++)
    if ((*p | 0x20) != *word)
      return 0;
  if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_')
    return 0;
  *sql = p;
  return 1;
}

/* DISCARD ALL, DEALLOCATE [PREPARE] ALL: the session's prepared statements
 * are gone.  (Any other loss is found by 26000 when a statement runs.) */
static int drops_all(const char *sql) {
  if (take_word(&sql, "discard"))
    return take_word(&sql, "all");
  if (take_word(&sql, "deallocate")) {
    take_word(&sql, "prepare");
    return take_word(&sql, "all");
  }
  return 0;
}

/*
 * exec of a parameterized statement through the cache: the first time as
 * an unnamed statement (as without the cache), the second time prepared,
 * then by name.  A prepared statement the server no longer has (26000:
 * DISCARD ALL, a pooler that switched sessions) or whose plan no longer
 * fits (0A000 "cached plan must not change result type", after ALTER
 * TABLE) is forgotten.  When unrun_kind() shows the error came before
 * anything was executed (never from the message text, which lc_messages
 * translates), the statement runs again unnamed if no transaction block
 * was involved; an error raised while it ran is returned as it is.
 * Returns like run_query.
 */
static int exec_cached(lua_State *L, pgl_conn *c, const char *sql, size_t len, int nparams,
                       const char *const *values) {
  unsigned hash = stmt_hash(sql, len);
  PGTransactionStatusType tx = PQtransactionStatus(c->pg);
  pgl_stmt *s = NULL;
  char name[32];
  int i, r, unrun;
  if (c->nstale > 0 && tx == PQTRANS_IDLE)
    stmts_sweep(L, c);
  for (i = 0; i < PGL_STMTS; i++) {
    pgl_stmt *e = &c->stmts[i];
    if (e->sql && e->hash == hash && e->len == len && e->nparams == nparams &&
        memcmp(e->sql, sql, len) == 0) {
      s = e;
      break;
    }
  }
  if (!s) {
    if (tx == PQTRANS_IDLE || tx == PQTRANS_INTRANS)
      stmt_remember(L, c, sql, len, nparams, hash);
    return run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
  }
  s->used = ++c->stmt_clock;
  if (!s->prepared) {
    if (tx != PQTRANS_IDLE && tx != PQTRANS_INTRANS)
      return run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
    s->id = ++c->stmt_next;
    stmt_name(name, sizeof name, s->id);
    r = run_query(L, c, sql, name, 1, nparams, NULL, c->timeout);
    if (r < 0) { /* the statement's own error (as unnamed), or a lost connection */
      const char *code = r == -3 ? lua_tostring(L, -1) : NULL;
      stmt_drop(s);
      if (code && strcmp(code, "42P05") == 0 && tx == PQTRANS_IDLE) {
        lua_pop(L, 3); /* the session has a statement of that name already */
        return run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
      }
      return r;
    }
    pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
    lua_pop(L, 1);
    s->prepared = 1;
  }
  stmt_name(name, sizeof name, s->id);
  r = run_query_x(L, c, sql, name, 0, nparams, values, c->timeout, &unrun);
  if (r == -3) {
    const char *code = lua_tostring(L, -1);
    int gone = code && strcmp(code, "26000") == 0, stale = unrun == PGL_UNRUN_STALE;
    if (gone) {
      stmt_drop(s); /* whoever raised it: a retry prepares it again */
    } else if (stale) {
      stmt_retire(L, c, s);
    }
    if (unrun != PGL_RAN && tx == PQTRANS_IDLE && PQtransactionStatus(c->pg) == PQTRANS_IDLE) {
      lua_pop(L, 3);
      return run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
    }
  }
  return r;
}

/* conn:exec(sql, ...) -> rows | nil, err[, sqlstate] */
static int conn_exec(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  size_t len;
  const char *sql = luaL_checklstring(L, 2, &len);
  int nparams = lua_gettop(L) - 2, nerr = 0, r;
  const char *const *values = NULL;
  if (nparams > 65535)
    return luaL_error(L, "too many query parameters (%d; the protocol allows 65535)", nparams);
  if (strlen(sql) != len) { /* libpq would send only what comes before it */
    lua_pushnil(L);
    lua_pushfstring(L, "SQL contains a zero byte (at byte %d); refused, nothing was sent",
                    (int)strlen(sql) + 1);
    return 2;
  }
  if (nparams > 0) {
    values = pgl_params(L, 3, nparams, &nerr);
    if (!values) {
      lua_pushnil(L);
      lua_pushfstring(L, "parameter $%d contains a zero byte, which text parameters cannot carry", nerr);
      return 2;
    }
  }
  if (nparams > 0 && c->stmt_cache)
    r = exec_cached(L, c, sql, len, nparams, values);
  else
    r = run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
  if (nparams == 0 && drops_all(sql))
    stmts_forget(c); /* gone from the server */
  if (r < 0)
    return -r;
  pgl_push_rows(L, *(PGresult **)lua_touserdata(L, -1));
  pgl_unbox_result((PGresult **)lua_touserdata(L, -2));
  return 1;
}

/*
 * conn:statement_cache([on]) -> whether exec prepares repeated statements
 * (before this call); `on` false turns it off and forgets the entries
 * (their statements stay on the server until the session ends).
 */
static int conn_statement_cache(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  int was = c->stmt_cache;
  if (!lua_isnone(L, 2)) {
    c->stmt_cache = lua_toboolean(L, 2);
    if (!c->stmt_cache)
      stmts_forget(c);
  }
  lua_pushboolean(L, was);
  return 1;
}

/*
 * conn:interruptible([on]) -> whether a stop signal of the host program
 * (TERM/INT) ends a wait of exec for the server (before this call).  On, an
 * exec that waits then returns nil, "interrupted", "08006" and the session
 * is dropped (the query's fate is unknown).  Off by default: handlers finish
 * their queries in the stop's grace.  The runner turns it on for its own
 * connections, whose LISTEN or lock query must not hold a stop.
 */
static int conn_interruptible(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  int was = c->stop_ends;
  if (!lua_isnone(L, 2))
    c->stop_ends = lua_toboolean(L, 2);
  lua_pushboolean(L, was);
  return 1;
}

/* conn:ping([timeout]) -> true | nil, err, sqlstate: an empty query, bounded. */
static int conn_ping(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  double timeout = luaL_optnumber(L, 2, c->timeout > 0 ? c->timeout : 10);
  int r;
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive");
  r = run_query(L, c, "", NULL, 0, 0, NULL, timeout);
  if (r < 0)
    return -r;
  pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Notifications                                                       */
/* ------------------------------------------------------------------ */

/*
 * Copies a notification into Lua as { channel, payload, pid, received_at }.
 * The strings go to the connection's scratch buffer first and the PGnotify is
 * freed before any Lua allocation, so a memory error cannot leak it.
 */
static int push_notify(lua_State *L, pgl_conn *c, int connidx, PGnotify *n) {
  size_t clen = strlen(n->relname), plen = strlen(n->extra), need = clen + plen;
  int pid = n->be_pid;
  if (need > c->scratch_len || !c->scratch) {
    char *p;
    if (need < 256)
      need = 256;
    p = (char *)realloc(c->scratch, need);
    if (!p) {
      PQfreemem(n);
      return luaL_error(L, "out of memory copying a notification");
    }
    c->scratch = p;
    c->scratch_len = need;
  }
  memcpy(c->scratch, n->relname, clen);
  memcpy(c->scratch + clen, n->extra, plen);
  PQfreemem(n);
  lua_createtable(L, 0, 4);
  /* the channel: the connection's user value keeps the last one, so that a
   * run of notes on one channel does not intern its name again and again */
  if (lua_getiuservalue(L, connidx, 1) == LUA_TSTRING && lua_rawlen(L, -1) == clen &&
      memcmp(lua_tostring(L, -1), c->scratch, clen) == 0) {
    lua_setfield(L, -2, "channel");
  } else {
    lua_pop(L, 1);
    lua_pushlstring(L, c->scratch, clen);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, connidx, 1);
    lua_setfield(L, -2, "channel");
  }
  lua_pushlstring(L, c->scratch + clen, plen);
  lua_setfield(L, -2, "payload");
  lua_pushinteger(L, pid);
  lua_setfield(L, -2, "pid");
  lua_pushnumber(L, pgl_realtime());
  lua_setfield(L, -2, "received_at");
  return 1;
}

/*
 * Returns the next notification: from libpq's queue without touching the
 * socket when one is there, else reads what the socket has and waits on it
 * for at most `timeout` seconds.  Pushes the note (1), or nil, reason (2/3).
 */
static int next_notify(lua_State *L, pgl_conn *c, double timeout) {
  double deadline = deadline_in(timeout);
  PGnotify *n = PQnotifies(c->pg);
  if (n)
    return push_notify(L, c, 1, n);
  for (;;) {
    int r;
    if (!PQconsumeInput(c->pg))
      return pgl_conn_fail(L, c, "connection lost");
    if ((n = PQnotifies(c->pg)) != NULL)
      return push_notify(L, c, 1, n);
    if (PQstatus(c->pg) == CONNECTION_BAD)
      return pgl_conn_fail(L, c, "connection lost");
    r = pgl_waitfd(L, PQsocket(c->pg), POLLIN, deadline, 1);
    if (r == 0) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
    if (r == -2) {
      lua_pushnil(L);
      lua_pushliteral(L, "interrupted");
      return 2;
    }
    if (r < 0) {
      lua_pushnil(L);
      lua_pushfstring(L, "poll failed: %s", strerror(errno));
      return 2;
    }
  }
}

static double opt_timeout(lua_State *L, int idx) {
  double t;
  if (lua_isnoneornil(L, idx))
    return -1;
  t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t >= 0, idx, "timeout must not be negative");
  return t;
}

/* conn:wait([timeout]) -> note | nil, "timeout" | nil, err */
static int conn_wait(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  return next_notify(L, c, opt_timeout(L, 2));
}

/*
 * conn:drain(max [, into]) -> array of up to `max` notes that are already
 * here (libpq's queue, then whatever the socket has without waiting), in
 * server order; n = count.  Never blocks.  Returns nil, err when the
 * connection is lost before any note was taken.
 */
static int conn_drain(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  lua_Integer max = luaL_checkinteger(L, 2), i = 0;
  int consumed = 0;
  luaL_argcheck(L, max > 0, 2, "must be positive");
  if (lua_istable(L, 3))
    lua_settop(L, 3);
  else {
    lua_settop(L, 2);
    lua_createtable(L, (int)(max < 64 ? max : 64), 1);
  }
  while (i < max) {
    PGnotify *n = PQnotifies(c->pg);
    if (!n) {
      if (consumed)
        break;
      consumed = 1;
      if (!PQconsumeInput(c->pg)) {
        if (i == 0)
          return pgl_conn_fail(L, c, "connection lost");
        break;
      }
      continue;
    }
    push_notify(L, c, 1, n);
    lua_rawseti(L, 3, ++i);
  }
  lua_pushinteger(L, i);
  lua_setfield(L, 3, "n");
  /* clear stale entries when the caller reuses a table */
  {
    lua_Integer k = i + 1;
    while (lua_rawgeti(L, 3, k) != LUA_TNIL) {
      lua_pop(L, 1);
      lua_pushnil(L);
      lua_rawseti(L, 3, k++);
    }
    lua_pop(L, 1);
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Small accessors                                                     */
/* ------------------------------------------------------------------ */

static int conn_escape_identifier(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  size_t len;
  const char *s = luaL_checklstring(L, 2, &len);
  char *q = PQescapeIdentifier(c->pg, s, len);
  if (!q) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    return 2;
  }
  lua_pushstring(L, q);
  PQfreemem(q);
  return 1;
}

static int conn_pollfd(lua_State *L) {
  lua_pushinteger(L, PQsocket(pgl_checkconn(L, 1)->pg));
  return 1;
}

/* cqueues convention: the events to poll for, "r" and/or "w". */
static int conn_events(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  lua_pushstring(L, PQflush(c->pg) == 1 ? "rw" : "r");
  return 1;
}

/* cqueues convention: seconds until the object wants attention, or nil. */
static int conn_timeout(lua_State *L) {
  pgl_checkconn(L, 1);
  lua_pushnil(L);
  return 1;
}

static int conn_pid(lua_State *L) {
  lua_pushinteger(L, PQbackendPID(pgl_checkconn(L, 1)->pg));
  return 1;
}

static int conn_status(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  switch (PQstatus(c->pg)) {
  case CONNECTION_OK:
    lua_pushliteral(L, "ok");
    break;
  case CONNECTION_BAD:
    lua_pushliteral(L, "bad");
    break;
  default:
    lua_pushliteral(L, "connecting");
  }
  return 1;
}

static int conn_txstatus(lua_State *L) {
  static const char *const names[] = {"idle", "active", "intrans", "inerror", "unknown"};
  PGTransactionStatusType t = PQtransactionStatus(pgl_checkconn(L, 1)->pg);
  lua_pushstring(L, (unsigned)t < 5 ? names[t] : "unknown");
  return 1;
}

static int conn_settimeout(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  double t = opt_timeout(L, 2);
  c->timeout = t < 0 ? 0 : t;
  return 0;
}

static int conn_gettimeout(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  if (c->timeout > 0)
    lua_pushnumber(L, c->timeout);
  else
    lua_pushnil(L);
  return 1;
}

/* conn:notices() -> array of server notices since the last call (oldest first) */
static int conn_notices(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  int i, n = c->notice_count;
  lua_createtable(L, n, 1);
  for (i = 0; i < n; i++) {
    pgl_push_trimmed(L, c->notices[(c->notice_head + i) % PGL_MAX_NOTICES]);
    lua_rawseti(L, -2, i + 1);
  }
  lua_pushinteger(L, c->notices_dropped);
  lua_setfield(L, -2, "dropped");
  clear_notices(c);
  c->notices_dropped = 0;
  return 1;
}

/*
 * conn:alive() -> boolean, without blocking: reads what the socket already
 * has.  A backend that was terminated (server restart, pg_terminate_backend)
 * leaves a FATAL message and EOF there; reading them marks the connection
 * bad before a query is sent on it, so the caller can reconnect first
 * instead of failing a query whose fate it could not know.  Notifications
 * read on the way stay queued in libpq.
 */
static int conn_alive(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  int i;
  for (i = 0; i < 8 && PQstatus(c->pg) == CONNECTION_OK; i++) {
    struct pollfd p;
    p.fd = PQsocket(c->pg);
    p.events = POLLIN;
    p.revents = 0;
    if (p.fd < 0 || poll(&p, 1, 0) <= 0)
      break; /* nothing to read (or poll failed: let the query find out) */
    if (!PQconsumeInput(c->pg))
      break; /* EOF or error: the status is bad now */
  }
  lua_pushboolean(L, PQstatus(c->pg) == CONNECTION_OK);
  return 1;
}

/* conn:server_version() -> integer like 150018 */
static int conn_server_version(lua_State *L) {
  lua_pushinteger(L, PQserverVersion(pgl_checkconn(L, 1)->pg));
  return 1;
}

/* conn:reset([timeout]) -> true | nil, err: reconnect with the same conninfo
 * (nil, "interrupted" on a stop signal of the host, as core.connect). */
static int conn_reset(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  double timeout = luaL_optnumber(L, 2, 10);
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive"); /* as connect: < 0 is no deadline */
  if (pgl_stopping(L)) { /* as drive_connect would, but without the network */
    lua_pushnil(L);
    lua_pushliteral(L, "interrupted");
    return 2;
  }
  stmts_forget(c); /* a new session has none of them */
  if (!PQresetStart(c->pg)) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    return 2;
  }
  if (!drive_connect(L, c, PQresetPoll, timeout)) {
    pgl_conn_abandon(c);
    return 2;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Life cycle                                                          */
/* ------------------------------------------------------------------ */

static void conn_release(pgl_conn *c) {
  if (c->pg) {
    PQfinish(c->pg);
    c->pg = NULL;
  }
  free(c->scratch);
  c->scratch = NULL;
  c->scratch_len = 0;
  clear_notices(c);
  stmts_forget(c);
}

static int conn_close(lua_State *L) {
  conn_release((pgl_conn *)luaL_checkudata(L, 1, PGL_CONN_MT));
  lua_pushboolean(L, 1);
  return 1;
}

static int conn_gc(lua_State *L) {
  conn_release((pgl_conn *)luaL_checkudata(L, 1, PGL_CONN_MT));
  return 0;
}

static int conn_isclosed(lua_State *L) {
  pgl_conn *c = (pgl_conn *)luaL_checkudata(L, 1, PGL_CONN_MT);
  lua_pushboolean(L, c->pg == NULL);
  return 1;
}

static int conn_tostring(lua_State *L) {
  pgl_conn *c = (pgl_conn *)luaL_checkudata(L, 1, PGL_CONN_MT);
  if (!c->pg)
    lua_pushliteral(L, "pglisten.conn (closed)");
  else
    lua_pushfstring(L, "pglisten.conn (pid %d, %s)", PQbackendPID(c->pg),
                    PQstatus(c->pg) == CONNECTION_OK ? "ok" : "bad");
  return 1;
}

/*
 * core.connect(conninfo, timeout) -> conn | nil, err
 * conninfo: keyword/value string or URI ("" for libpq's defaults).  The
 * message is libpq's own; the Lua facade removes any password from it.
 * nil, "interrupted" when the host program got a stop signal (drive_connect).
 */
int pgl_conn_connect(lua_State *L) {
  const char *conninfo = pgl_conninfo_arg(L, 1, 1);
  double timeout = luaL_optnumber(L, 2, 10);
  pgl_conn *c;
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive");
  if (!conninfo)
    return 2;
  if (pgl_stopping(L)) { /* as drive_connect would, but without DNS or a socket */
    lua_pushnil(L);
    lua_pushliteral(L, "interrupted");
    return 2;
  }
  c = (pgl_conn *)lua_newuserdatauv(L, sizeof *c, 1); /* user value: the last channel name */
  memset(c, 0, sizeof *c);
  c->stmt_cache = 1;
  luaL_setmetatable(L, PGL_CONN_MT);
  c->pg = PQconnectStart(conninfo);
  if (!c->pg) {
    lua_pushnil(L);
    lua_pushliteral(L, "out of memory allocating a connection");
    return 2;
  }
  PQsetNoticeProcessor(c->pg, notice_cb, c);
  if (PQstatus(c->pg) == CONNECTION_BAD) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    conn_release(c);
    return 2;
  }
  if (!drive_connect(L, c, PQconnectPoll, timeout)) {
    conn_release(c);
    return 2;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Registration                                                        */
/* ------------------------------------------------------------------ */

static const luaL_Reg conn_methods[] = {
  {"exec", conn_exec},
  {"statement_cache", conn_statement_cache},
  {"interruptible", conn_interruptible},
  {"ping", conn_ping},
  {"wait", conn_wait},
  {"drain", conn_drain},
  {"escape_identifier", conn_escape_identifier},
  {"pollfd", conn_pollfd},
  {"events", conn_events},
  {"timeout", conn_timeout},
  {"pid", conn_pid},
  {"status", conn_status},
  {"txstatus", conn_txstatus},
  {"settimeout", conn_settimeout},
  {"gettimeout", conn_gettimeout},
  {"notices", conn_notices},
  {"server_version", conn_server_version},
  {"alive", conn_alive},
  {"reset", conn_reset},
  {"close", conn_close},
  {"isclosed", conn_isclosed},
  {NULL, NULL}
};

static const luaL_Reg conn_meta[] = {
  {"__gc", conn_gc},
  {"__close", conn_gc},
  {"__tostring", conn_tostring},
  {"__index", NULL},
  {NULL, NULL}
};

/* Registers the metatable; its __index (the methods) is also returned to
 * the module as core.conn_methods so the Lua facade can extend it. */
void pgl_conn_open(lua_State *L) {
  luaL_newmetatable(L, PGL_CONN_MT);
  luaL_setfuncs(L, conn_meta, 0);
  luaL_newlib(L, conn_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
