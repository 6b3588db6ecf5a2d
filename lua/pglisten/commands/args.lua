--- What the subcommands (`lua-pglisten outbox ...`, `lua-pglisten
-- backfill ...`) share: their option parser (pglisten.argv, the runner's
-- too), the database to use and the error line.
-- @module pglisten.commands.args

local argv = require "pglisten.argv"

local M = {}

--- Parses `argv[first..]` against `options`; returns opts (with `opts[1..]`
-- the positional arguments), or nil and a usage error.  It is
-- pglisten.argv.parse: see there for the option fields.
-- @function parse
M.parse = argv.parse

--- The database to use: --db, else $DATABASE_URL, else libpq's environment.
function M.db(opts)
  return opts.db or os.getenv("DATABASE_URL") or ""
end

--- Writes "lua-pglisten: ..." and a newline to stderr.
function M.printerr(...)
  io.stderr:write("lua-pglisten: ", ...)
  io.stderr:write("\n")
end

return M
