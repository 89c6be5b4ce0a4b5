-- Claim runs for one worker in one round trip: the checks arq's Worker.start_jobs makes run by run
-- (WATCH the in-progress key, EXISTS it, ZSCORE the queue entry, then MULTI/PSETEX/EXEC) -- four
-- round trips per run -- made here for a whole batch, atomically per run.
--
-- A run is claimed when nobody holds its in-progress key and it is still on the queue and due; the
-- in-progress key is then set with arq's lock lifetime, exactly as arq sets it.
--
-- KEYS[1] arq's queue; ARGV: in-progress key prefix, now (ms), lock lifetime (ms), at most how many
-- to claim, then the run ids read from the queue's head, best first.
-- Returns {run id, score, run id, score, ...} of the claimed runs, in order.

local prefix, now_ms, lock_ms, limit = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV do
  if #out >= 2 * limit then break end
  local rid = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], rid)
  if score and tonumber(score) <= now_ms
      and redis.call('SET', prefix .. rid, '1', 'NX', 'PX', lock_ms) then
    out[#out + 1] = rid
    out[#out + 1] = score
  end
end
return out
