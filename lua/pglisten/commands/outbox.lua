--- `lua-pglisten outbox status|dead|replay|purge`: the operator's tools
-- for durable channels (the data layer is pglisten.outbox_admin).
--
-- Exit status: 0 done, 1 a runtime failure (cannot connect, a query
-- failed), 2 a usage error.  Messages never show the conninfo's secrets.
-- @module pglisten.commands.outbox

local pg = require "pglisten"
local args = require "pglisten.commands.args"
local admin = require "pglisten.outbox_admin"
local conninfo = require "pglisten.conninfo"

local M = {}

local USAGE = [[
usage: lua-pglisten outbox status [--channel C] [--format text|json] [--db CONNINFO]
       lua-pglisten outbox dead [--channel C] [--limit N] [--format text|json] [--db CONNINFO]
       lua-pglisten outbox replay (--id N [--id N ...] | --all) [--channel C] [--db CONNINFO]
       lua-pglisten outbox purge --dead --older-than DURATION [--channel C] [--db CONNINFO]

  status   per durable channel: events waiting and the oldest one's age,
           events due now, dead letters
  dead     dead letters with their last error, oldest first (default limit 100)
  replay   moves dead letters back into the outbox (attempts = 0, created_at
           kept) and wakes the runners; --all: every one (of --channel's)
  purge    deletes dead letters that failed more than DURATION ago: whole
           numbers with a unit s, m (minutes), h or d, e.g. 7d, 36h, 1d12h

  -d, --db CONNINFO   database (default: $DATABASE_URL, else libpq's PG* environment)
Exit status: 0 done, 1 runtime failure, 2 usage error.
]]

local COMMON = {
  { short = "d", long = "db", arg = true },
  { long = "channel", arg = true },
  { short = "h", long = "help" },
}

local function options(extra)
  local t = {}
  for _, o in ipairs(COMMON) do t[#t + 1] = o end
  for _, o in ipairs(extra) do t[#t + 1] = o end
  return t
end

local SUB = {
  status = options({ { long = "format", arg = true } }),
  dead = options({ { long = "format", arg = true }, { long = "limit", arg = true, integer = true } }),
  replay = options({ { long = "id", arg = true, integer = true, many = true }, { long = "all" } }),
  purge = options({ { long = "dead" }, { long = "older-than", arg = true } }),
}

local function usage(msg)
  args.printerr(msg)
  io.stderr:write("Try 'lua-pglisten outbox --help'.\n")
  return 2
end

-- Seconds as a short age: 42s, 5m12s, 3h04m, 2d03h.
local function age(s)
  if not s then return "-" end
  s = math.max(0, math.floor(s))
  if s < 60 then return ("%ds"):format(s) end
  if s < 3600 then return ("%dm%02ds"):format(s // 60, s % 60) end
  if s < 86400 then return ("%dh%02dm"):format(s // 3600, s % 3600 // 60) end
  return ("%dd%02dh"):format(s // 86400, s % 86400 // 3600)
end

local function one_line(s, n)
  s = tostring(s or ""):gsub("[%c]+", " ")
  if #s > n then s = s:sub(1, n - 3) .. "..." end
  return s
end

-- An array as JSON ([] when empty, which the encoder writes as {}).
local function json_out(list)
  io.stdout:write(#list == 0 and "[]" or pg.json.encode(list), "\n")
  return 0
end

local function cmd_status(conn, opts)
  local rows, err = admin.status(conn, opts.channel)
  if not rows then return nil, err end
  if opts.format == "json" then
    local list = {}
    for i, r in ipairs(rows) do
      list[i] = { channel = r.channel, waiting = r.waiting, due = r.due, dead = r.dead,
        oldest_age_seconds = r.oldest_age or pg.null }
    end
    return json_out(list)
  end
  io.stdout:write(("%-24s %9s %10s %9s %9s\n"):format("CHANNEL", "WAITING", "OLDEST", "DUE", "DEAD"))
  for _, r in ipairs(rows) do
    io.stdout:write(("%-24s %9d %10s %9d %9d\n"):format(r.channel, r.waiting, age(r.oldest_age), r.due, r.dead))
  end
  return 0
end

local function cmd_dead(conn, opts)
  local rows, err = admin.dead(conn, opts.channel, opts.limit or 100)
  if not rows then return nil, err end
  if opts.format == "json" then
    for _, r in ipairs(rows) do
      r.failed_at, r.last_error = r.failed_at or pg.null, r.last_error or pg.null
    end
    return json_out(rows)
  end
  io.stdout:write(("%-10s %-20s %8s %-26s %s\n"):format("ID", "CHANNEL", "ATTEMPTS", "FAILED_AT", "LAST_ERROR"))
  for _, r in ipairs(rows) do
    io.stdout:write(("%-10d %-20s %8d %-26s %s\n"):format(r.id, r.channel, r.attempts, r.failed_at or "-",
      one_line(r.last_error, 200)))
  end
  return 0
end

local function cmd_replay(conn, opts)
  local n, err = admin.replay(conn, opts.id, opts.channel)
  if not n then return nil, err end
  io.stdout:write(("replayed %d dead letter%s\n"):format(n, n == 1 and "" or "s"))
  return 0
end

local function cmd_purge(conn, opts, seconds)
  local n, err = admin.purge(conn, seconds, opts.channel)
  if not n then return nil, err end
  io.stdout:write(("purged %d dead letter%s\n"):format(n, n == 1 and "" or "s"))
  return 0
end

-- Usage checks that need more than the parser; returns an error or nil.
local function check(sub, opts)
  if #opts > 0 then return "unexpected argument " .. opts[1] end
  if opts.format and opts.format ~= "text" and opts.format ~= "json" then
    return "invalid --format " .. opts.format .. " (text or json)"
  end
  if sub == "replay" and not (opts.id or opts.all) then
    return "outbox replay needs --id N (one or more) or --all"
  end
  if sub == "replay" and opts.id and opts.all then return "outbox replay: --id and --all exclude each other" end
  if sub == "purge" then
    if not opts.dead then return "outbox purge needs --dead (dead letters are all it purges)" end
    if not opts["older-than"] then return "outbox purge needs --older-than DURATION (e.g. 7d)" end
    local s, err = admin.duration(opts["older-than"])
    if not s then return "--older-than: " .. err end
    opts.seconds = s
  end
end

local RUN = { status = cmd_status, dead = cmd_dead, replay = cmd_replay, purge = cmd_purge }

--- Runs `lua-pglisten outbox ...` with `argv[first]` the subcommand;
-- returns the exit code.
function M.main(argv, first)
  local sub = argv[first]
  if sub == nil or sub == "--help" or sub == "-h" or sub == "help" then
    if sub == nil then return usage("outbox: missing subcommand (status, dead, replay or purge)") end
    io.stdout:write(USAGE)
    return 0
  end
  if not SUB[sub] then return usage("outbox: unknown subcommand " .. sub .. " (status, dead, replay or purge)") end
  local opts, err = args.parse(SUB[sub], argv, first + 1)
  if not opts then return usage("outbox " .. sub .. ": " .. err) end
  if opts.help then io.stdout:write(USAGE); return 0 end
  err = check(sub, opts)
  if err then return usage("outbox " .. sub .. ": " .. err) end
  local db = args.db(opts)
  local conn
  conn, err = pg.connect(db)
  if not conn then
    args.printerr("cannot connect to ", pg.safe_conninfo(db), ": ", err)
    return 1
  end
  local rc
  rc, err = RUN[sub](conn, opts, opts.seconds)
  conn:close()
  if not rc then
    args.printerr("outbox ", sub, " failed: ", conninfo.redact(tostring(err), db))
    return 1
  end
  return rc
end

return M
