--- Conninfo strings without their secrets, for logs and error messages.
--
-- libpq marks the options that must never be shown with dispchar `"*"`
-- (`password` and `sslpassword` today; any later one too).  This module asks
-- libpq (`PQconninfoParse`, via `core.conninfo_parse`) which options a
-- conninfo sets and what their values are, keyword/value strings and
-- `postgres://` URIs alike, and:
--
-- * `safe(conninfo)` rebuilds the conninfo from the parsed options as
--   `keyword=value` pairs (a URI as a URI) with every secret as `********`;
--   it never echoes the string it was given, so a secret written in any odd
--   way (percent escapes, quotes, backslashes, a keyword given twice) cannot
--   slip through.
--   A conninfo libpq cannot parse is described by libpq's error, redacted.
-- * `redact(msg, conninfo)` masks in `msg` every secret value of `conninfo`
--   in every form it can take there: as libpq decodes it, as written (raw,
--   quoted, backslash-escaped, percent-encoded with any set of bytes
--   escaped), so also a form a log encoder escaped with backslashes.  For a
--   conninfo libpq cannot parse, the values that follow a secret keyword are
--   found by reading the string, and every double-quoted token of the message
--   is masked too: libpq's parse errors quote the token that broke the parse,
--   and that may be a piece of a password.
--
-- A secret of one or two characters is masked wherever those characters
-- appear: the message gets harder to read, never leaky.
-- @module pglisten.conninfo

local core = require "pglisten.core"

local M = {}

--- What a secret is replaced with.
M.MASK = "********"

local parse = core.conninfo_parse
local concat, sort = table.concat, table.sort
local byte, char, sub = string.byte, string.char, string.sub

---------------------------------------------------------------------------
-- What libpq says
---------------------------------------------------------------------------

-- Keywords whose dispchar is "*", from libpq itself (parsing "" lists every
-- option).  Computed once.
local secret_keys
local function secret_keywords()
  if not secret_keys then
    local set = {}
    for _, o in ipairs(assert(parse(""))) do
      if o.dispchar == "*" then set[o.keyword] = true end
    end
    secret_keys = set
  end
  return secret_keys
end

--- The keywords libpq treats as secret (dispchar `"*"`), sorted.
-- @treturn {string,...}
function M.secret_keywords()
  local list = {}
  for k in pairs(secret_keywords()) do list[#list + 1] = k end
  sort(list)
  return list
end

---------------------------------------------------------------------------
-- Finding the secrets of a conninfo
---------------------------------------------------------------------------

local function pct_decode(s)
  return (s:gsub("%%(%x%x)", function(h) return char(tonumber(h, 16)) end))
end

local function unbackslash(s)
  return (s:gsub("\\(.)", "%1"))
end

local function add(list, seen, s)
  if s and s ~= "" and not seen[s] then
    seen[s] = true
    list[#list + 1] = s
  end
end

-- A keyword/value string read by hand: the value after each `key =` of a
-- secret keyword, quoted or not, as written and unescaped.  Used for strings
-- libpq cannot parse, and as a second net for those it can (a keyword given
-- twice: libpq keeps the last value, the first was a secret too).
local function kv_secrets(s, list, seen)
  for key in pairs(secret_keywords()) do
    local init = 1
    while true do
      local a, b = s:find(key .. "%s*=%s*", init)
      if not a then break end
      init = b + 1
      local before = a > 1 and sub(s, a - 1, a - 1) or " "
      if before:find("%s") then
        local v
        if sub(s, b + 1, b + 1) == "'" then
          local j, n = b + 2, #s
          while j <= n do
            local c = sub(s, j, j)
            if c == "\\" then j = j + 2
            elseif c == "'" then break
            else j = j + 1 end
          end
          v = sub(s, b + 2, j - 1) -- to the closing quote, or to the end if unterminated
        else
          v = s:match("^[^%s]+", b + 1)
        end
        if v then
          add(list, seen, v)
          add(list, seen, unbackslash(v))
        end
      end
    end
  end
end

-- A URI read by hand: the password of the userinfo (after the first ':',
-- up to an '@'), and the value of every secret query parameter.  libpq ends
-- the userinfo at the first '@', or sees none when a '/' comes first; a
-- password written without percent-encoding may hold both, so every '@'
-- may be the one its writer meant, and a password holding '@' or '/' has
-- each of its pieces masked too: libpq reads them as a host, a port or a
-- database name.
local function uri_secrets(s, list, seen)
  local rest = s:match("^%a[%w+.-]*://(.*)$")
  if not rest then return false end
  for at in rest:gmatch("()@") do
    local pw = sub(rest, 1, at - 1):match("^[^:]*:(.*)$")
    if pw then
      add(list, seen, pw)
      add(list, seen, pct_decode(pw))
      for piece in pw:gmatch("[^@/]+") do
        if piece ~= pw then add(list, seen, piece) end
      end
    end
  end
  local query = rest:match("%?(.*)$")
  if query then
    local keys = secret_keywords()
    for k, v in query:gmatch("([^&=]*)=([^&]*)") do
      if keys[pct_decode(k)] then
        add(list, seen, v)
        add(list, seen, pct_decode(v))
      end
    end
  end
  return true
end

--- The secret values a conninfo carries: libpq's parse of every option with
-- dispchar `"*"`, plus what reading the string by hand finds (as written and
-- decoded).
-- @tparam string conninfo
-- @treturn {string,...} secrets, longest first
-- @treturn boolean whether libpq can parse the conninfo
function M.secrets(conninfo)
  local list, seen = {}, {}
  if type(conninfo) ~= "string" or conninfo == "" then return list, true end
  local opts = parse(conninfo)
  if opts then
    for _, o in ipairs(opts) do
      if o.dispchar == "*" then add(list, seen, o.value) end
    end
  end
  if not uri_secrets(conninfo, list, seen) then kv_secrets(conninfo, list, seen) end
  sort(list, function(a, b) return #a > #b or (#a == #b and a < b) end)
  return list, opts ~= nil
end

---------------------------------------------------------------------------
-- Masking
---------------------------------------------------------------------------

local PCT, BSL = byte("%"), byte("\\")

local function hexval(c)
  if not c then return nil end
  if c >= 48 and c <= 57 then return c - 48 end
  c = c | 32
  if c >= 97 and c <= 102 then return c - 87 end
  return nil
end

-- The end of the longest stretch of `s` from `i` that spells `secret` when
-- each byte is read literally, as a %XX escape or after a backslash; nil if
-- none.  The set of positions reachable after k bytes of the secret is
-- carried along, so every mix of escapes is tried in O(#secret * #s).
local function match_at(s, i, secret)
  local states, n = { i }, #s
  for k = 1, #secret do
    local c, nxt, seen = byte(secret, k), {}, {}
    for _, j in ipairs(states) do
      if j <= n then
        local b = byte(s, j)
        local function push(p) if not seen[p] then seen[p] = true; nxt[#nxt + 1] = p end end
        if b == c then push(j + 1) end
        if b == PCT then
          local h, l = hexval(byte(s, j + 1)), hexval(byte(s, j + 2))
          if h and l and h * 16 + l == c then push(j + 3) end
        elseif b == BSL and byte(s, j + 1) == c then
          push(j + 2)
        end
      end
    end
    if #nxt == 0 then return nil end
    states = nxt
  end
  local best = states[1]
  for _, p in ipairs(states) do if p > best then best = p end end
  return best - 1
end

--- Replaces every occurrence of each secret in `msg` (in any of the forms
-- match_at reads) with `M.MASK`.
-- @tparam string msg
-- @tparam {string,...} secrets
-- @treturn string
function M.mask(msg, secrets)
  if #secrets == 0 or msg == "" then return msg end
  -- the bytes a secret's occurrence can start with: its own first, % or \
  local starts = { [PCT] = true, [BSL] = true }
  for _, s in ipairs(secrets) do starts[byte(s, 1)] = true end
  local out, i, n, from = {}, 1, #msg, 1
  while i <= n do
    local e
    if starts[byte(msg, i)] then
      for _, s in ipairs(secrets) do
        e = match_at(msg, i, s)
        if e then break end
      end
    end
    if e then
      out[#out + 1] = sub(msg, from, i - 1)
      out[#out + 1] = M.MASK
      i = e + 1
      from = i
    else
      i = i + 1
    end
  end
  if from == 1 then return msg end
  out[#out + 1] = sub(msg, from)
  return concat(out)
end

-- libpq's parse errors quote the token that broke the parse
-- (`missing "=" after "pw2" in connection info string`); the literal "="
-- of that message stays.
local function mask_quoted(msg)
  return (msg:gsub('"([^"]*)"', function(t)
    if t == "=" then return nil end
    return '"' .. M.MASK .. '"'
  end))
end

--- `msg` with every secret of `conninfo` masked (see the module's summary).
-- Anything but a string `msg` is returned as it is.
-- @param msg a message (an error, a log line)
-- @tparam[opt] string conninfo the conninfo the message is about
-- @return the message
function M.redact(msg, conninfo)
  if type(msg) ~= "string" or type(conninfo) ~= "string" or conninfo == "" then return msg end
  local secrets, parsed = M.secrets(conninfo)
  msg = M.mask(msg, secrets)
  if not parsed then msg = mask_quoted(msg) end
  return msg
end

local function quote(v)
  if v ~= "" and not v:find("[%s'\\]") then return v end
  return "'" .. v:gsub("[\\']", "\\%0") .. "'"
end

local function pct_encode(v, keep)
  return (v:gsub("[^%w%-._~" .. (keep or "") .. "]", function(c) return ("%%%02X"):format(c:byte()) end))
end

-- The parsed options as a URI with the scheme the conninfo used: user,
-- host and port, and dbname in their places when there is one plain host
-- (not a socket directory, not a list), everything else as query
-- parameters.  `value(o)` gives what to show for an option.
local function as_uri(scheme, opts, value)
  local by, query = {}, {}
  for _, o in ipairs(opts) do
    if o.value then by[o.keyword] = o end
  end
  local host, port = by.host and by.host.value, by.port and by.port.value
  local inline = host and host ~= "" and not host:find("[,/]") and not (port and port:find(",", 1, true))
  local auth, hostpart, path = "", "", ""
  if by.user then auth = pct_encode(value(by.user), "*") end
  if by.password then auth = auth .. ":" .. value(by.password) end
  if auth ~= "" then auth = auth .. "@" end
  if inline then
    local shown = value(by.host)
    hostpart = host:find(":", 1, true) and ("[" .. shown .. "]") or pct_encode(shown, "*")
    if port and port ~= "" then hostpart = hostpart .. ":" .. pct_encode(value(by.port), "*") end
  end
  if by.dbname then path = "/" .. pct_encode(value(by.dbname), "*") end
  for _, o in ipairs(opts) do
    local k = o.keyword
    if o.value and k ~= "user" and k ~= "password" and k ~= "dbname"
        and not (inline and (k == "host" or k == "port")) then
      query[#query + 1] = k .. "=" .. (o.dispchar == "*" and M.MASK or pct_encode(value(o), ",/:*"))
    end
  end
  return scheme .. "://" .. auth .. hostpart .. path .. (#query > 0 and ("?" .. concat(query, "&")) or "")
end

--- A conninfo fit for a log: the options libpq reads from it, rebuilt as
-- `keyword=value` pairs in libpq's order (or as a URI when it was one),
-- secrets as `********` (and masked wherever else they appear in a value).  nil or "" is `(libpq defaults)`; a conninfo
-- libpq cannot parse is described by libpq's message, redacted, never echoed.
-- @tparam[opt] string conninfo
-- @treturn string
function M.safe(conninfo)
  if conninfo == nil or conninfo == "" then return "(libpq defaults)" end
  if type(conninfo) ~= "string" then return "(not a conninfo: a " .. type(conninfo) .. " value)" end
  local opts, err = parse(conninfo)
  if not opts then return "(a conninfo libpq cannot parse: " .. M.redact(err, conninfo) .. ")" end
  local secrets = M.secrets(conninfo)
  -- keywords are libpq's own names; a secret inside another value is masked there
  local function value(o)
    if o.dispchar == "*" then return M.MASK end
    return M.mask(o.value, secrets)
  end
  local scheme = conninfo:match("^(postgres[a-z]*)://")
  if scheme then return as_uri(scheme, opts, value) end
  local parts = {}
  for _, o in ipairs(opts) do
    if o.value then
      parts[#parts + 1] = o.keyword .. "=" .. (o.dispchar == "*" and M.MASK or quote(value(o)))
    end
  end
  if #parts == 0 then return "(libpq defaults)" end
  return concat(parts, " ")
end

---------------------------------------------------------------------------
-- Adding options
---------------------------------------------------------------------------

--- `conninfo` with the options of `list` (`"keyword=value"` strings, values
-- without spaces or quotes) added.  A URI gets them as query parameters,
-- after "?" or "&" as libpq reads the URI: a "?" inside a password written
-- without percent-encoding does not start the query.  A conninfo libpq
-- cannot parse, or where the options would not read back, is returned as
-- it is.
-- @tparam string conninfo
-- @tparam {string,...} list
-- @treturn string
function M.add(conninfo, list)
  if #list == 0 or not parse(conninfo) then return conninfo end
  if not conninfo:match("^%a[%w+.-]*://") then
    return (conninfo == "" and "" or (conninfo .. " ")) .. concat(list, " ")
  end
  local want = {}
  for _, kv in ipairs(list) do
    local k, v = kv:match("^([^=]+)=(.*)$")
    want[k] = v
  end
  local seps = conninfo:find("?", 1, true) and { "&", "?" } or { "?", "&" }
  for _, sep in ipairs(seps) do
    local candidate = conninfo .. sep .. concat(list, "&")
    local opts, got = parse(candidate), 0
    for _, o in ipairs(opts or {}) do
      if want[o.keyword] ~= nil and o.value == want[o.keyword] then got = got + 1 end
    end
    if got == #list then return candidate end
  end
  return conninfo
end

return M
