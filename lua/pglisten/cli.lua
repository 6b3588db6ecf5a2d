--- The command line of lua-pglisten: options, --help, --version, --check,
-- --sql / --install, and starting the runner (pglisten.runner).
-- @module pglisten.cli

local pg = require "pglisten"
local host = require "pglisten.host"
local logmod = require "pglisten.log"
local scriptmod = require "pglisten.script"
local conninfo = require "pglisten.conninfo"
local parser = require "pglisten.argv"

local M = {}

local USAGE = [[
usage: lua-pglisten [options] SCRIPT
       lua-pglisten --sql | --install [--db CONNINFO]
       lua-pglisten --drop-slot [--db CONNINFO] SCRIPT
       lua-pglisten outbox status|dead|replay|purge [options]  (outbox --help)
       lua-pglisten backfill --table T --channel C [options] SCRIPT  (backfill --help)

Runs the handler script SCRIPT: LISTENs on the channels it names and calls
its handler for each notification, with the payload decoded from JSON.

  -d, --db CONNINFO        database to listen on (default: $DATABASE_URL, else
                           libpq's PG* environment)
  -c, --check              load and validate SCRIPT, print its channels, exit
  -l, --log-level LEVEL    error | warn | info | debug (default info)
      --log-format FMT     text | json (one JSON object per line)
      --reconnect-min SECS first reconnect delay, >= 0.001 (default 0.1, doubling)
      --reconnect-max SECS longest reconnect delay, >= 0.001 (default 30)
      --heartbeat SECS     check an idle connection after SECS (default 30; 0: off)
      --stats-interval SECS  log statistics every SECS (default 60; 0: off)
      --single-active      one active runner per script and database (leader
                           elected with an advisory lock; others stand by)
      --metrics [ADDR:]PORT  serve GET /metrics (Prometheus text format) on
                           ADDR (default 127.0.0.1)
      --metrics-file PATH  write the same text to PATH every stats interval
                           (written to PATH.tmp, then renamed)
      --tap CHANNEL[,..]   print each decoded event of CHANNEL as one JSON
                           line on stdout instead of calling its handler
                           (repeatable; durable events stay in the outbox)
      --sql                print the SQL that installs schema pglisten, exit
      --install            apply that SQL to --db, exit
      --drop-slot          drop SCRIPT's replication slot (and the publication
                           lua-pglisten created for it), exit
  -V, --version            print the version, exit
  -h, --help               print this help, exit

Signals: TERM/INT stop after the running handler (a second one exits at
once), HUP reloads SCRIPT, USR1 logs statistics.
Exit status: 0 clean shutdown, 1 fatal runtime error, 2 usage or script error.
]]

-- Given twice, an option takes the later value (a wrapper can override a
-- unit's --log-level); --tap grows.
local OPTIONS = {
  twice = "last",
  { short = "d", long = "db", arg = true },
  { short = "c", long = "check" },
  { short = "l", long = "log-level", arg = true },
  { long = "log-format", arg = true },
  { long = "reconnect-min", arg = true, number = true, positive = true },
  { long = "reconnect-max", arg = true, number = true, positive = true },
  { long = "heartbeat", arg = true, number = true },
  { long = "stats-interval", arg = true, number = true },
  { long = "single-active" },
  { long = "metrics", arg = true },
  { long = "metrics-file", arg = true },
  { long = "tap", arg = true, list = true },
  { long = "sql" },
  { long = "install" },
  { long = "drop-slot" },
  { short = "V", long = "version" },
  { short = "h", long = "help" },
}

--- Parses argv; returns opts, or nil and a usage error.
function M.parse_args(argv)
  local opts, err = parser.parse(OPTIONS, argv)
  if not opts then return nil, err end
  if opts["log-level"] and not logmod.LEVELS[opts["log-level"]] then
    return nil, "invalid --log-level " .. opts["log-level"] .. " (error, warn, info or debug)"
  end
  if opts["log-format"] and opts["log-format"] ~= "text" and opts["log-format"] ~= "json" then
    return nil, "invalid --log-format " .. opts["log-format"] .. " (text or json)"
  end
  if #opts > 1 then return nil, "too many arguments: one SCRIPT expected" end
  opts.script, opts[1] = opts[1], nil
  if not opts.script and not (opts.help or opts.version or opts.sql or opts.install) then
    return nil, "missing SCRIPT"
  end
  return opts
end

--- Modules of the subcommands, by the first argument.
M.SUBCOMMANDS = { outbox = "pglisten.commands.outbox", backfill = "pglisten.commands.backfill" }

local function printerr(...)
  io.stderr:write("lua-pglisten: ", ...)
  io.stderr:write("\n")
end

--- libpq's version as people write it: 15.18 (9.6.24 before 10).
function M.libpq_version()
  local v = pg.libpq_version()
  if v >= 100000 then return ("%d.%d"):format(v // 10000, v % 10000) end
  return ("%d.%d.%d"):format(v // 10000, v // 100 % 100, v % 100)
end

-- --check: one line per channel, its name and what is not the default.
local function print_check(spec)
  for _, name in ipairs(spec.names) do
    local e = spec.channels[name]
    local extra = {}
    if e.decode ~= "json" and e.source ~= "replication" then extra[#extra + 1] = "decode=" .. e.decode end
    if e.batch then extra[#extra + 1] = "batch=" .. e.batch end
    if e.retry then extra[#extra + 1] = ("retry=%dx%gs"):format(e.retry.attempts, e.retry.backoff) end
    if e.durable then extra[#extra + 1] = "durable" end
    if e.source == "replication" then
      extra[#extra + 1] = "replication table=" .. e.table .. (e.on_failure == "dead" and " on_failure=dead" or "")
    end
    io.stdout:write(name, #extra > 0 and ("\t" .. table.concat(extra, " ")) or "", "\n")
  end
  return 0
end

--- Runs the program; returns the exit code.
function M.main(argv)
  -- subcommands: `lua-pglisten outbox ...`, `lua-pglisten backfill ...`
  local sub = M.SUBCOMMANDS[argv[1]]
  if sub then return require(sub).main(argv, 2) end
  local opts, err = M.parse_args(argv)
  if not opts then
    printerr(err)
    io.stderr:write("Try 'lua-pglisten --help'.\n")
    return 2
  end
  if opts.help then io.stdout:write(USAGE); return 0 end
  if opts.version then
    io.stdout:write(("lua-pglisten %s (%s, libpq %s)\n"):format(host.version, _VERSION, M.libpq_version()))
    return 0
  end
  if opts.sql or opts.install then return M.schema_command(opts) end

  local log = logmod.new({ level = opts["log-level"], format = opts["log-format"] })
  local spec
  pg.checking = opts.check or false -- connections made now are lazy and never opened
  spec, err = scriptmod.load(opts.script)
  pg.checking = false
  if not spec then
    -- a conninfo given where SCRIPT goes (--db forgotten) is shown without its secrets
    local secrets = conninfo.secrets(opts.script)
    err, opts.script = conninfo.mask(tostring(err), secrets), conninfo.mask(opts.script, secrets)
    if host.stopping() then -- SIGTERM/INT during the script's top level (a connect it waited on)
      log.info("stopped: signal received while loading the script", { script = opts.script, error = err })
      return 0
    end
    if opts.check then
      printerr(err)
    else
      log.error("cannot load script", { script = opts.script, error = err })
    end
    return 2
  end
  if opts.check then return print_check(spec) end
  if opts["drop-slot"] then return M.drop_slot(opts, spec) end
  if opts.tap then
    spec, err = require("pglisten.tap").apply(spec, opts.tap, opts.db)
    if not spec then printerr(err); return 2 end
  end
  local runner = require("pglisten.runner").make_runner(opts, spec, log)
  if runner.metrics and runner.metrics.err then
    log.error("cannot serve metrics", { address = runner.metrics.address, error = runner.metrics.err })
    runner:close()
    return 1
  end
  return runner:run()
end

--- --drop-slot: drops the script's replication slot, and its publication
-- when lua-pglisten created it.
function M.drop_slot(opts, spec)
  local slotmod = require "pglisten.replication.slot"
  local cfg = slotmod.config(spec)
  if not cfg then
    printerr(opts.script, ': no channel has source = "replication": there is no slot to drop')
    return 2
  end
  local db = opts.db or os.getenv("DATABASE_URL") or ""
  local conn, err = pg.connect(db)
  if not conn then
    printerr("cannot connect: ", err)
    return 1
  end
  local done
  done, err = slotmod.drop(conn, cfg)
  conn:close()
  if not done then
    printerr(err)
    return 1
  end
  for _, line in ipairs(done) do io.stdout:write(line, "\n") end
  return 0
end

--- --sql / --install.
function M.schema_command(opts)
  local ok, schema = pcall(require, "pglisten.schema")
  if not ok then
    printerr("schema unavailable: ", tostring(schema))
    return 1
  end
  if opts.sql then
    io.stdout:write(schema.sql, "\n")
    return 0
  end
  local db = opts.db or os.getenv("DATABASE_URL") or ""
  local conn, err = pg.connect(db)
  if not conn then
    printerr("cannot connect: ", err)
    return 1
  end
  local r, xerr = conn:exec(schema.sql)
  conn:close()
  if not r then
    printerr("install failed: ", xerr)
    return 1
  end
  io.stdout:write("schema pglisten installed\n")
  return 0
end

return M
