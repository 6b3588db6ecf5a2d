/*
 * query.c -- running a query on a pglisten.conn: send it, flush, wait on
 * the socket bounded by the connection's timeout (or a stop signal, with
 * conn:interruptible), collect every result; conn:exec and conn:ping.
 * Notifications that arrive meanwhile stay in libpq's queue for notify.c.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"

/* ------------------------------------------------------------------ */
/* Queries                                                             */
/* ------------------------------------------------------------------ */

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

/* How a wait for the server ended when it did not end with an answer. */
enum { Q_OK = 0, Q_TIMEDOUT, Q_INTERRUPTED, Q_LOST };

/* What a query waits with: the socket, the deadline, what signal ends it. */
typedef struct qwait {
  lua_State *L;
  PGconn *pg;
  int fd;
  double deadline;
  int stop;
} qwait;

/* Waits until the socket is ready for `events` (or `extra`, when >= 0, is
 * readable: Q_OK with nothing read), then reads what arrived: Q_OK, or how
 * the wait failed. */
static int await_server_or(const qwait *w, short events, int extra) {
  int r = pgl_waitfd_or(w->L, w->fd, events, extra, w->deadline, w->stop);
  if (r == 0)
    return Q_TIMEDOUT;
  if (r == -2)
    return Q_INTERRUPTED;
  if (r == 3)
    return Q_OK;
  if (r < 0 || !PQconsumeInput(w->pg))
    return Q_LOST;
  return Q_OK;
}

static int await_server(const qwait *w, short events) {
  return await_server_or(w, events, -1);
}

/* Sends the query as pgl_run_query_x says; libpq's answer (0: not sent). */
static int send_query(PGconn *pg, const char *sql, const char *stmt, int prepare, int nparams,
                      const char *const *values) {
  if (stmt && prepare)
    return PQsendPrepare(pg, stmt, sql, nparams, NULL);
  if (stmt)
    return PQsendQueryPrepared(pg, stmt, nparams, values, NULL, NULL, 0);
  if (nparams > 0)
    return PQsendQueryParams(pg, sql, nparams, NULL, values, NULL, NULL, 0);
  return PQsendQuery(pg, sql);
}

/* Flushes what libpq could not write at once, reading meanwhile: Q_OK, or
 * how it failed. */
static int flush_query(const qwait *w) {
  for (;;) {
    int f = PQflush(w->pg), r;
    if (f == 0)
      return Q_OK;
    if (f < 0)
      return Q_LOST;
    if ((r = await_server(w, POLLIN | POLLOUT)) != Q_OK)
      return r;
  }
}

/* A COPY TO STDOUT: reads its data to the end and discards it. */
static int discard_copy_out(const qwait *w) {
  char *buf;
  int got, r;
  while ((got = PQgetCopyData(w->pg, &buf, 1)) != -1) {
    if (got == -2)
      return Q_LOST;
    if (got > 0)
      PQfreemem(buf); /* libpq's copy of the row */
    else if ((r = await_server(w, POLLIN)) != Q_OK)
      return r;
  }
  return Q_OK;
}

/*
 * Collects every result of the query until libpq has none left: the last
 * into the box `last`, the first error into the box `err` (the first error
 * wins, later ones are cleared); *copy_out is set when a COPY TO STDOUT's
 * data was discarded.  Q_OK, or how the wait failed.
 */
static int collect_results(const qwait *w, PGresult **last, PGresult **err, int *copy_out) {
  for (;;) {
    PGresult *res;
    int r;
    while (PQisBusy(w->pg)) {
      int watch = pgl_idle(w->L, w->fd); /* all is written: the server is at work */
      if ((r = await_server_or(w, POLLIN, watch)) != Q_OK)
        return r;
    }
    res = PQgetResult(w->pg);
    if (res == NULL)
      return Q_OK;
    switch (PQresultStatus(res)) {
    case PGRES_COPY_IN: /* refuse: the server answers PQputCopyEnd with an error */
      PQclear(res);
      if (PQputCopyEnd(w->pg, "COPY FROM STDIN is not supported by pglisten") < 0)
        return Q_LOST;
      break;
    case PGRES_COPY_OUT: /* discard the data */
      PQclear(res);
      *copy_out = 1;
      if ((r = discard_copy_out(w)) != Q_OK)
        return r;
      break;
    case PGRES_BAD_RESPONSE:
    case PGRES_NONFATAL_ERROR:
    case PGRES_FATAL_ERROR:
      if (!*err)
        *err = res;
      else
        PQclear(res);
      break;
    default:
      pgl_unbox_result(last);
      *last = res;
    }
  }
}

/*
 * The wait failed (`how`): drops the session unless it is lost already,
 * frees both boxes (on the top of the stack) and pushes nil, message,
 * sqlstate in their place; returns -(count).
 */
static int wait_failed(lua_State *L, pgl_conn *c, int how, PGresult **last, PGresult **err,
                       double timeout) {
  if (how != Q_LOST)
    pgl_conn_abandon(c); /* a timeout or a stop signal of the host */
  pgl_unbox_result(last);
  pgl_unbox_result(err);
  lua_pop(L, 2);
  if (how == Q_LOST)
    return -pgl_conn_fail(L, c, "connection lost");
  lua_pushnil(L);
  if (how == Q_TIMEDOUT)
    lua_pushfstring(L, "timeout: no answer from the server within %f s; connection closed", timeout);
  else
    lua_pushliteral(L, "interrupted");
  lua_pushliteral(L, "08006");
  return -3;
}

/*
 * Every result is in: leaves the last one boxed on the stack and returns 1,
 * or pushes nil, message[, sqlstate] for the first error (or a COPY TO
 * STDOUT) in place of both boxes and returns -(count).
 */
static int finish_query(lua_State *L, PGconn *pg, PGresult **last, PGresult **err, int copy_out,
                        int *unrun) {
  int n;
  if (*err) {
    if (unrun)
      *unrun = unrun_kind(*err);
    n = pgl_push_result_error(L, *err);
    pgl_unbox_result(err);
    pgl_unbox_result(last);
    lua_rotate(L, -(n + 2), n); /* results under the boxes: drop the boxes */
    lua_pop(L, 2);
    return -n;
  }
  if (copy_out) {
    pgl_unbox_result(last);
    pgl_unbox_result(err);
    lua_pop(L, 2);
    lua_pushnil(L);
    lua_pushliteral(L, "COPY TO STDOUT is not supported by pglisten (its data was discarded)");
    return -2;
  }
  if (!*last) { /* an empty query string */
    pgl_unbox_result(err);
    lua_pop(L, 1);
    *last = PQmakeEmptyPGresult(pg, PGRES_EMPTY_QUERY);
    if (!*last)
      luaL_error(L, "out of memory");
    return 1;
  }
  lua_pop(L, 1); /* the error box, empty */
  return 1;
}

/*
 * Sends `sql` (with params when nparams > 0, else as a simple query that may
 * hold several statements) and collects the results.  With `stmt`, prepares
 * `sql` under that name (`prepare`) or executes the statement of that name.
 * On success returns 1 with the last result boxed on the stack.  On failure
 * pushes nil, message[, sqlstate] and returns -(count); `unrun` (when not
 * NULL) gets unrun_kind() of the error that failed it, else PGL_RAN.
 */
int pgl_run_query_x(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                    int nparams, const char *const *values, double timeout, int *unrun) {
  qwait w;
  PGresult **last, **err;
  int how, copy_out = 0;

  w.L = L;
  w.pg = c->pg;
  w.deadline = timeout > 0 ? pgl_deadline_in(timeout) : -1;
  w.stop = c->stop_ends ? PGL_WAIT_STOP : 0; /* conn:interruptible */
  if (unrun)
    *unrun = PGL_RAN;
  if (!send_query(c->pg, sql, stmt, prepare, nparams, values))
    return -pgl_conn_fail(L, c, "could not send query");
  last = pgl_box_result(L, NULL); /* the last result */
  err = pgl_box_result(L, NULL);  /* the first error, which wins */
  w.fd = PQsocket(c->pg);
  how = flush_query(&w);
  if (how == Q_OK)
    how = collect_results(&w, last, err, &copy_out);
  if (how != Q_OK)
    return wait_failed(L, c, how, last, err, timeout);
  return finish_query(L, c->pg, last, err, copy_out, unrun);
}

int pgl_run_query(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                  int nparams, const char *const *values, double timeout) {
  return pgl_run_query_x(L, c, sql, stmt, prepare, nparams, values, timeout, NULL);
}

/* conn:exec(sql, ...) -> rows | nil, err[, sqlstate] */
int pgl_conn_exec(lua_State *L) {
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
    r = pgl_exec_cached(L, c, sql, len, nparams, values);
  else
    r = pgl_run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
  if (nparams == 0 && pgl_drops_all(sql))
    pgl_stmts_forget(c); /* gone from the server */
  if (r < 0)
    return -r;
  pgl_push_rows(L, *(PGresult **)lua_touserdata(L, -1));
  pgl_unbox_result((PGresult **)lua_touserdata(L, -2));
  return 1;
}

/* conn:ping([timeout]) -> true | nil, err, sqlstate: an empty query, bounded. */
int pgl_conn_ping(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  double timeout = luaL_optnumber(L, 2, c->timeout > 0 ? c->timeout : 10);
  int r;
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive");
  r = pgl_run_query(L, c, "", NULL, 0, 0, NULL, timeout);
  if (r < 0)
    return -r;
  pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Rows up to a size                                                   */
/* ------------------------------------------------------------------ */

/*
 * Collects the rows of a query in single-row mode into the array at `rows`:
 * each is converted while the values taken stay under `max_bytes` (one row
 * at least), the rest are read and dropped (*more set); the first error
 * goes to the box `err`, the row being converted sits in the box `cur`.
 * Q_OK, or how the wait failed.
 */
static int collect_rows(const qwait *w, int rows, lua_Integer max_bytes, lua_Integer *bytes, int *more,
                        PGresult **cur, PGresult **err, int *copy_out) {
  for (;;) {
    PGresult *res;
    int r;
    while (PQisBusy(w->pg))
      if ((r = await_server(w, POLLIN)) != Q_OK)
        return r;
    if ((res = PQgetResult(w->pg)) == NULL)
      return Q_OK;
    switch (PQresultStatus(res)) {
    case PGRES_SINGLE_TUPLE: /* the first row whatever max_bytes says */
      if ((*bytes < max_bytes || lua_rawlen(w->L, rows) == 0) && !*err) {
        *cur = res;
        *bytes += pgl_rows_append(w->L, rows, res);
        *cur = NULL;
      } else {
        *more = 1;
      }
      break;
    case PGRES_COPY_IN:
      if (PQputCopyEnd(w->pg, "COPY FROM STDIN is not supported by pglisten") < 0)
        res = (PQclear(res), NULL);
      break;
    case PGRES_COPY_OUT:
      PQclear(res);
      res = NULL;
      *copy_out = 1;
      if ((r = discard_copy_out(w)) != Q_OK)
        return r;
      break;
    case PGRES_BAD_RESPONSE:
    case PGRES_NONFATAL_ERROR:
    case PGRES_FATAL_ERROR:
      if (!*err) {
        *err = res;
        res = NULL;
      }
      break;
    default: /* the end of the rows, or a statement without any */
      break;
    }
    PQclear(res);
  }
}

/*
 * conn:exec_upto(max_bytes, sql, ...) -> rows | nil, err[, sqlstate]
 * One statement, its parameters as exec's, its rows taken one at a time
 * (libpq's single-row mode): converted until their values reach max_bytes
 * (one row at least); the rest are read from the server and dropped, and
 * rows.more is true.  rows.n, rows.bytes as exec's.  So a page of rows of
 * unknown width never holds much more than max_bytes in memory.
 */
int pgl_conn_exec_upto(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  lua_Integer max_bytes = luaL_checkinteger(L, 2), bytes = 0;
  size_t len;
  const char *sql = luaL_checklstring(L, 3, &len);
  int nparams = lua_gettop(L) - 3, nerr = 0, more = 0, copy_out = 0, how, rows;
  const char *const *values = NULL;
  PGresult **cur, **err;
  qwait w;
  luaL_argcheck(L, nparams <= 65535, 4, "too many query parameters (the protocol allows 65535)");
  if (strlen(sql) != len) {
    lua_pushnil(L);
    lua_pushfstring(L, "SQL contains a zero byte (at byte %d); refused, nothing was sent", (int)strlen(sql) + 1);
    return 2;
  }
  if (nparams > 0 && !(values = pgl_params(L, 4, nparams, &nerr))) {
    lua_pushnil(L);
    lua_pushfstring(L, "parameter $%d contains a zero byte, which text parameters cannot carry", nerr);
    return 2;
  }
  w.L = L, w.pg = c->pg, w.fd = PQsocket(c->pg), w.stop = c->stop_ends ? PGL_WAIT_STOP : 0;
  w.deadline = c->timeout > 0 ? pgl_deadline_in(c->timeout) : -1;
  if (!PQsendQueryParams(c->pg, sql, nparams, NULL, values, NULL, NULL, 0) || !PQsetSingleRowMode(c->pg))
    return pgl_conn_fail(L, c, "could not send query");
  lua_newtable(L);
  rows = lua_gettop(L);
  cur = pgl_box_result(L, NULL);
  err = pgl_box_result(L, NULL);
  how = flush_query(&w);
  if (how == Q_OK)
    how = collect_rows(&w, rows, max_bytes, &bytes, &more, cur, err, &copy_out);
  pgl_unbox_result(cur);
  if (nparams == 0 && pgl_drops_all(sql))
    pgl_stmts_forget(c); /* gone from the server, as after exec */
  if (how != Q_OK)
    return -wait_failed(L, c, how, cur, err, c->timeout);
  if (*err || copy_out)
    return -finish_query(L, c->pg, cur, err, copy_out, NULL);
  lua_pop(L, 2);
  lua_pushinteger(L, (lua_Integer)lua_rawlen(L, rows));
  lua_setfield(L, rows, "n");
  lua_pushinteger(L, bytes);
  lua_setfield(L, rows, "bytes");
  lua_pushboolean(L, more);
  lua_setfield(L, rows, "more");
  return 1;
}
