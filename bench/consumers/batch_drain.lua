--- sync.sh consumer (lua-pglisten-batch-drain1000): batch.lua with the
-- script's batch_size = 1000, so that the runner takes up to 1000 notes
-- from libpq per read instead of its default 256 (which caps the batches
-- handed to a batch = 1000 handler at about 256).

local spec = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "batch.lua")
spec.batch_size = 1000
return spec
