/*
 * json_fuzz.c -- a libFuzzer target for the JSON decoder and encoder
 * (src/jsondec.c, src/json.c).  core.json_decode is the one decoder entry
 * of the tree: the runner's NOTIFY payloads (pglisten.json.safe.decode is
 * the same function), json/jsonb columns in results and in the WAL (the
 * decode hook core.setup installs).  Each input is one payload; a check
 * written in Lua (`check` below) then holds the decoder to:
 *
 *   - a reference decoder written from RFC 8259 and the number rules of
 *     src/pgl.h (pgl_push_number), in Lua: the same inputs accepted, the
 *     same value for each, down to the kind of every number (an integer,
 *     a float, the text) and the sign of -0.0;
 *   - a refusal's message: "invalid JSON: ..." naming a byte of the input
 *     and showing that byte, or the end of the input;
 *   - the round trip: encode(v) decodes again to v, where the only change
 *     allowed is an integral float that fits 64 bits coming back as the
 *     integer (encode writes 3.0 as 3); a second trip changes nothing.
 *     Empty arrays and objects are both {} (one Lua value), so they
 *     compare alike; JSON null is the null sentinel both ways; nesting
 *     that decodes (1000 levels) must encode;
 *   - core.intify (the C half of a channel's decode = "cjson") on the
 *     value: every integral float within 2^53 becomes an integer.
 *
 * Anything the sanitizers see, or a failed check, traps.  Inputs are kept
 * to 8192 bytes (a NOTIFY payload is under 8000).  `make fuzz` builds and
 * runs it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <lauxlib.h>
#include <lualib.h>

int luaopen_pglisten_core(lua_State *L);

/* The check, a Lua chunk returning function(payload), in pieces that C99
 * compilers must all accept (4095 bytes each at most). */
static const char *const check_lua[] = {
  "local core = require 'pglisten.core'\n"
  "local dec, enc, intify = core.json_decode, core.json_encode, core.intify\n"
  "local null = dec('null')\n"
  "assert(type(null) == 'userdata', 'null is not the null sentinel')\n"
  "local MAX_DEPTH = 1000\n"
  "local ESC = { ['\"'] = '\"', ['/'] = '/', b = '\\b', f = '\\f', n = '\\n', r = '\\r', t = '\\t' }\n"
  "ESC[string.char(92)] = string.char(92)\n"
  /* the bytes that end a plain run in a string: controls, '"', '\' */
  "local SPECIAL = '[' .. string.char(0) .. '-' .. string.char(31) .. string.char(34, 92) .. ']'\n"
  "\n"
  "local function ws(s, i) return s:find('[^ \\t\\n\\r]', i) or #s + 1 end\n"
  "\n"
  /* the reference: value, next index; nil on bad input */
  "local function ref_u(s, i, out)\n"
  "  local h = s:match('^%x%x%x%x', i)\n"
  "  if not h then return nil end\n"
  "  local cp = tonumber(h, 16)\n"
  "  i = i + 4\n"
  "  if cp >= 0xDC00 and cp <= 0xDFFF then return nil end\n"
  "  if cp >= 0xD800 and cp <= 0xDBFF then\n"
  "    local l = s:match('^' .. string.char(92) .. 'u(%x%x%x%x)', i)\n"
  "    local lo = l and tonumber(l, 16)\n"
  "    if not lo or lo < 0xDC00 or lo > 0xDFFF then return nil end\n"
  "    cp = 0x10000 + (cp - 0xD800) * 1024 + (lo - 0xDC00)\n"
  "    i = i + 6\n"
  "  end\n"
  "  out[#out + 1] = utf8.char(cp)\n"
  "  return i\n"
  "end\n"
  "\n"
  "local function ref_string(s, i)\n"
  "  local out = {}\n"
  "  i = i + 1\n"
  "  while true do\n"
  "    local j = s:find(SPECIAL, i)\n"
  "    if not j then return nil end\n"
  "    out[#out + 1] = s:sub(i, j - 1)\n"
  "    local c = s:byte(j)\n"
  "    if c == 34 then return table.concat(out), j + 1 end\n"
  "    if c ~= 92 then return nil end\n"
  "    local e = s:sub(j + 1, j + 1)\n"
  "    if ESC[e] then\n"
  "      out[#out + 1] = ESC[e]\n"
  "      i = j + 2\n"
  "    elseif e == 'u' then\n"
  "      i = ref_u(s, j + 2, out)\n"
  "      if not i then return nil end\n"
  "    else\n"
  "      return nil\n"
  "    end\n"
  "  end\n"
  "end\n"
  "\n",
  /* +-0.DIGITS * 10^exp of a number text: sign, digits, exp ("" for 0) */
  "local function decimal(t)\n"
  "  local sign, int, frac, exp = t:match('^(-?)(%d*)%.?(%d*)[eE]?([-+]?%d*)$')\n"
  "  local d, e = int .. frac, #int + (tonumber(exp) or 0)\n"
  "  local lead = #d:match('^0*')\n"
  "  d = d:sub(lead + 1):gsub('0+$', '')\n"
  "  if d == '' then return '', '', 0 end\n"
  "  return sign, d, e - lead\n"
  "end\n"
  "\n"
  "local function shortest(x)\n"
  "  for p = 1, 17 do\n"
  "    local f = ('%.' .. p .. 'g'):format(x)\n"
  "    if tonumber(f) == x then return f end\n"
  "  end\n"
  "end\n"
  "\n"
  /* pgl_push_number's rules, from the text and Lua's own reading of it */
  "local function ref_number(t)\n"
  "  local x = tonumber(t)\n"
  "  if x == nil then return t end -- what Lua cannot read is kept\n"
  "  if math.type(x) == 'integer' then\n"
  "    if x == 0 and t:sub(1, 1) == '-' then return -0.0 end\n"
  "    return x\n"
  "  end\n"
  "  if x ~= x or x == math.huge or x == -math.huge then return t end\n"
  "  local s1, d1, e1 = decimal(t)\n"
  "  local s2, d2, e2 = decimal(shortest(x))\n"
  "  if s1 == s2 and d1 == d2 and e1 == e2 then return x end\n"
  "  return t\n"
  "end\n"
  "\n"
  "local function ref_numtext(s, i)\n"
  "  local j = s:match('^-?()', i)\n"
  "  j = s:match('^0()', j) or s:match('^[1-9]%d*()', j)\n"
  "  if not j then return nil end\n"
  "  if s:sub(j, j) == '.' then\n"
  "    j = s:match('^%.%d+()', j)\n"
  "    if not j then return nil end\n"
  "  end\n"
  "  if s:match('^[eE]', j) then\n"
  "    j = s:match('^[eE][-+]?%d+()', j)\n"
  "    if not j then return nil end\n"
  "  end\n"
  "  return ref_number(s:sub(i, j - 1)), j\n"
  "end\n"
  "\n",
  "local ref_value\n"
  "\n"
  "local function ref_container(s, i, depth, object)\n"
  "  local close, t, n = object and '}' or ']', {}, 0\n"
  "  if depth >= MAX_DEPTH then return nil end\n"
  "  i = ws(s, i + 1)\n"
  "  if s:sub(i, i) == close then return t, i + 1 end\n"
  "  while true do\n"
  "    local k, v\n"
  "    if object then\n"
  "      i = ws(s, i)\n"
  "      if s:sub(i, i) ~= '\"' then return nil end\n"
  "      k, i = ref_string(s, i)\n"
  "      if k == nil then return nil end\n"
  "      i = ws(s, i)\n"
  "      if s:sub(i, i) ~= ':' then return nil end\n"
  "      i = i + 1\n"
  "    end\n"
  "    v, i = ref_value(s, i, depth + 1)\n"
  "    if v == nil then return nil end\n"
  "    if object then t[k] = v else n = n + 1; t[n] = v end\n"
  "    i = ws(s, i)\n"
  "    local c = s:sub(i, i)\n"
  "    if c == close then return t, i + 1 end\n"
  "    if c ~= ',' then return nil end\n"
  "    i = i + 1\n"
  "  end\n"
  "end\n"
  "\n"
  "local WORDS = { t = { 'true', true }, f = { 'false', false }, n = { 'null', null } }\n"
  "\n"
  "function ref_value(s, i, depth)\n"
  "  i = ws(s, i)\n"
  "  local c = s:sub(i, i)\n"
  "  if c == '{' or c == '[' then return ref_container(s, i, depth, c == '{') end\n"
  "  if c == '\"' then return ref_string(s, i) end\n"
  "  local w = WORDS[c]\n"
  "  if w then\n"
  "    if s:sub(i, i + #w[1] - 1) ~= w[1] then return nil end\n"
  "    return w[2], i + #w[1]\n"
  "  end\n"
  "  return ref_numtext(s, i)\n"
  "end\n"
  "\n"
  "local function ref_decode(s)\n"
  "  local v, i = ref_value(s, 1, 0)\n"
  "  if v == nil or ws(s, i) <= #s then return nil end\n"
  "  return v\n"
  "end\n"
  "\n",
  /* lenient: an integral float that fits 64 bits may be the integer */
  "local function same_number(a, b, lenient)\n"
  "  if a ~= a or b ~= b then return false end\n"
  "  if math.type(a) == math.type(b) then\n"
  "    return a == b and (a ~= 0 or 1 / a == 1 / b)\n"
  "  end\n"
  "  return lenient and math.type(a) == 'float' and math.tointeger(a) == b and (a ~= 0 or 1 / a > 0)\n"
  "end\n"
  "\n"
  "local function same(a, b, lenient)\n"
  "  local ta = type(a)\n"
  "  if ta ~= type(b) then return false end\n"
  "  if ta == 'number' then return same_number(a, b, lenient) end\n"
  "  if ta ~= 'table' then return rawequal(a, b) end\n"
  "  local n = 0\n"
  "  for k, x in pairs(a) do\n"
  "    n = n + 1\n"
  "    if not same(x, rawget(b, k), lenient) then return false end\n"
  "  end\n"
  "  for _ in pairs(b) do n = n - 1 end\n"
  "  return n == 0\n"
  "end\n"
  "\n"
  "local function check_error(s, err)\n"
  "  assert(type(err) == 'string', 'a refusal without a message')\n"
  "  local at, shown = err:match('^invalid JSON: .- at byte (%d+) %((.*)%)$')\n"
  "  if at then\n"
  "    local c = s:byte(tonumber(at))\n"
  "    assert(c, 'the message names a byte beyond the input: ' .. err)\n"
  "    local want = (c >= 32 and c < 127) and (\"'%c'\"):format(c) or ('0x%02x'):format(c)\n"
  "    assert(shown == want, 'the message shows another byte: ' .. err)\n"
  "    return\n"
  "  end\n"
  "  at = err:match('^invalid JSON: .- %(byte (%d+)%)$')\n"
  "  if at then\n"
  "    assert(tonumber(at) == #s + 1, 'the end of the input is not byte ' .. at .. ': ' .. err)\n"
  "    return\n"
  "  end\n"
  "  assert(err == 'invalid JSON: empty input' and #s == 0, 'unexpected message: ' .. err)\n"
  "end\n"
  "\n",
  "local function intified(v)\n"
  "  if type(v) == 'table' then\n"
  "    for _, x in pairs(v) do\n"
  "      if not intified(x) then return false end\n"
  "    end\n"
  "    return true\n"
  "  end\n"
  "  return not (math.type(v) == 'float' and v == math.floor(v) and v >= -2^53 and v <= 2^53)\n"
  "end\n"
  "\n"
  "return function(s)\n"
  "  local v, err = dec(s)\n"
  "  local r = ref_decode(s)\n"
  "  if v == nil then\n"
  "    check_error(s, err)\n"
  "    if err:find('too large to decode', 1, true) then return end -- the Lua stack: no reference\n"
  "    assert(r == nil, 'refused valid JSON: ' .. err)\n"
  "    return\n"
  "  end\n"
  "  assert(err == nil, 'a value and a message')\n"
  "  assert(r ~= nil, 'accepted invalid JSON')\n"
  "  assert(same(v, r, false), 'decoded otherwise than the reference')\n"
  "  local t1 = enc(v)\n"
  "  local v2, e2 = dec(t1)\n"
  "  assert(v2 ~= nil, e2)\n"
  "  assert(same(v, v2, true), 'round trip changed the value: ' .. t1)\n"
  "  local t2 = enc(v2)\n"
  "  local v3, e3 = dec(t2)\n"
  "  assert(v3 ~= nil, e3)\n"
  "  assert(same(v2, v3, false), 'second round trip changed the value: ' .. t2)\n"
  "  if type(v) ~= 'table' then assert(t1 == t2, 'second round trip changed the text: ' .. t2) end\n"
  "  assert(intified(intify(v)), 'intify left an integral float')\n"
  "end\n",
  NULL
};

/* lua_load's reader: the pieces of check_lua one by one. */
static const char *read_check(lua_State *S, void *ud, size_t *size) {
  const char *const **next = (const char *const **)ud;
  const char *piece = **next;
  (void)S;
  if (!piece) {
    *size = 0;
    return NULL;
  }
  (*next)++;
  *size = strlen(piece);
  return piece;
}

static lua_State *L;

/* The check's function at index 1. */
static void setup(void) {
  const char *const *next = check_lua;
  L = luaL_newstate();
  if (!L)
    __builtin_trap();
  luaL_openlibs(L);
  luaL_requiref(L, "pglisten.core", luaopen_pglisten_core, 0);
  lua_pop(L, 1);
  if (lua_load(L, read_check, &next, "=json_check", "t") != LUA_OK || lua_pcall(L, 0, 1, 0) != LUA_OK) {
    fprintf(stderr, "json_fuzz: %s\n", lua_tostring(L, -1));
    __builtin_trap();
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!L)
    setup();
  lua_settop(L, 1);
  lua_pushvalue(L, 1);
  lua_pushlstring(L, (const char *)data, size);
  if (lua_pcall(L, 1, 0, 0) != LUA_OK) {
    const char *m = lua_tostring(L, -1);
    if (m && (strcmp(m, "not enough memory") == 0 || strcmp(m, "not enough memory to encode JSON") == 0))
      return 0; /* Lua's allocator or the encoder's buffer failed: not a bug */
    fprintf(stderr, "json_fuzz: %s\n", m ? m : "(an error that is not a string)");
    __builtin_trap();
  }
  lua_settop(L, 1);
  lua_gc(L, LUA_GCSTEP, 0);
  return 0;
}
