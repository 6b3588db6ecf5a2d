/*
 * pipeline_send.c -- the sending side of conn:execmany (pipeline.c): the
 * commands queued in the order pipeline.c's opening comment lists them,
 * the tuples converted one at a time, and the close of the pipeline
 * (commit or roll back, end a failed transaction block, leave pipeline
 * mode).  Results are taken by pgl_batch_drive, in pipeline.c.
 */
#include "pipeline.h"

#define FLUSH_BYTES 32768    /* about this much queued: write it, read answers */
#define MAX_PARAMS 65535     /* the protocol's limit per statement */

/* ------------------------------------------------------------------ */
/* Sending                                                             */
/* ------------------------------------------------------------------ */

static int send_failed(batch *b, const char *what) {
  b->fail = B_SEND;
  b->what = what;
  return 0;
}

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
  return pgl_batch_drive(b, 1);
}

/*
 * Whether the first keyword of `sql`, after white space and comments, is
 * COPY.  COPY cannot run in a pipeline: the messages queued behind it reach
 * a server that reads COPY data, which ends the connection (protocol
 * violation).  The first keyword decides: no other statement starts COPY.
 */
int pgl_batch_is_copy(const char *s) {
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
int pgl_batch_send(lua_State *L) {
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
      if (!pgl_batch_drive(b, 0))
        return 0;
    }
  }
  lua_settop(L, base);
  return 0;
}

/* ------------------------------------------------------------------ */
/* Closing the pipeline                                                */
/* ------------------------------------------------------------------ */

/*
 * After pgl_batch_send (`raised`: it raised): commits what was all sent,
 * else rolls back; a failed transaction block outlives the Sync, so it is
 * ended by a second, short pipeline; then leaves pipeline mode.  Nothing is
 * queued once the transport failed (b->fail).  Returns 1 when the batch
 * failed: it raised, a string held a zero byte, or a command failed.
 */
int pgl_batch_close(batch *b, int raised) {
  int failed;

  /* close the first pipeline: commit what was all sent, else roll back */
  if (!b->fail) {
    if (!raised && !b->zero_tuple && b->err_at < 0 && b->sent == b->ntuples) {
      b->commit_at = b->own_tx ? b->queued : 0;
      if (b->nosave)
        (void)sync_all(b);
      else
        (void)(queue(b, b->own_tx ? "COMMIT" : "RELEASE SAVEPOINT " PGL_SAVEPOINT) && sync_all(b));
    }
    else
      (void)(queue_rollback(b) && sync_all(b));
  }
  failed = raised || b->zero_tuple || *b->err;
  /* a failed transaction block outlives the Sync: end it */
  if (!b->fail && failed && !b->nosave) {
    PGTransactionStatusType tx = PQtransactionStatus(b->pg);
    if (b->own_tx ? tx != PQTRANS_IDLE : tx == PQTRANS_INERROR)
      (void)(queue_rollback(b) && sync_all(b));
  }
  if (!b->fail && !PQexitPipelineMode(b->pg))
    send_failed(b, "could not leave pipeline mode");
  return failed;
}
