-- luacheck configuration (`make lint`).  Lua 5.4, as the runner embeds it.
std = "lua54"
max_line_length = 120
-- A method need not use its `self`: hook tables (sources, services) have
-- methods that the loop calls whether or not they need the object.
self = false

-- The specs run under busted: describe/it/assert and friends are its globals.
files["spec/"] = { std = "+busted" }

-- schema.lua is SQL in a long string: its lines follow the SQL, not Lua.
files["lua/pglisten/schema.lua"] = { max_line_length = false }
