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
  PGconn *pg = c->pg;
  double deadline = timeout > 0 ? pgl_deadline_in(timeout) : -1;
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
