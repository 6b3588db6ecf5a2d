-- After a reconnect, on_connect resyncs (README: plain NOTIFY is lossy while
-- the runner is disconnected, on_connect catches up).  Notes received on the
-- lost connection are still handled; they must be handled BEFORE that
-- resync, or an old note writes a stale value over the resync's newer one
-- and the target never matches the source again.  The fault is real: the
-- listening backend is terminated while a handler waits to retry (its
-- target row is locked), the runner's role may not log in for a moment so
-- that a change made meanwhile is lost for good, and only on_connect can
-- bring it over.
local H = require "helpers"

local script, lines, start = H.script, H.lines, H.start

local function index(list, s)
  for i, l in ipairs(list) do if l == s then return i end end
end

local BODY = [[
local target = assert(pglisten.connect(%q))
-- a locked target row fails the handler at once, and it retries 4 s later
assert(target:exec("SET lock_timeout = '100ms'"))
local function upsert(id, v)
  assert(target:exec("INSERT INTO items (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
    id, v))
end
return {
  ordering = %q,
  reconnect = { min = 0.05, max = 0.2 },
  channels = {
    items = { retry = { attempts = 10, backoff = 4, max_backoff = 4 }, handler = function(row)
      if row.op == "DELETE" then
        assert(target:exec("DELETE FROM items WHERE id = $1", row.id))
      else
        upsert(row.id, row.v)
      end
      out("applied", row.id, row.v)
    end },
    other = function(row) out("mark", row.i) end,
  },
  on_connect = function(db, info)
    -- README's recipe: LISTEN is in place; copy the source, remove what is gone
    local rows = assert(db:exec("SELECT id, v FROM items ORDER BY id"))
    local ids = {}
    for _, r in ipairs(rows) do
      upsert(r.id, r.v)
      ids[#ids + 1] = r.id
    end
    assert(target:exec("DELETE FROM items WHERE NOT (id = ANY($1::int[]))", "{" .. table.concat(ids, ",") .. "}"))
    out("resynced", info.reconnect)
  end,
}]]

local TABLE = "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)"
local TRIGGER = [[
  CREATE FUNCTION items_notify() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN
    IF TG_OP = 'DELETE' THEN
      PERFORM pg_notify('items', json_build_object('op', TG_OP, 'id', OLD.id)::text);
    ELSE
      PERFORM pg_notify('items', json_build_object('op', TG_OP, 'id', NEW.id, 'v', NEW.v)::text);
    END IF;
    RETURN NULL;
  END $$;
  CREATE TRIGGER items_t AFTER INSERT OR UPDATE OR DELETE ON items FOR EACH ROW EXECUTE FUNCTION items_notify();]]

local function dump(ci)
  local c = H.connect(ci)
  local r = assert(c:exec("SELECT coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '') AS s FROM items"))
  c:close()
  return r[1].s
end

local roleseq = 0

describe("on_connect after a reconnect", function()
  for _, mode in ipairs({ "global", "channel" }) do
    local p, role, admin, lock
    after_each(function()
      if p then p.stop() end
      if lock then lock:close() end
      if admin then
        admin:exec(("ALTER ROLE %s LOGIN"):format(role))
        admin:close()
      end
      p, lock, admin = nil, nil, nil
    end)

    it(("runs after the notes received before the loss are handled (ordering = %s)"):format(mode), function()
      local src, srcci = H.createdb("osrc")
      local _, dstci = H.createdb("odst")
      roleseq = roleseq + 1
      role = ("pgl_resync_%d_%d"):format(os.time() % 100000, roleseq)
      admin = H.connect(srcci)
      assert(admin:exec(TABLE .. ";" .. TRIGGER))
      assert(admin:exec(("CREATE ROLE %s LOGIN; GRANT SELECT ON items TO %s"):format(role, role)))
      assert(admin:exec("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 5) g"))
      local d = H.connect(dstci)
      assert(d:exec(TABLE))
      d:close()
      p = start(script(BODY:format(dstci, mode)), { "--db", srcci .. " user=" .. role })
      assert(H.eventually(function() return p.stdout():find("resynced false", 1, true) end, 10), p.stderr())
      assert.equal(dump(srcci), dump(dstci))

      -- the target row 1 is locked: the note for it fails and waits 4 s to retry
      lock = H.connect(dstci)
      assert(lock:exec("BEGIN"))
      assert(lock:exec("SELECT * FROM items WHERE id = 1 FOR UPDATE"))
      assert(admin:exec("UPDATE items SET v = 'stale1' WHERE id = 1"))
      assert(H.eventually(function() return p.stderr():find("handler failed; retrying", 1, true) end, 10),
        p.stderr())
      assert(admin:exec("UPDATE items SET v = 'stale2' WHERE id = 2"))
      H.sleep(0.2) -- the runner reads it while the handler waits

      -- the connection goes, and for a moment the runner cannot come back:
      -- what changes meanwhile sends its notification to no one
      assert(admin:exec(("ALTER ROLE %s NOLOGIN"):format(role)))
      local pid = H.runner_backend(src)
      assert.is_number(pid, "no listening backend")
      assert(admin:exec("SELECT pg_terminate_backend($1)", pid))
      assert(H.eventually(function() return p.stderr():find("reconnect failed", 1, true) end, 10), p.stderr())
      assert(admin:exec("UPDATE items SET v = 'final1' WHERE id = 1"))
      assert(admin:exec("UPDATE items SET v = 'final2' WHERE id = 2"))
      assert(admin:exec("DELETE FROM items WHERE id = 3"))
      assert(lock:exec("COMMIT"))
      lock:close()
      lock = nil
      assert(admin:exec(("ALTER ROLE %s LOGIN"):format(role)))
      assert(H.eventually(function() return p.stderr():find("reconnected", 1, true) end, 10), p.stderr())
      -- a note on the new connection, on another channel
      assert(admin:notify("other", { i = 1 }))

      local want = dump(srcci)
      assert.equal("1:final1,2:final2,4:v4,5:v5", want)
      assert(H.eventually(function()
        local o = p.stdout()
        return o:find("mark 1", 1, true) and o:find("applied 2 stale2", 1, true)
      end, 20), p.stdout() .. p.stderr())
      assert(H.eventually(function() return dump(dstci) == want end, 10),
        "target differs from source: " .. dump(dstci) .. "\n" .. p.stdout() .. p.stderr())
      -- the old notes were handled (README: notes already received are), then
      -- the resync, then what the new connection brought
      local out = lines(p.stdout())
      local a1, a2 = index(out, "applied 1 stale1"), index(out, "applied 2 stale2")
      local r, m = index(out, "resynced true"), index(out, "mark 1")
      assert(a1 and a2 and r and m, p.stdout())
      assert.is_true(a1 < a2 and a2 < r and r < m, "order:\n" .. p.stdout())
      assert.is_true(p.running())
    end)
  end
end)

describe("on_connect after a reconnect, when an old note fails for good", function()
  local p
  after_each(function() if p then p.stop() end end)

  it("runs once the handler has given up on it (on_error first)", function()
    local db, ci = H.createdb("ogive")
    p = start(script([[
return {
  channels = { g = { retry = { attempts = 2, backoff = 2 },
    handler = function(row) error("target refuses " .. row.i) end } },
  on_error = function(err, note, info) out("gave up", note.payload, info.attempts) end,
  on_connect = function(db, info) out("on_connect", info.reconnect) end,
}]]), { "--db", ci })
    local c = H.connect(ci)
    assert(c:notify("g", "{\"i\":1}"))
    assert(H.eventually(function() return p.stderr():find("handler failed; retrying", 1, true) end, 10),
      p.stderr())
    local pid = H.runner_backend(db)
    assert.is_number(pid, "no listening backend")
    assert(c:exec("SELECT pg_terminate_backend($1)", pid))
    assert(H.eventually(function() return p.stdout():find("on_connect true", 1, true) end, 15),
      p.stdout() .. p.stderr())
    c:close()
    assert.same({ "on_connect false", 'gave up {"i":1} 2', "on_connect true" }, lines(p.stdout()))
    assert.matches("on_connect waits for the notes received before the loss", p.stderr())
  end)
end)
