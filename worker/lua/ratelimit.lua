-- Per-tenant submission rate limit: the generic cell rate algorithm (GCRA) on one key.
-- KEYS[1] the tenant's key; ARGV: emission interval T (ms per request), burst tolerance tau (ms).
-- Redis' own clock is used, so every server process agrees on time.
-- Returns {allowed (1|0), remaining, retry_after_ms, reset_ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval, tau = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if now < tat - tau then
  return {0, 0, tat - tau - now, tat - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((now + tau + interval - new_tat) / interval), 0, new_tat - now}
