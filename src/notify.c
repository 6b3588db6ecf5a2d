/*
 * notify.c -- conn:wait and conn:drain, the notifications of a
 * pglisten.conn.
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

#include "conn.h"

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
  double deadline = pgl_deadline_in(timeout);
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

/* conn:wait([timeout]) -> note | nil, "timeout" | nil, err */
int pgl_conn_wait(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  return next_notify(L, c, pgl_opt_timeout(L, 2));
}

/*
 * conn:drain(max [, into]) -> array of up to `max` notes that are already
 * here (libpq's queue, then whatever the socket has without waiting), in
 * server order; n = count.  Never blocks.  Returns nil, err when the
 * connection is lost before any note was taken.
 */
int pgl_conn_drain(lua_State *L) {
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
