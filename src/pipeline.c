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
 * the server always gets to write (drive()).  Taking the results as they come
 * also keeps libpq's input buffer small and lets us stop converting tuples
 * once one has failed.
 *
 * Notifications that arrive meanwhile are parsed by libpq into its queue and
 * left there for conn:wait()/drain(); nothing here calls PQnotifies.
 */
#include <errno.h>
#include <poll.h>
#include <string.h>

#include "pgl.h"

#define PGL_SAVEPOINT "pgl_execmany"
#define FLUSH_BYTES 32768    /* about this much queued: write it, read answers */
#define MAX_PARAMS 65535     /* the protocol's limit per statement */

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

static int send_failed(batch *b, const char *what) {
  b->fail = B_SEND;
  b->what = what;
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
static int drive(batch *b, int all) {
  int fd = PQsocket(b->pg);
  for (;;) {
    int f = PQflush(b->pg), r;
    if (f < 0)
      return lost(b);
    collect(b);
    if (b->fail)
      return 0;
    if (PQstatus(b->pg) == CONNECTION_BAD)
      return lost(b);
    if (all ? b->synced == b->syncs : f == 0)
      return 1;
    r = pgl_waitfd(b->L, fd, f ? POLLIN | POLLOUT : POLLIN, b->deadline, 0);
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
/* Sending                                                             */
/* ------------------------------------------------------------------ */

/* Queues a statement without parameters (extended protocol, as pipeline
 * mode requires). */
static int queue(batch *b, const char *sql) {
  if (!PQsendQueryParams(b->pg, sql, 0, NULL, NULL, NULL, NULL, 0))
    return send_failed(b, "could not send query");
  b->queued++;
  return 1;
}

/*
 * Without a savepoint nothing can undo the tuples the server has run, so a
 * batch that failed on our side (a value that cannot be sent) makes the
 * server abort the caller's transaction: its COMMIT then rolls back, and
 * half a batch can never commit.  A failure on the server aborted it already.
 */
static int abort_block(batch *b) {
  return queue(b, "DO $pgl$BEGIN RAISE EXCEPTION 'execmany failed (savepoint = false): the transaction is "
                  "aborted' USING ERRCODE = '25P02'; END$pgl$");
}

static int queue_rollback(batch *b) {
  if (b->own_tx)
    return queue(b, "ROLLBACK");
  if (b->nosave)
    return abort_block(b);
  return queue(b, "ROLLBACK TO SAVEPOINT " PGL_SAVEPOINT) &&
         queue(b, "RELEASE SAVEPOINT " PGL_SAVEPOINT);
}

static int sync_all(batch *b) {
  if (!PQpipelineSync(b->pg))
    return send_failed(b, "could not send a pipeline sync");
  b->syncs++;
  return drive(b, 1);
}

/*
 * Whether the first keyword of `sql`, after white space and comments, is
 * COPY.  COPY cannot run in a pipeline: the messages queued behind it reach
 * a server that reads COPY data, which ends the connection (protocol
 * violation).  The first keyword decides: no other statement starts COPY.
 */
static int is_copy(const char *s) {
  int i;
  for (;;) {
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r' || *s == '\f' || *s == '\v')
      s++;
    if (s[0] == '-' && s[1] == '-') {
      while (*s && *s != '\n')
        s++;
    } else if (s[0] == '/' && s[1] == '*') { /* block comments nest */
      int depth = 1;
      for (s += 2; *s && depth > 0; s++) {
        if (s[0] == '/' && s[1] == '*')
          depth++, s++;
        else if (s[0] == '*' && s[1] == '/')
          depth--, s++;
      }
    } else {
      break;
    }
  }
  for (i = 0; i < 4; i++)
    if ((s[i] | 0x20) != "copy"[i])
      return 0;
  return !((s[4] >= 'a' && s[4] <= 'z') || (s[4] >= 'A' && s[4] <= 'Z') ||
           (s[4] >= '0' && s[4] <= '9') || s[4] == '_' || s[4] == '$' || (unsigned char)s[4] >= 0x80);
}

/* The number of values of the tuple at `t`: its field n, else #t. Raises. */
static int tuple_size(lua_State *L, int t, lua_Integer i) {
  lua_Integer n;
  if (!lua_istable(L, t))
    luaL_error(L, "bad argument #2 to 'execmany' (tuple %I is a %s, table expected)",
               (LUAI_UACINT)i, luaL_typename(L, t));
  lua_pushliteral(L, "n");
  if (lua_rawget(L, t) == LUA_TNIL)
    n = (lua_Integer)lua_rawlen(L, t);
  else if (lua_isinteger(L, -1))
    n = lua_tointeger(L, -1);
  else
    return luaL_error(L, "bad argument #2 to 'execmany' (tuple %I: field 'n' is a %s, integer expected)",
                      (LUAI_UACINT)i, luaL_typename(L, -1));
  lua_pop(L, 1);
  if (n < 0 || n > MAX_PARAMS)
    luaL_error(L, "bad argument #2 to 'execmany' (tuple %I has %I values; 0 to %d allowed)",
               (LUAI_UACINT)i, (LUAI_UACINT)n, MAX_PARAMS);
  return (int)n;
}

/* Raises for a value that has no SQL meaning, naming the tuple: exec()'s
 * own check in pgl_params would name a stack slot instead. */
static void check_values(lua_State *L, int first, int n, lua_Integer i) {
  int k;
  for (k = 0; k < n; k++) {
    int t = lua_type(L, first + k);
    if (t == LUA_TLIGHTUSERDATA) {
      int isnull;
      lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
      isnull = lua_rawequal(L, first + k, -1);
      lua_pop(L, 1);
      if (isnull)
        continue;
    } else if (t == LUA_TNIL || t == LUA_TBOOLEAN || t == LUA_TNUMBER || t == LUA_TSTRING ||
               t == LUA_TTABLE) {
      continue;
    }
    luaL_error(L, "bad argument #2 to 'execmany' (tuple %I: cannot send a %s as parameter $%d)",
               (LUAI_UACINT)i, lua_typename(L, t), k + 1);
  }
}

/*
 * Protected (lua_pcall): queues the opening, the Parse and one Bind/Execute
 * per tuple, converting one tuple at a time and popping it once libpq has
 * copied it into its output buffer.  Stops early when a tuple failed on the
 * server already, when a string holds a zero byte, or when the transport
 * failed.  May raise (a tuple of the wrong type, a table the JSON encoder
 * refuses, memory): the caller then closes the pipeline and re-raises.
 * Stack: 1 the batch (light userdata), 2 the list.
 */
static int send_tuples(lua_State *L) {
  batch *b = (batch *)lua_touserdata(L, 1);
  size_t pending = 0;
  lua_Integer i;
  int base = lua_gettop(L);

  if (!b->nosave && !queue(b, b->own_tx ? "BEGIN" : "SAVEPOINT " PGL_SAVEPOINT))
    return 0;
  if (!PQsendPrepare(b->pg, "", b->sql, 0, NULL))
    return send_failed(b, "could not send the statement");
  b->queued++;

  for (i = 1; i <= b->ntuples && b->err_at < 0; i++) {
    const char *const *vals;
    int n, k, nerr = 0;
    lua_rawgeti(L, 2, i); /* base + 1 */
    n = tuple_size(L, base + 1, i);
    luaL_checkstack(L, n + 8, "too many query parameters");
    for (k = 1; k <= n; k++)
      lua_rawgeti(L, base + 1, k); /* base + 2 .. base + 1 + n */
    check_values(L, base + 2, n, i);
    vals = pgl_params(L, base + 2, n, &nerr);
    if (!vals) {
      b->zero_tuple = i;
      b->zero_param = nerr;
      break;
    }
    /* the converted strings sit above the array and the null sentinel */
    for (k = base + n + 4; k <= lua_gettop(L); k++)
      pending += lua_rawlen(L, k);
    pending += 40 + 4 * (size_t)n; /* Bind, Describe, Execute */
    if (!PQsendQueryPrepared(b->pg, "", n, vals, NULL, NULL, 0))
      return send_failed(b, "could not send a tuple");
    b->queued++;
    b->sent++;
    lua_settop(L, base);
    if (pending >= FLUSH_BYTES) {
      pending = 0;
      if (!drive(b, 0))
        return 0;
    }
  }
  lua_settop(L, base);
  return 0;
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
  luaL_checktype(L, idx, LUA_TTABLE);
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
  pgl_conn *c = pgl_checkconn(L, 1);
  size_t len;
  const char *sql = luaL_checklstring(L, 2, &len);
  batch b;
  int raised, failed;

  luaL_checktype(L, 3, LUA_TTABLE);
  memset(&b, 0, sizeof b);
  b.nosave = !savepoint_option(L, 4);
  if (strlen(sql) != len) { /* libpq would send only what comes before it */
    lua_pushnil(L);
    lua_pushfstring(L, "SQL contains a zero byte (at byte %d); refused, nothing was sent",
                    (int)strlen(sql) + 1);
    return 2;
  }
  if (is_copy(sql))
    return luaL_error(L, "bad argument #1 to 'execmany' (COPY cannot run in pipeline mode)");
  lua_settop(L, 3);
  b.ntuples = (lua_Integer)lua_rawlen(L, 3);
  if (b.ntuples == 0) { /* nothing to run: no round trip */
    lua_pushinteger(L, 0);
    return 1;
  }
  if (PQstatus(c->pg) != CONNECTION_OK)
    return pgl_conn_fail(L, c, "connection lost");
  switch (PQtransactionStatus(c->pg)) {
  case PQTRANS_IDLE:
    b.own_tx = 1;
    b.nosave = 0; /* the batch is its own transaction: nothing to keep */
    break;
  case PQTRANS_INTRANS:
    b.own_tx = 0;
    break;
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
  b.L = L;
  b.c = c;
  b.pg = c->pg;
  b.sql = sql;
  b.first = b.nosave ? 1 : 2;
  b.err_at = -1;
  refresh(&b);
  b.err = pgl_box_result(L, NULL); /* 4 */
  if (!PQenterPipelineMode(b.pg))
    return pgl_conn_fail(L, c, "could not enter pipeline mode");

  lua_pushcfunction(L, send_tuples);
  lua_pushlightuserdata(L, &b);
  lua_pushvalue(L, 3);
  raised = lua_pcall(L, 2, 0, 0) != LUA_OK; /* the error object at 5 */

  /* close the first pipeline: commit what was all sent, else roll back */
  if (!b.fail) {
    if (!raised && !b.zero_tuple && b.err_at < 0 && b.sent == b.ntuples) {
      b.commit_at = b.own_tx ? b.queued : 0;
      if (b.nosave)
        (void)sync_all(&b);
      else
        (void)(queue(&b, b.own_tx ? "COMMIT" : "RELEASE SAVEPOINT " PGL_SAVEPOINT) && sync_all(&b));
    }
    else
      (void)(queue_rollback(&b) && sync_all(&b));
  }
  failed = raised || b.zero_tuple || *b.err;
  /* a failed transaction block outlives the Sync: end it */
  if (!b.fail && failed && !b.nosave) {
    PGTransactionStatusType tx = PQtransactionStatus(b.pg);
    if (b.own_tx ? tx != PQTRANS_IDLE : tx == PQTRANS_INERROR)
      (void)(queue_rollback(&b) && sync_all(&b));
  }
  if (!b.fail && !PQexitPipelineMode(b.pg))
    send_failed(&b, "could not leave pipeline mode");

  if (b.fail) {
    int n = push_transport_failure(L, &b);
    if (!raised)
      return n;
  }
  if (raised) {
    pgl_unbox_result(b.err);
    lua_settop(L, 5);
    return lua_error(L);
  }
  if (failed)
    return push_failure(L, &b);
  lua_pushinteger(L, b.affected);
  return 1;
}

/* Adds execmany to the connection's methods (the __index of its metatable). */
void pgl_pipeline_open(lua_State *L) {
  luaL_getmetatable(L, PGL_CONN_MT);
  lua_getfield(L, -1, "__index");
  lua_pushcfunction(L, conn_execmany);
  lua_setfield(L, -2, "execmany");
  lua_pop(L, 2);
}
