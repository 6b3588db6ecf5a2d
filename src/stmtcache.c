/*
 * stmtcache.c -- exec's statement cache: a parameterized statement seen a
 * second time is prepared on the server as pglisten_<id> and executed by
 * name from then on; entries the server lost or whose plan went stale are
 * forgotten, and deallocated outside a transaction block.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn.h"

/* ------------------------------------------------------------------ */
/* The statement cache                                                 */
/* ------------------------------------------------------------------ */

/* Forgets every entry (a new session, or the server dropped them). */
void pgl_stmts_forget(pgl_conn *c) {
  int i;
  for (i = 0; i < PGL_STMTS; i++) {
    free(c->stmts[i].sql);
    memset(&c->stmts[i], 0, sizeof c->stmts[i]);
  }
  c->nstale = 0;
}

static void stmt_drop(pgl_stmt *s) {
  free(s->sql);
  memset(s, 0, sizeof *s);
}

static unsigned stmt_hash(const char *sql, size_t len) {
  unsigned h = 2166136261u; /* FNV-1a */
  size_t i;
  for (i = 0; i < len; i++)
    h = (h ^ (unsigned char)sql[i]) * 16777619u;
  return h;
}

static void stmt_name(char *buf, size_t size, unsigned id) {
  snprintf(buf, size, "pglisten_%u", id);
}

/* Runs `sql` with no result wanted, bounded by the connection's query
 * timeout; 1 when it worked.  Leaves nothing. */
static int run_quiet(lua_State *L, pgl_conn *c, const char *sql) {
  int top = lua_gettop(L), r = pgl_run_query(L, c, sql, NULL, 0, 0, NULL, c->timeout);
  if (r > 0)
    pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
  lua_settop(L, top);
  return r > 0;
}

/* DEALLOCATEs statement `id`; 1 when it worked (or is gone). */
static int stmt_deallocate(lua_State *L, pgl_conn *c, unsigned id) {
  char cmd[48];
  snprintf(cmd, sizeof cmd, "DEALLOCATE pglisten_%u", id);
  return run_quiet(L, c, cmd) || PQstatus(c->pg) == CONNECTION_OK;
}

/* Outside a transaction block: deallocates the statements that went stale
 * inside one (a failed DEALLOCATE there would have aborted it). */
static void stmts_sweep(lua_State *L, pgl_conn *c) {
  while (c->nstale > 0 && PQtransactionStatus(c->pg) == PQTRANS_IDLE) {
    if (!stmt_deallocate(L, c, c->stale[c->nstale - 1]))
      return; /* the connection is gone: so are they */
    c->nstale--;
  }
}

/* A prepared statement that can no longer run: deallocated now when outside
 * a transaction block, else queued for stmts_sweep; its slot is freed. */
static void stmt_retire(lua_State *L, pgl_conn *c, pgl_stmt *s) {
  if (s->prepared) {
    if (PQtransactionStatus(c->pg) == PQTRANS_IDLE)
      stmt_deallocate(L, c, s->id);
    else if (c->nstale < PGL_STMTS)
      c->stale[c->nstale++] = s->id;
  }
  stmt_drop(s);
}

/*
 * Remembers a statement seen for the first time: in a free slot, else in
 * place of the least recently used entry that was never prepared, else of
 * the least recently used prepared one, which is deallocated first.  That
 * only happens outside a transaction block (a failed DEALLOCATE would abort
 * the caller's transaction); otherwise the statement is not remembered.
 */
static void stmt_remember(lua_State *L, pgl_conn *c, const char *sql, size_t len, int nparams,
                          unsigned hash) {
  pgl_stmt *victim = NULL;
  char *copy;
  int i;
  for (i = 0; i < PGL_STMTS; i++) {
    pgl_stmt *s = &c->stmts[i];
    if (!s->sql) {
      victim = s;
      break;
    }
    if (!victim || (victim->prepared && !s->prepared) ||
        (victim->prepared == s->prepared && s->used < victim->used))
      victim = s;
  }
  if (victim->sql && victim->prepared && PQtransactionStatus(c->pg) != PQTRANS_IDLE)
    return;
  if ((copy = (char *)malloc(len + 1)) == NULL)
    return; /* not cached: no harm done */
  memcpy(copy, sql, len + 1);
  if (victim->sql && victim->prepared && !stmt_deallocate(L, c, victim->id)) {
    free(copy);
    return;
  }
  stmt_drop(victim);
  victim->sql = copy;
  victim->len = len;
  victim->hash = hash;
  victim->nparams = nparams;
  victim->used = ++c->stmt_clock;
}

/* Case-insensitive: does `*sql`, after white space, start with the word
 * `word`?  Moves *sql past it when it does. */
static int take_word(const char **sql, const char *word) {
  const char *p = *sql;
  while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
    p++;
  for (; *word; word++, p++)
    if ((*p | 0x20) != *word)
      return 0;
  if ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_')
    return 0;
  *sql = p;
  return 1;
}

/* DISCARD ALL, DEALLOCATE [PREPARE] ALL: the session's prepared statements
 * are gone.  (Any other loss is found by 26000 when a statement runs.) */
int pgl_drops_all(const char *sql) {
  if (take_word(&sql, "discard"))
    return take_word(&sql, "all");
  if (take_word(&sql, "deallocate")) {
    take_word(&sql, "prepare");
    return take_word(&sql, "all");
  }
  return 0;
}

/*
 * exec of a parameterized statement through the cache: the first time as
 * an unnamed statement (as without the cache), the second time prepared,
 * then by name.  A prepared statement the server no longer has (26000:
 * DISCARD ALL, a pooler that switched sessions) or whose plan no longer
 * fits (0A000 "cached plan must not change result type", after ALTER
 * TABLE) is forgotten.  When unrun_kind() shows the error came before
 * anything was executed (never from the message text, which lc_messages
 * translates), the statement runs again unnamed if no transaction block
 * was involved; an error raised while it ran is returned as it is.
 * Returns like run_query.
 */
int pgl_exec_cached(lua_State *L, pgl_conn *c, const char *sql, size_t len, int nparams,
                    const char *const *values) {
  unsigned hash = stmt_hash(sql, len);
  PGTransactionStatusType tx = PQtransactionStatus(c->pg);
  pgl_stmt *s = NULL;
  char name[32];
  int i, r, unrun;
  if (c->nstale > 0 && tx == PQTRANS_IDLE)
    stmts_sweep(L, c);
  for (i = 0; i < PGL_STMTS; i++) {
    pgl_stmt *e = &c->stmts[i];
    if (e->sql && e->hash == hash && e->len == len && e->nparams == nparams &&
        memcmp(e->sql, sql, len) == 0) {
      s = e;
      break;
    }
  }
  if (!s) {
    if (tx == PQTRANS_IDLE || tx == PQTRANS_INTRANS)
      stmt_remember(L, c, sql, len, nparams, hash);
    return pgl_run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
  }
  s->used = ++c->stmt_clock;
  if (!s->prepared) {
    if (tx != PQTRANS_IDLE && tx != PQTRANS_INTRANS)
      return pgl_run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
    s->id = ++c->stmt_next;
    stmt_name(name, sizeof name, s->id);
    r = pgl_run_query(L, c, sql, name, 1, nparams, NULL, c->timeout);
    if (r < 0) { /* the statement's own error (as unnamed), or a lost connection */
      const char *code = r == -3 ? lua_tostring(L, -1) : NULL;
      stmt_drop(s);
      if (code && strcmp(code, "42P05") == 0 && tx == PQTRANS_IDLE) {
        lua_pop(L, 3); /* the session has a statement of that name already */
        return pgl_run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
      }
      return r;
    }
    pgl_unbox_result((PGresult **)lua_touserdata(L, -1));
    lua_pop(L, 1);
    s->prepared = 1;
  }
  stmt_name(name, sizeof name, s->id);
  r = pgl_run_query_x(L, c, sql, name, 0, nparams, values, c->timeout, &unrun);
  if (r == -3) {
    const char *code = lua_tostring(L, -1);
    int gone = code && strcmp(code, "26000") == 0, stale = unrun == PGL_UNRUN_STALE;
    if (gone) {
      stmt_drop(s); /* whoever raised it: a retry prepares it again */
    } else if (stale) {
      stmt_retire(L, c, s);
    }
    if (unrun != PGL_RAN && tx == PQTRANS_IDLE && PQtransactionStatus(c->pg) == PQTRANS_IDLE) {
      lua_pop(L, 3);
      return pgl_run_query(L, c, sql, NULL, 0, nparams, values, c->timeout);
    }
  }
  return r;
}

/*
 * conn:statement_cache([on]) -> whether exec prepares repeated statements
 * (before this call); `on` false turns it off and forgets the entries
 * (their statements stay on the server until the session ends).
 */
int pgl_conn_statement_cache(lua_State *L) {
  pgl_conn *c = pgl_checkconn(L, 1);
  int was = c->stmt_cache;
  if (!lua_isnone(L, 2)) {
    c->stmt_cache = lua_toboolean(L, 2);
    if (!c->stmt_cache)
      pgl_stmts_forget(c);
  }
  lua_pushboolean(L, was);
  return 1;
}
