-- Take a slot for one event stream of a tenant, if the tenant has fewer than `cap` open.
-- KEYS[1] the tenant's zset of open streams (member: stream id, score: expiry in ms);
-- ARGV: now_ms, ttl_ms, cap, stream id. Entries of processes that died expire on their own:
-- live processes push their streams' expiry forward (see server/limits.py).
local now, ttl, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
