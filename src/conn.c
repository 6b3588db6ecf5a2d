/*
 * conn.c -- the pglisten.conn object: a libpq connection in non-blocking
 * mode, with an async notification listener and queries bounded by time.
 * This file holds the object itself (connect, reset, life cycle, the small
 * accessors and the method table); running queries is query.c, exec's
 * statement cache stmtcache.c, and wait/drain notify.c (conn.h ties them).
 *
 * Shape after Lua's liolib.c: the userdata is created closed and gets its
 * metatable before libpq is called, one idempotent close backs close(),
 * __gc and __close, and a closed object raises on use.
 */
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "conn.h"

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
double pgl_deadline_in(double secs) {
  return secs < 0 ? -1 : pgl_monotonic() + secs;
}

/* An optional timeout argument: -1 when absent, else a number >= 0. */
double pgl_opt_timeout(lua_State *L, int idx) {
  double t;
  if (lua_isnoneornil(L, idx))
    return -1;
  t = luaL_checknumber(L, idx);
  luaL_argcheck(L, t >= 0, idx, "timeout must not be negative");
  return t;
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
 * Drives PQconnectPoll / PQresetPoll to completion or the deadline, then
 * sets the connection non-blocking (conn.c and repl.c both connect by it).
 * Returns 1 when connected; otherwise pushes nil, message and returns 0.
 * In the host program a stop signal (TERM/INT) ends the wait at once with
 * the message "interrupted", as does one that came before the connect
 * began: a program on its way out opens no new session.  HUP and USR1 do
 * not end it (their flags wait for the host).  The name lookup is libpq's
 * own, blocking, inside PQconnectStart and not covered.
 */
int pgl_drive_connect(lua_State *L, PGconn *pg, PostgresPollingStatusType (*pollfn)(PGconn *),
                      double timeout) {
  double deadline = pgl_deadline_in(timeout);
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  for (;;) {
    int r;
    if (st == PGRES_POLLING_OK)
      break;
    if (st == PGRES_POLLING_FAILED) {
      lua_pushnil(L);
      pgl_push_trimmed(L, PQerrorMessage(pg));
      return 0;
    }
    r = pgl_waitfd(L, PQsocket(pg), st == PGRES_POLLING_READING ? POLLIN : POLLOUT, deadline,
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
    st = pollfn(pg);
  }
  if (PQsetnonblocking(pg, 1) != 0) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(pg));
    return 0;
  }
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
  double t = pgl_opt_timeout(L, 2);
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
  if (pgl_stopping(L)) { /* as pgl_drive_connect would, but without the network */
    lua_pushnil(L);
    lua_pushliteral(L, "interrupted");
    return 2;
  }
  pgl_stmts_forget(c); /* a new session has none of them */
  if (!PQresetStart(c->pg)) {
    lua_pushnil(L);
    pgl_push_trimmed(L, PQerrorMessage(c->pg));
    return 2;
  }
  if (!pgl_drive_connect(L, c->pg, PQresetPoll, timeout)) {
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
  pgl_stmts_forget(c);
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
 * nil, "interrupted" when the host program got a stop signal (pgl_drive_connect).
 */
int pgl_conn_connect(lua_State *L) {
  const char *conninfo = pgl_conninfo_arg(L, 1, 1);
  double timeout = luaL_optnumber(L, 2, 10);
  pgl_conn *c;
  luaL_argcheck(L, timeout > 0, 2, "timeout must be positive");
  if (!conninfo)
    return 2;
  if (pgl_stopping(L)) { /* as pgl_drive_connect would, but without DNS or a socket */
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
  if (!pgl_drive_connect(L, c->pg, PQconnectPoll, timeout)) {
    conn_release(c);
    return 2;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Registration                                                        */
/* ------------------------------------------------------------------ */

static const luaL_Reg conn_methods[] = {
  {"exec", pgl_conn_exec},
  {"exec_upto", pgl_conn_exec_upto},
  {"statement_cache", pgl_conn_statement_cache},
  {"interruptible", conn_interruptible},
  {"ping", pgl_conn_ping},
  {"wait", pgl_conn_wait},
  {"drain", pgl_conn_drain},
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
