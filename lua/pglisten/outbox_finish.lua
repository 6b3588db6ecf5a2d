--- Ending a claim: `finish` and the error texts it stores, the second half
-- of `pglisten.outbox`, which re-exports `finish`, `error_text` and
-- `MAX_ERROR`: use them from there.
--
-- The settings these read at call time (`MAX_ERROR`, `MAX_ATTEMPTS`,
-- `backoff`, `error_text`) are looked up in `pglisten.outbox`'s table, as
-- before the split, so that a change a caller makes there still counts.
-- @module pglisten.outbox_finish

local util = require "pglisten.outbox_util"

local M = {}

local check_conn = util.check_conn
local argerror = util.argerror
local bigint_array = util.bigint_array
local abort = util.abort
local concat, mtype = table.concat, math.type

-- pglisten.outbox requires this module, so it is looked up when called.
local function outbox() return require "pglisten.outbox" end

---------------------------------------------------------------------------
-- Error texts
---------------------------------------------------------------------------

--- Longest `last_error` stored, in bytes.
M.MAX_ERROR = 4000

local REPLACEMENT = "\u{FFFD}"

-- Valid UTF-8 from any bytes: each byte that does not start a valid sequence
-- (a stray continuation byte, an overlong form, a surrogate, a sequence cut
-- short, a code point above U+10FFFF) becomes U+FFFD.
local function valid_utf8(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local ok, bad = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, bad - 1)
    out[#out + 1] = REPLACEMENT
    i = bad + 1
  end
  return concat(out)
end

-- The longest head of valid UTF-8 `s` of at most `max` bytes that ends on a
-- character boundary.
local function utf8_head(s, max)
  if #s <= max then return s end
  local j = max
  while j > 0 do
    local b = s:byte(j + 1)
    if b < 0x80 or b >= 0xC0 then break end -- s[j + 1] starts a character
    j = j - 1
  end
  return s:sub(1, j)
end

local function as_string(msg)
  if msg == nil then return "unknown error" end
  if type(msg) == "string" then return msg end
  local ok, s = pcall(tostring, msg) -- a __tostring may raise
  return ok and s or ("(an error %s that tostring cannot show)"):format(type(msg))
end

--- An error text fit for `last_error`: zero bytes removed, bytes that are
-- not valid UTF-8 replaced with U+FFFD, at most `MAX_ERROR` bytes (cut on a
-- character boundary, with a note of the full length).  nil is
-- "unknown error"; other values go through tostring.
-- @param msg the handler's error
-- @treturn string
function M.error_text(msg)
  local raw, max = as_string(msg), outbox().MAX_ERROR
  local s = raw:gsub("\0", "")
  local cut = #s > max
  if cut then s = s:sub(1, max + 3) end -- the character across the cut stays whole
  s = valid_utf8(s)
  if cut or #s > max then
    local note = (" [... cut; %d bytes in all]"):format(#raw)
    s = utf8_head(s, max - #note) .. note
  end
  return s
end

-- The same in ASCII (other bytes as \xNN), for a database whose encoding
-- cannot hold what error_text keeps.
local function ascii_text(msg)
  local raw, max = as_string(msg), outbox().MAX_ERROR
  local s = raw:gsub("\0", ""):sub(1, max)
    :gsub("[\128-\255]", function(c) return ("\\x%02x"):format(c:byte()) end)
  if #s > max or #raw > max then
    local note = (" [... cut; %d bytes in all]"):format(#raw)
    s = s:sub(1, max - #note):gsub("\\x%x?$", "") .. note
  end
  return s
end

---------------------------------------------------------------------------
-- Finishing
---------------------------------------------------------------------------

-- One statement for the whole batch: delete the done events ($1), and for
-- each failure ($2..$5: id, error, max_attempts, backoff) move it to
-- pglisten.dead when this failure is its last allowed one, else reschedule
-- it.  Decided on the row's own attempts, which the claim keeps locked; the
-- two branches test complementary conditions on the statement's snapshot.
-- An event whose id pglisten.dead holds already (written by hand, or an
-- identity reset) is rescheduled, with a note, rather than fail the batch.
-- A NULL backoff is 1 s doubling from the row's attempts, capped at 300 s.
-- clock_timestamp(): now() is the claim's start, maybe long ago.
local FINISH = [[
WITH f AS (
  SELECT * FROM unnest($2::bigint[], $3::text[], $4::int[], $5::float8[]) AS f(id, err, max_attempts, backoff)
), done AS (
  DELETE FROM pglisten.outbox WHERE id = ANY($1::bigint[])
  RETURNING id
), gone AS (
  DELETE FROM pglisten.outbox o USING f
   WHERE o.id = f.id AND o.attempts + 1 >= f.max_attempts
     AND NOT EXISTS (SELECT 1 FROM pglisten.dead d WHERE d.id = o.id)
  RETURNING o.id, o.channel, o.payload, o.created_at, o.run_at, o.attempts + 1 AS attempts, f.err
), buried AS (
  INSERT INTO pglisten.dead (id, channel, payload, created_at, run_at, attempts, last_error, failed_at)
  SELECT id, channel, payload, created_at, run_at, attempts, err, clock_timestamp() FROM gone
  RETURNING id
), retried AS (
  UPDATE pglisten.outbox o
     SET attempts = o.attempts + 1,
         last_error = CASE WHEN o.attempts + 1 < f.max_attempts THEN f.err
           ELSE 'not moved to pglisten.dead, which holds an event with this id already: ' || f.err END,
         run_at = clock_timestamp() + make_interval(secs =>
           coalesce(f.backoff, least(300, 2 ^ least(o.attempts, 30))))
    FROM f
   WHERE o.id = f.id
     AND (o.attempts + 1 < f.max_attempts OR EXISTS (SELECT 1 FROM pglisten.dead d WHERE d.id = o.id))
  RETURNING o.id
)
SELECT (SELECT count(*) FROM done) AS done, (SELECT count(*) FROM buried) AS buried,
       (SELECT count(*) FROM retried) AS retried]]

-- The last resort for failures: attempts + 1 and a later run_at, no dead
-- letter (for when FINISH cannot run, e.g. without privileges on
-- pglisten.dead).
local RETRY_ONLY = [[
UPDATE pglisten.outbox o
   SET attempts = o.attempts + 1, last_error = f.err,
       run_at = clock_timestamp() + make_interval(secs =>
         coalesce(f.backoff, least(300, 2 ^ least(o.attempts, 30))))
  FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS f(id, err, backoff)
 WHERE o.id = f.id]]

local INT_MAX, BACKOFF_MAX = 2147483647, 1e9 -- seconds: some 31 years

local function check_failure(f, i)
  if type(f) ~= "table" then argerror(3, "finish", ("failure %d must be a table, got %s"):format(i, type(f))) end
  if mtype(f.id) ~= "integer" then
    argerror(3, "finish", ("failure %d: id must be an integer, got %s"):format(i, mtype(f.id) or type(f.id)))
  end
  local maxa = f.max_attempts
  if maxa == nil then maxa = outbox().MAX_ATTEMPTS end
  if mtype(maxa) ~= "integer" then
    argerror(3, "finish", ("failure %d: max_attempts must be an integer, got %s"):format(i, tostring(maxa)))
  end
  local backoff = f.backoff
  if backoff == nil then backoff = outbox().backoff((f.attempts or 0) + 1) end
  if type(backoff) ~= "number" or not (backoff >= 0 and backoff < math.huge) then
    argerror(3, "finish", ("failure %d: backoff must be a finite number of seconds >= 0, got %s"):format(
      i, tostring(backoff)))
  end
  if f.attempts ~= nil and mtype(f.attempts) ~= "integer" then
    argerror(3, "finish", ("failure %d: attempts must be an integer, got %s"):format(i, tostring(f.attempts)))
  end
  return {
    id = f.id, error = f.error,
    max_attempts = math.max(0, math.min(maxa, INT_MAX)),
    backoff = math.min(backoff, BACKOFF_MAX),
  }
end

-- The failures as array literals for FINISH ($2..$5) or RETRY_ONLY: texts
-- through `text` (error_text or ascii_text), each prefixed with `prefix`.
local function failure_arrays(fails, text, prefix)
  local ids, errs, maxas, backoffs = {}, {}, {}, {}
  for i, f in ipairs(fails) do
    ids[i] = ("%d"):format(f.id)
    local e = text((prefix or "") .. as_string(f.error))
    errs[i] = '"' .. e:gsub('[\\"]', "\\%0") .. '"'
    maxas[i] = ("%d"):format(f.max_attempts)
    backoffs[i] = f.backoff and ("%.17g"):format(f.backoff) or "NULL"
  end
  local function arr(t) return "{" .. concat(t, ",") .. "}" end
  return arr(ids), arr(errs), arr(maxas), arr(backoffs)
end

-- Runs one statement under a savepoint.  On failure the savepoint is
-- rolled back, so the claim's transaction and its locks live on; `fatal` is
-- true when they did not (the connection is gone, or rolling back failed).
local function guarded(conn, sql, ...)
  -- deferred constraints checked now, under the savepoint, not at COMMIT
  -- (where one refused row would roll the whole claim back)
  local ok, err, code = conn:exec("SAVEPOINT pglisten_finish; SET CONSTRAINTS ALL IMMEDIATE")
  if not ok then return nil, err, code, true end
  local r
  r, err, code = conn:exec(sql, ...)
  if r then return r end
  if conn:status() ~= "ok" or conn:txstatus() ~= "inerror" then return nil, err, code, true end
  local rok, rerr, rcode = conn:exec("ROLLBACK TO SAVEPOINT pglisten_finish")
  if not rok then return nil, rerr, rcode, true end
  return nil, err, code, false
end

-- Failures without duplicates (the last report of an id wins) and without
-- the ids that are done as well.
local function distinct_failures(fails, done_ids)
  local is_done, last = {}, {}
  for _, id in ipairs(done_ids or {}) do is_done[id] = true end
  for i, f in ipairs(fails) do last[f.id] = i end
  local out = {}
  for i, f in ipairs(fails) do
    if not is_done[f.id] and last[f.id] == i then out[#out + 1] = f end
  end
  return out
end

-- untranslatable_character, character_not_in_repertoire
local UNTRANSLATABLE = { ["22P05"] = true, ["22021"] = true }

-- Records `fails` in one statement: FINISH, again with ASCII texts when the
-- database's encoding lacks a character, else RETRY_ONLY (attempts advance,
-- no dead letter).  Returns true[, note], or nil, err, code, fatal.
local function record(conn, fails)
  local ok, err, code, fatal = guarded(conn, FINISH, "{}", failure_arrays(fails, outbox().error_text))
  if ok or fatal then return ok, err, code, fatal end
  if UNTRANSLATABLE[code] then
    ok, err, code, fatal = guarded(conn, FINISH, "{}", failure_arrays(fails, ascii_text))
    if ok or fatal then return ok, err, code, fatal end
  end
  local ids, errs, _, backoffs = failure_arrays(fails, ascii_text,
    "could not record this failure as usual (" .. err .. "): ")
  local rok, rerr, rcode, rfatal = guarded(conn, RETRY_ONLY, ids, errs, backoffs)
  if rok then return true, "failures rescheduled without dead letters: " .. err end
  return nil, rerr, rcode, rfatal
end

-- When the one statement failed (the server refused a text, a user trigger
-- raised, a privilege is missing): the same work in steps, each under its
-- own savepoint, so that what can be recorded is.  Handled events that
-- cannot be deleted become failures (handled again later, after a backoff);
-- failures are recorded as `record` does.  A step that fails for the whole
-- set is redone event by event, so that one row a trigger refuses keeps no
-- other from being finished.  Returns notes, or nil, err, code when the
-- transaction is gone.
local function finish_in_steps(conn, done, done_ids, fails, first_err)
  local notes = { "finish: " .. first_err .. "; recorded step by step" }
  local ok, err, code, fatal
  if done_ids and #done_ids > 0 then
    ok, err, code, fatal = guarded(conn, FINISH, done, "{}", "{}", "{}", "{}")
    if fatal then return nil, err, code end
    for _, id in ipairs(ok and {} or done_ids) do
      local one = ("{%d}"):format(id)
      ok, err, code, fatal = guarded(conn, FINISH, one, "{}", "{}", "{}", "{}")
      if fatal then return nil, err, code end
      if not ok then
        notes[#notes + 1] = ("handled event %d could not be deleted and will be handled again: %s"):format(id, err)
        fails[#fails + 1] = { id = id, max_attempts = outbox().MAX_ATTEMPTS,
          error = "handled, but removing it from the outbox failed: " .. err }
      end
    end
  end
  if #fails == 0 then return notes end
  ok, err, code, fatal = record(conn, fails)
  if fatal then return nil, err, code end
  if ok then
    notes[#notes + 1] = err
    return notes
  end
  for _, f in ipairs(fails) do
    ok, err, code, fatal = record(conn, { f })
    if fatal then return nil, err, code end
    if not ok then err = ("the attempts of event %d could not be advanced: %s"):format(f.id, err) end
    notes[#notes + 1] = err
  end
  return notes
end

--- Ends the transaction `claim` opened: deletes the events handled, and for
-- each failure either reschedules it (attempts + 1, last_error, run_at =
-- now + backoff) or, when attempts + 1 reaches max_attempts, moves it to
-- `pglisten.dead`; then commits.  All of it is one statement, whatever the
-- number of events.  Error texts go through `error_text` (valid UTF-8, no
-- zero bytes, at most `MAX_ERROR` bytes).  Should that statement fail, the
-- work is redone in steps, each under a savepoint, so that the bookkeeping
-- of one event cannot undo the others' and a failing event's attempts still
-- advance: handled events that cannot be deleted are rescheduled as
-- failures, and failures that cannot be buried are rescheduled.  Only a
-- lost connection or a failed COMMIT rolls everything back (the events are
-- claimable again: at least once).
-- @param conn the connection that claimed
-- @tparam {integer,...} done_ids ids handled successfully (may be empty or nil)
-- @tparam[opt] {table,...} failed `{id=, error=, attempts=, max_attempts=, backoff=}`:
--   `error` a message (kept as last_error); `attempts` as claimed;
--   `max_attempts` default `outbox.MAX_ATTEMPTS`; `backoff` seconds until the
--   next try, default `outbox.backoff(attempts + 1)`, at most 1e9
-- @return true, or true and a note of what had to be recorded step by step
--   (for the log), or nil, err, sqlstate
function M.finish(conn, done_ids, failed)
  check_conn(conn, "finish")
  local done, ndone = bigint_array(done_ids, 2, "finish")
  if failed ~= nil and type(failed) ~= "table" then
    argerror(3, "finish", "array of failures expected, got " .. type(failed))
  end
  local fails = {}
  for i = 1, failed and #failed or 0 do fails[i] = check_failure(failed[i], i) end

  local tx = conn:status() == "ok" and conn:txstatus() or "lost"
  if tx ~= "intrans" then
    -- A lost connection took the transaction (and the locks) with it: the
    -- facade reports that once, on the next call, and heals on the one after.
    local ok, err, code = conn:exec("ROLLBACK")
    if ok then
      err, code = tx == "inerror"
        and "finish: the claim's transaction had failed; rolled back, its events are claimable again"
        or "finish: no claim is open on this connection (lost or already finished)", nil
    end
    return nil, err, code
  end
  fails = distinct_failures(fails, done_ids)
  local notes
  if ndone > 0 or #fails > 0 then
    local ok, err, code, fatal = guarded(conn, FINISH, done, failure_arrays(fails, outbox().error_text))
    if not ok then
      if fatal then return abort(conn, err, code) end
      notes, err, code = finish_in_steps(conn, done, done_ids, fails, err)
      if not notes then return abort(conn, err, code) end
    end
  end
  local ok, err, code = conn:exec("COMMIT")
  if not ok then return abort(conn, err, code) end
  if notes then return true, concat(notes, "; ") end
  return true
end

return M
