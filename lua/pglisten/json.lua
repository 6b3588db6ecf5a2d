--- The JSON codec of pglisten, `pglisten.json` (the facade's `json` field):
-- encode and decode from the C core, lua-cjson's null, and lua-cjson's
-- decoder for a channel's `decode = "cjson"`.
-- @module pglisten.json

local core = require "pglisten.core"
local cjson = require "cjson"

-- Decoding is ours too (src/jsondec.c, core.json_decode): lua-cjson 2.1.0
-- returns every number as a double, so a bigint id above 2^53 came back
-- rounded, and it was 40% of the runner's work per notification.  lua-cjson
-- stays for its null sentinel (scripts compare with `cjson.null`) and as a
-- channel's `decode = "cjson"`.
local json_encode, json_decode = core.json_encode, core.json_decode

--- JSON as this module uses it.  `encode` writes Lua integers exactly and
-- floats in the shortest form that reads back as the same double (3.0 as
-- 3, -0.0 as -0.0).  `decode` is strict RFC 8259 and rounds no number:
-- integers that fit 64 bits are Lua integers, other numbers floats when
-- the double's shortest form is the same value (0.30, 1e20), else their
-- text (12345678901234567890, 1e400); JSON null is `pglisten.null`.
-- `encode`/`decode` raise on bad input; `safe.encode`/`safe.decode` return
-- `nil, err` instead.
local function safe_json_encode(v)
  local ok, s = pcall(json_encode, v)
  if ok then return s end
  return nil, s
end

local function raising_decode(s)
  local v, err = json_decode(s)
  if v == nil then error(err, 2) end
  return v
end

local M = {
  encode = json_encode,
  decode = raising_decode,
  null = cjson.null,
  safe = {
    encode = safe_json_encode,
    decode = json_decode,
  },
}

-- lua-cjson's decoder with integral numbers made integers again (up to
-- 2^53; it has rounded larger ones already): `decode = "cjson"`.
local cjson_safe = require("cjson.safe").new()
local cjson_decode, intify = cjson_safe.decode, core.intify
function M.cjson_decode(s)
  local v, err = cjson_decode(s)
  if v == nil then return nil, "invalid JSON: " .. tostring(err) end
  return intify(v)
end

return M
