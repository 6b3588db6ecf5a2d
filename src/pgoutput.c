/*
 * pgoutput.c -- the decoder of a logical replication stream: the CopyData
 * messages of START_REPLICATION ... LOGICAL ('w' XLogData, 'k' keepalive)
 * and the pgoutput plugin's messages inside XLogData (proto_version 1:
 * Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate,
 * Message), into Lua tables.
 *
 * Nothing from the wire is trusted: every read is checked against the end
 * of the buffer, every count against the bytes left before anything is
 * built from it, and a short or malformed message is an error that names
 * the message and the byte where it went wrong.
 *
 * The relation map is a Lua table relid -> relation (the Relation message's
 * table); the decoder replaces an entry when a new Relation message comes,
 * and decodes row changes into tables keyed by column name, typed as exec
 * types its results (pgl_push_text_value).
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pgl.h"

const char pgl_key_unchanged = 0;

/* Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's epoch. */
#define PG_EPOCH_UNIX 946684800.0

/* ------------------------------------------------------------------ */
/* A bounded reader                                                    */
/* ------------------------------------------------------------------ */

typedef struct rd {
  const unsigned char *b, *p, *e; /* start, next byte, end */
  const char *what;               /* the message being read, for errors */
  char err[200];                  /* set on the first failure */
} rd;

/* Records "truncated <what> message at byte N" unless an error is set. */
static void truncated(rd *r) {
  if (!r->err[0])
    snprintf(r->err, sizeof r->err, "pgoutput: truncated %s message at byte %zu", r->what,
             (size_t)(r->p - r->b));
}

static int need(rd *r, size_t n) {
  if (r->err[0])
    return 0;
  if ((size_t)(r->e - r->p) < n) {
    truncated(r);
    return 0;
  }
  return 1;
}

/* A big-endian unsigned of n bytes; 0 (and the error set) when short. */
static uint64_t get_u(rd *r, int n) {
  uint64_t v = 0;
  int i;
  if (!need(r, (size_t)n))
    return 0;
  for (i = 0; i < n; i++)
    v = (v << 8) | *r->p++;
  return v;
}

/* A NUL-terminated string inside the buffer; "" (and the error) if none. */
static const char *get_str(rd *r, size_t *len) {
  const unsigned char *z;
  *len = 0;
  if (r->err[0])
    return "";
  z = (const unsigned char *)memchr(r->p, 0, (size_t)(r->e - r->p));
  if (!z) {
    truncated(r);
    return "";
  }
  *len = (size_t)(z - r->p);
  r->p = z + 1;
  return (const char *)(z - *len);
}

static size_t left(const rd *r) {
  return (size_t)(r->e - r->p);
}

/* ------------------------------------------------------------------ */
/* Fields                                                              */
/* ------------------------------------------------------------------ */

static void push_lsn(lua_State *L, uint64_t lsn) {
  char buf[32];
  snprintf(buf, sizeof buf, "%" PRIX32 "/%" PRIX32, (uint32_t)(lsn >> 32), (uint32_t)lsn);
  lua_pushstring(L, buf);
}

/* t[name] = "X/Y" and t[name .. "_int"] = the integer, t on top. */
static void set_lsn(lua_State *L, const char *name, uint64_t lsn) {
  push_lsn(L, lsn);
  lua_setfield(L, -2, name);
  lua_pushinteger(L, (lua_Integer)lsn);
  lua_pushfstring(L, "%s_int", name);
  lua_insert(L, -2);
  lua_rawset(L, -3);
}

/* t[name] = a server timestamp (microseconds since 2000) as Unix seconds. */
static void set_time(lua_State *L, const char *name, uint64_t us) {
  lua_pushnumber(L, (lua_Number)((double)(int64_t)us / 1e6 + PG_EPOCH_UNIX));
  lua_setfield(L, -2, name);
}

static void set_int(lua_State *L, const char *name, lua_Integer v) {
  lua_pushinteger(L, v);
  lua_setfield(L, -2, name);
}

static void set_str(lua_State *L, const char *name, const char *s, size_t len) {
  lua_pushlstring(L, s, len);
  lua_setfield(L, -2, name);
}

static void new_msg(lua_State *L, const char *kind, int nrec) {
  lua_createtable(L, 0, nrec);
  lua_pushstring(L, kind);
  lua_setfield(L, -2, "kind");
}

/* ------------------------------------------------------------------ */
/* Relations and tuples                                                */
/* ------------------------------------------------------------------ */

/* Relation: relid, namespace, relname, replica identity, natts columns
 * (flags, name, type oid, typmod).  Stored in the map under relid. */
static int dec_relation(lua_State *L, rd *r, int relidx) {
  uint64_t relid = get_u(r, 4), ident, natts, i;
  size_t len;
  const char *s;
  char id;
  new_msg(L, "relation", 6);
  set_int(L, "relid", (lua_Integer)relid);
  s = get_str(r, &len);
  set_str(L, "schema", s, len);
  s = get_str(r, &len);
  set_str(L, "table", s, len);
  ident = get_u(r, 1);
  id = (char)ident;
  lua_pushlstring(L, &id, ident ? 1 : 0); /* d(efault) n(othing) f(ull) i(ndex) */
  lua_setfield(L, -2, "replident");
  natts = get_u(r, 2);
  if (natts > left(r) / 10) /* a column is at least 10 bytes */
    truncated(r);
  if (r->err[0])
    return 0;
  lua_createtable(L, (int)natts, 0);
  for (i = 1; i <= natts; i++) {
    lua_createtable(L, 0, 4);
    lua_pushboolean(L, (int)(get_u(r, 1) & 1));
    lua_setfield(L, -2, "key");
    s = get_str(r, &len);
    set_str(L, "name", s, len);
    set_int(L, "type", (lua_Integer)get_u(r, 4));
    set_int(L, "typmod", (lua_Integer)(int32_t)(uint32_t)get_u(r, 4));
    lua_rawseti(L, -2, (lua_Integer)i);
  }
  lua_setfield(L, -2, "columns");
  if (r->err[0])
    return 0;
  lua_pushvalue(L, -1);
  lua_rawseti(L, relidx, (lua_Integer)relid);
  return 1;
}

/* Pushes the relation of relid from the map; 0 (error set) if unknown. */
static int get_rel(lua_State *L, rd *r, int relidx, uint64_t relid) {
  if (r->err[0])
    return 0;
  if (lua_rawgeti(L, relidx, (lua_Integer)relid) != LUA_TTABLE) {
    lua_pop(L, 1);
    snprintf(r->err, sizeof r->err,
             "pgoutput: %s message for relation %" PRIu64 ", which no Relation message described",
             r->what, relid);
    return 0;
  }
  return 1;
}

/* One 't' value of column `col` (a table on top), pushed typed. */
static int push_text(lua_State *L, rd *r) {
  uint64_t n = get_u(r, 4);
  Oid type;
  if (!need(r, (size_t)n))
    return 0;
  lua_getfield(L, -1, "type");
  type = (Oid)lua_tointeger(L, -1);
  lua_pop(L, 1);
  lua_pushlstring(L, (const char *)r->p, (size_t)n);
  r->p += n;
  if (pgl_text_converts(type)) { /* the Lua copy ends in the '\0' it needs */
    size_t len;
    const char *s = lua_tolstring(L, -1, &len);
    pgl_push_text_value(L, s, len, type);
    lua_remove(L, -2);
  }
  return 1;
}

/* Pushes the value of the next column, col (a table) on top. */
static int push_column(lua_State *L, rd *r) {
  int kind = (int)get_u(r, 1);
  if (r->err[0])
    return 0;
  switch (kind) {
  case 'n':
    lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_null);
    return 1;
  case 'u':
    lua_rawgetp(L, LUA_REGISTRYINDEX, &pgl_key_unchanged);
    return 1;
  case 't':
    return push_text(L, r);
  case 'b':
    snprintf(r->err, sizeof r->err, "pgoutput: binary column value in %s message (binary mode "
             "is not supported)", r->what);
    return 0;
  default:
    snprintf(r->err, sizeof r->err, "pgoutput: unknown column kind 0x%02x in %s message at byte %zu",
             (unsigned)kind, r->what, (size_t)(r->p - r->b - 1));
    return 0;
  }
}

/* TupleData of the relation at rel (an absolute index): pushes a table
 * keyed by column name. */
static int push_tuple(lua_State *L, rd *r, int rel) {
  uint64_t natts = get_u(r, 2), ncols, i;
  int cols;
  if (r->err[0])
    return 0;
  lua_getfield(L, rel, "columns");
  cols = lua_gettop(L);
  ncols = (uint64_t)lua_rawlen(L, cols);
  if (natts != ncols) {
    snprintf(r->err, sizeof r->err, "pgoutput: %s message has %" PRIu64 " columns, its relation %"
             PRIu64, r->what, natts, ncols);
    return 0;
  }
  if (natts > left(r)) /* a column is at least its kind byte */
    truncated(r);
  if (r->err[0])
    return 0;
  lua_createtable(L, 0, (int)natts);
  for (i = 1; i <= natts; i++) {
    lua_rawgeti(L, cols, (lua_Integer)i);
    lua_getfield(L, -1, "name");
    lua_insert(L, -2);
    if (!push_column(L, r))
      return 0;
    lua_remove(L, -2); /* the column table */
    lua_rawset(L, -3);
  }
  lua_remove(L, cols);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Row changes                                                         */
/* ------------------------------------------------------------------ */

/* A row change message: op, relid, schema, table; the relation pushed
 * below it.  Returns the relation's absolute index, 0 on error. */
static int new_change(lua_State *L, rd *r, int relidx, const char *kind, const char *op) {
  uint64_t relid = get_u(r, 4);
  int rel;
  if (!get_rel(L, r, relidx, relid))
    return 0;
  rel = lua_gettop(L);
  new_msg(L, kind, 8);
  lua_pushstring(L, op);
  lua_setfield(L, -2, "op");
  set_int(L, "relid", (lua_Integer)relid);
  lua_getfield(L, rel, "schema");
  lua_setfield(L, -2, "schema");
  lua_getfield(L, rel, "table");
  lua_setfield(L, -2, "table");
  return rel;
}

/* Sets msg[field] to the next tuple; msg on top, rel its relation. */
static int set_tuple(lua_State *L, rd *r, int rel, const char *field) {
  if (!push_tuple(L, r, rel))
    return 0;
  lua_setfield(L, -2, field);
  return 1;
}

/* Insert: relid, 'N', new tuple. */
static int dec_insert(lua_State *L, rd *r, int relidx) {
  int rel = new_change(L, r, relidx, "insert", "INSERT");
  if (!rel)
    return 0;
  if (get_u(r, 1) != 'N')
    truncated(r);
  if (!set_tuple(L, r, rel, "new"))
    return 0;
  lua_remove(L, rel);
  return 1;
}

/* Update: relid, optional 'K' (key) or 'O' (old row) tuple, 'N' new tuple.
 * Delete: relid, 'K' or 'O' tuple. */
static int dec_update_delete(lua_State *L, rd *r, int relidx, int update) {
  int rel = new_change(L, r, relidx, update ? "update" : "delete", update ? "UPDATE" : "DELETE");
  uint64_t k;
  if (!rel)
    return 0;
  k = get_u(r, 1);
  if (k == 'K' || k == 'O') {
    lua_pushstring(L, k == 'K' ? "key" : "full");
    lua_setfield(L, -2, "old_kind");
    if (!set_tuple(L, r, rel, "old"))
      return 0;
    if (update)
      k = get_u(r, 1);
  } else if (!update && !r->err[0]) {
    snprintf(r->err, sizeof r->err, "pgoutput: Delete message without a 'K' or 'O' tuple");
  }
  if (update && k != 'N' && !r->err[0])
    snprintf(r->err, sizeof r->err, "pgoutput: Update message without its 'N' tuple");
  if (update && !set_tuple(L, r, rel, "new"))
    return 0;
  if (r->err[0])
    return 0;
  lua_remove(L, rel);
  return 1;
}

/* Truncate: nrelids, options (1 cascade, 2 restart identity), relids. */
static int dec_truncate(lua_State *L, rd *r, int relidx) {
  uint64_t n = get_u(r, 4), flags = get_u(r, 1), i;
  if (n > left(r) / 4)
    truncated(r);
  if (r->err[0])
    return 0;
  new_msg(L, "truncate", 4);
  lua_pushliteral(L, "TRUNCATE");
  lua_setfield(L, -2, "op");
  lua_pushboolean(L, (int)(flags & 1));
  lua_setfield(L, -2, "cascade");
  lua_pushboolean(L, (int)(flags & 2));
  lua_setfield(L, -2, "restart_identity");
  lua_createtable(L, (int)n, 0);
  for (i = 1; i <= n; i++) {
    uint64_t relid = get_u(r, 4);
    if (!get_rel(L, r, relidx, relid))
      return 0;
    lua_createtable(L, 0, 3);
    set_int(L, "relid", (lua_Integer)relid);
    lua_getfield(L, -2, "schema");
    lua_setfield(L, -2, "schema");
    lua_getfield(L, -2, "table");
    lua_setfield(L, -2, "table");
    lua_remove(L, -2);
    lua_rawseti(L, -2, (lua_Integer)i);
  }
  lua_setfield(L, -2, "relations");
  return 1;
}

/* ------------------------------------------------------------------ */
/* Transactions and the rest                                           */
/* ------------------------------------------------------------------ */

static int dec_begin(lua_State *L, rd *r) {
  uint64_t lsn = get_u(r, 8), ts = get_u(r, 8), xid = get_u(r, 4);
  if (r->err[0])
    return 0;
  new_msg(L, "begin", 5);
  set_lsn(L, "final_lsn", lsn);
  set_time(L, "commit_time", ts);
  set_int(L, "xid", (lua_Integer)xid);
  return 1;
}

static int dec_commit(lua_State *L, rd *r) {
  uint64_t flags = get_u(r, 1), lsn = get_u(r, 8), end = get_u(r, 8), ts = get_u(r, 8);
  if (r->err[0])
    return 0;
  new_msg(L, "commit", 7);
  set_int(L, "flags", (lua_Integer)flags);
  set_lsn(L, "commit_lsn", lsn);
  set_lsn(L, "end_lsn", end);
  set_time(L, "commit_time", ts);
  return 1;
}

static int dec_origin(lua_State *L, rd *r) {
  uint64_t lsn = get_u(r, 8);
  size_t len;
  const char *name = get_str(r, &len);
  if (r->err[0])
    return 0;
  new_msg(L, "origin", 3);
  set_lsn(L, "origin_lsn", lsn);
  set_str(L, "name", name, len);
  return 1;
}

static int dec_type(lua_State *L, rd *r) {
  uint64_t oid = get_u(r, 4);
  size_t l1, l2;
  const char *nsp = get_str(r, &l1), *name = get_str(r, &l2);
  if (r->err[0])
    return 0;
  new_msg(L, "type", 3);
  set_int(L, "type", (lua_Integer)oid);
  set_str(L, "schema", nsp, l1);
  set_str(L, "name", name, l2);
  return 1;
}

/* Message (pg_logical_emit_message, with messages 'true'): flags (1:
 * transactional), lsn, prefix, content length, content. */
static int dec_message(lua_State *L, rd *r) {
  uint64_t flags = get_u(r, 1), lsn = get_u(r, 8), n;
  size_t len;
  const char *prefix = get_str(r, &len);
  n = get_u(r, 4);
  if (!need(r, (size_t)n))
    return 0;
  new_msg(L, "message", 5);
  lua_pushboolean(L, (int)(flags & 1));
  lua_setfield(L, -2, "transactional");
  set_lsn(L, "message_lsn", lsn);
  set_str(L, "prefix", prefix, len);
  set_str(L, "content", (const char *)r->p, (size_t)n);
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
  int t = (int)get_u(r, 1);
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
  case 'R': return dec_relation(L, r, relidx);
  case 'Y': return dec_type(L, r);
  case 'I': return dec_insert(L, r, relidx);
  case 'U': return dec_update_delete(L, r, relidx, 1);
  case 'D': return dec_update_delete(L, r, relidx, 0);
  case 'T': return dec_truncate(L, r, relidx);
  default: return dec_message(L, r);
  }
}

/* ------------------------------------------------------------------ */
/* CopyData: XLogData and keepalives                                   */
/* ------------------------------------------------------------------ */

static int dec_copydata(lua_State *L, rd *r, int relidx) {
  int t = (int)get_u(r, 1);
  uint64_t start, end, ts;
  if (t == 'k') {
    r->what = "keepalive";
    end = get_u(r, 8);
    ts = get_u(r, 8);
    t = (int)get_u(r, 1);
    if (r->err[0])
      return 0;
    new_msg(L, "keepalive", 4);
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
  start = get_u(r, 8);
  end = get_u(r, 8);
  ts = get_u(r, 8);
  if (!dec_pgoutput(L, r, relidx))
    return 0;
  set_lsn(L, "lsn", start);
  set_lsn(L, "wal_end", end);
  set_time(L, "send_time", ts);
  return 1;
}

int pgl_pgoutput_decode(lua_State *L, const char *buf, size_t len, int relidx) {
  int base = lua_gettop(L);
  rd r;
  r.b = r.p = (const unsigned char *)buf;
  r.e = r.b + len;
  r.what = "XLogData";
  r.err[0] = '\0';
  relidx = lua_absindex(L, relidx);
  luaL_checkstack(L, 32, "pgoutput decoder");
  if (!dec_copydata(L, &r, relidx) && !r.err[0]) /* cannot happen: every failure says why */
    snprintf(r.err, sizeof r.err, "pgoutput: malformed %s message", r.what);
  else if (!r.err[0] && r.p != r.e)
    snprintf(r.err, sizeof r.err, "pgoutput: %zu unexpected bytes after a %s message",
             left(&r), r.what);
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
  push_lsn(L, (uint64_t)luaL_checkinteger(L, 1));
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
