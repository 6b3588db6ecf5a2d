--- What a retried job of pglisten.dispatch goes by, out of its handler's
-- reach.  The handler gets `job.notes` (and the rows decoded from them) and
-- may change them: a batch handler that removes each note it has written,
-- a note's payload cleared, a row's value scaled in place.  A retry, the
-- counts and on_error go by `job.sent`, the notes as taken from the lane,
-- and a retry decodes `job.payloads`, their payloads as received.
-- @module pglisten.retryjob

local M = {}

--- At a job's first attempt: what its outcome will go by (`retries`: the
-- payloads too, for the retries to decode).
function M.keep(job, retries)
  job.payload = job.note.payload -- for the log
  if job.notes then job.sent = table.move(job.notes, 1, #job.notes, 1, {}) end
  if retries then
    local p = {}
    for i, n in ipairs(job.sent or { job.note }) do p[i] = n.payload end
    job.payloads = p
  end
end

--- A retry's argument: the payloads decoded again with `decode`, so that a
-- handler that changed the tables it was given before it failed does not
-- get its own changes as the values sent.  A payload the decoder refuses
-- now (or raises on) is a decode failure, as it would have been on its
-- first try: `refused(note, err)` is called, its note leaves the job (a
-- batch's rows and notes stay aligned) and the handler never sees the table
-- it changed.
-- @return true, or false when no note is left to retry
function M.fresh(job, decode, refused)
  local payloads = job.payloads
  local rows, notes, kept, k = {}, {}, {}, 0
  for i, n in ipairs(job.sent or { job.note }) do
    local v, err = decode(payloads[i])
    if v == nil then
      refused(n, err)
    else
      k = k + 1
      rows[k], notes[k], kept[k] = v, n, payloads[i]
    end
  end
  if k == 0 then return false end
  if job.sent then
    job.arg, job.notes, job.note, job.payloads = rows, notes, notes[1], kept
    job.sent = table.move(notes, 1, k, 1, {})
  else
    job.arg = rows[1]
  end
  job.payload = kept[1]
  return true
end

return M
