--- The lua-pglisten runner: options, the handler script, the listen loop.
--
-- The C host (src/main.c) calls `main(argv)` and exits with what it returns:
-- 0 after a clean shutdown, 1 on a fatal runtime error, 2 on a usage or
-- script error.
--
-- The loop, one notification at a time in server order:
--   wait on the listening socket (woken early by signals) -> drain what has
--   arrived -> decode -> handler (retried as the channel says) -> on_error.
-- Between notifications: signals (TERM/INT stop, HUP reload, USR1 stats),
-- heartbeat, statistics, and reconnecting with capped exponential backoff.
-- @module pglisten.runner

local pg = require "pglisten"
local host = require "pglisten.host"
local logmod = require "pglisten.log"
local scriptmod = require "pglisten.script"

local M = {}

local now = pg.monotonic
local traceback = debug.traceback
local _
local xpcall, pcall, type, tostring = xpcall, pcall, type, tostring
local json_decode, cjson_decode = pg.json.safe.decode, pg.json.cjson_decode

M.DEFAULTS = {
  reconnect_min = 0.1,
  reconnect_max = 30,
  heartbeat = 30,
  heartbeat_timeout = 10,
  stats_interval = 60,
  connect_timeout = 10,
  stop_grace = 3,        -- seconds to finish notifications already received after TERM
  drain = 256,           -- notifications taken from libpq per read
  retry_buffer = 10000,  -- notifications read ahead while a handler waits to retry
}

local USAGE = [[
usage: lua-pglisten [options] SCRIPT
       lua-pglisten --sql | --install [--db CONNINFO]

Runs the handler script SCRIPT: LISTENs on the channels it names and calls
its handler for each notification, with the payload decoded from JSON.

  -d, --db CONNINFO        database to listen on (default: $DATABASE_URL, else
                           libpq's PG* environment)
  -c, --check              load and validate SCRIPT, print its channels, exit
  -l, --log-level LEVEL    error | warn | info | debug (default info)
      --log-format FMT     text | json (one JSON object per line)
      --reconnect-min SECS first reconnect delay (default 0.1, doubling)
      --reconnect-max SECS longest reconnect delay (default 30)
      --heartbeat SECS     check an idle connection after SECS (default 30; 0: off)
      --stats-interval SECS  log statistics every SECS (default 60; 0: off)
      --single-active      one active runner per script and database (leader
                           elected with an advisory lock; others stand by)
      --sql                print the SQL that installs schema pglisten, exit
      --install            apply that SQL to --db, exit
  -V, --version            print the version, exit
  -h, --help               print this help, exit

Signals: TERM/INT stop after the running handler (a second one exits at
once), HUP reloads SCRIPT, USR1 logs statistics.
Exit status: 0 clean shutdown, 1 fatal runtime error, 2 usage or script error.
]]

---------------------------------------------------------------------------
-- Command line
---------------------------------------------------------------------------

local OPTIONS = {
  { short = "d", long = "db", arg = true },
  { short = "c", long = "check" },
  { short = "l", long = "log-level", arg = true },
  { long = "log-format", arg = true },
  { long = "reconnect-min", arg = true, number = true },
  { long = "reconnect-max", arg = true, number = true },
  { long = "heartbeat", arg = true, number = true },
  { long = "stats-interval", arg = true, number = true },
  { long = "single-active" },
  { long = "sql" },
  { long = "install" },
  { short = "V", long = "version" },
  { short = "h", long = "help" },
}

--- Parses argv; returns opts, or nil and a usage error.
function M.parse_args(argv)
  local opts, positional, i = {}, {}, 1
  local function find(name, short)
    for _, o in ipairs(OPTIONS) do
      if (short and o.short == name) or (not short and o.long == name) then return o end
    end
  end
  while i <= #argv do
    local a = argv[i]
    local o, val
    if a == "--" then
      for j = i + 1, #argv do positional[#positional + 1] = argv[j] end
      break
    elseif a:sub(1, 2) == "--" then
      local name, v = a:match("^%-%-([^=]+)=(.*)$")
      name = name or a:sub(3)
      o, val = find(name, false), v
      if not o then return nil, "unknown option --" .. name end
    elseif a:sub(1, 1) == "-" and #a > 1 then
      o = find(a:sub(2, 2), true)
      if not o then return nil, "unknown option " .. a:sub(1, 2) end
      if #a > 2 then
        if not o.arg then return nil, "option -" .. o.short .. " takes no value" end
        val = a:sub(3)
      end
    else
      positional[#positional + 1] = a
    end
    if o then
      if o.arg then
        if val == nil then
          i = i + 1
          val = argv[i]
          if val == nil then return nil, "option --" .. o.long .. " needs a value" end
        end
        if o.number then
          local n = tonumber(val)
          if not n or n < 0 then return nil, "option --" .. o.long .. " needs a number >= 0, got " .. val end
          val = n
        end
        opts[o.long] = val
      else
        if val ~= nil then return nil, "option --" .. o.long .. " takes no value" end
        opts[o.long] = true
      end
    end
    i = i + 1
  end
  if opts["log-level"] and not logmod.LEVELS[opts["log-level"]] then
    return nil, "invalid --log-level " .. opts["log-level"] .. " (error, warn, info or debug)"
  end
  if opts["log-format"] and opts["log-format"] ~= "text" and opts["log-format"] ~= "json" then
    return nil, "invalid --log-format " .. opts["log-format"] .. " (text or json)"
  end
  if #positional > 1 then return nil, "too many arguments: one SCRIPT expected" end
  opts.script = positional[1]
  if not opts.script and not (opts.help or opts.version or opts.sql or opts.install) then
    return nil, "missing SCRIPT"
  end
  return opts
end

---------------------------------------------------------------------------
-- A FIFO of notifications
---------------------------------------------------------------------------

local Queue = {}
Queue.__index = Queue

local function new_queue()
  return setmetatable({ head = 1, tail = 0 }, Queue)
end

function Queue:push(v)
  local t = self.tail + 1
  self[t], self.tail = v, t
end

function Queue:peek() return self[self.head] end

function Queue:pop()
  local h = self.head
  local v = self[h]
  self[h] = nil
  if h == self.tail then
    self.head, self.tail = 1, 0
  else
    self.head = h + 1
  end
  return v
end

function Queue:len() return self.tail - self.head + 1 end

---------------------------------------------------------------------------
-- Connection errors that no retry can fix (start-up only)
---------------------------------------------------------------------------

local PERMANENT = {
  "password authentication failed", "authentication failed", "does not exist",
  "invalid connection option", 'missing "="', "invalid URI", "invalid port number",
  "invalid sslmode", "unterminated quoted string", "invalid integer value",
  "no password supplied", "is not permitted to log in", "pg_hba.conf",
  "invalid value for parameter", "invalid percent-encoded token", "unexpected spaces",
}

--- True when a connect error will not go away by retrying.
function M.permanent(err)
  for _, p in ipairs(PERMANENT) do
    if err:find(p, 1, true) then return true end
  end
  return false
end

--- Names the listening connection `lua-pglisten` in pg_stat_activity,
-- unless the conninfo (or PGAPPNAME) names it already.
function M.with_application_name(conninfo)
  local set = pg.core.conninfo_keys(conninfo)
  if not set or set.application_name or os.getenv("PGAPPNAME") then return conninfo end
  if conninfo:match("^postgres[a-z]*://") then
    return conninfo .. (conninfo:find("?", 1, true) and "&" or "?") .. "application_name=lua-pglisten"
  end
  return (conninfo == "" and "" or (conninfo .. " ")) .. "application_name=lua-pglisten"
end

---------------------------------------------------------------------------
-- The runner
---------------------------------------------------------------------------

local Runner = {}
Runner.__index = Runner

local function errstring(e)
  if type(e) == "string" then return e end
  local mt = getmetatable(e)
  if mt and mt.__tostring then return tostring(e) end
  if type(e) == "table" then
    local s = pg.json.safe.encode(e)
    if s then return "(error object) " .. s end
  end
  return ("(error object is a %s value)"):format(type(e))
end

-- Message handler for handlers: keeps the error value and its traceback.
local last_traceback
-- The traceback stops where the runner called the handler.
local function handler_msgh(e)
  local tb = traceback(errstring(e), 2)
  local cut = tb:find("\n%s*%[C%]: in function 'xpcall'")
  last_traceback = cut and tb:sub(1, cut - 1) or tb
  return e
end

local function excerpt(s, n)
  n = n or 120
  if #s <= n then return s end
  return s:sub(1, n) .. ("... (%d bytes)"):format(#s)
end

Runner.errstring = errstring

function Runner.new(opts, spec, log)
  local self = setmetatable({}, Runner)
  self.opts, self.spec, self.log = opts, spec, log
  self.db = opts.db or os.getenv("DATABASE_URL") or ""
  self.listen_conninfo = M.with_application_name(self.db)
  self.queue = new_queue()
  self.stats = {
    received = 0, handled = 0, failed_decode = 0, failed_handler = 0,
    retries = 0, reconnects = 0, unrouted = 0,
  }
  self.started = now()
  self:configure()
  return self
end

-- Settings: command line over script over defaults.
function Runner:configure()
  local o, s, D = self.opts, self.spec, M.DEFAULTS
  local rc = s.reconnect or {}
  self.reconnect_min = o["reconnect-min"] or rc.min or D.reconnect_min
  self.reconnect_max = o["reconnect-max"] or rc.max or D.reconnect_max
  if self.reconnect_max < self.reconnect_min then self.reconnect_max = self.reconnect_min end
  self.heartbeat = o.heartbeat or s.heartbeat or D.heartbeat
  self.heartbeat_timeout = s.heartbeat_timeout or D.heartbeat_timeout
  self.stats_interval = o["stats-interval"] or s.stats_interval or D.stats_interval
  -- notes taken from libpq per read: enough to fill the largest batch
  local drain = s.batch_size or D.drain
  for _, e in pairs(s.channels) do
    if e.batch and e.batch > drain then drain = e.batch end
  end
  self.drain_max = drain
  if o["single-active"] and not s.single_active then s.single_active = true end
end

--- Signals since the last look: TERM/INT stop, HUP reload, USR1 stats.
function Runner:signals()
  if not host.pending() then return end
  local sig = host.signals()
  if sig.TERM and not self.stop_at then
    self.stop_at = now()
    self.log.info("stopping: signal received", { queued = self.queue:len() })
  end
  if sig.HUP and not self.stop_at then self:reload() end
  if sig.USR1 then self:log_stats() end
end

function Runner:stopping()
  return self.stop_at ~= nil
end

---------------------------------------------------------------------------
-- Connecting
---------------------------------------------------------------------------

function Runner:listen_all(conn)
  local names = self:wanted_channels()
  local ok, err = conn:listen(table.unpack(names))
  if not ok then return nil, err end
  return true
end

function Runner:wanted_channels()
  return self.spec.names
end

function Runner:call_on_connect(info)
  local f = self.spec.on_connect
  if not f then return end
  local ok, err = xpcall(f, handler_msgh, self.conn, info)
  if not ok then
    self.log.error("on_connect failed; listening goes on", { error = errstring(err), traceback = last_traceback })
  end
end

-- One connection attempt: connect, LISTEN.  Returns conn or nil, err.
function Runner:try_connect()
  local conn, err = pg.connect(self.listen_conninfo, { timeout = M.DEFAULTS.connect_timeout, heal = false })
  if not conn then return nil, err end
  local ok, lerr = self:listen_all(conn)
  if not ok then
    conn:close()
    return nil, "LISTEN failed: " .. tostring(lerr)
  end
  return conn
end

--- Connects with capped exponential backoff and jitter until it works or
-- the runner stops.  At start-up (`first`), an error no retry can fix
-- returns nil, err at once.
function Runner:connect_loop(first)
  local delay, attempt = self.reconnect_min, 0
  local last_warn = -math.huge
  local lost_at = self.lost_at or now()
  while true do
    self:signals()
    if self:stopping() then return nil, "stopped" end
    attempt = attempt + 1
    local conn, err = self:try_connect()
    if conn then
      self.conn, self.last_io = conn, now()
      local info = { reconnect = not first, attempts = attempt }
      if not first then
        info.disconnected_for = now() - lost_at
        self.stats.reconnects = self.stats.reconnects + 1
      end
      self.lost_at = nil
      self.log.info(first and "listening" or "reconnected", {
        db = pg.safe_conninfo(self.db), pid = conn:pid(), channels = table.concat(self:wanted_channels(), ","),
        attempts = attempt, disconnected_for = info.disconnected_for and ("%.3f"):format(info.disconnected_for),
      })
      self:after_connect(info)
      return conn
    end
    if err == "standby" then
      -- single active: another runner leads; try again shortly, quietly
      attempt, delay = 0, self.reconnect_min
      self:standby_wait()
      goto continue
    end
    if first and M.permanent(err) then return nil, err end
    -- one warning at first, then one every 30 s; every attempt at debug
    local t = now()
    if t - last_warn >= 30 then
      self.log.warn(first and "cannot connect yet; retrying" or "reconnect failed; retrying",
        { error = err, attempt = attempt, next_in = ("%.2f"):format(delay) })
      last_warn = t
    else
      self.log.debug("reconnect attempt failed", { error = err, attempt = attempt })
    end
    local sleep = delay / 2 + math.random() * delay / 2
    pg.sleep(sleep)
    delay = math.min(delay * 2, self.reconnect_max)
    ::continue::
  end
end

-- Called with the LISTENs in place: on_connect, then whatever else must
-- happen after every (re)connect.
function Runner:after_connect(info)
  self:call_on_connect(info)
end

--- The listening connection is gone: log it, close it, reconnect.
function Runner:lost(err)
  self.log.warn("connection lost", { error = err, queued = self.queue:len() })
  if self.conn then self.conn:close() end
  self.conn = nil
  self.lost_at = now()
end

---------------------------------------------------------------------------
-- Reading
---------------------------------------------------------------------------

-- Moves what libpq has already read into the queue (no waiting).
function Runner:drain_into_queue(max)
  local conn = self.conn
  if not conn then return end
  local buf = self.drain_buf
  if not buf then
    buf = {}
    self.drain_buf = buf
  end
  local batch, err = conn:drain(max or self.drain_max, buf)
  if not batch then
    self:lost(err)
    return
  end
  local q, n = self.queue, batch.n
  if n > 0 then
    local t = q.tail
    for i = 1, n do q[t + i] = batch[i] end
    q.tail = t + n
    self.last_io = now()
    self.stats.received = self.stats.received + n
  end
end

-- Seconds until the next timer is due (heartbeat, stats, others).
function Runner:next_timeout()
  local t = now()
  local due = math.huge
  if self.heartbeat > 0 then due = math.min(due, self.last_io + self.heartbeat - t) end
  if self.stats_interval > 0 then
    self.next_stats = self.next_stats or (self.started + self.stats_interval)
    due = math.min(due, self.next_stats - t)
  end
  due = math.min(due, self:extra_timeout(t))
  if due == math.huge then return nil end
  return due > 0 and due or 0
end

function Runner:extra_timeout()
  return math.huge
end

--- Waits for notifications (or a timer, or a signal) and queues them.
function Runner:read()
  local conn = self.conn
  local note, err, code = conn:wait(self:next_timeout())
  if note then
    self.queue:push(note)
    self.stats.received = self.stats.received + 1
    self.last_io = now()
    self:drain_into_queue()
  elseif err ~= "timeout" and err ~= "interrupted" then
    self:lost(err .. (code and (" (" .. code .. ")") or ""))
  end
end

function Runner:timers()
  local t = now()
  if self.stats_interval > 0 and t >= (self.next_stats or math.huge) then
    self:log_stats()
    self.next_stats = t + self.stats_interval
  end
  if self.conn and self.heartbeat > 0 and t - self.last_io >= self.heartbeat and self.queue:len() == 0 then
    local ok, err = self.conn:ping(self.heartbeat_timeout)
    if ok then
      self.last_io = now()
      self:drain_into_queue() -- the ping may have brought notifications
    else
      self:lost("heartbeat failed: " .. tostring(err))
    end
  end
  self:extra_timers(t)
end

function Runner:extra_timers() end

--- Waits `secs` while notifications keep being read into the queue (up to
-- retry_buffer of them, then the server's queue holds the rest).
function Runner:pump(secs)
  local deadline = now() + secs
  while true do
    self:signals()
    local left = deadline - now()
    if left <= 0 then return end
    if self:stopping() and now() > self.stop_at + M.DEFAULTS.stop_grace then return end
    if self.conn and self.queue:len() < M.DEFAULTS.retry_buffer then
      local note, err, code = self.conn:wait(left)
      if note then
        self.queue:push(note)
        self.stats.received = self.stats.received + 1
        self.last_io = now()
      elseif err ~= "timeout" and err ~= "interrupted" then
        self:lost(err .. (code and (" (" .. code .. ")") or ""))
      end
    else
      pg.sleep(left)
    end
  end
end

---------------------------------------------------------------------------
-- Dispatching
---------------------------------------------------------------------------

function Runner:on_error(err, note, info)
  local f = self.spec.on_error
  if not f then return end
  local ok, e = xpcall(f, handler_msgh, err, note, info)
  if not ok then
    self.log.error("on_error failed", { error = errstring(e), traceback = last_traceback, channel = note and note.channel })
  end
end

-- Calls entry.handler(arg, note) once: true, or false, err, traceback.
function Runner:call_once(entry, arg, note)
  local ok, err = xpcall(entry.handler, handler_msgh, arg, note)
  if ok then return true end
  return false, err, last_traceback
end

-- Calls entry.handler(arg, note) with the channel's retry rule.  Returns
-- true, or false, err, traceback, attempts.
function Runner:call(entry, arg, note)
  local attempts = entry.retry and entry.retry.attempts or 1
  local err, tb
  for attempt = 1, attempts do
    local ok
    ok, err = xpcall(entry.handler, handler_msgh, arg, note)
    if ok then return true end
    tb = last_traceback
    if attempt < attempts and not (self:stopping() and now() > self.stop_at + M.DEFAULTS.stop_grace) then
      self.stats.retries = self.stats.retries + 1
      local wait = entry.retry.backoff * 2 ^ (attempt - 1)
      self.log.warn("handler failed; retrying", {
        channel = entry.name, error = errstring(err), attempt = attempt, of = attempts,
        retry_in = ("%.3f"):format(wait),
      })
      self:pump(wait)
    else
      return false, err, tb, attempt
    end
  end
  return false, err, tb, attempts
end

local function not_container(v)
  return ("payload is JSON but not an object or array (%s)"):format(type(v) == "userdata" and "null" or type(v))
end

function Runner:decode(entry, note)
  local how = entry.decode
  if how == "raw" then return note.payload end
  local v, err
  if how == "json" then
    v, err = json_decode(note.payload)
  else
    v, err = cjson_decode(note.payload)
  end
  if v == nil then return nil, err end
  if type(v) ~= "table" then return nil, not_container(v) end
  return v
end

function Runner:decode_failed(entry, note, err)
  self.stats.failed_decode = self.stats.failed_decode + 1
  self.log.error("payload rejected", {
    channel = note.channel, error = err, pid = note.pid, payload = excerpt(note.payload),
  })
  self:on_error(err, note, { kind = "decode", channel = entry.name })
end

function Runner:handler_failed(entry, note, err, tb, attempts, notes)
  self.stats.failed_handler = self.stats.failed_handler + (notes and #notes or 1)
  self.log.error("handler failed", {
    channel = entry.name, error = errstring(err), traceback = tb, attempts = attempts,
    payload = note and excerpt(note.payload), count = notes and #notes or nil,
  })
  local info = { kind = "handler", channel = entry.name, attempts = attempts, traceback = tb }
  if notes then
    info.batch = notes
    for _, n in ipairs(notes) do self:on_error(err, n, info) end
  else
    self:on_error(err, note, info)
  end
end

-- The common case at full speed: notes at the head of the queue for plain
-- channels (no batch, no retry) handled with the per-note work inlined: one
-- C decode, one xpcall, one look at the signal flag.  Stops at anything else
-- (dispatch_one takes it), at a signal, or after FAST_RUN notes so that the
-- main loop sees its timers.  Same outcomes as dispatch_one, note for note.
local FAST_RUN = 64

function Runner:dispatch()
  local q = self.queue
  local h, tail = q.head, q.tail
  local last = h + FAST_RUN - 1
  if last > tail then last = tail end
  local channels, pending, handled, slow = self.spec.channels, host.pending, 0, false
  while h <= last do
    local note = q[h]
    local entry = channels[note.channel]
    if not entry or entry.batch or entry.retry then
      slow = true
      break
    end
    q[h] = nil
    h = h + 1
    local v, err
    local how = entry.decode
    if how == "json" then
      v, err = json_decode(note.payload)
      if v ~= nil and type(v) ~= "table" then v, err = nil, not_container(v) end
    elseif how == "raw" then
      v = note.payload
    else
      v, err = self:decode(entry, note)
    end
    if v == nil then
      q.head = h
      self:decode_failed(entry, note, err)
    else
      self.current_at = note.received_at
      local ok, herr = xpcall(entry.handler, handler_msgh, v, note)
      if ok then
        handled = handled + 1
      else
        q.head = h
        self:handler_failed(entry, note, herr, last_traceback, 1)
      end
    end
    if pending() then break end
  end
  self.current_at = nil
  self.stats.handled = self.stats.handled + handled
  if h > tail then
    q.head, q.tail = 1, 0
  else
    q.head = h
  end
  if slow then self:dispatch_one() end
end

-- Takes the next note (or, for a batch channel, the run of notes on that
-- channel at the head of the queue) and handles it.
function Runner:dispatch_one()
  local q = self.queue
  local note = q:pop()
  local entry = self.spec.channels[note.channel]
  if not entry then
    if not self:route_special(note) then
      self.stats.unrouted = self.stats.unrouted + 1
      self.log.debug("notification on a channel with no handler", { channel = note.channel })
    end
    return
  end
  self.current_at = note.received_at
  if entry.batch then
    local want = entry.batch
    -- top up from what has already arrived, without waiting for more
    if self.conn and q:len() + 1 < want then self:drain_into_queue(want - q:len() - 1) end
    local rows, notes, k = {}, {}, 0
    local channel = note.channel
    while true do
      local v, err = self:decode(entry, note)
      if v == nil then
        self:decode_failed(entry, note, err)
      else
        k = k + 1
        rows[k], notes[k] = v, note
      end
      local nx = q[q.head]
      if k >= want or not nx or nx.channel ~= channel then break end
      note = q:pop()
    end
    if #notes > 0 then
      local ok, err, tb, attempts = self:call(entry, rows, notes)
      if ok then
        self.stats.handled = self.stats.handled + #notes
      else
        self:handler_failed(entry, notes[1], err, tb, attempts, notes)
      end
    end
  else
    local v, err = self:decode(entry, note)
    if v == nil then
      self:decode_failed(entry, note, err)
    else
      local ok, herr, tb, attempts = self:call(entry, v, note)
      if ok then
        self.stats.handled = self.stats.handled + 1
      else
        self:handler_failed(entry, note, herr, tb, attempts)
      end
    end
  end
  self.current_at = nil
end

-- Hook for notifications the runner itself listens to (durable wake-ups).
function Runner:route_special()
  return false
end

---------------------------------------------------------------------------
-- Statistics, reload, shutdown
---------------------------------------------------------------------------

function Runner:log_stats()
  local s = self.stats
  local oldest = self.current_at or (self.queue:peek() or {}).received_at
  self.log.info("stats", {
    received = s.received, handled = s.handled, failed_decode = s.failed_decode,
    failed_handler = s.failed_handler, retries = s.retries, reconnects = s.reconnects,
    unrouted = s.unrouted, queued = self.queue:len(),
    oldest_unhandled_age = oldest and ("%.3f"):format(math.max(0, pg.now() - oldest)) or "0",
    uptime = ("%.0f"):format(now() - self.started),
  })
end

--- SIGHUP: loads the script again; LISTENs to added channels and UNLISTENs
-- removed ones on the same connection.  A script that fails to load keeps
-- the old one.
function Runner:reload()
  local spec, err = scriptmod.load(self.opts.script)
  if not spec then
    self.log.error("reload failed; keeping the running script", { error = err })
    return
  end
  local old = self.spec
  local added, removed = {}, {}
  for _, n in ipairs(spec.names) do if not old.channels[n] then added[#added + 1] = n end end
  for _, n in ipairs(old.names) do if not spec.channels[n] then removed[#removed + 1] = n end end
  self.spec = spec
  self:configure()
  if self.conn then
    local lerr
    if #added > 0 then _, lerr = self.conn:listen(table.unpack(added)) end
    if lerr == nil and #removed > 0 then _, lerr = self.conn:unlisten(table.unpack(removed)) end
    if lerr then
      self:lost("LISTEN after reload failed: " .. tostring(lerr))
    end
    self:drain_into_queue()
  end
  self.log.info("reloaded", { added = table.concat(added, ","), removed = table.concat(removed, ","),
    channels = table.concat(spec.names, ",") })
  self:after_reload(old)
end

function Runner:after_reload() end

function Runner:shutdown()
  local left = self.queue:len()
  if left > 0 then
    self.log.warn("stopped with notifications received but not handled", { count = left })
  end
  self:log_stats()
  if self.conn then self.conn:close() end
  self.conn = nil
  self:close_extra()
  self.log.info("stopped")
end

function Runner:close_extra() end

--- The main loop; returns the exit code.
function Runner:run()
  local conn, err = self:connect_loop(true)
  if not conn then
    if self:stopping() then self:shutdown(); return 0 end
    self.log.error("cannot connect", { db = pg.safe_conninfo(self.db), error = err })
    return 1
  end
  local q = self.queue
  while true do
    self:signals()
    if self:stopping() then
      if q:len() == 0 or now() > self.stop_at + M.DEFAULTS.stop_grace then break end
      self:dispatch_one()
    elseif q:len() > 0 then
      self:dispatch()
      if self.stats_interval > 0 and now() >= (self.next_stats or math.huge) then self:timers() end
    elseif not self.conn then
      if not self:connect_loop(false) and self:stopping() then break end
    else
      self:read()
      if q:len() == 0 then self:timers() end
    end
  end
  self:shutdown()
  return 0
end

M.Runner = Runner
M.Queue = new_queue
require("pglisten.scale").extend(Runner)

---------------------------------------------------------------------------
-- Entry point
---------------------------------------------------------------------------

local function printerr(...)
  io.stderr:write("lua-pglisten: ", ...)
  io.stderr:write("\n")
end

--- Runs the program; returns the exit code.
function M.main(argv)
  local opts, err = M.parse_args(argv)
  if not opts then
    printerr(err)
    io.stderr:write("Try 'lua-pglisten --help'.\n")
    return 2
  end
  if opts.help then io.stdout:write(USAGE); return 0 end
  if opts.version then
    io.stdout:write(("lua-pglisten %s (%s, libpq %d)\n"):format(host.version, _VERSION, pg.libpq_version()))
    return 0
  end
  if opts.sql or opts.install then return M.schema_command(opts) end

  local log = logmod.new({ level = opts["log-level"], format = opts["log-format"] })
  local spec
  spec, err = scriptmod.load(opts.script)
  if not spec then
    if opts.check then
      printerr(err)
    else
      log.error("cannot load script", { script = opts.script, error = err })
    end
    return 2
  end
  if opts.check then
    for _, name in ipairs(spec.names) do
      local e = spec.channels[name]
      local extra = {}
      if e.decode ~= "json" then extra[#extra + 1] = "decode=" .. e.decode end
      if e.batch then extra[#extra + 1] = "batch=" .. e.batch end
      if e.retry then extra[#extra + 1] = ("retry=%dx%gs"):format(e.retry.attempts, e.retry.backoff) end
      if e.durable then extra[#extra + 1] = "durable" end
      io.stdout:write(name, #extra > 0 and ("\t" .. table.concat(extra, " ")) or "", "\n")
    end
    return 0
  end
  local runner = M.make_runner(opts, spec, log)
  return runner:run()
end

--- Builds the runner for a spec (the durable/single-active extensions hook in here).
function M.make_runner(opts, spec, log)
  return Runner.new(opts, spec, log)
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
