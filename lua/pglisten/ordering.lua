--- Ordering: the lanes notes wait in before their handler runs, and where a
-- retry waits.
--
-- A lane is a FIFO of notes plus, when its head failed and will be retried,
-- the job that waits (`lane.job`) and when it may run again
-- (`lane.wait_until`).  A waiting lane hands out nothing: the notes behind
-- the job stay in order behind it.
--
-- - `ordering = "global"` (the default): one lane, every note in server order.
--   A retry holds up every channel.
-- - `ordering = "channel"`: one lane per channel; order holds within a
--   channel, and a channel that waits (a retry, a target that is down) holds
--   up no other.
--
-- In both, the reader stops reading while the lanes hold `read_ahead` notes
-- (the server's queue holds the rest), so a waiting channel stays bounded.
-- @module pglisten.ordering

local Queue = require "pglisten.queue"

local M = {}
M.__index = M

local function new_lane(name)
  return { name = name, q = Queue.new(), job = nil, wait_until = nil }
end

--- Lanes for `mode` ("global" or "channel").
function M.new(mode)
  local self = setmetatable({ mode = mode == "channel" and "channel" or "global", list = {}, by = {} }, M)
  if self.mode == "global" then
    self.single = new_lane("*")
    self.list[1] = self.single
  end
  return self
end

--- The lane a channel's notes go to.
function M:lane(channel)
  local l = self.single
  if l then return l end
  l = self.by[channel]
  if not l then
    l = new_lane(channel)
    self.by[channel] = l
    self.list[#self.list + 1] = l
  end
  return l
end

--- Appends `batch[1..n]` (server order) to the lanes.
function M:append(batch, n)
  local l = self.single
  if l then return l.q:append(batch, n) end
  for i = 1, n do
    local note = batch[i]
    self:lane(note.channel).q:push(note)
  end
end

--- Notes waiting in every lane (a waiting job counts its notes).
function M:len()
  local n = 0
  for _, l in ipairs(self.list) do
    n = n + l.q:len()
    -- (`sent`: a batch as taken, whatever its handler did to the list it got)
    if l.job then n = n + (l.job.sent and #l.job.sent or 1) end
  end
  return n
end

-- True when the lane has work it may do now.
local function lane_ready(l, t)
  if l.job then return t >= l.wait_until end
  return l.q.tail >= l.q.head
end
M.lane_ready = lane_ready

--- True when some lane may be served at time `t`.
function M:ready(t)
  local l = self.single
  if l then return lane_ready(l, t) end
  for _, x in ipairs(self.list) do
    if lane_ready(x, t) then return true end
  end
  return false
end

--- When the earliest waiting lane may run again, or nil.
function M:next_due()
  local due
  for _, l in ipairs(self.list) do
    if l.job and (not due or l.wait_until < due) then due = l.wait_until end
  end
  return due
end

--- received_at of the oldest note not yet handled, or nil.
function M:oldest()
  local t
  for _, l in ipairs(self.list) do
    local n = l.job and l.job.note or l.q:peek()
    if n and n.received_at and (not t or n.received_at < t) then t = n.received_at end
  end
  return t
end

return M
