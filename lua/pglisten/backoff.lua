--- The one backoff policy: how long a retry waits.
--
-- Plain handler retries, durable retries (the outbox row's `run_at`) and
-- reconnects all wait `backoff.delay(n, base, cap, jitter)` seconds after
-- their n-th failure: `base * 2^(n-1)`, capped at `cap`, then shortened by up
-- to `jitter` (a fraction: 0.5 waits between half and all of it) so that
-- many runners do not retry in step.  A channel's
-- `retry = { attempts, backoff, max_backoff }` gives base and cap.
-- @module pglisten.backoff

local M = {}

--- Defaults: the first wait and the longest one, in seconds.
M.BASE = 1
M.CAP = 30

local random = math.random

--- Seconds to wait after the `n`-th failure (n >= 1).
-- @tparam integer n failures so far
-- @tparam[opt=1] number base seconds after the first failure
-- @tparam[opt=30] number cap the longest wait
-- @tparam[opt=0] number jitter fraction of the wait that may be cut at random
-- @treturn number seconds
function M.delay(n, base, cap, jitter)
  base, cap = base or M.BASE, cap or M.CAP
  if n < 1 then n = 1 end
  local d
  if n > 1024 then d = cap else d = base * 2.0 ^ (n - 1) end
  if d > cap then d = cap end
  if jitter and jitter > 0 then d = d * (1 - jitter * random()) end
  return d
end

--- The base and cap of a channel entry's retry rule (defaults when absent).
-- @tparam table entry a channel entry (see pglisten.script)
-- @treturn number base
-- @treturn number cap
function M.of(entry)
  local r = entry and entry.retry
  if not r then return M.BASE, M.CAP end
  return r.backoff or M.BASE, r.max_backoff or M.CAP
end

return M
