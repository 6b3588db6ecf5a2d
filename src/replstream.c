/*
 * replstream.c -- the streaming half of the pglisten.replication object
 * (repl.c): read() takes what the socket has without blocking and decodes
 * it (pgoutput.c), confirm() sends a Standby Status Update, finish() ends
 * the stream cleanly.  When to confirm and what to do on an error is the
 * Lua caller's policy.
 */
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "repl.h"

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
    if (pgl_repl_await(L, c, pgl_monotonic() + c->timeout) <= 0) {
      pgl_repl_abandon(c);
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

enum { READ_MESSAGES, READ_RAW, READ_EVENTS };

/*
 * Decodes the CopyData payload at c->pending (len bytes) into messages[n]
 * (stack: 3 the relation map, 4 the messages; in events mode 5 the info
 * table and 6, 7, 8 its lsn, relid and size arrays).  Returns 1, or 0 with
 * nil, err pushed.
 */
static int take_one(lua_State *L, pgl_repl *c, int len, int mode, lua_Integer n, uint64_t *wal_end) {
  pgl_msginfo mi;
  if (mode == READ_RAW) {
    lua_pushlstring(L, c->pending, (size_t)len);
  } else if (mode == READ_MESSAGES) {
    if (pgl_pgoutput_decode(L, c->pending, (size_t)len, 3) != 1)
      return 0;
  } else {
    mi.events = 1;
    if (pgl_pgoutput_decode_ex(L, c->pending, (size_t)len, 3, &mi) != 1)
      return 0;
    if (mi.wal_end > *wal_end)
      *wal_end = mi.wal_end;
    if (mi.change) {
      lua_pushinteger(L, (lua_Integer)mi.lsn);
      lua_rawseti(L, 6, n);
      lua_pushinteger(L, (lua_Integer)mi.relid);
      lua_rawseti(L, 7, n);
      lua_pushinteger(L, (lua_Integer)len);
      lua_rawseti(L, 8, n);
    }
  }
  lua_rawseti(L, 4, n);
  return 1;
}

/* The results of a read: the messages, and in events mode the info. */
static int read_result(lua_State *L, int mode, uint64_t wal_end, lua_Integer bytes) {
  if (mode != READ_EVENTS) {
    lua_settop(L, 4);
    return 1;
  }
  lua_pushvalue(L, 6);
  lua_setfield(L, 5, "lsn");
  lua_pushvalue(L, 7);
  lua_setfield(L, 5, "relid");
  lua_pushvalue(L, 8);
  lua_setfield(L, 5, "size");
  lua_pushinteger(L, (lua_Integer)wal_end);
  lua_setfield(L, 5, "wal_end");
  lua_pushinteger(L, bytes);
  lua_setfield(L, 5, "bytes");
  lua_settop(L, 5);
  return 2;
}

/* The mode argument: nil/false, true or "raw", "events"; anything else is
 * a programmer error ("event" must not read raw bytes). */
static int read_mode(lua_State *L, int idx) {
  const char *s;
  switch (lua_type(L, idx)) {
  case LUA_TNONE:
  case LUA_TNIL:
    return READ_MESSAGES;
  case LUA_TBOOLEAN:
    return lua_toboolean(L, idx) ? READ_RAW : READ_MESSAGES;
  case LUA_TSTRING:
    s = lua_tostring(L, idx);
    if (strcmp(s, "events") == 0)
      return READ_EVENTS;
    if (strcmp(s, "raw") == 0)
      return READ_RAW;
    break;
  default:
    break;
  }
  return luaL_argerror(L, idx, "mode must be nil, false, true, \"raw\" or \"events\"");
}

/*
 * repl:read([max [, mode [, max_bytes]]]) -> { message, ... }[, info] |
 * nil, err[, sqlstate]
 * Never blocks: the messages the socket has now, up to max (default 1000)
 * and until their payloads reach max_bytes (default: no limit; one message
 * is always taken), possibly none (the socket is read again while it gives
 * more; what a read cut short leaves in libpq's buffer does not make the
 * socket readable: read again).  mode true
 * or "raw": the CopyData payloads as strings, undecoded (the relation map is
 * then not updated).  mode "events": a row change is its event { op,
 * schema, table, new, old } (no kind), and info holds, at the same index,
 * lsn[i] (the change's LSN, an integer: core.lsn_format makes its "X/Y")
 * relid[i] and size[i] (its payload's bytes), wal_end, the largest walEnd
 * read (0: none), and bytes (every payload's).  A malformed message is an error: the
 * stream must be restarted from the last confirmed position.  At the end of
 * the stream the messages read before it come first, the error at the next
 * call.
 */
int pgl_repl_read(lua_State *L) {
  pgl_repl *c = pgl_repl_check(L, 1);
  lua_Integer max = luaL_optinteger(L, 2, 1000), n = 0, bytes = 0;
  int mode = read_mode(L, 3);
  lua_Integer max_bytes = luaL_optinteger(L, 4, LUA_MAXINTEGER);
  int fresh = 1; /* nothing taken since the last socket read */
  int presize;
  uint64_t wal_end = 0;
  lua_settop(L, 2);
  if (!c->copying) {
    if (c->end_msg)
      return end_of_stream(L, c);
    luaL_error(L, "replication connection is not streaming: start() it first");
  }
  lua_getiuservalue(L, 1, 1); /* 3: the relation map */
  presize = max < 1 ? 0 : max > 1024 ? 1024 : (int)max; /* the arrays are made once, at their size */
  lua_createtable(L, presize, 0); /* 4: the messages */
  if (mode == READ_EVENTS) {
    lua_createtable(L, 0, 5); /* 5: info, 6-8 its arrays */
    lua_createtable(L, presize, 0);
    lua_createtable(L, presize, 0);
    lua_createtable(L, presize, 0);
  }
  if (!PQconsumeInput(c->pg) && PQstatus(c->pg) == CONNECTION_BAD) {
    c->copying = 0;
    return pgl_repl_fail(L, c, "replication stream lost");
  }
  while (n < max && (n == 0 || bytes < max_bytes)) {
    int len = PQgetCopyData(c->pg, &c->pending, 1), ok;
    if (len == 0) {
      /* libpq's buffer is empty: read the socket again, without waiting,
       * so that a read takes what the socket already holds (libpq reads
       * at most its buffer, ~16 kB or 200 changes, per call) */
      if (fresh || !PQconsumeInput(c->pg))
        break;
      fresh = 1;
      continue;
    }
    fresh = 0;
    if (len == -1) {
      stream_ended(L, c);
      return n > 0 ? read_result(L, mode, wal_end, bytes) : end_of_stream(L, c);
    }
    if (len < 0) {
      c->copying = 0;
      return pgl_repl_fail(L, c, "replication stream failed");
    }
    ok = take_one(L, c, len, mode, n + 1, &wal_end);
    PQfreemem(c->pending);
    c->pending = NULL;
    if (!ok)
      return 2;
    n++;
    bytes += len;
  }
  if (n == 0 && PQstatus(c->pg) == CONNECTION_BAD) {
    c->copying = 0;
    return pgl_repl_fail(L, c, "replication stream lost");
  }
  return read_result(L, mode, wal_end, bytes);
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
int pgl_repl_confirm(lua_State *L) {
  pgl_repl *c = pgl_repl_check(L, 1);
  lua_Integer w = pgl_repl_checklsn(L, 2);
  lua_Integer f = lua_isnoneornil(L, 3) ? w : pgl_repl_checklsn(L, 3);
  lua_Integer a = lua_isnoneornil(L, 4) ? f : pgl_repl_checklsn(L, 4);
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
    return pgl_repl_fail(L, c, "could not send the status update");
  r = PQflush(c->pg);
  if (r < 0)
    return pgl_repl_fail(L, c, "could not send the status update");
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
    return -pgl_repl_timedout(L, c, "finishing the stream");
  if (r < 0 || !PQconsumeInput(c->pg))
    return -pgl_repl_fail(L, c, "finishing the stream failed");
  return 1;
}

/*
 * repl:finish() -> true | nil, err[, sqlstate]: a clean end of the stream:
 * CopyDone, then what the server still sends is read and dropped up to its
 * end, within the timeout.  The connection can run commands again after.
 */
int pgl_repl_finish(lua_State *L) {
  pgl_repl *c = pgl_repl_check(L, 1);
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
    return pgl_repl_fail(L, c, "could not end the stream");
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
      return pgl_repl_fail(L, c, "finishing the stream failed");
    }
  }
  if (c->end_state[0])
    return end_of_stream(L, c);
  lua_pushboolean(L, 1);
  return 1;
}

