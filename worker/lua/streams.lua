-- Open an event stream, in one round trip: check the job (job streams), check the client's last id
-- against the log, take a slot among the tenant's open streams, and read the first page of what the
-- stream sends. Nothing is written unless the outcome is 'ok'.
--
-- KEYS[1] the log (the job's or the tenant's), KEYS[2] the tenant's zset of open streams (member: a
-- stream's slot id, score: its expiry in ms), KEYS[3] the job's record (job streams; else KEYS[1]),
-- KEYS[4] the cell's epoch (a hash: the primary's replication id, and since when, in ms).
-- ARGV[1] 'job' or 'tenant'; ARGV[2] tenant; ARGV[3] the client's last id ('' when none); ARGV[4]
-- without a last id: 'replay' (from the start) or 'live' (from the tip); ARGV[5] page size;
-- ARGV[6] now_ms, ARGV[7] slot ttl_ms, ARGV[8] the tenant's cap (0: none), ARGV[9] slot id;
-- ARGV[10] the log's cap (Redis 6 has no entries-added: a log at its cap counts as trimmed);
-- ARGV[11..] the terminal statuses.
--
-- Reply {outcome, tip, entries}: outcome 'ok', 'missing' (no such job for this tenant), 'gone'
-- (events after the last id were trimmed), 'over' (the job ended and nothing follows the last id),
-- 'ahead' (the last id is past the log's newest event: not an id of this stream), 'full' (the
-- tenant's cap), 'lost' (the last id is not in the log, and the log may have lost it: it predates the
-- cell's epoch, see below). tip: the newest id ('' if the log is empty or was not needed).
-- entries: XRANGE's.
--
-- The epoch: Redis replicates asynchronously, so a primary that fails over (or restarts from an
-- append-only file synced once a second) may come back without the last events it wrote, events
-- that clients may have received. A new primary, or a restarted one, has a new replication id; the
-- first resume that sees it starts a new epoch, recorded with the time it started. A last id that is
-- not in the log (and not before all of it) and from before the epoch started (give or take
-- EPOCH_GRACE_MS: the old primary takes writes until every process has moved over) may have been
-- lost: the client is told to resync ('lost') instead of being resumed past a hole, or refused as if
-- it had made the id up ('ahead'). Such an id from later is not one this log ever had: 'ahead' as
-- before, or, within the log, resumed from where it falls (the other stream's id, as before).
local log, slots, record, epoch = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local EPOCH_GRACE_MS = 60000
local audience, tenant, after, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local page = tonumber(ARGV[5])

-- Event ids compare as two decimal numbers of up to 20 digits: too long for Lua's doubles, so by
-- length, then digits, with leading zeros dropped.
local function number_less(a, b)
  a, b = string.gsub(a, '^0+(%d)', '%1'), string.gsub(b, '^0+(%d)', '%1')
  if #a ~= #b then return #a < #b end
  return a < b
end
local function id_less(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)%-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)%-(%d+)$')
  if a_ms ~= b_ms and (number_less(a_ms, b_ms) or number_less(b_ms, a_ms)) then
    return number_less(a_ms, b_ms)
  end
  return number_less(a_seq, b_seq)
end

-- When the cell's current epoch started (ms); a new one when the primary is not the one recorded.
local function epoch_start()
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
  local known = redis.call('HMGET', epoch, 'replid', 'since')
  if known[1] == replid and known[2] then return tonumber(known[2]) end
  local t = redis.call('TIME')
  local since = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', epoch, 'replid', replid, 'since', since)
  return since
end

local terminal = false
if audience == 'job' then
  local fields = redis.call('HMGET', record, 'tenant', 'status')
  if fields[1] ~= tenant or not fields[2] then return {'missing', '', {}} end
  for i = 11, #ARGV do
    if fields[2] == ARGV[i] then terminal = true end
  end
end

local tip, oldest = '', ''
local entries
if after ~= '' then
  if redis.call('EXISTS', log) == 1 then
    local raw = redis.call('XINFO', 'STREAM', log)
    local info = {}
    for i = 1, #raw, 2 do info[raw[i]] = raw[i + 1] end
    local trimmed
    if info['entries-added'] then
      trimmed = tonumber(info['entries-added']) > tonumber(info['length'])
    else
      trimmed = tonumber(info['length']) >= tonumber(ARGV[10])
    end
    local first, last = info['first-entry'], info['last-entry']
    if trimmed and first and id_less(after, first[1]) then return {'gone', '', {}} end
    if first then oldest = first[1] end
    if last then tip = last[1] end
  end
  -- Not an event of this log (and not before all of it): lost, if it may have been.
  if (oldest == '' or not id_less(after, oldest)) and #redis.call('XRANGE', log, after, after, 'COUNT', 1) == 0 then
    if tonumber(string.match(after, '^(%d+)')) < epoch_start() + EPOCH_GRACE_MS then return {'lost', tip, {}} end
  end
  entries = redis.call('XRANGE', log, '(' .. after, '+', 'COUNT', page)
  if terminal and #entries == 0 then return {'over', tip, {}} end
  if tip == '' or id_less(tip, after) then return {'ahead', tip, {}} end
elseif mode == 'replay' then
  entries = redis.call('XRANGE', log, '-', '+', 'COUNT', page)
else
  entries = {}
  local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if newest[1] then tip = newest[1][1] end
end

local cap = tonumber(ARGV[8])
if cap > 0 then
  local now, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
  if redis.call('ZCARD', slots) >= cap then return {'full', tip, {}} end
  redis.call('ZADD', slots, now + ttl, ARGV[9])
  redis.call('PEXPIRE', slots, ttl)
end
return {'ok', tip, entries}
