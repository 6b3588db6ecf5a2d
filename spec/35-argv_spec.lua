-- The command lines of lua-pglisten, table-driven: what the runner's options
-- (pglisten.cli.parse_args) and the `outbox` / `backfill` subcommands accept
-- and refuse, with their exact messages and exit codes.  The refusals run the
-- real binary; a subcommand's accepted command line is seen through what it
-- does next (the message that names the parsed value, or the connect that
-- follows parsing).
local H = require "helpers"

-- pglisten.cli needs the host program's module only once it runs a script.
package.loaded["pglisten.host"] = package.loaded["pglisten.host"] or { version = "spec" }
local cli = require "pglisten.cli"

-- Runs the binary; returns its exit code, stdout and stderr.
local seq = 0
local function run(argv)
  seq = seq + 1
  local base = ("%s/argv%d"):format(H.dir, seq)
  local cmd = { H.q(H.runner) }
  for i, a in ipairs(argv) do cmd[i + 1] = H.q(a) end
  local _, _, code = os.execute(("cd %s && %s >%s.out 2>%s.err </dev/null"):format(H.q(H.dir),
    table.concat(cmd, " "), base, base))
  return code, H.read(base .. ".out"), H.read(base .. ".err")
end

local function show(argv) return table.concat(argv, " ") end

-- A refused command line: exit 2, the message, then the hint, on stderr.
local function refused(argv, msg, hint)
  local rc, out, err = run(argv)
  assert.equal(2, rc, show(argv))
  assert.equal("", out, show(argv))
  assert.equal("lua-pglisten: " .. msg .. "\nTry 'lua-pglisten " .. hint .. "--help'.\n", err, show(argv))
end

-- A database nothing listens on: a command that parsed goes on to connect.
local NODB = "host=127.0.0.1 port=1 connect_timeout=2"

describe("the runner's command line", function()
  -- argv -> the options parse_args returns
  local ACCEPTED = {
    { { "s.lua" }, { script = "s.lua" } },
    { { "--db", "x", "s.lua" }, { db = "x", script = "s.lua" } },
    { { "--db=x", "s.lua" }, { db = "x", script = "s.lua" } },
    { { "--db=a=b c", "s.lua" }, { db = "a=b c", script = "s.lua" } },
    { { "-d", "x", "s.lua" }, { db = "x", script = "s.lua" } },
    { { "-dx", "s.lua" }, { db = "x", script = "s.lua" } },
    { { "-d=x", "s.lua" }, { db = "=x", script = "s.lua" } },
    { { "--db=", "s.lua" }, { db = "", script = "s.lua" } },
    { { "--db", "", "s.lua" }, { db = "", script = "s.lua" } },
    { { "--db", "--check", "s.lua" }, { db = "--check", script = "s.lua" } },
    { { "-c", "s.lua" }, { check = true, script = "s.lua" } },
    { { "s.lua", "--check" }, { check = true, script = "s.lua" } },
    { { "-l", "debug", "s.lua" }, { ["log-level"] = "debug", script = "s.lua" } },
    { { "-lwarn", "--log-format=json", "s.lua" },
      { ["log-level"] = "warn", ["log-format"] = "json", script = "s.lua" } },
    { { "--reconnect-min", "0.5", "--reconnect-max=60", "s.lua" },
      { ["reconnect-min"] = 0.5, ["reconnect-max"] = 60, script = "s.lua" } },
    { { "--reconnect-min", "0.001", "s.lua" }, { ["reconnect-min"] = 0.001, script = "s.lua" } },
    { { "--heartbeat", "0", "--stats-interval", "1e1", "s.lua" },
      { heartbeat = 0, ["stats-interval"] = 10, script = "s.lua" } },
    { { "--single-active", "--metrics", "9100", "--metrics-file", "/tmp/m", "s.lua" },
      { ["single-active"] = true, metrics = "9100", ["metrics-file"] = "/tmp/m", script = "s.lua" } },
    { { "--tap", "a", "--tap=b,c", "s.lua" }, { tap = { "a", "b", "c" }, script = "s.lua" } },
    { { "--tap", "a,,b,", "s.lua" }, { tap = { "a", "b" }, script = "s.lua" } },
    { { "--drop-slot", "s.lua" }, { ["drop-slot"] = true, script = "s.lua" } },
    { { "--sql" }, { sql = true } },
    { { "--install", "--db", "x" }, { install = true, db = "x" } },
    { { "--help" }, { help = true } },
    { { "-h" }, { help = true } },
    { { "-V" }, { version = true } },
    { { "--version" }, { version = true } },
    { { "-" }, { script = "-" } },
    { { "--", "-x.lua" }, { script = "-x.lua" } },
    { { "--", "--help" }, { script = "--help" } },
    { { "--check", "--", "s.lua" }, { check = true, script = "s.lua" } },
    -- given twice: the later one wins (a list grows)
    { { "--db", "a", "-d", "b", "s.lua" }, { db = "b", script = "s.lua" } },
    { { "-l", "info", "--log-level=debug", "s.lua" }, { ["log-level"] = "debug", script = "s.lua" } },
    { { "-c", "--check", "s.lua" }, { check = true, script = "s.lua" } },
    { { "--heartbeat", "5", "--heartbeat", "0", "s.lua" }, { heartbeat = 0, script = "s.lua" } },
  }
  for _, case in ipairs(ACCEPTED) do
    it("accepts " .. show(case[1]), function()
      local opts, err = cli.parse_args(case[1])
      assert.is_nil(err)
      assert.same(case[2], opts)
    end)
  end

  -- argv -> the usage error (exit 2)
  local REFUSED = {
    { {}, "missing SCRIPT" },
    { { "--check" }, "missing SCRIPT" },
    { { "--drop-slot", "--db", "x" }, "missing SCRIPT" },
    { { "--bogus", "s.lua" }, "unknown option --bogus" },
    { { "--bogus=1", "s.lua" }, "unknown option --bogus" },
    { { "--Db", "x", "s.lua" }, "unknown option --Db" },
    { { "--=x", "s.lua" }, "unknown option --=x" },
    { { "---db", "x", "s.lua" }, "unknown option ---db" },
    { { "--chec", "s.lua" }, "unknown option --chec" },
    { { "-x", "s.lua" }, "unknown option -x" },
    { { "-xyz", "s.lua" }, "unknown option -x" },
    { { "--bogus", "--db" }, "unknown option --bogus" },
    { { "--db" }, "option --db needs a value" },
    { { "-d" }, "option --db needs a value" },
    { { "s.lua", "--tap" }, "option --tap needs a value" },
    { { "--check=yes", "s.lua" }, "option --check takes no value" },
    { { "--check=", "s.lua" }, "option --check takes no value" },
    { { "-cx", "s.lua" }, "option -c takes no value" },
    { { "-hV" }, "option -h takes no value" },
    { { "--heartbeat", "soon", "s.lua" }, "option --heartbeat needs a number >= 0, got soon" },
    { { "--heartbeat=-1", "s.lua" }, "option --heartbeat needs a number >= 0, got -1" },
    { { "--heartbeat", "nan", "s.lua" }, "option --heartbeat needs a number >= 0, got nan" },
    { { "--stats-interval=", "s.lua" }, "option --stats-interval needs a number >= 0, got " },
    { { "--reconnect-min", "0", "s.lua" },
      "option --reconnect-min needs a number > 0 (from 0.001 to a finite number of seconds), got 0" },
    { { "--reconnect-max=1e999", "s.lua" },
      "option --reconnect-max needs a number > 0 (from 0.001 to a finite number of seconds), got 1e999" },
    { { "--reconnect-max", "inf", "s.lua" }, "option --reconnect-max needs a number >= 0, got inf" },
    { { "-l", "loud", "s.lua" }, "invalid --log-level loud (error, warn, info or debug)" },
    { { "-l", "loud" }, "invalid --log-level loud (error, warn, info or debug)" },
    { { "--log-format", "xml", "s.lua" }, "invalid --log-format xml (text or json)" },
    { { "--log-format=", "s.lua" }, "invalid --log-format  (text or json)" },
    { { "a.lua", "b.lua" }, "too many arguments: one SCRIPT expected" },
    { { "--", "a.lua", "b.lua" }, "too many arguments: one SCRIPT expected" },
  }
  for _, case in ipairs(REFUSED) do
    it("refuses " .. show(case[1]) .. " with exit 2: " .. case[2], function()
      assert.same({ nil, case[2] }, { cli.parse_args(case[1]) })
      refused(case[1], case[2], "")
    end)
  end
end)

describe("lua-pglisten outbox's command line", function()
  local function o(...) return { "outbox", ... } end

  it("prints its help with exit 0", function()
    for _, argv in ipairs({ o("--help"), o("-h"), o("help"), o("status", "--help"), o("dead", "-h"),
      o("replay", "--id", "1", "-h"), o("purge", "--help") }) do
      local rc, out, err = run(argv)
      assert.equal(0, rc, show(argv))
      assert.matches("^usage: lua%-pglisten outbox status", out)
      assert.equal("", err, show(argv))
    end
  end)

  local REFUSED = {
    { o(), "outbox: missing subcommand (status, dead, replay or purge)" },
    { o("bogus"), "outbox: unknown subcommand bogus (status, dead, replay or purge)" },
    { o("--db", "x", "status"), "outbox: unknown subcommand --db (status, dead, replay or purge)" },
    { o("status", "--bogus"), "outbox status: unknown option --bogus" },
    { o("status", "-x"), "outbox status: unknown option -x" },
    { o("status", "--limit", "5"), "outbox status: unknown option --limit" },
    { o("status", "--all"), "outbox status: unknown option --all" },
    { o("status", "--db"), "outbox status: option --db needs a value" },
    { o("status", "-d"), "outbox status: option --db needs a value" },
    { o("status", "--channel"), "outbox status: option --channel needs a value" },
    { o("status", "--help=yes"), "outbox status: option --help takes no value" },
    { o("status", "--format", "xml"), "outbox status: invalid --format xml (text or json)" },
    { o("status", "--format=xml"), "outbox status: invalid --format xml (text or json)" },
    { o("status", "--format="), "outbox status: invalid --format  (text or json)" },
    { o("status", "extra"), "outbox status: unexpected argument extra" },
    { o("status", "--", "--format"), "outbox status: unexpected argument --format" },
    { o("status", "--channel", "a", "--channel", "b"), "outbox status: option --channel given twice" },
    { o("status", "-d", "x", "--db=y"), "outbox status: option --db given twice" },
    { o("status", "-h", "--help"), "outbox status: option --help given twice" },
    { o("dead", "--limit", "0"), 'outbox dead: option --limit needs a whole number >= 1, got "0"' },
    { o("dead", "--limit=1.5"), 'outbox dead: option --limit needs a whole number >= 1, got "1.5"' },
    { o("dead", "--limit", "1e3"), 'outbox dead: option --limit needs a whole number >= 1, got "1e3"' },
    { o("dead", "--limit", "-3"), 'outbox dead: option --limit needs a whole number >= 1, got "-3"' },
    { o("dead", "--limit="), 'outbox dead: option --limit needs a whole number >= 1, got ""' },
    { o("dead", "--limit", "5", "--limit", "6"), "outbox dead: option --limit given twice" },
    { o("replay"), "outbox replay: outbox replay needs --id N (one or more) or --all" },
    { o("replay", "--id", "1", "--all"), "outbox replay: outbox replay: --id and --all exclude each other" },
    { o("replay", "--all", "--all"), "outbox replay: option --all given twice" },
    { o("replay", "--id", "x"), 'outbox replay: option --id needs a whole number >= 1, got "x"' },
    { o("replay", "--id", "1", "--id"), "outbox replay: option --id needs a value" },
    { o("replay", "--format", "json", "--all"), "outbox replay: unknown option --format" },
    { o("purge"), "outbox purge: outbox purge needs --dead (dead letters are all it purges)" },
    { o("purge", "--dead"), "outbox purge: outbox purge needs --older-than DURATION (e.g. 7d)" },
    { o("purge", "--dead=1", "--older-than", "7d"), "outbox purge: option --dead takes no value" },
    { o("purge", "--dead", "--older-than", "7d", "--older-than", "1d"),
      "outbox purge: option --older-than given twice" },
  }
  for _, case in ipairs(REFUSED) do
    it("refuses " .. show(case[1]) .. " with exit 2: " .. case[2], function()
      refused(case[1], case[2], "outbox ")
    end)
  end

  it("refuses a bad --older-than, naming it", function()
    local rc, _, err = run(o("purge", "--dead", "--older-than=7x"))
    assert.equal(2, rc)
    assert.matches('^lua%-pglisten: outbox purge: %-%-older%-than: invalid duration "7x"', err)
  end)

  -- parsed, these go on to connect to the --db they name (exit 1)
  local ACCEPTED = {
    o("status", "--db", NODB),
    o("status", "--db=" .. NODB, "--format", "json", "--channel", "c"),
    o("status", "-d", NODB),
    o("status", "-d" .. NODB),
    o("dead", "--limit=5", "--format=text", "--db", NODB),
    o("replay", "--id", "1", "--id=2", "-d", NODB),
    o("replay", "--all", "--channel=", "--db", NODB),
    o("purge", "--dead", "--older-than", "1d12h", "--db", NODB, "--"),
  }
  for _, argv in ipairs(ACCEPTED) do
    it("accepts " .. show(argv), function()
      local rc, out, err = run(argv)
      assert.equal(1, rc, err)
      assert.equal("", out)
      assert.matches("^lua%-pglisten: cannot connect to [^\n]*port=1[^\n]*: ", err)
    end)
  end
end)

describe("lua-pglisten backfill's command line", function()
  local function b(...) return { "backfill", ... } end

  it("prints its help with exit 0", function()
    for _, argv in ipairs({ b("--help"), b("-h"), b("--table", "t", "--help") }) do
      local rc, out, err = run(argv)
      assert.equal(0, rc, show(argv))
      assert.matches("^usage: lua%-pglisten backfill", out)
      assert.equal("", err, show(argv))
    end
  end)

  local TC = { "--table", "t", "--channel", "c" }
  local function bt(...) return b(TC[1], TC[2], TC[3], TC[4], ...) end
  local REFUSED = {
    { b(), "backfill needs --table SCHEMA.TABLE" },
    { b("--channel", "c", "s.lua"), "backfill needs --table SCHEMA.TABLE" },
    { b("--table", "t", "s.lua"), "backfill needs --channel C" },
    { bt(), "backfill: missing SCRIPT" },
    { bt("a.lua", "b.lua"), "backfill: one SCRIPT expected" },
    { b("--bogus"), "backfill: unknown option --bogus" },
    { b("-x"), "backfill: unknown option -x" },
    { b("--table"), "backfill: option --table needs a value" },
    { bt("-l"), "backfill: option --log-level needs a value" },
    { bt("--batch", "0", "s.lua"), 'backfill: option --batch needs a whole number >= 1, got "0"' },
    { bt("--batch=", "s.lua"), 'backfill: option --batch needs a whole number >= 1, got ""' },
    { bt("--table", "u", "s.lua"), "backfill: option --table given twice" },
    { bt("--restart", "--restart", "s.lua"), "backfill: option --restart given twice" },
    { bt("--restart=yes", "s.lua"), "backfill: option --restart takes no value" },
    { bt("-l", "loud", "s.lua"), "invalid --log-level loud" },
    { bt("--log-format=xml", "s.lua"), "invalid --log-format xml (text or json)" },
  }
  for _, case in ipairs(REFUSED) do
    it("refuses " .. show(case[1]) .. " with exit 2: " .. case[2], function()
      refused(case[1], case[2], "backfill ")
    end)
  end

  -- parsed, these go on to load SCRIPT (which does not exist: exit 2, logged)
  local ACCEPTED = {
    { bt("missing.lua"), "missing.lua" },
    { b("--table=t", "--channel=c", "-ldebug", "--log-format", "json", "missing.lua"), "missing.lua" },
    { bt("--where=", "--batch", "10", "--restart", "-d", NODB, "missing.lua"), "missing.lua" },
    { b("missing.lua", "--table", "t", "--channel", "c"), "missing.lua" },
    { bt("--", "-s.lua"), "-s.lua" },
  }
  for _, case in ipairs(ACCEPTED) do
    it("accepts " .. show(case[1]), function()
      local rc, out, err = run(case[1])
      assert.equal(2, rc, err)
      assert.equal("", out)
      assert.matches("cannot load script", err, 1, true)
      assert.truthy(err:find(case[2], 1, true), err)
    end)
  end
end)

-- Where the runner's parser and the subcommands' differed before they became
-- one (pglisten.argv), and what the one parser does:
--   * a flag's short form with text glued to it (`-hx`): the runner named
--     what was typed (`option -h takes no value`), the subcommands the long
--     name (`option --help takes no value`); now every command names what
--     was typed, as it does for `--help=x`;
--   * an option given twice: the runner takes the later one (as GNU tools
--     do, so a wrapper can override a unit's `--log-level`), the subcommands
--     refuse it (an operator's `--channel a --channel b` or two
--     `--older-than` is ambiguous on purge/replay): both stay, declared by
--     each command's option table (covered above);
--   * `--opt=`: an empty value, as `--opt ""`, in both (`--db=` is libpq's
--     defaults, `--where=` no filter); but the runner's list option `--tap=`
--     (or `--tap ,`) made an empty list, and the runner then tapped no channel
--     at all, running on silently: now refused;
--   * `--` ends the options and `-xVALUE` gives a value to an option that
--     takes one, in both alike (covered above); neither suggested a near
--     option name for an unknown one, nor does the one parser.
describe("one parser for every command line", function()
  it("names a flag's short form when text is glued to it, on the subcommands too", function()
    refused({ "outbox", "status", "-hx" }, "outbox status: option -h takes no value", "outbox ")
    refused({ "outbox", "replay", "--all", "-hall" }, "outbox replay: option -h takes no value", "outbox ")
    refused({ "backfill", "-hx" }, "backfill: option -h takes no value", "backfill ")
  end)

  it("refuses a list option whose value lists nothing", function()
    local CASES = { { "--tap=", "s.lua" }, { "--tap", ",", "s.lua" }, { "--tap", "a", "--tap=,,", "s.lua" } }
    for _, argv in ipairs(CASES) do
      local val = argv[#argv - 1]:match("^%-%-tap=(.*)$") or argv[#argv - 1]
      local msg = ("option --tap needs at least one value, got %q"):format(val)
      assert.same({ nil, msg }, { cli.parse_args(argv) })
      refused(argv, msg, "")
    end
  end)

  it("is one function, used by the runner and the subcommands", function()
    local argv = require "pglisten.argv"
    assert.equal(argv.parse, require("pglisten.commands.args").parse)
    -- no other module of lua/pglisten words the parser's errors
    -- (lazy.lua words execmany's "unknown option ...; the option is savepoint", a table's key, not argv)
    local p = io.popen("grep -rlF -e '\"option --' -e 'unknown option' " .. H.q(H.root .. "/lua/pglisten")
      .. " | xargs grep -LF 'the option is savepoint'")
    local files = p:read("a")
    p:close()
    assert.equal(H.root .. "/lua/pglisten/argv.lua\n", files)
  end)
end)
