/*
 * pgoutput_rows.c -- pgoutput's Relation messages (kept in the relation
 * map, relid -> relation, replaced by a newer one) and the row changes
 * decoded with them: Insert, Update, Delete, Truncate.  A tuple becomes a
 * table keyed by column name, each 't' value typed as exec types it
 * (pgl_push_text_value), 'n' pglisten.null, 'u' pglisten.unchanged.
 * Every count is checked against the bytes left before it is used.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "pgoutput.h"

/* ------------------------------------------------------------------ */
/* Relations and tuples                                                */
/* ------------------------------------------------------------------ */

/* The columns of a Relation message (natts of them, on top of the
 * relation table): `columns`, { key, name, type, typmod } each, and the
 * same names and types as two flat arrays, `names` and `types`, which the
 * tuples are decoded with (two array reads per value, not a table and two
 * field lookups). */
static void dec_columns(lua_State *L, rd *r, uint64_t natts) {
  int rel = lua_gettop(L), cols, names, types;
  uint64_t i;
  size_t len;
  const char *s;
  lua_createtable(L, (int)natts, 0);
  lua_createtable(L, (int)natts, 0);
  lua_createtable(L, (int)natts, 0);
  cols = rel + 1, names = rel + 2, types = rel + 3;
  for (i = 1; i <= natts; i++) {
    lua_Integer type;
    lua_createtable(L, 0, 4);
    lua_pushboolean(L, (int)(pgl_rd_u(r, 1) & 1));
    lua_setfield(L, -2, "key");
    s = pgl_rd_str(r, &len);
    lua_pushlstring(L, s, len);
    lua_pushvalue(L, -1);
    lua_rawseti(L, names, (lua_Integer)i);
    lua_setfield(L, -2, "name");
    type = (lua_Integer)pgl_rd_u(r, 4);
    lua_pushinteger(L, type);
    lua_rawseti(L, types, (lua_Integer)i);
    pgl_set_int(L, "type", type);
    pgl_set_int(L, "typmod", (lua_Integer)(int32_t)(uint32_t)pgl_rd_u(r, 4));
    lua_rawseti(L, cols, (lua_Integer)i);
  }
  lua_setfield(L, rel, "types");
  lua_setfield(L, rel, "names");
  lua_setfield(L, rel, "columns");
}

/* Relation: relid, namespace, relname, replica identity, natts columns
 * (flags, name, type oid, typmod).  Stored in the map under relid. */
int pgl_dec_relation(lua_State *L, rd *r, int relidx) {
  uint64_t relid = pgl_rd_u(r, 4), ident, natts;
  size_t len;
  const char *s;
  char id;
  pgl_new_msg(L, "relation", 8);
  pgl_set_int(L, "relid", (lua_Integer)relid);
  s = pgl_rd_str(r, &len);
  pgl_set_str(L, "schema", s, len);
  s = pgl_rd_str(r, &len);
  pgl_set_str(L, "table", s, len);
  ident = pgl_rd_u(r, 1);
  id = (char)ident;
  lua_pushlstring(L, &id, ident ? 1 : 0); /* d(efault) n(othing) f(ull) i(ndex) */
  lua_setfield(L, -2, "replident");
  natts = pgl_rd_u(r, 2);
  if (natts > pgl_rd_left(r) / 10) /* a column is at least 10 bytes */
    pgl_rd_truncated(r);
  if (r->err[0])
    return 0;
  dec_columns(L, r, natts);
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

/* One 't' value of a column of type `type`, pushed typed. */
static int push_text(lua_State *L, rd *r, Oid type) {
  uint64_t n = pgl_rd_u(r, 4);
  if (!pgl_rd_need(r, (size_t)n))
    return 0;
  if (n < 64 && pgl_text_converts(type)) { /* a number, a boolean: no string made first */
    char buf[64];
    memcpy(buf, r->p, (size_t)n);
    buf[n] = '\0';
    r->p += n;
    pgl_push_text_value(L, buf, (size_t)n, type);
    return 1;
  }
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

/* Pushes the value of the next column, of type `type`. */
static int push_column(lua_State *L, rd *r, Oid type) {
  int kind = (int)pgl_rd_u(r, 1);
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
    return push_text(L, r, type);
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
  uint64_t natts = pgl_rd_u(r, 2), ncols, i;
  int names, types;
  if (r->err[0])
    return 0;
  names = lua_gettop(L) + 1, types = names + 1;
  if (lua_getfield(L, rel, "names") != LUA_TTABLE || lua_getfield(L, rel, "types") != LUA_TTABLE) {
    snprintf(r->err, sizeof r->err, "pgoutput: %s message for a relation without names and types",
             r->what);
    return 0;
  }
  ncols = (uint64_t)lua_rawlen(L, names);
  if (ncols != (uint64_t)lua_rawlen(L, types)) {
    snprintf(r->err, sizeof r->err, "pgoutput: %s message for a relation whose names and types differ",
             r->what);
    return 0;
  }
  if (natts != ncols) {
    snprintf(r->err, sizeof r->err, "pgoutput: %s message has %" PRIu64 " columns, its relation %"
             PRIu64, r->what, natts, ncols);
    return 0;
  }
  if (natts > pgl_rd_left(r)) /* a column is at least its kind byte */
    pgl_rd_truncated(r);
  if (r->err[0])
    return 0;
  lua_createtable(L, 0, (int)natts);
  for (i = 1; i <= natts; i++) {
    Oid type;
    lua_rawgeti(L, names, (lua_Integer)i);
    lua_rawgeti(L, types, (lua_Integer)i);
    type = (Oid)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
      snprintf(r->err, sizeof r->err, "pgoutput: %s message for a relation whose column %" PRIu64
               " has no name", r->what, i);
      return 0;
    }
    if (!push_column(L, r, type))
      return 0;
    lua_rawset(L, -3);
  }
  lua_replace(L, names);
  lua_settop(L, names);
  return 1;
}

/* ------------------------------------------------------------------ */
/* Row changes                                                         */
/* ------------------------------------------------------------------ */

/* A row change message: op, relid, schema, table; the relation pushed
 * below it.  Returns the relation's absolute index, 0 on error. */
static int new_change(lua_State *L, rd *r, int relidx, const char *kind, const char *op) {
  uint64_t relid = pgl_rd_u(r, 4);
  int rel;
  if (!get_rel(L, r, relidx, relid))
    return 0;
  rel = lua_gettop(L);
  if (r->mi && r->mi->events) { /* the event itself */
    r->mi->change = 1;
    r->mi->relid = relid;
    lua_createtable(L, 0, 5);
    lua_pushstring(L, op);
    lua_setfield(L, -2, "op");
    lua_getfield(L, rel, "schema");
    lua_setfield(L, -2, "schema");
    lua_getfield(L, rel, "table");
    lua_setfield(L, -2, "table");
    return rel;
  }
  pgl_new_msg(L, kind, 13); /* + lsn, lsn_int, wal_end_int, send_time, new, old, old_kind */
  lua_pushstring(L, op);
  lua_setfield(L, -2, "op");
  pgl_set_int(L, "relid", (lua_Integer)relid);
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
int pgl_dec_insert(lua_State *L, rd *r, int relidx) {
  int rel = new_change(L, r, relidx, "insert", "INSERT");
  if (!rel)
    return 0;
  if (pgl_rd_u(r, 1) != 'N')
    pgl_rd_truncated(r);
  if (!set_tuple(L, r, rel, "new"))
    return 0;
  lua_remove(L, rel);
  return 1;
}

/* Update: relid, optional 'K' (key) or 'O' (old row) tuple, 'N' new tuple.
 * Delete: relid, 'K' or 'O' tuple. */
int pgl_dec_update_delete(lua_State *L, rd *r, int relidx, int update) {
  int rel = new_change(L, r, relidx, update ? "update" : "delete", update ? "UPDATE" : "DELETE");
  uint64_t k;
  if (!rel)
    return 0;
  k = pgl_rd_u(r, 1);
  if (k == 'K' || k == 'O') {
    if (!(r->mi && r->mi->events)) {
      lua_pushstring(L, k == 'K' ? "key" : "full");
      lua_setfield(L, -2, "old_kind");
    }
    if (!set_tuple(L, r, rel, "old"))
      return 0;
    if (update)
      k = pgl_rd_u(r, 1);
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
int pgl_dec_truncate(lua_State *L, rd *r, int relidx) {
  uint64_t n = pgl_rd_u(r, 4), flags = pgl_rd_u(r, 1), i;
  if (n > pgl_rd_left(r) / 4)
    pgl_rd_truncated(r);
  if (r->err[0])
    return 0;
  pgl_new_msg(L, "truncate", 4);
  lua_pushliteral(L, "TRUNCATE");
  lua_setfield(L, -2, "op");
  lua_pushboolean(L, (int)(flags & 1));
  lua_setfield(L, -2, "cascade");
  lua_pushboolean(L, (int)(flags & 2));
  lua_setfield(L, -2, "restart_identity");
  lua_createtable(L, (int)n, 0);
  for (i = 1; i <= n; i++) {
    uint64_t relid = pgl_rd_u(r, 4);
    if (!get_rel(L, r, relidx, relid))
      return 0;
    lua_createtable(L, 0, 3);
    pgl_set_int(L, "relid", (lua_Integer)relid);
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

