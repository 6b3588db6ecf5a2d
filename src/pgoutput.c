/*
 * pgoutput.c -- the decoder of a logical replication stream: the CopyData
 * messages of START_REPLICATION ... LOGICAL ('w' XLogData, 'k' keepalive)
 * and the pgoutput plugin's messages inside XLogData (proto_version 1:
 * Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate,
 * Message), into Lua tables.  Each XLogData message has lsn (its start, "X/Y"),
 * lsn_int, wal_end_int and send_time beside the pgoutput message's fields;
 * a keepalive has wal_end, wal_end_int, send_time and reply_requested.
 *
 * Nothing from the wire is trusted: every read is checked against the end
 * of the buffer, every count against the bytes left before anything is
 * built from it, and a short or malformed message is an error that names
 * the message and the byte where it went wrong.
 *
 * The relation map is a Lua table relid -> relation (the Relation message's
 * table); pgoutput_rows.c replaces an entry when a new Relation message
 * comes, and decodes row changes into tables keyed by column name, typed
 * as exec types its results (pgl_push_text_value).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgoutput.h"

const char pgl_key_unchanged = 0;

/* Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch. */
#define PG_EPOCH_UNIX 946684800.0

/* ------------------------------------------------------------------ */
/* A bounded reader                                                    */
/* ------------------------------------------------------------------ */

/* Records "truncated <what> message at byte N" unless an error is set. */
void pgl_rd_truncated(rd *r) {
  if (!r->err[0])
    snprintf(r->err, sizeof r->err, "pgoutput: truncated %s message at byte %zu", r->what,
             (size_t)(r->p - r->b));
}

int pgl_rd_need(rd *r, size_t n) {
  if (r->err[0])
    return 0;
  if ((size_t)(r->e - r->p) < n) {
    pgl_rd_truncated(r);
    return 0;
  }
  return 1;
}

/* A big-endian unsigned of n bytes; 0 (and the error set) when short. */
uint64_t pgl_rd_u(rd *r, int n) {
  uint64_t v = 0;
  int i;
  if (!pgl_rd_need(r, (size_t)n))
    return 0;
  for (i = 0; i < n; i++)
    v = (v << 8) | *r->p++;
  return v;
}

/* A NUL-terminated string inside the buffer; "" (and the error) if none. */
const char *pgl_rd_str(rd *r, size_t *len) {
  const unsigned char *z;
  *len = 0;
  if (r->err[0])
    return "";
  z = (const unsigned char *)memchr(r->p, 0, (size_t)(r->e - r->p));
  if (!z) {
    pgl_rd_truncated(r);
    return "";
  }
  *len = (size_t)(z - r->p);
  r->p = z + 1;
  return (const char *)(z - *len);
}

size_t pgl_rd_left(const rd *r) {
  return (size_t)(r->e - r->p);
}

/* ------------------------------------------------------------------ */
/* Fields                                                              */
/* ------------------------------------------------------------------ */

/* Upper-case hex of v, no leading zeros, at p; returns the end. */
static char *put_hex(char *p, uint32_t v) {
  char tmp[8];
  int n = 0;
  do {
    tmp[n++] = "0123456789ABCDEF"[v & 15];
    v >>= 4;
  } while (v);
  while (n)
    *p++ = tmp[--n];
  return p;
}

/* "X/Y", as the server prints an LSN (%X/%X).  By hand: it is done twice
 * for every change, and snprintf cost more than the rest of the message. */
void pgl_push_lsn(lua_State *L, uint64_t lsn) {
  char buf[20], *p = put_hex(buf, (uint32_t)(lsn >> 32));
  *p++ = '/';
  p = put_hex(p, (uint32_t)lsn);
  lua_pushlstring(L, buf, (size_t)(p - buf));
}

/* t[name] = "X/Y" and t[name_int] = the integer, t on top. */
static void set_lsn2(lua_State *L, const char *name, const char *name_int, uint64_t lsn) {
  pgl_push_lsn(L, lsn);
  lua_setfield(L, -2, name);
  lua_pushinteger(L, (lua_Integer)lsn);
  lua_setfield(L, -2, name_int);
}
#define set_lsn(L, name, lsn) set_lsn2(L, name, name "_int", lsn)

/* t[name] = a server timestamp (microseconds since 2000) as Unix seconds. */
static void set_time(lua_State *L, const char *name, uint64_t us) {
  lua_pushnumber(L, (lua_Number)((double)(int64_t)us / 1e6 + PG_EPOCH_UNIX));
  lua_setfield(L, -2, name);
}

void pgl_set_int(lua_State *L, const char *name, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, name);
}

void pgl_set_str(lua_State *L, const char *name, const char *s, size_t len) {
  lua_pushlstring(L, s, len);
  lua_setfield(L, -2, name);
}

void pgl_new_msg(lua_State *L, const char *kind, int nrec) {
  lua_createtable(L, 0, nrec);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
}

/* ------------------------------------------------------------------ */
/* Transactions and the rest                                           */
/* ------------------------------------------------------------------ */

static int dec_begin(lua_State *L, rd *r) {
  uint64_t lsn = pgl_rd_u(r, 8), ts = pgl_rd_u(r, 8), xid = pgl_rd_u(r, 4);
  if (r->err[0])
    return 0;
  pgl_new_msg(L, "begin", 10); /* + lsn, wal_end (and _int), send_time */
  set_lsn(L, "final_lsn", lsn);
  set_time(L, "commit_time", ts);
  pgl_set_int(L, "xid", (lua_Integer)xid);
  return 1;
}

static int dec_commit(lua_State *L, rd *r) {
  uint64_t flags = pgl_rd_u(r, 1), lsn = pgl_rd_u(r, 8), end = pgl_rd_u(r, 8), ts = pgl_rd_u(r, 8);
  if (r->err[0])
    return 0;
  pgl_new_msg(L, "commit", 12);
  pgl_set_int(L, "flags", (lua_Integer)flags);
  set_lsn(L, "commit_lsn", lsn);
  set_lsn(L, "end_lsn", end);
  set_time(L, "commit_time", ts);
  return 1;
}

static int dec_origin(lua_State *L, rd *r) {
  uint64_t lsn = pgl_rd_u(r, 8);
  size_t len;
  const char *name = pgl_rd_str(r, &len);
  if (r->err[0])
    return 0;
  pgl_new_msg(L, "origin", 3);
  set_lsn(L, "origin_lsn", lsn);
  pgl_set_str(L, "name", name, len);
  return 1;
}

static int dec_type(lua_State *L, rd *r) {
  uint64_t oid = pgl_rd_u(r, 4);
  size_t l1, l2;
  const char *nsp = pgl_rd_str(r, &l1), *name = pgl_rd_str(r, &l2);
  if (r->err[0])
    return 0;
  pgl_new_msg(L, "type", 3);
  pgl_set_int(L, "type", (lua_Integer)oid);
  pgl_set_str(L, "schema", nsp, l1);
  pgl_set_str(L, "name", name, l2);
  return 1;
}

/* Message (pg_logical_emit_message, with messages 'true'): flags (1:
 * transactional), lsn, prefix, content length, content. */
static int dec_message(lua_State *L, rd *r) {
  uint64_t flags = pgl_rd_u(r, 1), lsn = pgl_rd_u(r, 8), n;
  size_t len;
  const char *prefix = pgl_rd_str(r, &len);
  n = pgl_rd_u(r, 4);
  if (!pgl_rd_need(r, (size_t)n))
    return 0;
  pgl_new_msg(L, "message", 5);
  lua_pushboolean(L, (int)(flags & 1));
  lua_setfield(L, -2, "transactional");
  set_lsn(L, "message_lsn", lsn);
  pgl_set_str(L, "prefix", prefix, len);
  pgl_set_str(L, "content", (const char *)r->p, (size_t)n);
  r->p += n;
  return 1;
}

static const char *msg_name(int t) {
  switch (t) {
  case 'B': return "Begin";
  case 'C': return "Commit";
  case 'O': return "Origin";
  case 'R': return "Relation";
  case 'Y': return "Type";
  case 'I': return "Insert";
  case 'U': return "Update";
  case 'D': return "Delete";
  case 'T': return "Truncate";
  case 'M': return "Message";
  default: return NULL;
  }
}

/* One pgoutput message at r->p (to the end of the buffer). */
static int dec_pgoutput(lua_State *L, rd *r, int relidx) {
  int t = (int)pgl_rd_u(r, 1);
  if (r->err[0])
    return 0;
  r->what = msg_name(t);
  if (!r->what) {
    if (strchr("SEcAbPKrp", t)) /* streaming (2), two-phase (3): never asked for */
      snprintf(r->err, sizeof r->err, "pgoutput: message '%c' belongs to a streamed or prepared "
               "transaction, which proto_version 1 does not send", t);
    else
      snprintf(r->err, sizeof r->err, "pgoutput: unknown message type 0x%02x", (unsigned)t);
    return 0;
  }
  switch (t) {
  case 'B': return dec_begin(L, r);
  case 'C': return dec_commit(L, r);
  case 'O': return dec_origin(L, r);
  case 'R': return pgl_dec_relation(L, r, relidx);
  case 'Y': return dec_type(L, r);
  case 'I': return pgl_dec_insert(L, r, relidx);
  case 'U': return pgl_dec_update_delete(L, r, relidx, 1);
  case 'D': return pgl_dec_update_delete(L, r, relidx, 0);
  case 'T': return pgl_dec_truncate(L, r, relidx);
  default: return dec_message(L, r);
  }
}

/* ------------------------------------------------------------------ */
/* CopyData: XLogData and keepalives                                   */
/* ------------------------------------------------------------------ */

static int dec_copydata(lua_State *L, rd *r, int relidx) {
  int t = (int)pgl_rd_u(r, 1);
  uint64_t start, end, ts;
  if (t == 'k') {
    r->what = "keepalive";
    end = pgl_rd_u(r, 8);
    ts = pgl_rd_u(r, 8);
    t = (int)pgl_rd_u(r, 1);
    if (r->err[0])
      return 0;
    if (r->mi)
      r->mi->wal_end = end;
    pgl_new_msg(L, "keepalive", 5);
    set_lsn(L, "wal_end", end);
    set_time(L, "send_time", ts);
    lua_pushboolean(L, t != 0);
    lua_setfield(L, -2, "reply_requested");
    return 1;
  }
  if (t != 'w') {
    if (!r->err[0])
      snprintf(r->err, sizeof r->err, "replication: unknown CopyData message type 0x%02x",
               (unsigned)t);
    return 0;
  }
  start = pgl_rd_u(r, 8);
  end = pgl_rd_u(r, 8);
  ts = pgl_rd_u(r, 8);
  if (!dec_pgoutput(L, r, relidx))
    return 0;
  if (r->mi) {
    r->mi->lsn = start;
    r->mi->wal_end = end;
    if (r->mi->change)
      return 1; /* the event alone: its position is in mi */
  }
  /* wal_end as an integer only: the string would be made for every change
   * and nobody reads it (a keepalive has both) */
  set_lsn(L, "lsn", start);
  pgl_set_int(L, "wal_end_int", (lua_Integer)end);
  set_time(L, "send_time", ts);
  return 1;
}

int pgl_pgoutput_decode(lua_State *L, const char *buf, size_t len, int relidx) {
  return pgl_pgoutput_decode_ex(L, buf, len, relidx, NULL);
}

int pgl_pgoutput_decode_ex(lua_State *L, const char *buf, size_t len, int relidx, pgl_msginfo *mi) {
  int base = lua_gettop(L);
  rd r;
  r.mi = mi;
  if (mi)
    mi->change = 0, mi->lsn = mi->wal_end = mi->relid = 0;
  r.b = r.p = (const unsigned char *)buf;
  r.e = r.b + len;
  r.what = "XLogData";
  r.err[0] = '\0';
  relidx = lua_absindex(L, relidx);
  luaL_checkstack(L, 32, "pgoutput decoder");
  if (!dec_copydata(L, &r, relidx) && !r.err[0]) /* cannot happen: every failure says why */
    snprintf(r.err, sizeof r.err, "pgoutput: malformed %s message", r.what);
  else if (!r.err[0] && r.p != r.e)
    snprintf(r.err, sizeof r.err, "pgoutput: %zu unexpected bytes after the %s message",
             pgl_rd_left(&r), r.what);
  if (r.err[0]) {
    lua_settop(L, base);
    lua_pushnil(L);
    lua_pushstring(L, r.err);
    return 2;
  }
  return 1;
}

/* ------------------------------------------------------------------ */
/* Module functions                                                    */
/* ------------------------------------------------------------------ */

/* core.pgoutput_decode(bytes, relations) -> message | nil, err */
static int core_pgoutput_decode(lua_State *L) {
  size_t len;
  const char *buf = luaL_checklstring(L, 1, &len);
  luaL_checktype(L, 2, LUA_TTABLE);
  return pgl_pgoutput_decode(L, buf, len, 2);
}

/* core.lsn_parse("X/Y") -> integer | nil, err */
static int core_lsn_parse(lua_State *L) {
  const char *s = luaL_checkstring(L, 1);
  unsigned hi, lo;
  int n = 0;
  if (sscanf(s, "%8X/%8X%n", &hi, &lo, &n) != 2 || s[n] != '\0' || strchr(s, ' ') ||
      strchr(s, '-') || strchr(s, '+')) {
    lua_pushnil(L);
    lua_pushfstring(L, "not an LSN: %s", s);
    return 2;
  }
  lua_pushinteger(L, (lua_Integer)(((uint64_t)hi << 32) | lo));
  return 1;
}

/* core.lsn_format(integer) -> "X/Y" */
static int core_lsn_format(lua_State *L) {
  pgl_push_lsn(L, (uint64_t)luaL_checkinteger(L, 1));
  return 1;
}

static int unchanged_tostring(lua_State *L) {
  lua_pushliteral(L, "pglisten.unchanged");
  return 1;
}

static const luaL_Reg pgoutput_funcs[] = {
  {"pgoutput_decode", core_pgoutput_decode},
  {"lsn_parse", core_lsn_parse},
  {"lsn_format", core_lsn_format},
  {NULL, NULL}
};

void pgl_pgoutput_open(lua_State *L) {
  luaL_setfuncs(L, pgoutput_funcs, 0);
  lua_newtable(L); /* the unchanged sentinel: one table, compared by identity */
  if (luaL_newmetatable(L, PGL_UNCHANGED_MT)) {
    lua_pushcfunction(L, unchanged_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
  }
  lua_setmetatable(L, -2);
  lua_pushvalue(L, -1);
  lua_rawsetp(L, LUA_REGISTRYINDEX, &pgl_key_unchanged);
  lua_setfield(L, -2, "unchanged");
}
