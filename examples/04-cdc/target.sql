-- Example 4, the target database: the same tables, the same foreign key.
-- The runner applies the source's changes in commit order, so a parent row
-- arrives before the rows that point to it, and a deleted parent's children
-- go with it here as they went on the source (ON DELETE CASCADE).  (A source
-- whose foreign key is DEFERRABLE INITIALLY DEFERRED may write a child
-- before its parent in one transaction, and the target, which applies a
-- batch of one table at a time, would refuse it: leave the foreign key out
-- of such a target.)
CREATE TABLE users (
  id         bigint PRIMARY KEY,
  email      text NOT NULL,
  name       text NOT NULL,
  bio        text,
  updated_at timestamptz NOT NULL
);

CREATE TABLE orders (
  id         bigint PRIMARY KEY,
  user_id    bigint NOT NULL REFERENCES users ON DELETE CASCADE,
  amount     numeric(12, 2) NOT NULL,
  status     text NOT NULL,
  created_at timestamptz NOT NULL
);
CREATE INDEX ON orders (user_id);
