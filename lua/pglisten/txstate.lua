--- The facade's bookkeeping of a connection's transaction block, for the
-- case the server can no longer answer: the connection was lost inside it.
-- pglisten's exec/execmany/transaction call these on the connection's Lua
-- state; what an SQL string does to a block is read by pglisten.txblock.
-- Internal.
-- @module pglisten.txstate

local M = {}

-- The transaction bookkeeping of a connection's state `s`:
--   s.intx   a transaction block was open after the last call;
--   s.txlost its connection was lost: the server rolled it back, and every
--            call fails until the caller ends it (ROLLBACK, COMMIT, ...);
--   s.dirty  LISTEN/UNLISTEN ran inside it: s.channels (what the server has
--            committed) is read again once the block is over.
function M.end_tx(s)
  s.intx, s.txlost = nil, nil
end

-- How a statement ends or begins a transaction block, and what a string of
-- statements may have done when the connection was lost under it.
local txblock = require "pglisten.txblock"
local ends_tx = txblock.ends

local LOST_FOUND = "connection lost inside a transaction: the server rolled it back;"
  .. " calls fail until the transaction is ended (ROLLBACK)"
local LOST_STILL = "the connection of this transaction was lost and the server rolled it back;"
  .. " calls fail until the transaction is ended (ROLLBACK)"
local LOST_COMMIT = "COMMIT failed: the connection was lost inside the transaction and the server"
  .. " rolled it back; nothing was committed"

-- A call in a transaction whose connection is lost: fails (08006 when it
-- is the call that finds the loss, else 08003) unless it ends the block.
-- Returns false, err, code; or false, rows for a ROLLBACK answered here
-- (the server has done it); or true when the block is over and the rest of
-- `sql` (a ROLLBACK followed by more statements) is to run on a healed
-- connection.
function M.lost_call(s, sql, found)
  local kind = ends_tx(sql)
  if kind == "rollback" then
    M.end_tx(s)
    if sql:find(";%s*[^%s;]") then return true end
    return false, { n = 0, affected = 0, command = "ROLLBACK", bytes = 0 }
  end
  local code = found and "08006" or "08003"
  if kind == "commit" then
    M.end_tx(s)
    return false, LOST_COMMIT, code
  end
  return false, found and LOST_FOUND or LOST_STILL, code
end

-- After a call of `sql` that lost the connection (failed with `err, code`,
-- err nil when it seemed to succeed): notes what became of the transaction
-- block in `s` and returns err, code made to say so.
function M.after_loss(s, sql, err, code)
  -- any statement of `sql` may have been the one under the loss
  local lost, committed = txblock.effect(sql, s.intx)
  if not (lost or committed) then
    M.end_tx(s) -- a block the string ended (...; ROLLBACK) is over either way
    return err, code
  end
  s.dirty = nil
  err = err or "connection lost"
  if lost then s.intx, s.txlost = true, true else M.end_tx(s) end
  if committed then -- the server may have committed before the loss
    return err .. " (during COMMIT: whether it committed is unknown"
      .. (lost and "; the transaction it begins was rolled back: calls fail until it is ended" or "")
      .. ")", "08007"
  end
  return err .. " (" .. LOST_FOUND .. ")", code or "08006"
end

return M
