--- What an SQL string does to a transaction block, read from its text: the
-- facade needs it when the connection is lost under a call, because the
-- server can no longer say (libpq's transaction status comes with the
-- ReadyForQuery that never arrived).  A simple query may hold several
-- statements, so every statement counts, not only the first: in
-- `SET x = 1; BEGIN; INSERT ...` a block was open when the INSERT ran.
-- The splitter knows quotes ('', "", E'' with backslashes, $tag$...$tag$)
-- and comments (--, nested /* */), and splits as psql does inside
-- parentheses and CREATE ... BEGIN ATOMIC bodies, so a `;`, BEGIN or END
-- inside them is no statement.  Text it cannot read (an unterminated quote) ends the last
-- statement, as the server would refuse it anyway.
-- @module pglisten.txblock

local M = {}

-- Where the token that starts at `i` (a quote or comment opener, or one
-- character) ends: the index after it.
local function skip(sql, i)
  local two = sql:sub(i, i + 1)
  if two == "--" then
    return (sql:find("\n", i + 2, true) or #sql) + 1
  elseif two == "/*" then
    local depth, j = 1, i + 2
    while depth > 0 do
      local o, c = sql:find("/*", j, true), sql:find("*/", j, true)
      if not c then return #sql + 1 end
      if o and o < c then depth, j = depth + 1, o + 2 else depth, j = depth - 1, c + 2 end
    end
    return j
  end
  local ch = sql:sub(i, i)
  if ch == "'" or ch == '"' then
    local esc = ch == "'" and i > 1 and sql:sub(i - 1, i - 1):match("[eE]")
      and not sql:sub(i - 2, i - 2):match("[%w_]")
    local j = i + 1
    while true do
      local k = sql:find(esc and "[\\" .. ch .. "]" or ch, j)
      if not k then return #sql + 1 end
      if sql:sub(k, k) == "\\" then
        j = k + 2
      elseif sql:sub(k + 1, k + 1) == ch then
        j = k + 2 -- a doubled quote
      else
        return k + 1
      end
    end
  elseif ch == "$" and not sql:sub(i - 1, i - 1):match("[%w_]") then
    local tag = sql:match("^%$[%a_][%w_]*%$", i) or sql:match("^%$%$", i)
    if tag then
      local _, e = sql:find(tag, i + #tag, true)
      return (e or #sql) + 1
    end
  end
  return i + 1
end

-- psql's rule for SQL-standard function bodies (CREATE FUNCTION ...
-- BEGIN ATOMIC ... END): inside a CREATE statement BEGIN and CASE open a
-- level and END closes one, and a `;` inside a level, or inside
-- parentheses (a rule's actions), ends no statement.
local OPENS = { begin = 1, case = 1, ["end"] = -1 }

--- The statements of `sql`, split at the `;` outside quotes, comments,
-- parentheses and BEGIN ATOMIC bodies (empty ones left out).
function M.statements(sql)
  local list, start, i, create, depth, parens = {}, 1, 1, nil, 0, 0
  while i <= #sql do
    local ch = sql:sub(i, i)
    if ch == ";" and depth == 0 and parens == 0 then
      list[#list + 1] = sql:sub(start, i - 1)
      start, i, create = i + 1, i + 1, nil
    elseif ch:match("[%a_]") and not sql:sub(i - 1, i - 1):match("[%w_$]") then
      local word = sql:match("^[%w_$]+", i)
      local lw = word:lower()
      if create == nil then create = lw == "create" end
      if create and OPENS[lw] then depth = math.max(0, depth + OPENS[lw]) end
      i = i + #word
    else
      if ch == "(" then parens = parens + 1 elseif ch == ")" then parens = math.max(0, parens - 1) end
      i = skip(sql, i)
    end
  end
  list[#list + 1] = sql:sub(start)
  local out = {}
  for _, s in ipairs(list) do
    if s:find("[^%s]") and s:gsub("%-%-[^\n]*", ""):gsub("/%*.-%*/", ""):find("[^%s]") then
      out[#out + 1] = s
    end
  end
  return out
end

--- The first four words of a statement, lower case, after white space and
-- comments (enough to tell how it ends a transaction).
function M.first_words(sql)
  local i = 1
  while true do
    local j = sql:match("^%s*()", i)
    local two = sql:sub(j, j + 1)
    if two == "--" or two == "/*" then i = skip(sql, j) else i = j break end
  end
  local words = {}
  for w in sql:sub(i, i + 200):gmatch("[%a_]+") do
    words[#words + 1] = w:lower()
    if #words == 4 then break end
  end
  return words
end

--- How the first statement of `sql` ends a transaction block: "rollback"
-- (ROLLBACK, ABORT), "commit" (COMMIT, END, PREPARE TRANSACTION), or nil
-- when it does not end one (ROLLBACK TO SAVEPOINT) or begins another (AND
-- CHAIN).
function M.ends(sql)
  local w = M.first_words(sql)
  local kind = ({ rollback = "rollback", abort = "rollback", commit = "commit", ["end"] = "commit" })[w[1]]
  if w[1] == "prepare" and w[2] == "transaction" then return "commit" end
  if not kind or w[2] == "prepared" then return nil end -- COMMIT PREPARED 'gid'
  local k = (w[2] == "work" or w[2] == "transaction") and 3 or 2
  if w[k] == "to" or w[k] == "and" and w[k + 1] == "chain" then return nil end
  return kind
end

--- Whether the first statement of `sql` commits and begins the next block
-- at once (COMMIT AND CHAIN, END AND CHAIN).
function M.chains(sql)
  local w = M.first_words(sql)
  if w[1] ~= "commit" and w[1] ~= "end" then return false end
  local k = (w[2] == "work" or w[2] == "transaction") and 3 or 2
  return w[k] == "and" and w[k + 1] == "chain"
end

--- Whether the first statement of `sql` begins a transaction block.
function M.begins(sql)
  local w = M.first_words(sql)
  return w[1] == "begin" or (w[1] == "start" and w[2] == "transaction")
end

--- What `sql` did to the caller's transaction when the connection was lost
-- at an unknown statement of it, `intx` telling whether a block was open
-- before it.  Returns `lost`: the string leaves a block open (the caller's
-- next calls belong to it, and the server rolled it back), and
-- `maybe_committed`: a COMMIT in it ended a block (it may have committed
-- before the loss).  A string that ends its block (a COMMIT or ROLLBACK
-- after its last BEGIN) leaves the next calls outside one, where healing
-- is right whichever statement the loss hit.
function M.effect(sql, intx)
  local committed = false
  for _, stmt in ipairs(M.statements(sql)) do
    local kind = M.ends(stmt)
    if kind then
      if intx and kind == "commit" then committed = true end
      intx = false
    elseif M.chains(stmt) then
      if intx then committed = true end
    elseif M.begins(stmt) then
      intx = true
    end
  end
  return intx and true or false, committed
end

return M
