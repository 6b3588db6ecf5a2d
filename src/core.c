/*
 * core.c -- luaopen_pglisten_core: the module table, clocks, waiting on a
 * descriptor, and the hooks the Lua facade installs (JSON codec, null).
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pgl.h"

#ifndef PGL_VERSION
#define PGL_VERSION "0.0.0-dev"
#endif

#if defined(__GNUC__)
#define PGL_EXPORT __attribute__((visibility("default")))
#else
#define PGL_EXPORT
#endif

const char pgl_key_encode = 0;
const char pgl_key_decode = 0;
const char pgl_key_null = 0;

/*
 * A host program (lua-pglisten) that wants waits to end when a signal
 * arrives stores, in the registry, a lightuserdata pointing to its
 * `volatile sig_atomic_t` flag under PGL_SIGFLAG and the read end of its
 * self-pipe (the signal handler writes a byte to it) under PGL_SIGFD.  An
 * interruptible wait then polls that pipe beside the socket and returns
 * "interrupted" while the flag is set: no signal is missed, even one that
 * lands just before poll().  Without them EINTR is retried, as a library
 * must.
 *
 * A connect waits for a stop signal only (PGL_WAIT_STOP): the host also
 * stores, under PGL_STOPFLAG, a pointer to its count of stop signals (TERM,
 * INT), which no one resets.  A HUP or USR1 that arrives meanwhile leaves
 * its flag for the host to read later; the wait only empties the pipe, so
 * that the pending byte does not wake poll() again and again.
 */
#define PGL_SIGFLAG  "pglisten.sigflag"
#define PGL_SIGFD    "pglisten.sigfd"
#define PGL_STOPFLAG "pglisten.stopflag"

/* ------------------------------------------------------------------ */
/* Clocks and waiting                                                  */
/* ------------------------------------------------------------------ */

double pgl_monotonic(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double pgl_realtime(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (double)ts.tv_sec + (double)(ts.tv_nsec / 1000) / 1e6;
}

int pgl_interrupted(lua_State *L) {
  volatile sig_atomic_t *flag;
  int set;
  if (lua_getfield(L, LUA_REGISTRYINDEX, PGL_SIGFLAG) != LUA_TLIGHTUSERDATA) {
    lua_pop(L, 1);
    return 0;
  }
  flag = (volatile sig_atomic_t *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  set = flag && *flag;
  return set;
}

int pgl_stopping(lua_State *L) {
  volatile sig_atomic_t *stops;
  if (lua_getfield(L, LUA_REGISTRYINDEX, PGL_STOPFLAG) != LUA_TLIGHTUSERDATA) {
    lua_pop(L, 1);
    return 0;
  }
  stops = (volatile sig_atomic_t *)lua_touserdata(L, -1);
  lua_pop(L, 1);
  return stops && *stops;
}

/* Does a signal end a wait of kind `interruptible`? */
static int wait_ends(lua_State *L, int interruptible) {
  return interruptible == PGL_WAIT_STOP ? pgl_stopping(L) : pgl_interrupted(L);
}

/* Empties the host's self-pipe (non-blocking) without touching its flags. */
static void drain_pipe(int fd) {
  char buf[64];
  while (read(fd, buf, sizeof buf) > 0)
    ;
}

/* Milliseconds until `deadline` for poll(), rounded up so we never wake early. */
static int ms_until(double deadline) {
  double left;
  if (deadline < 0)
    return -1;
  left = deadline - pgl_monotonic();
  if (left <= 0)
    return 0;
  if (left > 86400.0)
    return 86400000;
  return (int)ceil(left * 1000.0);
}

static int sigfd(lua_State *L) {
  int fd = -1;
  if (lua_getfield(L, LUA_REGISTRYINDEX, PGL_SIGFD) == LUA_TNUMBER)
    fd = (int)lua_tointeger(L, -1);
  lua_pop(L, 1);
  return fd;
}

/* pgl_waitfd, and also readable `extra` (when >= 0; a descriptor poll()
 * calls invalid is left out): 3 when extra is readable and fd is not. */
int pgl_waitfd_or(lua_State *L, int fd, short events, int extra, double deadline, int interruptible) {
  struct pollfd p[3];
  nfds_t n = 1;
  int si = -1, ei = -1;
  if (fd < 0) {
    errno = EBADF;
    return -1;
  }
  p[0].fd = fd;
  p[0].events = events;
  if (interruptible) {
    if (wait_ends(L, interruptible))
      return -2;
    p[n].fd = sigfd(L);
    p[n].events = POLLIN;
    if (p[n].fd >= 0)
      si = (int)n++;
  }
  if (extra >= 0) {
    p[n].fd = extra;
    p[n].events = POLLIN;
    ei = (int)n++;
  }
  for (;;) {
    int r;
    nfds_t i;
    for (i = 0; i < n; i++)
      p[i].revents = 0;
    r = poll(p, n, ms_until(deadline));
    if (r > 0) {
      if (si >= 0 && p[si].revents) {
        if (wait_ends(L, interruptible))
          return -2; /* the host drains the pipe when it reads its signals */
        if (interruptible == PGL_WAIT_STOP)
          drain_pipe(p[si].fd); /* HUP/USR1: their flags stay for the host */
      }
      if (p[0].revents)
        return 1; /* readable, writable, or hung up: the caller's libpq call tells which */
      if (ei >= 0 && (p[ei].revents & POLLNVAL))
        n = (nfds_t)ei, ei = -1; /* not a descriptor: wait for the rest (it was the last) */
      else if (ei >= 0 && p[ei].revents)
        return deadline >= 0 && pgl_monotonic() >= deadline ? 0 : 3; /* a busy extra ends no deadline */
      continue;
    }
    if (r == 0) {
      if (deadline >= 0 && pgl_monotonic() < deadline)
        continue; /* woke a hair early */
      return 0;
    }
    if (errno != EINTR)
      return -1;
    if (interruptible && wait_ends(L, interruptible))
      return -2;
  }
}

int pgl_waitfd(lua_State *L, int fd, short events, double deadline, int interruptible) {
  return pgl_waitfd_or(L, fd, events, -1, deadline, interruptible);
}

/* ------------------------------------------------------------------ */
/* Module functions                                                    */
/* ------------------------------------------------------------------ */

/* core.now() -> seconds since the epoch, microsecond resolution */
static int core_now(lua_State *L) {
  lua_pushnumber(L, pgl_realtime());
  return 1;
}

/* core.monotonic() -> seconds on a clock that never jumps */
static int core_monotonic(lua_State *L) {
  lua_pushnumber(L, pgl_monotonic());
  return 1;
}

/* core.sleep(seconds) -> true | nil, "interrupted" (a runner signal only) */
static int core_sleep(lua_State *L) {
  double secs = luaL_checknumber(L, 1), deadline;
  int fd;
  if (!(secs > 0)) {
    lua_pushboolean(L, 1);
    return 1;
  }
  deadline = pgl_monotonic() + secs;
  fd = sigfd(L);
  /* on the host's signal pipe: wakes at once for a signal */
  if (fd >= 0 && pgl_waitfd(L, fd, POLLIN, deadline, 1) == -2) {
    lua_pushnil(L);
    lua_pushliteral(L, "interrupted");
    return 2;
  }
  for (;;) { /* no pipe (a plain library user), or a byte without the flag */
    double left = deadline - pgl_monotonic();
    struct timespec req;
    if (left <= 0)
      break;
    req.tv_sec = (time_t)left;
    req.tv_nsec = (long)((left - (double)req.tv_sec) * 1e9);
    if (nanosleep(&req, NULL) != 0 && errno != EINTR)
      break;
  }
  lua_pushboolean(L, 1);
  return 1;
}

/*
 * core.setup(encode, decode, null): the JSON encoder used for table
 * parameters, the non-raising decoder used for json/jsonb columns, and the
 * value SQL NULL is returned as.
 */
static int core_setup(lua_State *L) {
  luaL_checktype(L, 1, LUA_TFUNCTION);
  luaL_checktype(L, 2, LUA_TFUNCTION);
  luaL_checkany(L, 3);
  lua_pushvalue(L, 1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &pgl_key_encode);
  lua_pushvalue(L, 2);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &pgl_key_decode);
  lua_pushvalue(L, 3);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
  return 0;
}

/*
 * core.intify(v) -> v: turns every float with an exact integer value inside
 * a decoded JSON value into a Lua integer, in place.  lua-cjson 2.1.0 decodes
 * all numbers as floats, so {"id":1} would otherwise give id = 1.0, which
 * prints and formats as "1.0".  Floats beyond 2^53 were already rounded by
 * the decoder and stay floats.  Used for a channel's decode = "cjson"; the
 * default decoder (json.c) makes integers itself.
 */
static void intify(lua_State *L, int idx, int depth) {
  if (depth > 1000)
    luaL_error(L, "JSON value nested too deeply");
  luaL_checkstack(L, 4, "JSON value nested too deeply");
  lua_pushnil(L);
  while (lua_next(L, idx) != 0) {
    int t = lua_type(L, -1);
    if (t == LUA_TNUMBER && !lua_isinteger(L, -1)) {
      lua_Number x = lua_tonumber(L, -1);
      if (x >= -9007199254740992.0 && x <= 9007199254740992.0 && floor(x) == x) {
        lua_pushvalue(L, -2);
        lua_pushinteger(L, (lua_Integer)x);
        lua_rawset(L, idx);
      }
    } else if (t == LUA_TTABLE) {
      intify(L, lua_gettop(L), depth + 1);
    }
    lua_pop(L, 1);
  }
}

static int core_intify(lua_State *L) {
  if (lua_type(L, 1) == LUA_TTABLE)
    intify(L, 1, 0);
  else if (lua_type(L, 1) == LUA_TNUMBER && !lua_isinteger(L, 1)) {
    lua_Number x = lua_tonumber(L, 1);
    if (x >= -9007199254740992.0 && x <= 9007199254740992.0 && floor(x) == x)
      lua_pushinteger(L, (lua_Integer)x);
    return 1;
  }
  lua_settop(L, 1);
  return 1;
}

/*
 * core.poll(fds [, timeout]) -> ready | nil, "timeout" | nil, "interrupted"
 * The runner's loop waits here on every source's socket at once, and on the
 * host's signal pipe (a signal ends the wait, as in pgl_waitfd).  `fds` is an
 * array whose items are a descriptor (wait to read) or `{fd, "r"|"w"|"rw"}`.
 * `ready` is an array of the 1-based indices that are ready (readable,
 * writable, hung up or in error: the source's own libpq call tells which).
 */
#define PGL_POLL_MAX 16
static int core_poll(lua_State *L) {
  struct pollfd p[PGL_POLL_MAX + 1];
  lua_Integer n = 0, i;
  double deadline = -1;
  int sfd, base, k;
  luaL_checktype(L, 1, LUA_TTABLE);
  if (!lua_isnoneornil(L, 2)) {
    double t = luaL_checknumber(L, 2);
    luaL_argcheck(L, t >= 0, 2, "timeout must not be negative");
    deadline = pgl_monotonic() + t;
  }
  n = (lua_Integer)lua_rawlen(L, 1);
  luaL_argcheck(L, n <= PGL_POLL_MAX, 1, "too many descriptors (at most 16)");
  for (i = 0; i < n; i++) {
    const char *ev = "r";
    lua_Integer fd;
    if (lua_rawgeti(L, 1, i + 1) == LUA_TTABLE) {
      lua_rawgeti(L, -1, 1);
      lua_rawgeti(L, -2, 2);
      fd = lua_isinteger(L, -2) ? lua_tointeger(L, -2) : -1;
      ev = lua_isstring(L, -1) ? lua_tostring(L, -1) : "?";
      lua_pop(L, 2);
    } else {
      fd = lua_isinteger(L, -1) ? lua_tointeger(L, -1) : -1;
    }
    lua_pop(L, 1);
    if (fd < 0 || fd > INT_MAX || (strcmp(ev, "r") && strcmp(ev, "w") && strcmp(ev, "rw")))
      return luaL_argerror(L, 1, "items must be descriptors >= 0 or {fd, \"r\"|\"w\"|\"rw\"}");
    p[i].fd = (int)fd;
    p[i].events = (short)((strchr(ev, 'r') ? POLLIN : 0) | (strchr(ev, 'w') ? POLLOUT : 0));
  }
  base = (int)n;
  sfd = sigfd(L);
  if (sfd >= 0) {
    p[n].fd = sfd;
    p[n].events = POLLIN;
    n++;
  }
  for (;;) {
    int r;
    if (pgl_interrupted(L))
      break;
    for (i = 0; i < n; i++)
      p[i].revents = 0;
    r = poll(p, (nfds_t)n, ms_until(deadline));
    if (r < 0 && errno != EINTR) {
      lua_pushnil(L);
      lua_pushfstring(L, "poll failed: %s", strerror(errno));
      return 2;
    }
    if (r > 0) {
      lua_createtable(L, r, 0);
      for (i = 0, k = 0; i < base; i++)
        if (p[i].revents)
          { lua_pushinteger(L, i + 1); lua_rawseti(L, -2, ++k); }
      if (k > 0)
        return 1;
      lua_pop(L, 1); /* only the signal pipe: interrupted when the flag is set */
      continue;
    }
    if (r == 0 && !(deadline >= 0 && pgl_monotonic() < deadline)) {
      lua_pushnil(L);
      lua_pushliteral(L, "timeout");
      return 2;
    }
  }
  lua_pushnil(L);
  lua_pushliteral(L, "interrupted");
  return 2;
}

static int core_libpq_version(lua_State *L) {
  lua_pushinteger(L, PQlibVersion());
  return 1;
}

static const luaL_Reg core_funcs[] = {
  {"sd_notify", pgl_core_sd_notify},
  {"connect", pgl_conn_connect},
  {"replication_connect", pgl_repl_connect},
  {"now", core_now},
  {"monotonic", core_monotonic},
  {"sleep", core_sleep},
  {"poll", core_poll},
  {"setup", core_setup},
  {"intify", core_intify},
  {"set_wait_hook", pgl_set_wait_hook},
  {"libpq_version", core_libpq_version},
  {"conninfo_keys", pgl_core_conninfo_keys},
  {"conninfo_parse", pgl_core_conninfo_parse},
  {NULL, NULL}
};

PGL_EXPORT int luaopen_pglisten_core(lua_State *L) {
  pgl_result_open(L);
  pgl_conn_open(L);
  pgl_pipeline_open(L);
  pgl_repl_open(L);
  /* defaults until the facade calls setup(): NULL as a null lightuserdata,
   * no JSON (tables as parameters raise, json columns stay strings) */
  lua_pushlightuserdata(L, NULL);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
  luaL_newlib(L, core_funcs);
  luaL_getmetatable(L, PGL_CONN_MT);
  lua_getfield(L, -1, "__index");
  lua_setfield(L, -3, "conn_methods");
  lua_pop(L, 1);
  pgl_json_open(L);
  pgl_pgoutput_open(L);
  lua_pushliteral(L, PGL_VERSION);
  lua_setfield(L, -2, "_VERSION");
  return 1;
}
