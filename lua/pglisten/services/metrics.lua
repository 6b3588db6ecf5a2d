--- Metrics: `GET /metrics` in the Prometheus text format (0.0.4), served
-- from the runner's own loop, and the same text written to a file for
-- node_exporter's textfile collector.
--
-- `--metrics [ADDR:]PORT` (or `metrics = "ADDR:PORT"` in the script) binds
-- ADDR (127.0.0.1 when only a port is given).  The sockets are luasocket's
-- (a dependency already), non-blocking, and the loop polls them beside the
-- sources' (the `pollables` hook): a scraper never makes the loop wait.  A
-- request may be MAX_REQUEST bytes at most (431 beyond), must be complete
-- within CLIENT_TIMEOUT seconds of the connect (else the connection is
-- closed), gets one response and the connection is closed; at most
-- MAX_CLIENTS are served at once (more wait in the listen backlog).  Only
-- `GET /metrics` (and HEAD) answer 200; other paths 404, other methods 405.
-- While handlers are busy the loop runs `tick` every SERVE_EVERY seconds,
-- and it serves scrapers then.
--
-- `--metrics-file PATH` writes PATH.tmp and renames it to PATH at the first
-- tick and every stats_interval (60 s when that is 0).
--
-- The durable channels' outbox figures are read on the outbox source's
-- connection at most every OUTBOX_EVERY seconds, and the replication
-- source's (its lag, which it reads from the server) as often.
--
-- Hooks: pollables, timeout, tick, reload, close.
-- @module pglisten.services.metrics

local pg = require "pglisten"

local M = {}
M.__index = M

local now, poll = pg.monotonic, pg.core.poll

M.MAX_REQUEST = 8192
M.CLIENT_TIMEOUT = 5
M.MAX_CLIENTS = 8
M.SERVE_EVERY = 0.2
M.OUTBOX_EVERY = 5
M.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

--- Host and port of "ADDR:PORT", "[V6ADDR]:PORT" or "PORT"; or nil, err.
function M.parse_address(s)
  if type(s) ~= "string" then return nil, "an address must be a string" end
  local host, port = s:match("^%[(.+)%]:(%d+)$")
  if not host then host, port = s:match("^([^:]*):(%d+)$") end
  if not host then host, port = "127.0.0.1", s:match("^(%d+)$") end
  port = tonumber(port)
  if not port or port > 65535 then return nil, ('"ADDR:PORT" expected, got %q'):format(s) end
  if host == "" then host = "127.0.0.1" end
  return host, port
end

---------------------------------------------------------------------------
-- The text
---------------------------------------------------------------------------

local function num(v)
  if math.type(v) == "integer" then return ("%d"):format(v) end
  if v ~= v then return "NaN" end
  if v == math.huge then return "+Inf" end
  if v == -math.huge then return "-Inf" end
  return ("%.15g"):format(v)
end

local function label(v)
  return (tostring(v):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

-- A writer of families: family(name, type, help) then sample(labels, value).
local function writer()
  local out = {}
  local w = {}
  function w.family(name, kind, help)
    w.name = "lua_pglisten_" .. name
    out[#out + 1] = ("# HELP %s %s\n# TYPE %s %s\n"):format(w.name, help, w.name, kind)
  end
  function w.sample(labels, v)
    local l = ""
    if labels then
      local parts = {}
      for i = 1, #labels, 2 do parts[#parts + 1] = ('%s="%s"'):format(labels[i], label(labels[i + 1])) end
      l = "{" .. table.concat(parts, ",") .. "}"
    end
    out[#out + 1] = ("%s%s %s\n"):format(w.name, l, num(v))
  end
  function w.text() return table.concat(out) end
  return w
end

--- The resident set size in bytes (VmRSS of /proc/self/status), or nil.
function M.rss()
  local f = io.open("/proc/self/status", "r")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  local kb = s:match("VmRSS:%s*(%d+) kB")
  return kb and tonumber(kb) * 1024
end

local function sorted(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local CHANNEL_COUNTERS = {
  { "received_total", "received", "Notes received on the channel (NOTIFYs read, durable events claimed)." },
  { "handled_total", "handled", "Notes whose handler returned without raising." },
  { "retries_total", "retries", "Handler calls that retried a failed one." },
}

function M:channel_families(w)
  local by = self.rt.stats.channels
  local names = sorted(by)
  for _, c in ipairs(CHANNEL_COUNTERS) do
    w.family(c[1], "counter", c[3])
    for _, n in ipairs(names) do w.sample({ "channel", n }, by[n][c[2]]) end
  end
  w.family("failed_total", "counter", "Notes that failed: their payload was refused (decode) or their handler raised.")
  for _, n in ipairs(names) do
    w.sample({ "channel", n, "kind", "decode" }, by[n].failed_decode)
    w.sample({ "channel", n, "kind", "handler" }, by[n].failed_handler)
  end
  w.family("unrouted_total", "counter", "Notes on channels without a handler.")
  w.sample(nil, self.rt.stats.unrouted)
end

function M:source_families(w)
  local rt, d = self.rt, self.rt.dispatch
  local repl = self:replication()
  w.family("reconnects_total", "counter", "Connections made again after being lost.")
  local notify_n = rt.notify.reconnects or 0
  w.sample({ "source", "notify" }, notify_n)
  if repl then w.sample({ "source", "replication" }, math.max(0, rt.stats.reconnects - notify_n)) end
  w.family("connected", "gauge", "1 while the source's connection is up.")
  w.sample({ "source", "notify" }, rt.notify.conn and 1 or 0)
  if repl then w.sample({ "source", "replication" }, repl.streaming and 1 or 0) end
  w.family("queue_length", "gauge", "Notes received and not yet handled.")
  w.sample({ "source", "notify" }, rt.notify:backlog()) -- held for on_connect too
  if repl then w.sample({ "source", "replication" }, tonumber(repl.queued) or 0) end
  w.family("oldest_unhandled_age_seconds", "gauge", "Age of the oldest note received and not yet handled.")
  local oldest = d:oldest()
  w.sample({ "source", "notify" }, oldest and math.max(0, pg.now() - oldest) or 0)
  if repl then
    w.family("replication_lag_seconds", "gauge", "Seconds since the oldest transaction not yet handled committed.")
    w.sample({ "slot", repl.slot }, tonumber(repl.lag_seconds) or 0)
    if repl.lag_bytes then
      w.family("replication_lag_bytes", "gauge",
        "Bytes of WAL between the server's position and the slot's confirmed one.")
      w.sample({ "slot", repl.slot }, tonumber(repl.lag_bytes) or 0)
    end
  end
end

function M:outbox_families(w)
  local ob = self:outbox()
  if not ob then return end
  local names = sorted(ob)
  w.family("outbox_events", "gauge", "Durable events waiting in pglisten.outbox.")
  for _, n in ipairs(names) do w.sample({ "channel", n }, ob[n].waiting) end
  w.family("outbox_due_events", "gauge", "Durable events in pglisten.outbox due now.")
  for _, n in ipairs(names) do w.sample({ "channel", n }, ob[n].due) end
  w.family("outbox_oldest_age_seconds", "gauge", "Age of the oldest durable event waiting.")
  for _, n in ipairs(names) do w.sample({ "channel", n }, ob[n].oldest) end
  w.family("dead_events", "gauge", "Dead letters in pglisten.dead.")
  for _, n in ipairs(names) do w.sample({ "channel", n }, ob[n].dead) end
end

--- The exposition text.
function M:render()
  local w = writer()
  w.family("up", "gauge", "1 while the runner runs (0 in the file it leaves when it stops).")
  w.sample(nil, self.closing and 0 or 1)
  w.family("start_time_seconds", "gauge", "Start time of the runner since the epoch.")
  w.sample(nil, self.rt.stats_service.started_at)
  local rss = M.rss()
  if rss then
    w.family("resident_memory_bytes", "gauge", "Resident memory of the runner.")
    w.sample(nil, rss)
  end
  self:channel_families(w)
  self:source_families(w)
  self:outbox_families(w)
  return w.text()
end

---------------------------------------------------------------------------
-- Figures read from the server, at most every OUTBOX_EVERY seconds
---------------------------------------------------------------------------

local OUTBOX_SQL = [[
SELECT c AS channel,
  (SELECT count(*) FROM pglisten.outbox o WHERE o.channel = c)::bigint AS waiting,
  (SELECT count(*) FROM pglisten.outbox o WHERE o.channel = c AND o.run_at <= now())::bigint AS due,
  coalesce((SELECT extract(epoch FROM now() - min(o.created_at)) FROM pglisten.outbox o
    WHERE o.channel = c), 0)::float8 AS oldest,
  (SELECT count(*) FROM pglisten.dead d WHERE d.channel = c)::bigint AS dead
FROM unnest($1::text[]) AS c]]

local function text_array(list)
  local q = {}
  for i, n in ipairs(list) do q[i] = '"' .. n:gsub('[\\"]', "\\%0") .. '"' end
  return "{" .. table.concat(q, ",") .. "}"
end

--- Per durable channel: waiting, due, oldest, dead (nil: no durable channel).
function M:outbox()
  local src = self.rt.outbox
  if not src or #src.names == 0 then return nil end
  local t = now()
  if self.ob and t < self.ob_at + M.OUTBOX_EVERY then return self.ob end
  self.ob_at = t
  local conn, err = src:conn()
  local r
  if conn then r, err = conn:exec(OUTBOX_SQL, text_array(src.names)) end
  if not r then
    if t - (self.ob_warned or -math.huge) > 60 then
      self.ob_warned = t
      self.rt.log.warn("metrics: reading the outbox failed", { error = err })
    end
    return self.ob
  end
  local ob = {}
  for _, row in ipairs(r) do ob[row.channel] = row end
  self.ob = ob
  return ob
end

--- The replication source's figures (nil: no replication channel).
function M:replication()
  local src = self.rt.replication
  if not src or not src.cfg or not src.figures then return nil end
  local t = now()
  if self.repl and t < self.repl_at + M.OUTBOX_EVERY then return self.repl end
  self.repl_at = t
  local ok, f = pcall(src.figures, src)
  if ok then self.repl = f end
  return self.repl
end

---------------------------------------------------------------------------
-- The HTTP side
---------------------------------------------------------------------------

local REASON = { [200] = "OK", [400] = "Bad Request", [404] = "Not Found", [405] = "Method Not Allowed",
  [431] = "Request Header Fields Too Large" }

-- The response to a complete request head.
function M:respond(head)
  local method, target = head:match("^(%u+) (%S+) HTTP/%d%.%d\r?\n")
  local status, body = 200, nil
  if not method then
    status = 400
  elseif method ~= "GET" and method ~= "HEAD" then
    status = 405
  elseif (target:match("^[^?#]*")) ~= "/metrics" then
    status = 404
  else
    body = self:render()
  end
  body = body or (REASON[status] .. "\n")
  local hdr = ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n%s\r\n"):format(
    status, REASON[status], status == 200 and M.CONTENT_TYPE or "text/plain; charset=utf-8", #body,
    status == 405 and "Allow: GET, HEAD\r\n" or "")
  return method == "HEAD" and hdr or (hdr .. body)
end

local Client = {}
Client.__index = Client

-- luasocket's getfd is a float; core.poll wants an integer
local function fd_of(sock) return math.tointeger(sock:getfd()) end

function Client:pollfd() return fd_of(self.sock) end
function Client:events() return self.out and "w" or "r" end

function Client:read()
  if self.out then return self:write() end
  local data, err, partial = self.sock:receive(M.MAX_REQUEST - #self.buf)
  data = data or partial
  if data and #data > 0 then self.buf = self.buf .. data end
  if self.buf:find("\r?\n\r?\n") then
    self.out, self.sent = self.service:respond(self.buf), 0
    return self:write()
  end
  if #self.buf >= M.MAX_REQUEST then
    self.out, self.sent = "HTTP/1.1 431 " .. REASON[431] .. "\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", 0
    return self:write()
  end
  if err == "closed" then return self.service:drop(self) end
end

function Client:write()
  local last, err, partial = self.sock:send(self.out, self.sent + 1)
  self.sent = last or partial or self.sent
  if self.sent >= #self.out or (err and err ~= "timeout") then return self.service:drop(self) end
end

local Listener = {}
Listener.__index = Listener
function Listener:pollfd() return fd_of(self.service.server) end
function Listener:events() return "r" end
function Listener:read() return self.service:accept() end

function M:listen(addr)
  local host, port = M.parse_address(addr)
  if not host then self.err = port; return end
  self.address = addr
  local ok, socket = pcall(require, "socket") -- only when metrics are served
  if not ok then self.err = "luasocket is not installed (Debian: lua-socket)"; return end
  local server, err = socket.bind(host, port, 32)
  if not server then self.err = err; return end
  server:settimeout(0)
  self.server = server
  local h, p = server:getsockname()
  self.address = (h and h:find(":", 1, true) and ("[%s]:%s") or "%s:%s"):format(h or host, p or port)
  self.listener = setmetatable({ service = self }, Listener)
  self.rt.log.info("serving metrics", { address = self.address, path = "/metrics" })
end

function M:accept()
  while #self.clients < M.MAX_CLIENTS do
    local sock = self.server:accept()
    if not sock then return end
    sock:settimeout(0)
    self.clients[#self.clients + 1] = setmetatable(
      { service = self, sock = sock, buf = "", deadline = now() + M.CLIENT_TIMEOUT }, Client)
  end
end

function M:drop(client)
  client.sock:close()
  for i, c in ipairs(self.clients) do
    if c == client then table.remove(self.clients, i); return end
  end
end

--- What the loop polls: the listening socket (while fewer than MAX_CLIENTS
-- are served) and every client's.
function M:pollables()
  local list = {}
  if self.listener and #self.clients < M.MAX_CLIENTS then list[1] = self.listener end
  for _, c in ipairs(self.clients) do list[#list + 1] = c end
  return list
end

---------------------------------------------------------------------------
-- The service
---------------------------------------------------------------------------

--- The metrics service of runtime `rt`, or nil when neither an address nor
-- a file is configured.  `.err` says why the address could not be bound.
function M.new(rt)
  local addr, file = rt.opts.metrics or rt.spec.metrics, rt.opts["metrics-file"]
  if not addr and not file then return nil end
  local self = setmetatable({ rt = rt, clients = {}, file = file, next_file = now() }, M)
  if addr then self:listen(addr) end
  return self
end

function M:file_every()
  local iv = self.rt.settings.stats_interval
  return iv > 0 and iv or 60
end

function M:timeout(t)
  local due = self.file and self.next_file or math.huge
  for _, c in ipairs(self.clients) do
    if c.deadline < due then due = c.deadline end
  end
  -- handlers busy: the loop does not poll; serve scrapers from tick
  if self.listener and self.rt.dispatch:queued() > 0 then due = math.min(due, t + M.SERVE_EVERY) end
  if due == math.huge then return nil end
  return due - t
end

--- Writes the text to the file: PATH.tmp, then renamed to PATH.
function M:write_file()
  local tmp = self.file .. ".tmp"
  local f, err = io.open(tmp, "w")
  local ok = f ~= nil
  if f then
    ok, err = f:write(self:render())
    ok = f:close() and ok
    if ok then ok, err = os.rename(tmp, self.file) end
  end
  if not ok then
    os.remove(tmp)
    self.rt.log.warn("metrics: cannot write the file", { path = self.file, error = err })
  end
end

function M:tick(t)
  if self.file and t >= self.next_file then
    self.next_file = t + self:file_every()
    self:write_file()
  end
  -- serve what is ready without waiting (the loop's wait may not come soon)
  local list = self:pollables()
  if #list > 0 then
    local fds = {}
    for i, p in ipairs(list) do fds[i] = { p:pollfd(), p:events() } end
    local ready = poll(fds, 0)
    for _, i in ipairs(ready or {}) do list[i]:read() end
  end
  t = now()
  for i = #self.clients, 1, -1 do
    local c = self.clients[i]
    if t >= c.deadline then
      self.rt.log.debug("metrics: client timed out", { received = #c.buf })
      self:drop(c)
    end
  end
end

function M:reload(old, new)
  if (old.metrics or nil) ~= (new.metrics or nil) and not self.rt.opts.metrics then
    self.rt.log.warn("metrics address changed; it takes effect at the next start", { address = self.address })
  end
end

function M:close()
  self.closing = true
  if self.file then self:write_file() end
  for i = #self.clients, 1, -1 do self:drop(self.clients[i]) end
  if self.server then self.server:close() end
  self.server, self.listener = nil, nil
end

return M
