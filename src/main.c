/*
 * main.c -- lua-pglisten: the host program.
 *
 * Shaped after Lua 5.4's lua.c: main() creates the state and runs everything
 * under lua_pcall; a message handler adds a traceback; signal handlers only
 * set flags (and write a byte to a self-pipe so that a wait on the database
 * socket wakes at once).  The policy -- options, the handler script, the
 * listen loop, reconnects -- is Lua: pglisten.runner.
 *
 * PGL_LPATH / PGL_CPATH are fixed at build time (the tree the program is
 * installed into) and put ahead of Lua's defaults, so the program finds its
 * own modules with no LUA_PATH set.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#ifndef PGL_LPATH
#define PGL_LPATH "./lua/?.lua;./lua/?/init.lua"
#endif
#ifndef PGL_CPATH
#define PGL_CPATH "./build/?.so"
#endif
#ifndef PGL_VERSION
#define PGL_VERSION "0.0.0-dev"
#endif

#define PROGNAME "lua-pglisten"

/* ------------------------------------------------------------------ */
/* Signals                                                             */
/* ------------------------------------------------------------------ */

static volatile sig_atomic_t sig_any;   /* some signal is waiting to be read */
static volatile sig_atomic_t sig_term;  /* SIGTERM or SIGINT */
static volatile sig_atomic_t sig_hup;
static volatile sig_atomic_t sig_usr1;
static volatile sig_atomic_t stops;     /* SIGTERM/SIGINT seen; never reset */
static int sigpipe_fds[2] = {-1, -1};

/* The line a second stop signal writes on stderr before _exit (the runner
 * keeps it current: how many received notes it drops).  The handler reads
 * it only while last_words_len is non-zero; host.last_words zeroes the
 * length before it copies. */
static char last_words[1024];
static volatile sig_atomic_t last_words_len;

/* Only flags and a write(2): both async-signal-safe. */
static void on_signal(int sig) {
  int saved = errno;
  if (sig == SIGTERM || sig == SIGINT) {
    if (++stops >= 2) {
      size_t n = (size_t)last_words_len;
      if (n > 0 && write(2, last_words, n) < 0) { /* nothing more can be done */ }
      _exit(1); /* a second stop signal: the user means it; exit at once */
    }
    sig_term = 1;
  } else if (sig == SIGHUP) {
    sig_hup = 1;
  } else if (sig == SIGUSR1) {
    sig_usr1 = 1;
  }
  sig_any = 1;
  if (sigpipe_fds[1] >= 0) {
    ssize_t w = write(sigpipe_fds[1], "s", 1);
    (void)w; /* a full pipe already wakes the reader */
  }
  errno = saved;
}

static int set_flags(int fd, int fl) {
  int cur = fcntl(fd, F_GETFL);
  int fdfl = fcntl(fd, F_GETFD);
  if (cur < 0 || fdfl < 0)
    return -1;
  if (fcntl(fd, F_SETFL, cur | fl) < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0)
    return -1;
  return 0;
}

static int install_signals(void) {
  struct sigaction sa;
  int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGUSR1};
  size_t i;
  if (pipe(sigpipe_fds) != 0 || set_flags(sigpipe_fds[0], O_NONBLOCK) != 0
      || set_flags(sigpipe_fds[1], O_NONBLOCK) != 0)
    return -1;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    if (sigaction(sigs[i], &sa, NULL) != 0)
      return -1;
  signal(SIGPIPE, SIG_IGN); /* libpq handles EPIPE itself */
  return 0;
}

/*
 * host.signals() -> { TERM = true, HUP = true, USR1 = true } (those that
 * arrived since the last call), clearing them and draining the pipe.
 */
static int host_signals(lua_State *L) {
  char buf[64];
  lua_createtable(L, 0, 3);
  sig_any = 0;
  while (read(sigpipe_fds[0], buf, sizeof buf) > 0)
    ;
  if (sig_term) {
    sig_term = 0;
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "TERM");
  }
  if (sig_hup) {
    sig_hup = 0;
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "HUP");
  }
  if (sig_usr1) {
    sig_usr1 = 0;
    lua_pushboolean(L, 1);
    lua_setfield(L, -2, "USR1");
  }
  return 1;
}

/* host.pending() -> true when a signal waits to be read (cheap, no syscall) */
static int host_pending(lua_State *L) {
  lua_pushboolean(L, sig_any != 0);
  return 1;
}

/* host.stopping() -> true once a stop signal (TERM/INT) arrived, whether or
 * not host.signals() has returned it since: it stays true. */
static int host_stopping(lua_State *L) {
  lua_pushboolean(L, stops != 0);
  return 1;
}

/* host.last_words(line) -> the line (at most 1023 bytes) that a second stop
 * signal writes on stderr before exiting; nil forgets it. */
static int host_last_words(lua_State *L) {
  size_t n = 0;
  const char *s = luaL_optlstring(L, 1, NULL, &n);
  last_words_len = 0;
  if (s) {
    if (n >= sizeof last_words)
      n = sizeof last_words - 1;
    memcpy(last_words, s, n);
    last_words_len = (sig_atomic_t)n;
  }
  return 0;
}

static int open_host(lua_State *L) {
  static const luaL_Reg funcs[] = {
    {"last_words", host_last_words},
    {"signals", host_signals},
    {"pending", host_pending},
    {"stopping", host_stopping},
    {NULL, NULL}
  };
  luaL_newlib(L, funcs);
  lua_pushliteral(L, PGL_VERSION);
  lua_setfield(L, -2, "version");
  lua_pushliteral(L, PGL_LPATH);
  lua_setfield(L, -2, "lpath");
  lua_pushliteral(L, PGL_CPATH);
  lua_setfield(L, -2, "cpath");
  return 1;
}

/* ------------------------------------------------------------------ */
/* Running Lua                                                         */
/* ------------------------------------------------------------------ */

/* Message handler: adds a traceback to the error (lua.c's msghandler). */
static int msghandler(lua_State *L) {
  const char *msg = lua_tostring(L, 1);
  if (msg == NULL) {
    if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
      return 1;
    msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
  }
  luaL_traceback(L, L, msg, 1);
  return 1;
}

/* package[field] = prefix .. ";" .. package[field] */
static void prepend_path(lua_State *L, const char *field, const char *prefix) {
  lua_getglobal(L, "package");
  lua_getfield(L, -1, field);
  lua_pushfstring(L, "%s;%s", prefix, luaL_optstring(L, -1, ""));
  lua_setfield(L, -3, field);
  lua_pop(L, 2);
}

/* Runs in protected mode: everything that can raise is in here. */
static int pmain(lua_State *L) {
  int argc = (int)lua_tointeger(L, 1);
  char **argv = (char **)lua_touserdata(L, 2);
  int i, status;

  luaL_checkversion(L);
  luaL_openlibs(L);
  prepend_path(L, "path", PGL_LPATH);
  prepend_path(L, "cpath", PGL_CPATH);
  luaL_requiref(L, "pglisten.host", open_host, 0);
  lua_pop(L, 1);

  if (install_signals() != 0)
    return luaL_error(L, "cannot install signal handlers: %s", strerror(errno));
  lua_pushlightuserdata(L, (void *)&sig_any);
  lua_setfield(L, LUA_REGISTRYINDEX, "pglisten.sigflag");
  lua_pushinteger(L, sigpipe_fds[0]);
  lua_setfield(L, LUA_REGISTRYINDEX, "pglisten.sigfd");
  /* connects end on a stop signal only (pglisten.core's pgl_waitfd) */
  lua_pushlightuserdata(L, (void *)&stops);
  lua_setfield(L, LUA_REGISTRYINDEX, "pglisten.stopflag");

  lua_pushcfunction(L, msghandler);
  lua_getglobal(L, "require");
  lua_pushliteral(L, "pglisten.runner");
  status = lua_pcall(L, 1, 1, -3);
  if (status != LUA_OK)
    return lua_error(L);
  lua_getfield(L, -1, "main");
  if (lua_type(L, -1) != LUA_TFUNCTION)
    return luaL_error(L, "pglisten.runner has no main function");
  lua_createtable(L, argc, 1);
  for (i = 1; i < argc; i++) {
    lua_pushstring(L, argv[i]);
    lua_rawseti(L, -2, i);
  }
  lua_pushstring(L, argv[0]);
  lua_rawseti(L, -2, 0);
  status = lua_pcall(L, 1, 1, -4);
  if (status != LUA_OK)
    return lua_error(L);
  if (!lua_isinteger(L, -1))
    return luaL_error(L, "pglisten.runner.main returned %s, not an exit code", luaL_typename(L, -1));
  return 1;
}

int main(int argc, char **argv) {
  lua_State *L = luaL_newstate();
  int status, code = 1;
  if (L == NULL) {
    fprintf(stderr, "%s: cannot create the Lua state: not enough memory\n", PROGNAME);
    return 1;
  }
  lua_pushcfunction(L, pmain);
  lua_pushinteger(L, argc);
  lua_pushlightuserdata(L, argv);
  status = lua_pcall(L, 2, 1, 0);
  if (status == LUA_OK) {
    code = (int)lua_tointeger(L, -1);
  } else {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "%s: fatal: %s\n", PROGNAME, msg ? msg : "(error object is not a string)");
    fflush(stderr);
  }
  lua_close(L); /* closes connections: __gc of every live object */
  if (sigpipe_fds[0] >= 0) {
    close(sigpipe_fds[0]);
    close(sigpipe_fds[1]);
  }
  return code;
}
