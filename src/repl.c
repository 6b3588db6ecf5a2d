/*
 * repl.c -- the pglisten.replication object: a replication=database libpq
 * connection that runs replication commands, streams a logical slot with
 * the pgoutput plugin (START_REPLICATION ... LOGICAL, PGRES_COPY_BOTH) and
 * sends Standby Status Updates.  The messages are decoded by pgoutput.c.
 *
 * Shape of conn.c (after liolib.c): created closed with its metatable set
 * before libpq is called, one idempotent close for close(), __gc and
 * __close.  Reading never blocks: read() takes what the socket has, and
 * pollfd()/events() let the runner's loop wait for more.  Policy (when to
 * confirm, what to do on an error) is the Lua caller's.
 *
 * The object's user value is the relation map (relid -> relation table),
 * which the decoder keeps up to date from the stream's Relation messages.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

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

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static pgl_repl *check_repl(lua_State *L, int idx) {
  pgl_repl *c = (pgl_repl *)luaL_checkudata(L, idx, PGL_REPL_MT);
  if (c->pg == NULL)
    luaL_error(L, "attempt to use a closed connection");
  return c;
}

/* nil, "what: libpq's message"[, "08006" when the connection is gone]. */
static int repl_fail(lua_State *L, pgl_repl *c, const char *what) {
  const char *msg = PQerrorMessage(c->pg);
  lua_pushnil(L);
  lua_pushfstring(L, "%s: ", what);
  pgl_push_trimmed(L, msg && *msg ? msg : "connection failed");
  lua_concat(L, 2);
  if (PQstatus(c->pg) == CONNECTION_BAD) {
    lua_pushliteral(L, "08006");
    return 3;
  }
  return 2;
}

/* After a timeout: shut the socket so that libpq marks the connection bad. */
static void abandon(pgl_repl *c) {
  PGresult *res;
  int fd = PQsocket(c->pg);
  if (fd >= 0)
    shutdown(fd, SHUT_RDWR);
  (void)PQconsumeInput(c->pg);
  while ((res = PQgetResult(c->pg)) != NULL)
    PQclear(res);
  c->copying = 0;
}

static int push_timeout(lua_State *L, pgl_repl *c, const char *what) {
  abandon(c);
  lua_pushnil(L);
  lua_pushfstring(L, "timeout: %s took more than %f s", what, c->timeout);
  lua_pushliteral(L, "08006");
  return 3;
}

/* Flushes and waits until a result is ready.  1 when ready, 0 on timeout,
 * -1 when the connection failed. */
static int await_result(lua_State *L, pgl_repl *c, double deadline) {
  int fd = PQsocket(c->pg), f, r;
  while ((f = PQflush(c->pg)) != 0) {
    if (f < 0)
      return -1;
    r = pgl_waitfd(L, fd, POLLIN | POLLOUT, deadline, 0);
    if (r <= 0)
      return r == 0 ? 0 : -1;
    if (!PQconsumeInput(c->pg))
      return -1;
  }
  while (PQisBusy(c->pg)) {
    r = pgl_waitfd(L, fd, POLLIN, deadline, 0);
    if (r <= 0)
      return r == 0 ? 0 : -1;
    if (!PQconsumeInput(c->pg))
      return -1;
  }
  return 1;
}

static void release(pgl_repl *c) {
  if (c->pg) {
    PQfinish(c->pg);
    c->pg = NULL;
  }
  if (c->pending) {
    PQfreemem(c->pending);
    c->pending = NULL;
  }
  free(c->end_msg);
  c->end_msg = NULL;
  c->copying = 0;
}

/* ------------------------------------------------------------------ */
/* Connecting                                                          */
/* ------------------------------------------------------------------ */

/* Drives PQconnectPoll to the end; 1 when connected, else pushes nil, err.
 * A stop signal of the host program ends the wait ("interrupted"). */
static int drive(lua_State *L, pgl_repl *c, double timeout) {
  double deadline = pgl_monotonic() + timeout;
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  while (st != PGRES_POLLING_OK) {
    int r;
    if (st == PGRES_POLLING_FAILED) {
      lua_pushnil(L);
      pgl_push_trimmed(L, PQerrorMessage(c->pg));
      return 0;
    }
    r = pgl_waitfd(L, PQsocket(c->pg), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline,
                   PGL_WAIT_STOP);
    if (r <= 0) {
      lua_pushnil(L);
      if (r == -2)
        lua_pushliteral(L, "interrupted");
      else if (r == 0)
        lua_pushfstring(L, "timeout: could not connect to the server within %f s", timeout);
      else
        lua_pushfstring(L, "could not connect: poll failed: %s", strerror(errno));
      return 0;
    }
    st = PQconnectPoll(c->pg);
  }
  if (PQsetnonblocking(c->pg, 1) != 0) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    return 0;
  }
  return 1;
}

/*
 * core.replication_connect(conninfo, timeout) -> repl | nil, err
 * conninfo as for core.connect (a URI too: it is expanded as dbname, and
 * replication=database is set after it, so it wins).  timeout (default 10 s)
 * bounds the connect, and each command, start and finish.
 */
int pgl_repl_connect(lua_State *L) {
  const char *conninfo = luaL_optstring(L, 1, "");
  double timeout = luaL_optnumber(L, 2, 10);
  const char *keys[] = {"dbname", "replication", NULL};
  const char *vals[] = {conninfo, "database", NULL};
  pgl_repl *c;
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive");
  if (pgl_stopping(L)) {
    lua_pushnil(L);
    lua_pushliteral(L, "interrupted");
    return 2;
  }
  c = (pgl_repl *)lua_newuserdatauv(L, sizeof *c, 1);
  memset(c, 0, sizeof *c);
  c->timeout = timeout;
  luaL_setmetatable(L, PGL_REPL_MT);
  lua_newtable(L);
  lua_setiuservalue(L, -2, 1);
  c->pg = PQconnectStartParams(keys, vals, 1);
  if (!c->pg || PQstatus(c->pg) == CONNECTION_BAD) {
    lua_pushnil(L);
    if (c->pg)
      pgl_push_trimmed(L, PQerrorMessage(c->pg));
    else
      lua_pushliteral(L, "out of memory allocating a connection");
    release(c);
    return 2;
  }
  if (!drive(L, c, timeout)) {
    release(c);
    return 2;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Commands                                                            */
/* ------------------------------------------------------------------ */

/*
 * Sends sql and waits for its results; the last one is left boxed on the
 * stack and returned.  On failure pushes nil, err[, sqlstate] and returns
 * NULL with *nret the count.  A COPY_BOTH result ends the collection.
 */
static PGresult *run(lua_State *L, pgl_repl *c, const char *sql, int *nret) {
  double deadline = pgl_monotonic() + c->timeout;
  PGresult **box, **err;
  if (c->copying)
    luaL_error(L, "replication connection is streaming: finish() it first");
  if (!PQsendQuery(c->pg, sql)) {
    *nret = repl_fail(L, c, "could not send command");
    return NULL;
  }
  box = pgl_box_result(L, NULL);
  err = pgl_box_result(L, NULL);
  for (;;) {
    int w = await_result(L, c, deadline);
    PGresult *res;
    if (w <= 0) {
      *nret = w == 0 ? push_timeout(L, c, "replication command") : repl_fail(L, c, "command failed");
      return NULL;
    }
    res = PQgetResult(c->pg);
    if (!res)
      break;
    if (PQresultStatus(res) == PGRES_FATAL_ERROR && !*err) {
      *err = res;
      continue;
    }
    pgl_unbox_result(box);
    *box = res;
    if (PQresultStatus(res) == PGRES_COPY_BOTH)
      break;
  }
  if (*err) {
    *nret = pgl_push_result_error(L, *err);
    return NULL;
  }
  lua_pop(L, 1);
  if (!*box) {
    *nret = repl_fail(L, c, "command returned no result");
    return NULL;
  }
  return *box;
}

/* repl:command(sql) -> rows | nil, err[, sqlstate]  (rows as exec's) */
static int repl_command(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  const char *sql = luaL_checkstring(L, 2);
  int n = 0;
  PGresult *res = run(L, c, sql, &n);
  if (!res)
    return n;
  switch (PQresultStatus(res)) {
  case PGRES_TUPLES_OK:
  case PGRES_COMMAND_OK:
  case PGRES_EMPTY_QUERY:
    pgl_push_rows(L, res);
    return 1;
  default:
    lua_pushnil(L);
    lua_pushfstring(L, "command returned %s, which command() does not handle (use start())",
                    PQresStatus(PQresultStatus(res)));
    abandon(c);
    return 2;
  }
}

/* Pushes s as a replication-grammar string literal: quotes doubled,
 * backslashes literal (repl_scanner.l has no E'' strings). */
static void push_literal(lua_State *L, const char *s) {
  luaL_Buffer b;
  luaL_buffinit(L, &b);
  luaL_addchar(&b, '\'');
  for (; *s; s++) {
    if (*s == '\'')
      luaL_addchar(&b, '\'');
    luaL_addchar(&b, *s);
  }
  luaL_addchar(&b, '\'');
  luaL_pushresult(&b);
}

/* Pushes PQescapeIdentifier(s); 0 (nothing pushed) when libpq refused. */
static int push_ident(lua_State *L, pgl_repl *c, const char *s, size_t len) {
  char *q = PQescapeIdentifier(c->pg, s, len);
  if (!q)
    return 0;
  lua_pushstring(L, q); /* may raise: q is leaked only then, on a memory error */
  PQfreemem(q);
  return 1;
}

/* Pushes the publication_names value for opts.publications (a list) or
 * opts.publication (a name): each name quoted as an identifier, joined
 * with commas (pgoutput splits it with SplitIdentifierString).  0 when
 * libpq refused a name (nothing pushed). */
static int push_publications(lua_State *L, pgl_repl *c, int opts) {
  int top = lua_gettop(L), list;
  lua_Integer i, n;
  if (lua_getfield(L, opts, "publications") != LUA_TTABLE) {
    lua_pop(L, 1);
    lua_createtable(L, 1, 0);
    lua_getfield(L, opts, "publication");
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 4, "publication or publications required");
    lua_rawseti(L, -2, 1);
  }
  list = lua_gettop(L);
  n = (lua_Integer)lua_rawlen(L, list);
  luaL_argcheck(L, n > 0 && n <= 1000, 4, "publications: 1 to 1000 names");
  luaL_checkstack(L, (int)(2 * n + 4), "too many publications");
  for (i = 1; i <= n; i++) {
    size_t len;
    const char *name;
    lua_rawgeti(L, list, i);
    name = lua_tolstring(L, -1, &len);
    luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING && len > 0 && strlen(name) == len, 4,
                  "publication names must be non-empty strings without zero bytes");
    lua_pop(L, 1);
    if (!push_ident(L, c, name, len)) {
      lua_settop(L, top);
      return 0;
    }
    if (i < n)
      lua_pushliteral(L, ",");
  }
  lua_concat(L, (int)(2 * n - 1));
  lua_remove(L, list);
  return 1;
}

/* The START_REPLICATION command for slot, lsn, opts (index 4), pushed. */
static int push_start_command(lua_State *L, pgl_repl *c, const char *slot, size_t slen,
                              lua_Integer lsn) {
  lua_Integer proto = 1;
  int messages;
  char at[32];
  snprintf(at, sizeof at, "%" PRIX32 "/%" PRIX32, (uint32_t)((uint64_t)lsn >> 32), (uint32_t)lsn);
  if (lua_getfield(L, 4, "proto_version") != LUA_TNIL)
    proto = luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  luaL_argcheck(L, proto == 1 || proto == 2, 4, "proto_version must be 1 or 2 (no streaming)");
  luaL_argcheck(L, lua_getfield(L, 4, "streaming") == LUA_TNIL, 4, "streaming is not supported");
  luaL_argcheck(L, lua_getfield(L, 4, "binary") == LUA_TNIL, 4, "binary is not supported");
  lua_getfield(L, 4, "messages");
  messages = lua_toboolean(L, -1);
  lua_pop(L, 3);
  if (!push_ident(L, c, slot, slen))
    return 0;
  if (!push_publications(L, c, 4)) {
    lua_pop(L, 1);
    return 0;
  }
  push_literal(L, lua_tostring(L, -1));
  lua_remove(L, -2);
  lua_pushfstring(L, "START_REPLICATION SLOT %s LOGICAL %s (proto_version '%d', "
                  "publication_names %s%s)", lua_tostring(L, -2), at, (int)proto,
                  lua_tostring(L, -1), messages ? ", messages 'true'" : "");
  lua_replace(L, -3);
  lua_pop(L, 1);
  return 1;
}

/* The LSN argument at idx: an integer or an "X/Y" string. */
static lua_Integer check_lsn(lua_State *L, int idx) {
  unsigned hi, lo;
  int n = 0;
  const char *s;
  if (lua_type(L, idx) == LUA_TNUMBER)
    return luaL_checkinteger(L, idx);
  s = luaL_checkstring(L, idx);
  if (sscanf(s, "%8X/%8X%n", &hi, &lo, &n) != 2 || s[n] != '\0' || strpbrk(s, " +-"))
    luaL_argerror(L, idx, "not an LSN");
  return (lua_Integer)(((uint64_t)hi << 32) | lo);
}

/* repl:start(slot, start_lsn, opts) -> true | nil, err[, sqlstate]
 * opts: publication = name or publications = {names}; messages = true;
 * proto_version = 1 (default) or 2. */
static int repl_start(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  size_t slen;
  const char *slot = luaL_checklstring(L, 2, &slen);
  lua_Integer lsn = check_lsn(L, 3);
  PGresult *res;
  int n = 0;
  luaL_checktype(L, 4, LUA_TTABLE);
  if (slen == 0 || slen > 63 || strspn(slot, "abcdefghijklmnopqrstuvwxyz0123456789_") != slen) {
    lua_pushnil(L); /* the server's rule (ReplicationSlotValidateName) */
    lua_pushliteral(L, "invalid replication slot name: only a-z, 0-9 and _, 1 to 63 of them");
    lua_pushliteral(L, "42602");
    return 3;
  }
  if (!push_start_command(L, c, slot, slen, lsn))
    return repl_fail(L, c, "could not quote a name");
  res = run(L, c, lua_tostring(L, -1), &n);
  if (!res)
    return n;
  if (PQresultStatus(res) != PGRES_COPY_BOTH) {
    lua_pushnil(L);
    lua_pushfstring(L, "START_REPLICATION returned %s, not COPY_BOTH",
                    PQresStatus(PQresultStatus(res)));
    return 2;
  }
  free(c->end_msg);
  c->end_msg = NULL;
  c->copying = 1;
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Streaming                                                           */
/* ------------------------------------------------------------------ */

/* The stream ended (PQgetCopyData -1): keeps the final result's error (or
 * "replication stream ended") for end_of_stream() to report. */
static void stream_ended(lua_State *L, pgl_repl *c) {
  PGresult *res;
  const char *msg = NULL, *state = NULL;
  c->copying = 0;
  free(c->end_msg);
  c->end_msg = NULL;
  c->end_state[0] = '\0';
  for (;;) {
    if (await_result(L, c, pgl_monotonic() + c->timeout) <= 0) {
      abandon(c);
      break;
    }
    if ((res = PQgetResult(c->pg)) == NULL)
      break;
    if (PQresultStatus(res) == PGRES_FATAL_ERROR && !c->end_msg) {
      msg = PQresultErrorMessage(res);
      state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
      c->end_msg = strdup(msg && *msg ? msg : "replication stream failed");
      if (state)
        snprintf(c->end_state, sizeof c->end_state, "%s", state);
    }
    PQclear(res);
  }
  if (!c->end_msg)
    c->end_msg = strdup("replication stream ended");
}

static int end_of_stream(lua_State *L, pgl_repl *c) {
  lua_pushnil(L);
  pgl_push_trimmed(L, c->end_msg ? c->end_msg : "replication stream ended");
  if (c->end_state[0]) {
    lua_pushstring(L, c->end_state);
    return 3;
  }
  if (PQstatus(c->pg) == CONNECTION_BAD) {
    lua_pushliteral(L, "08006");
    return 3;
  }
  return 2;
}

/*
 * repl:read([max [, raw]]) -> { message, ... } | nil, err[, sqlstate]
 * Never blocks: the messages the socket has now, up to max (default 1000),
 * possibly none.  With raw, the CopyData payloads as strings, undecoded
 * (the relation map is then not updated).  A malformed message is an error: the stream must be
 * restarted from the last confirmed position.  At the end of the stream
 * the messages read before it come first, the error at the next call.
 */
static int repl_read(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 1000), n = 0;
  int raw = lua_toboolean(L, 3);
  lua_settop(L, 2);
  if (!c->copying) {
    if (c->end_msg)
      return end_of_stream(L, c);
    luaL_error(L, "replication connection is not streaming: start() it first");
  }
  lua_getiuservalue(L, 1, 1); /* 3: the relation map */
  lua_newtable(L);            /* 4: the messages */
  if (!PQconsumeInput(c->pg) && PQstatus(c->pg) == CONNECTION_BAD) {
    c->copying = 0;
    return repl_fail(L, c, "replication stream lost");
  }
  while (n < max) {
    int len = PQgetCopyData(c->pg, &c->pending, 1);
    if (len == 0)
      break;
    if (len == -1) {
      stream_ended(L, c);
      return n > 0 ? 1 : end_of_stream(L, c);
    }
    if (len < 0) {
      c->copying = 0;
      return repl_fail(L, c, "replication stream failed");
    }
    if (raw)
      lua_pushlstring(L, c->pending, (size_t)len);
    else if (pgl_pgoutput_decode(L, c->pending, (size_t)len, 3) != 1) {
      PQfreemem(c->pending);
      c->pending = NULL;
      return 2;
    }
    PQfreemem(c->pending);
    c->pending = NULL;
    lua_rawseti(L, 4, ++n);
  }
  if (n == 0 && PQstatus(c->pg) == CONNECTION_BAD) {
    c->copying = 0;
    return repl_fail(L, c, "replication stream lost");
  }
  return 1;
}

/* Big-endian into p. */
static void put64(char *p, uint64_t v) {
  int i;
  for (i = 7; i >= 0; i--, v >>= 8)
    p[i] = (char)(v & 0xff);
}

/*
 * repl:confirm(written, flushed, applied, reply_requested) -> true | nil,
 * err[, sqlstate]: a Standby Status Update ('r').  LSNs as integers or
 * "X/Y"; flushed and applied default to written.  Returns true, "pending"
 * when libpq could not write it all yet (events() then says "rw").
 */
static int repl_confirm(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  lua_Integer w = check_lsn(L, 2);
  lua_Integer f = lua_isnoneornil(L, 3) ? w : check_lsn(L, 3);
  lua_Integer a = lua_isnoneornil(L, 4) ? f : check_lsn(L, 4);
  char msg[34];
  double now = (pgl_realtime() - PG_EPOCH_UNIX) * 1e6;
  int r;
  if (!c->copying)
    return c->end_msg ? end_of_stream(L, c) : luaL_error(L, "replication connection is not streaming");
  msg[0] = 'r';
  put64(msg + 1, (uint64_t)w);
  put64(msg + 9, (uint64_t)f);
  put64(msg + 17, (uint64_t)a);
  put64(msg + 25, (uint64_t)(int64_t)now);
  msg[33] = (char)lua_toboolean(L, 5);
  if (PQputCopyData(c->pg, msg, (int)sizeof msg) != 1)
    return repl_fail(L, c, "could not send the status update");
  r = PQflush(c->pg);
  if (r < 0)
    return repl_fail(L, c, "could not send the status update");
  lua_pushboolean(L, 1);
  if (r == 1) {
    lua_pushliteral(L, "pending");
    return 2;
  }
  return 1;
}

/* Waits for `events` on the socket until deadline: 1 ready, else pushes
 * nil, err and returns the count as a negative number. */
static int finish_wait(lua_State *L, pgl_repl *c, short events, double deadline) {
  int r = pgl_waitfd(L, PQsocket(c->pg), events, deadline, 0);
  if (r == 0)
    return -push_timeout(L, c, "finishing the stream");
  if (r < 0 || !PQconsumeInput(c->pg))
    return -repl_fail(L, c, "finishing the stream failed");
  return 1;
}

/*
 * repl:finish() -> true | nil, err[, sqlstate]: a clean end of the stream:
 * CopyDone, then what the server still sends is read and dropped up to its
 * end, within the timeout.  The connection can run commands again after.
 */
static int repl_finish(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  double deadline = pgl_monotonic() + c->timeout;
  int r;
  if (!c->copying) {
    lua_pushboolean(L, 1);
    return 1;
  }
  while ((r = PQputCopyEnd(c->pg, NULL)) == 0)
    if ((r = finish_wait(L, c, POLLOUT, deadline)) < 0)
      return -r;
  if (r < 0)
    return repl_fail(L, c, "could not end the stream");
  for (;;) {
    int len = PQgetCopyData(c->pg, &c->pending, 1);
    if (len > 0) {
      PQfreemem(c->pending);
      c->pending = NULL;
    } else if (len == 0) {
      if ((r = finish_wait(L, c, PQflush(c->pg) ? POLLIN | POLLOUT : POLLIN, deadline)) < 0)
        return -r;
    } else if (len == -1) {
      stream_ended(L, c);
      break;
    } else {
      c->copying = 0;
      return repl_fail(L, c, "finishing the stream failed");
    }
  }
  if (c->end_state[0])
    return end_of_stream(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Polling, introspection, life cycle                                  */
/* ------------------------------------------------------------------ */

static int repl_pollfd(lua_State *L) {
  lua_pushinteger(L, PQsocket(check_repl(L, 1)->pg));
  return 1;
}

/* cqueues convention: "r", or "rw" while libpq holds unsent data. */
static int repl_events(lua_State *L) {
  pgl_repl *c = check_repl(L, 1);
  lua_pushstring(L, PQflush(c->pg) == 1 ? "rw" : "r");
  return 1;
}

/* cqueues convention: no timer of its own (the caller's policy). */
static int repl_timeout(lua_State *L) {
  check_repl(L, 1);
  lua_pushnil(L);
  return 1;
}

static int repl_pid(lua_State *L) {
  lua_pushinteger(L, PQbackendPID(check_repl(L, 1)->pg));
  return 1;
}

/* repl:streaming() -> true between start() and the end of the stream. */
static int repl_streaming(lua_State *L) {
  lua_pushboolean(L, check_repl(L, 1)->copying);
  return 1;
}

/* repl:relations() -> the relation map (relid -> relation), live. */
static int repl_relations(lua_State *L) {
  check_repl(L, 1);
  lua_getiuservalue(L, 1, 1);
  return 1;
}

static int repl_close(lua_State *L) {
  release((pgl_repl *)luaL_checkudata(L, 1, PGL_REPL_MT));
  lua_pushboolean(L, 1);
  return 1;
}

static int repl_gc(lua_State *L) {
  release((pgl_repl *)luaL_checkudata(L, 1, PGL_REPL_MT));
  return 0;
}

static int repl_isclosed(lua_State *L) {
  lua_pushboolean(L, ((pgl_repl *)luaL_checkudata(L, 1, PGL_REPL_MT))->pg == NULL);
  return 1;
}

static int repl_tostring(lua_State *L) {
  pgl_repl *c = (pgl_repl *)luaL_checkudata(L, 1, PGL_REPL_MT);
  if (!c->pg)
    lua_pushliteral(L, "pglisten.replication (closed)");
  else
    lua_pushfstring(L, "pglisten.replication (pid %d, %s%s)", PQbackendPID(c->pg),
                    PQstatus(c->pg) == CONNECTION_OK ? "ok" : "bad",
                    c->copying ? ", streaming" : "");
  return 1;
}

static const luaL_Reg repl_methods[] = {
  {"command", repl_command},
  {"start", repl_start},
  {"read", repl_read},
  {"confirm", repl_confirm},
  {"finish", repl_finish},
  {"pollfd", repl_pollfd},
  {"events", repl_events},
  {"timeout", repl_timeout},
  {"pid", repl_pid},
  {"streaming", repl_streaming},
  {"relations", repl_relations},
  {"close", repl_close},
  {"isclosed", repl_isclosed},
  {NULL, NULL}
};

static const luaL_Reg repl_meta[] = {
  {"__gc", repl_gc},
  {"__close", repl_gc},
  {"__tostring", repl_tostring},
  {"__index", NULL},
  {NULL, NULL}
};

void pgl_repl_open(lua_State *L) {
  luaL_newmetatable(L, PGL_REPL_MT);
  luaL_setfuncs(L, repl_meta, 0);
  luaL_newlib(L, repl_methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
}
