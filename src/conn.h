/*
 * conn.h -- internal to the pglisten.conn object, whose code is split by
 * job: conn.c (the object, connect, life cycle, accessors, the method
 * table), query.c (sending a query and collecting its results: exec, ping),
 * stmtcache.c (exec's cache of prepared statements) and notify.c (wait,
 * drain).  Nothing here leaves the module.
 */
#ifndef PGL_CONN_H
#define PGL_CONN_H

#include "pgl.h"

/* conn.c */
double pgl_deadline_in(double secs);           /* -1 for none (secs < 0) */
double pgl_opt_timeout(lua_State *L, int idx); /* -1 when absent; raises when < 0 */

/* query.c */
/* What an error of a named statement says about whether it ran. */
enum { PGL_RAN = 0, PGL_UNRUN_GONE, PGL_UNRUN_STALE };
/* Runs a query (see query.c): 1 with the last result boxed on the stack, or
 * -(count) after pushing nil, message[, sqlstate]. */
int pgl_run_query_x(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                    int nparams, const char *const *values, double timeout, int *unrun);
int pgl_run_query(lua_State *L, pgl_conn *c, const char *sql, const char *stmt, int prepare,
                  int nparams, const char *const *values, double timeout);
int pgl_conn_exec(lua_State *L);
int pgl_conn_exec_upto(lua_State *L);
int pgl_conn_ping(lua_State *L);

/* stmtcache.c */
void pgl_stmts_forget(pgl_conn *c);
int pgl_drops_all(const char *sql);
int pgl_exec_cached(lua_State *L, pgl_conn *c, const char *sql, size_t len, int nparams,
                    const char *const *values);
int pgl_conn_statement_cache(lua_State *L);

/* notify.c */
int pgl_conn_wait(lua_State *L);
int pgl_conn_drain(lua_State *L);

#endif
