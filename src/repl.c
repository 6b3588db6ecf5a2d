/*
 * repl.c -- the pglisten.replication object: a replication=database libpq
 * connection that runs replication commands, streams a logical slot with
 * the pgoutput plugin (START_REPLICATION ... LOGICAL, PGRES_COPY_BOTH) and
 * sends Standby Status Updates.  This file: connect, commands, start, life
 * cycle; replstream.c: read, confirm, finish; pgoutput.c decodes.
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
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "repl.h"

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

pgl_repl *pgl_repl_check(lua_State *L, int idx) {
  pgl_repl *c = (pgl_repl *)luaL_checkudata(L, idx, PGL_REPL_MT);
  if (c->pg == NULL)
    luaL_error(L, "attempt to use a closed connection");
  return c;
}

/* nil, "what: libpq's message"[, "08006" when the connection is gone]. */
int pgl_repl_fail(lua_State *L, pgl_repl *c, const char *what) {
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
void pgl_repl_abandon(pgl_repl *c) {
  PGresult *res;
  int fd = PQsocket(c->pg);
  if (fd >= 0)
    shutdown(fd, SHUT_RDWR);
  (void)PQconsumeInput(c->pg);
  while ((res = PQgetResult(c->pg)) != NULL)
    PQclear(res);
  c->copying = 0;
}

int pgl_repl_timedout(lua_State *L, pgl_repl *c, const char *what) {
  pgl_repl_abandon(c);
  lua_pushnil(L);
  lua_pushfstring(L, "timeout: %s took more than %f s", what, c->timeout);
  lua_pushliteral(L, "08006");
  return 3;
}

/* Flushes and waits until a result is ready.  1 when ready, 0 on timeout,
 * -1 when the connection failed. */
int pgl_repl_await(lua_State *L, pgl_repl *c, double deadline) {
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

/* libpq's notices (server NOTICEs, its own complaints after an abandoned
 * COPY) are dropped: the default processor would write them to stderr. */
static void quiet(void *arg, const char *message) {
  (void)arg;
  (void)message;
}

/* ------------------------------------------------------------------ */
/* Connecting                                                          */
/* ------------------------------------------------------------------ */

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
  PQsetNoticeProcessor(c->pg, quiet, NULL);
  if (!pgl_drive_connect(L, c->pg, PQconnectPoll, timeout)) {
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
 * NULL with *nret the count.  A COPY result ends the collection.
 */
static PGresult *run(lua_State *L, pgl_repl *c, const char *sql, int *nret) {
  double deadline = pgl_monotonic() + c->timeout;
  PGresult **box, **err;
  if (c->copying)
    luaL_error(L, "replication connection is streaming: finish() it first");
  if (!PQsendQuery(c->pg, sql)) {
    *nret = pgl_repl_fail(L, c, "could not send command");
    return NULL;
  }
  box = pgl_box_result(L, NULL);
  err = pgl_box_result(L, NULL);
  for (;;) {
    int w = pgl_repl_await(L, c, deadline);
    PGresult *res;
    if (w <= 0) {
      *nret = w == 0 ? pgl_repl_timedout(L, c, "replication command") : pgl_repl_fail(L, c, "command failed");
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
    if (PQresultStatus(res) == PGRES_COPY_BOTH || PQresultStatus(res) == PGRES_COPY_OUT ||
        PQresultStatus(res) == PGRES_COPY_IN)
      break; /* libpq hands out a COPY result again and again until the COPY ends */
  }
  if (*err) {
    *nret = pgl_push_result_error(L, *err);
    return NULL;
  }
  lua_pop(L, 1);
  if (!*box) {
    *nret = pgl_repl_fail(L, c, "command returned no result");
    return NULL;
  }
  return *box;
}

/* repl:command(sql) -> rows | nil, err[, sqlstate]  (rows as exec's) */
static int repl_command(lua_State *L) {
  pgl_repl *c = pgl_repl_check(L, 1);
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
    lua_pushfstring(L, "command returned %s, which command() does not handle "
                    "(the connection is abandoned)", PQresStatus(PQresultStatus(res)));
    pgl_repl_abandon(c);
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
lua_Integer pgl_repl_checklsn(lua_State *L, int idx) {
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
  pgl_repl *c = pgl_repl_check(L, 1);
  size_t slen;
  const char *slot = luaL_checklstring(L, 2, &slen);
  lua_Integer lsn = pgl_repl_checklsn(L, 3);
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
    return pgl_repl_fail(L, c, "could not quote a name");
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
/* Polling, introspection, life cycle                                  */
/* ------------------------------------------------------------------ */

static int repl_pollfd(lua_State *L) {
  lua_pushinteger(L, PQsocket(pgl_repl_check(L, 1)->pg));
  return 1;
}

/* cqueues convention: "r", or "rw" while libpq holds unsent data. */
static int repl_events(lua_State *L) {
  pgl_repl *c = pgl_repl_check(L, 1);
  lua_pushstring(L, PQflush(c->pg) == 1 ? "rw" : "r");
  return 1;
}

/* cqueues convention: no timer of its own (the caller's policy). */
static int repl_timeout(lua_State *L) {
  pgl_repl_check(L, 1);
  lua_pushnil(L);
  return 1;
}

static int repl_pid(lua_State *L) {
  lua_pushinteger(L, PQbackendPID(pgl_repl_check(L, 1)->pg));
  return 1;
}

/* repl:streaming() -> true between start() and the end of the stream. */
static int repl_streaming(lua_State *L) {
  lua_pushboolean(L, pgl_repl_check(L, 1)->copying);
  return 1;
}

/* repl:relations() -> the relation map (relid -> relation), live. */
static int repl_relations(lua_State *L) {
  pgl_repl_check(L, 1);
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
  {"read", pgl_repl_read},
  {"confirm", pgl_repl_confirm},
  {"finish", pgl_repl_finish},
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
