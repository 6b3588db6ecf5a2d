--- A FIFO of notifications: `head`/`tail` indices into the table itself, so
-- that the dispatcher's fast path and the reader can index it directly.
-- @module pglisten.queue

local Queue = {}
Queue.__index = Queue

--- A new, empty queue.
function Queue.new()
  return setmetatable({ head = 1, tail = 0 }, Queue)
end

--- Appends `v`.
function Queue:push(v)
  local t = self.tail + 1
  self[t], self.tail = v, t
end

--- Appends `batch[1..n]` (what conn:drain returned).
function Queue:append(batch, n)
  local t = self.tail
  for i = 1, n do self[t + i] = batch[i] end
  self.tail = t + n
end

--- The first item, or nil.
function Queue:peek() return self[self.head] end

--- Removes and returns the first item (nil when empty).
function Queue:pop()
  local h = self.head
  local v = self[h]
  if v == nil then return nil end
  self[h] = nil
  if h == self.tail then
    self.head, self.tail = 1, 0
  else
    self.head = h + 1
  end
  return v
end

--- Number of items.
function Queue:len() return self.tail - self.head + 1 end

return Queue
