/*
 * pipeline.c -- conn:execmany(sql, list): one statement run for many
 * parameter tuples in libpq's pipeline mode, inside one transaction, in one
 * round trip.
 *
 * What is queued, in the order the server runs it (the "ordinal" of each
 * command is its place in this list, counted from 0):
 *
 *   BEGIN | SAVEPOINT pgl_execmany        0      (nothing with savepoint = false)
 *   Parse `sql` as the unnamed statement  1
 *   Bind/Execute, once per tuple          2 .. n+1   (tuple i is ordinal i+1)
 *   COMMIT | RELEASE SAVEPOINT            (the rollback instead when not every
 *                                          tuple could be sent)
 *   Sync
 *
 * With savepoint = false inside the caller's transaction the ordinals start
 * one lower (b->first is 1): there is no opening, nothing is released, and a
 * failure leaves the caller's transaction aborted (see abort_block()).
 *
 * pipeline_send.c queues all of the above and closes the pipeline
 * (pgl_batch_send, pgl_batch_close); this file takes the results and runs
 * conn:execmany.
 *
 * After an error the server skips everything up to the Sync (libpq hands
 * those commands back as PGRES_PIPELINE_ABORTED), so the first error is the
 * one reported.  An explicit transaction block outlives the Sync in its
 * failed state, so a failed batch takes a second, short pipeline: ROLLBACK
 * (or ROLLBACK TO SAVEPOINT + RELEASE SAVEPOINT) and another Sync.
 *
 * Deadlock: the server stops reading our input while its own output is
 * blocked, so a client that only writes can wait for it forever.  Whenever
 * libpq cannot write all it holds we wait for the socket to become writable
 * *or readable*, read what the server sent and take the results parsed, so
 * the server always gets to write (pgl_batch_drive()).  Taking the results
 * as they come also keeps libpq's input buffer small and lets us stop
 * converting tuples once one has failed.
 *
 * Notifications that arrive meanwhile are parsed by libpq into its queue and
 * left there for conn:wait()/drain(); nothing here calls PQnotifies.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "pipeline.h"

/* ------------------------------------------------------------------ */
/* Results                                                             */
/* ------------------------------------------------------------------ */

/* The client-side timeout bounds the time without progress on the socket:
 * each statement of the batch gets it, as each exec() does, rather than
 * the batch as a whole, which may rightly take longer. */
static void refresh(batch *b) {
  b->deadline = b->c->timeout > 0 ? pgl_monotonic() + b->c->timeout : -1;
}

static lua_Integer cmd_tuples(PGresult *res) {
  const char *s = PQcmdTuples(res);
  lua_Integer n = 0;
  for (; *s >= '0' && *s <= '9'; s++)
    n = n * 10 + (*s - '0');
  return n;
}

static int lost(batch *b) {
  b->fail = B_LOST;
  return 0;
}

/*
 * COPY is not allowed in pipeline mode (libpq's documentation) and
 * conn_execmany refuses a statement that starts with it, so these results
 * should not come.  Should one come, COPY FROM STDIN is refused (the server
 * may well end the connection: what we queued behind it reads as COPY data),
 * and COPY TO STDOUT's rows are read and dropped so that the results stay in
 * step (waiting here, as exec() does).
 */
static void drop_copy_out(batch *b) {
  int fd = PQsocket(b->pg);
  for (;;) {
    char *buf;
    int got = PQgetCopyData(b->pg, &buf, 1), r;
    if (got > 0) {
      PQfreemem(buf);
      continue;
    }
    if (got == -1)
      return; /* done: the command's own result follows */
    if (got == -2) {
      lost(b);
      return;
    }
    r = pgl_waitfd(b->L, fd, POLLIN, b->deadline, 0);
    if (r == 0) {
      b->fail = B_TIMEOUT;
      return;
    }
    if (r < 0 || !PQconsumeInput(b->pg)) {
      lost(b);
      return;
    }
    refresh(b);
  }
}

/* Takes one result of the command at ordinal b->done.  Owns `res`: clears it
 * or keeps it, boxed, as the first error. */
static void take(batch *b, PGresult *res) {
  switch (PQresultStatus(res)) {
  case PGRES_PIPELINE_SYNC:
    b->synced++;
    break;
  case PGRES_COMMAND_OK:
  case PGRES_TUPLES_OK:
  case PGRES_SINGLE_TUPLE:
  case PGRES_EMPTY_QUERY:
    if (b->done >= b->first && b->done - b->first < b->sent)
      b->affected += cmd_tuples(res);
    break;
  case PGRES_PIPELINE_ABORTED: /* skipped after an earlier error */
    break;
  case PGRES_COPY_IN:
    PQclear(res);
    if (PQputCopyEnd(b->pg, "COPY FROM STDIN is not supported by execmany") != 1)
      lost(b);
    return;
  case PGRES_COPY_OUT:
    PQclear(res);
    drop_copy_out(b);
    return;
  default: /* PGRES_FATAL_ERROR, PGRES_NONFATAL_ERROR, PGRES_BAD_RESPONSE, ... */
    if (!*b->err) {
      *b->err = res;
      b->err_at = b->done;
      return;
    }
  }
  PQclear(res);
}

/*
 * Takes every result libpq can hand out without reading the socket.  Returns
 * when nothing is outstanding, when the next result needs more input, or
 * when the connection is gone.  PQgetResult is only called when PQisBusy
 * says it will not block (it would wait without our deadline), and only
 * while something is outstanding (in pipeline mode it returns NULL both to
 * end a command's results and when there is nothing at all).
 */
static void collect(batch *b) {
  while (!b->fail && (b->done < b->queued || b->synced < b->syncs)) {
    PGresult *res;
    if (PQisBusy(b->pg))
      return;
    res = PQgetResult(b->pg);
    if (res)
      take(b, res); /* a Sync's result is not followed by a NULL */
    else if (PQstatus(b->pg) == CONNECTION_BAD)
      return;
    else
      b->done++;
  }
}

/*
 * Moves the pipeline on: writes what libpq holds and takes the results that
 * are in.  With `all`, returns once every queued Sync has come back;
 * otherwise as soon as libpq's output is written.  While the output cannot
 * all be written, waits for writable *or readable* and reads, so that the
 * server, blocked on its own output, gets to read ours again.  Returns 1, or
 * 0 with b->fail set.
 */
int pgl_batch_drive(batch *b, int all) {
  int fd = PQsocket(b->pg);
  for (;;) {
    int f = PQflush(b->pg), r, watch = -1;
    if (f < 0)
      return lost(b);
    collect(b);
    if (b->fail)
      return 0;
    if (PQstatus(b->pg) == CONNECTION_BAD)
      return lost(b);
    if (all ? b->synced == b->syncs : f == 0)
      return 1;
    if (!f)
      watch = pgl_idle(b->L, fd); /* all is written: the server is at work */
    r = pgl_waitfd_or(b->L, fd, f ? POLLIN | POLLOUT : POLLIN, watch, b->deadline, 0);
    if (r == 3)
      continue; /* the hook's descriptor: it is called again */
    if (r == 0) {
      b->fail = B_TIMEOUT;
      return 0;
    }
    if (r < 0 || !PQconsumeInput(b->pg))
      return lost(b);
    refresh(b);
  }
}

/* ------------------------------------------------------------------ */
/* conn:execmany                                                       */
/* ------------------------------------------------------------------ */

/* Pushes the outcome of a batch whose transport failed; returns the count.
 * The connection is left bad in every case: a pipeline cut off half way
 * cannot be brought back in step.  Cut off while the batch's own COMMIT was
 * the command outstanding (every command before it answered, none failed),
 * the server may have committed: 08007, as for transaction()'s COMMIT. */
static int push_transport_failure(lua_State *L, batch *b) {
  int in_commit = b->commit_at > 0 && !*b->err && b->done >= b->commit_at;
  pgl_unbox_result(b->err);
  if (in_commit) {
    int timedout = b->fail == B_TIMEOUT;
    if (timedout || PQstatus(b->pg) != CONNECTION_BAD)
      pgl_conn_abandon(b->c);
    lua_pushnil(L);
    if (timedout)
      lua_pushfstring(L, "timeout: no answer from the server within %f s to the batch's COMMIT;"
                         " connection closed", b->c->timeout);
    else
      pgl_push_trimmed(L, PQerrorMessage(b->pg));
    lua_pushliteral(L, " (connection lost during the batch's COMMIT: whether it committed is unknown)");
    lua_concat(L, 2);
    lua_pushliteral(L, "08007");
    return 3;
  }
  if (b->fail == B_TIMEOUT) {
    pgl_conn_abandon(b->c);
    lua_pushnil(L);
    lua_pushfstring(L, "timeout: no answer from the server within %f s; connection closed",
                    b->c->timeout);
    lua_pushliteral(L, "08006");
    return 3;
  }
  if (PQstatus(b->pg) == CONNECTION_BAD)
    return pgl_conn_fail(L, b->c, b->what ? b->what : "connection lost");
  pgl_conn_fail(L, b->c, b->what ? b->what : "connection lost"); /* nil, message */
  pgl_conn_abandon(b->c);
  lua_pushliteral(L, "08006");
  return 3;
}

/* Pushes nil, message, sqlstate | nil, tuple index | nil for a failed batch. */
static int push_failure(lua_State *L, batch *b) {
  lua_Integer zero_at = b->first + b->zero_tuple - 1;
  if (*b->err && (!b->zero_tuple || b->err_at < zero_at)) {
    if (pgl_push_result_error(L, *b->err) == 2)
      lua_pushnil(L); /* no SQLSTATE */
    pgl_unbox_result(b->err);
    if (b->err_at >= b->first && b->err_at - b->first < b->sent)
      lua_pushinteger(L, b->err_at - b->first + 1);
    else
      lua_pushnil(L); /* the opening, the statement itself, or the commit */
    return 4;
  }
  pgl_unbox_result(b->err);
  lua_pushnil(L);
  lua_pushfstring(L, "tuple %I: parameter $%d contains a zero byte, which text parameters cannot carry",
                  (LUAI_UACINT)b->zero_tuple, b->zero_param);
  lua_pushnil(L);
  lua_pushinteger(L, b->zero_tuple);
  return 4;
}

/* The option savepoint (default true) of execmany's table at `idx` (or nil).
 * Raises for anything else: options are the programmer's. */
static int savepoint_option(lua_State *L, int idx) {
  int t = lua_type(L, idx), v = 1;
  if (t == LUA_TNONE || t == LUA_TNIL)
    return 1;
  if (t != LUA_TTABLE) /* #3: the caller's count, the connection being self */
    return luaL_error(L, "bad argument #3 to 'execmany' (table expected, got %s)", luaL_typename(L, idx));
  lua_pushnil(L);
  while (lua_next(L, idx)) {
    if (lua_type(L, -2) != LUA_TSTRING || strcmp(lua_tostring(L, -2), "savepoint") != 0)
      return luaL_error(L, "bad argument #3 to 'execmany' (unknown option %s; the option is savepoint)",
                        lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2));
    if (!lua_isboolean(L, -1))
      return luaL_error(L, "bad argument #3 to 'execmany' (option savepoint is a %s, boolean expected)",
                        luaL_typename(L, -1));
    v = lua_toboolean(L, -1);
    lua_pop(L, 1);
  }
  return v;
}

/* The transaction state decides how the batch is wrapped (b->own_tx, and
 * b->nosave cleared outside a transaction).  Returns -1 to go on, else
 * pushes the outcome, which needs no round trip, and returns its count. */
static int tx_state(lua_State *L, batch *b) {
  switch (PQtransactionStatus(b->c->pg)) {
  case PQTRANS_IDLE:
    b->own_tx = 1;
    b->nosave = 0; /* the batch is its own transaction: nothing to keep */
    return -1;
  case PQTRANS_INTRANS:
    b->own_tx = 0;
    return -1;
  case PQTRANS_INERROR: /* what the server would answer, without asking it */
    lua_pushnil(L);
    lua_pushliteral(L, "current transaction is aborted, commands ignored until end of transaction block");
    lua_pushliteral(L, "25P02");
    return 3;
  default:
    lua_pushnil(L);
    lua_pushliteral(L, "connection is busy");
    return 2;
  }
}

/* Checks execmany's arguments into b (c, sql, nosave, ntuples), leaving the
 * connection, the SQL and the list at 1..3.  Returns -1 to go on, else
 * pushes the outcome, which needs no round trip, and returns its count.
 * Raises for misuse. */
static int check_call(lua_State *L, batch *b) {
  size_t len;
  b->c = pgl_checkconn(L, 1);
  b->sql = luaL_checklstring(L, 2, &len);
  luaL_checktype(L, 3, LUA_TTABLE);
  b->nosave = !savepoint_option(L, 4);
  if (strlen(b->sql) != len) { /* libpq would send only what comes before it */
    lua_pushnil(L);
    lua_pushfstring(L, "SQL contains a zero byte (at byte %d); refused, nothing was sent",
                    (int)strlen(b->sql) + 1);
    return 2;
  }
  if (pgl_batch_is_copy(b->sql))
    return luaL_error(L, "bad argument #1 to 'execmany' (COPY cannot run in pipeline mode)");
  lua_settop(L, 3);
  b->ntuples = (lua_Integer)lua_rawlen(L, 3);
  if (b->ntuples == 0) { /* nothing to run: no round trip */
    lua_pushinteger(L, 0);
    return 1;
  }
  if (PQstatus(b->c->pg) != CONNECTION_OK)
    return pgl_conn_fail(L, b->c, "connection lost");
  return tx_state(L, b);
}

/* Pushes the outcome of a batch whose pipeline is closed; returns the count.
 * When pgl_batch_send raised, re-raises its error object (at 5) instead,
 * after dropping what a transport failure pushed. */
static int outcome(lua_State *L, batch *b, int raised, int failed) {
  if (b->fail) {
    int n = push_transport_failure(L, b);
    if (!raised)
      return n;
  }
  if (raised) {
    pgl_unbox_result(b->err);
    lua_settop(L, 5);
    return lua_error(L);
  }
  if (failed)
    return push_failure(L, b);
  lua_pushinteger(L, b->affected);
  return 1;
}

/*
 * conn:execmany(sql, list[, opts]) -> affected | nil, err, sqlstate, index
 *
 * Runs `sql` once for every tuple of `list` (an array of arrays of values,
 * converted as exec() converts its parameters; a tuple's length is its field
 * n when set, else #tuple, so a trailing nil needs n).  Outside a transaction
 * the batch is its own transaction; inside one (txstatus "intrans") it runs
 * under SAVEPOINT pgl_execmany, and a failure rolls back only the batch;
 * with opts.savepoint = false it runs without one (a subtransaction costs
 * the server an XID and its bookkeeping per batch), and a failure leaves the
 * caller's transaction aborted: it can only be rolled back.
 * Returns the sum of the affected-row counts.  On failure nothing of the
 * batch remains and index is the 1-based tuple that failed (nil when the
 * failure was not a tuple's).  Raises for a tuple that is not a table or a
 * value that cannot be sent, after rolling the batch back.
 */
static int conn_execmany(lua_State *L) {
  batch b;
  int raised, failed, n;

  memset(&b, 0, sizeof b);
  n = check_call(L, &b);
  if (n >= 0)
    return n;
  b.L = L;
  b.pg = b.c->pg;
  b.first = b.nosave ? 1 : 2;
  b.err_at = -1;
  refresh(&b);
  b.err = pgl_box_result(L, NULL); /* 4 */
  if (!PQenterPipelineMode(b.pg))
    return pgl_conn_fail(L, b.c, "could not enter pipeline mode");

  lua_pushcfunction(L, pgl_batch_send);
  lua_pushlightuserdata(L, &b);
  lua_pushvalue(L, 3);
  raised = lua_pcall(L, 2, 0, 0) != LUA_OK; /* the error object at 5 */
  failed = pgl_batch_close(&b, raised);
  return outcome(L, &b, raised, failed);
}

/* Adds execmany to the connection's methods (the __index of its metatable). */
void pgl_pipeline_open(lua_State *L) {
  luaL_getmetatable(L, PGL_CONN_MT);
  lua_getfield(L, -1, "__index");
  lua_pushcfunction(L, conn_execmany);
  lua_setfield(L, -2, "execmany");
  lua_pop(L, 2);
}
