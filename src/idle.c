/*
 * idle.c -- the wait hook: a Lua function the runner sets so that the time a
 * query spends waiting for its server's answer does other work, e.g. read and
 * decode the replication stream ahead while a target database executes the
 * batch a handler sent it.  Without it the runner and the target take turns,
 * and the walsender stalls once the runner's socket buffer is full.
 *
 * core.set_wait_hook(fn | nil) -> the previous hook (or nil)
 *
 * The hook is called with no arguments by conn:exec() and conn:execmany()
 * when everything is written and they are about to wait for the answer (never
 * while output is still to be written: the server would wait for it).  It is
 * called again while it returns true (it has more to do) and the answer has
 * not come, up to PGL_IDLE_MAX times in a row; a hook that returns a file
 * descriptor (an integer >= 0) has nothing to do now and is called again
 * when that descriptor becomes readable before the answer comes (the wait
 * watches both; the answer first).  It is not called from a wait
 * inside itself, whatever hook it sets meanwhile (that one is called from
 * the next wait on).  Each call must be short and must not raise: an error it
 * raises is dropped, and the hook is removed so that it cannot fail every
 * wait (the runner's hook catches its own errors).
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>

#include "pgl.h"

/* hook calls per wait at most (each reads a bounded part of a stream) */
#define PGL_IDLE_MAX 64

static const char hook_key = 'h';
static const char busy_key = 'b'; /* true while the hook runs */

/* Runs the hook (on top, popped): its first result's truth, 0 when it
 * raised (it is then removed, unless it set another meanwhile); *watch is
 * the descriptor it returned, or -1. */
static int run_hook(lua_State *L, int *watch) {
  int more, ok;
  lua_Integer w;
  *watch = -1;
  lua_pushboolean(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &busy_key);
  lua_pushvalue(L, -1);
  ok = lua_pcall(L, 0, 1, 0) == LUA_OK;
  lua_pushnil(L);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &busy_key);
  if (!ok) {
    lua_pop(L, 1); /* the error */
    lua_rawgetp(L, LUA_REGISTRYINDEX, &hook_key);
    if (lua_rawequal(L, -1, -2)) {
      lua_pushnil(L);
      lua_rawsetp(L, LUA_REGISTRYINDEX, &hook_key);
    }
    lua_pop(L, 2);
    return 0;
  }
  lua_remove(L, -2); /* the hook */
  if (lua_isinteger(L, -1)) {
    w = lua_tointeger(L, -1);
    more = 0;
    if (w >= 0 && w <= INT_MAX)
      *watch = (int)w;
  } else {
    more = lua_toboolean(L, -1);
  }
  lua_pop(L, 1);
  return more;
}

int pgl_idle(lua_State *L, int fd) {
  int i;
  for (i = 0; i < PGL_IDLE_MAX; i++) {
    struct pollfd p;
    int r, busy, watch;
    if (!lua_checkstack(L, 4))
      return -1;
    lua_rawgetp(L, LUA_REGISTRYINDEX, &busy_key);
    busy = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (busy)
      return -1; /* a wait inside the hook */
    if (i > 0) { /* the answer is in: stop at once */
      p.fd = fd;
      p.events = POLLIN;
      p.revents = 0;
      do
        r = poll(&p, 1, 0);
      while (r < 0 && errno == EINTR);
      if (r != 0)
        return -1;
    }
    if (lua_rawgetp(L, LUA_REGISTRYINDEX, &hook_key) != LUA_TFUNCTION) {
      lua_pop(L, 1);
      return -1;
    }
    if (!run_hook(L, &watch))
      return watch;
  }
  return -1;
}

/* core.set_wait_hook(fn | nil) -> the previous hook, or nil */
int pgl_set_wait_hook(lua_State *L) {
  if (!lua_isnoneornil(L, 1))
    luaL_checktype(L, 1, LUA_TFUNCTION);
  lua_settop(L, 1);
  lua_rawgetp(L, LUA_REGISTRYINDEX, &hook_key);
  lua_pushvalue(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &hook_key);
  return 1;
}
