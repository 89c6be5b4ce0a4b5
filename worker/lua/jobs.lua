-- Jobcast's state machine. Every write to a job goes through one call of this script, so that the
-- record, the job's event log, the tenant's event log, the indexes, the arq queue and the PUBLISH
-- doorbell change together or not at all (DESIGN.md, invariants 1 and 2).
--
-- Loaded as a Redis Function library and called as FCALL fn n key... op now_iso now_ms arg... (on
-- Redis 6, as EVALSHA with the same keys and arguments); key prefixes come from the prelude that
-- worker/schema.py prepends (the #!lua shebang, then K_*, TAG and CFG_* locals), so no key name is
-- spelled here. Every key is one cell's (its prefix carries the cell's hash tag): KEYS[1] is the
-- cell's arq queue (it routes the call), then the keys of the job(s) the caller names (its record
-- and its log); the other keys, which depend on what the script reads, are built from the prefixes,
-- and Redis holds them to the declared slot (worker/schema.py).
--
-- A job's "run" is a fencing number: each time the job is put on the arq queue it gets a new run,
-- and the arq job id is "<job id>.<run>". A worker may only move a job it holds the current run of,
-- so a worker that lost its lease (killed, hung, partitioned) can never overwrite its successor.
--
-- Cost: a transition reads the record once (load: one HMGET of everything it needs) and writes it
-- once (one HSET, the history entry included: each entry is a field of its own, "h<version>", so
-- nothing is rewritten), and counts itself with one HINCRBY (see "Metrics" below). BENCHMARKS.md §2
-- has the commands per job.
--
-- Webhook deliveries live here too (ops 'attempted' and 'replay' at the end): an event the job's
-- webhook asks for records its delivery and queues the first attempt inside the same call that
-- emits the event. Attempts are fenced the same way: attempt <seq> of delivery <wid> is the arq job
-- "<wid>.<seq>", and only the current seq may record an outcome.

-- Set by each call (run, at the end), read by every helper. Numbers go to Redis as strings where
-- they already are (now_ms_s: ARGV[3] as given; the prelude's S_* constants): Redis formats every
-- Lua number it is handed, and that showed in the profile.
local op, now_iso, now_ms, now_ms_s

local PRIORITY_BOOST = {high = 3e12, normal = 2e12, low = 1e12}
-- The progress of a job that has not reported any (queued, or a new attempt just started).
local NO_PROGRESS = '{"percent":0.0,"eta":null}'
-- ... and of one completed without reporting any.
local DONE_PROGRESS = '{"percent":100.0,"eta":null}'

-- The last job key built (a transition names its job's key several times; a string built is a
-- string to hash, allocate and collect).
local last_id, last_key = '', K_JOB
local function job_key(id)
  if id ~= last_id then last_id, last_key = id, K_JOB .. id end
  return last_key
end

-- The same for a job's log, and for the last tenant's logs, channel and status indexes.
local last_log_id, last_log = '', K_JOB_LOG
local function log_key(id)
  if id ~= last_log_id then last_log_id, last_log = id, K_JOB_LOG .. id end
  return last_log
end
local last_tenant, tenant_log, tenant_channel, status_index = '', K_TENANT_LOG, K_TENANT_CHANNEL, {}
local function tenant_keys(tenant)
  if tenant ~= last_tenant then
    last_tenant, status_index = tenant, {}
    tenant_log, tenant_channel = K_TENANT_LOG .. tenant, K_TENANT_CHANNEL .. tenant
  end
end
local function status_key(tenant, status)
  tenant_keys(tenant)
  local key = status_index[status]
  if not key then
    key = K_INDEX .. tenant .. ':status:' .. status
    status_index[status] = key
  end
  return key
end

local function fields(id, ...)
  return redis.call('HMGET', job_key(id), ...)
end

-- What a transition needs of the record, read in one HMGET and handed around as a table (absent
-- fields are false). Ops that need one more field name it (`more`).
local RECORD = {'status', 'run', 'tenant', 'type', 'priority', 'attempt', 'max_attempts', 'version', 'progress',
  'webhook', 'webhook_gone', 'cancel', 'error', 'ready_ms', 'started_ms'}
-- RECORD and one more field, per field: built once per load of the library, not per call.
local RECORD_AND = {}

-- (Loops here and below are numeric: each step of an ipairs loop is a call of a C function.)
local function load(id, more)
  local names = RECORD
  if more then
    names = RECORD_AND[more]
    if not names then
      names = {unpack(RECORD)}
      names[#names + 1] = more
      RECORD_AND[more] = names
    end
  end
  local v = redis.call('HMGET', job_key(id), unpack(names))
  -- (A constructor sizes the table once; filled field by field, it would grow five times.)
  local r = {status = v[1], run = v[2], tenant = v[3], type = v[4], priority = v[5], attempt = v[6],
    max_attempts = v[7], version = v[8], progress = v[9], webhook = v[10], webhook_gone = v[11], cancel = v[12],
    error = v[13], ready_ms = v[14], started_ms = v[15]}  -- RECORD's order
  if more then r[more] = v[16] end
  return r
end

-- arq's ids: run `run` of job `id`, attempt `seq` of delivery `wid`. They carry the cell's tag, so
-- that arq's keys for them (arq:job:<id>, arq:in-progress:<id>, ...) are in the cell's slot too.
local function run_id(id, run) return TAG .. id .. '.' .. run end
local function attempt_id(wid, seq) return TAG .. wid .. '.' .. seq end

-- The job id and run (a string) of arq run id `rid`.
local function run_of(rid)
  local dot = string.find(rid, '.', 1, true)
  return string.sub(rid, #TAG + 1, dot - 1), string.sub(rid, dot + 1)
end

-- Metrics (K_STATS, read by GET /metrics through worker/jobstats.py, which derives the series): each
-- event counts once, with one HINCRBY of "t|<from>|<event>|<type>|<priority>" (<from>: the status
-- left, '-' for a new job; <event>: the event's name without "job.") -- or of "progress" for a
-- progress event. A transition a histogram observes (pickup: queued -> processing; duration:
-- processing -> terminal) adds "|b<i>", its bucket, and adds its milliseconds to
-- "<histogram>|<type>|ms" (an integer HINCRBY: HINCRBYFLOAT parses and formats long doubles, and a
-- Lua number handed to Redis is formatted with printf; jobstats.py turns them back into seconds).
-- The buckets' upper bounds, in ms (the seconds of server/metrics.py's, times 1000).
local PICKUP_BUCKETS = {5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000}
local DURATION_BUCKETS = {100, 500, 1000, 5000, 10000, 30000, 60000, 300000, 900000, 1800000, 3600000}
local BUCKET_SUFFIX = {'|b1', '|b2', '|b3', '|b4', '|b5', '|b6', '|b7', '|b8', '|b9', '|b10', '|b11', '|b12'}
-- Events' names without "job.", filled in as they come (a library cannot iterate EVENT as it loads).
local EVENT_SHORT = {}

-- The sums' fields of the last type seen.
local sum_type, sum_field = '', {}

local function count_event(r, from, event)
  local short = EVENT_SHORT[event]
  if not short then
    short = string.sub(event, 5)
    EVENT_SHORT[event] = short
  end
  local histogram, buckets, since
  if from == 'queued' and r.status == 'processing' then
    histogram, buckets, since = 'pickup', PICKUP_BUCKETS, r.ready_ms
  elseif from == 'processing' and TERMINAL[r.status] then
    histogram, buckets, since = 'duration', DURATION_BUCKETS, r.started_ms
  end
  local suffix = ''
  if since then
    local ms = now_ms - since  -- (a string: Lua converts it)
    if ms < 0 then ms = 0 end
    local i = #buckets + 1
    for b = 1, #buckets do
      if ms <= buckets[b] then i = b; break end
    end
    suffix = BUCKET_SUFFIX[i]
    if r.type ~= sum_type then sum_type, sum_field = r.type, {} end
    local key = sum_field[histogram]
    if not key then
      key = histogram .. '|' .. r.type .. '|ms'
      sum_field[histogram] = key
    end
    redis.call('HINCRBY', K_STATS, key, string.format('%d', ms))
  end
  redis.call('HINCRBY', K_STATS, 't|' .. (from or '-') .. '|' .. short .. '|' .. r.type .. '|' .. r.priority .. suffix, '1')
end

-- Versions as strings, and their history fields, kept once formatted (string.format is a C call,
-- dearer than a table read); the first thousand, which are most versions jobs reach.
local VERSION, HISTORY_FIELD = {}, {}
local function version_after(version)
  local n = (version or 0) + 1
  local s, h = VERSION[n], HISTORY_FIELD[n]
  if not s then
    s = string.format('%d', n)
    h = 'h' .. s
    if n <= 1000 then VERSION[n], HISTORY_FIELD[n] = s, h end
  end
  return s, h
end

local function history_entry(status, attempt)
  return '{"status":"' .. status .. '","at":"' .. now_iso .. '","attempt":' .. attempt .. '}'
end

-- Put arq job `rid` (function `fn`, arguments `args` as a JSON array's inside) on arq queue `queue`
-- with score `score`: arq's own job format, as arq's enqueue_job writes it.
local function arq_put(queue, rid, fn, args, score)
  local payload = '{"t":1,"f":"' .. fn .. '","a":[' .. args .. '],"k":{},"et":' .. now_ms_s .. '}'
  redis.call('SET', K_ARQ_JOB .. rid, payload)
  redis.call('ZADD', queue, score, rid)
end

local function delivery_key(wid) return K_DELIVERY .. wid end

-- Queue attempt `seq` of delivery `wid`, due at `due_ms` (arq takes only scores <= now).
local function delivery_enqueue(wid, seq, due_ms)
  arq_put(K_WEBHOOK_QUEUE, attempt_id(wid, seq), CFG_DELIVER_FUNCTION, '"' .. wid .. '",' .. seq, due_ms)
  redis.call('PUBLISH', K_WEBHOOK_DOORBELL_CHANNEL, wid)
end

-- Destinations (scheme://host:port, see worker/destinations.py): a rate, kept as GCRA reservations
-- (K_DESTINATION: 'tat', the theoretical arrival time, in ms), a pause set by a receiver's
-- Retry-After, in-flight slots, and per tenant, health. With several cells (CFG_SHARED_RATES) a
-- destination's reservations are kept by one cell only, its home (worker/destinations.py,
-- RateHomes): a first attempt is not reserved when its event is written but when it comes up, in
-- 'admit', here when this cell is the home, else by op 'reserve' on the home, ahead of 'admit'.
local function destination_of(url)
  local scheme, rest = string.match(url, '^(%a[%w+.-]*)://(.*)$')
  scheme = string.lower(scheme)
  local authority = string.lower((string.gsub(string.match(rest, '^([^/?#]*)'), '^.*@', '')))
  if not string.match(authority, ':%d+$') then
    authority = authority .. ':' .. ((scheme == 'https') and '443' or '80')
  end
  return scheme .. '://' .. authority
end

local function health_key(tenant, dest) return K_DESTINATION_HEALTH .. tenant .. ':' .. dest end

-- Reserve the next moment at or after `t` when one more delivery to `dest` may leave: never
-- refused, only later. Reservations are handed out in call order, so they keep that order.
local function reserve(dest, t)
  local key = K_DESTINATION .. dest
  local s = redis.call('HMGET', key, 'tat', 'paused_until')
  local paused = tonumber(s[2] or 0)
  if paused > t then t = paused end
  local rate = CFG_WEBHOOK_RATES[dest] or CFG_WEBHOOK_RATE
  local tat = math.max(tonumber(s[1] or 0), t)
  local due = math.floor(math.max(t, tat - rate[2]))
  redis.call('HSET', key, 'tat', string.format('%.3f', tat + rate[1]))
  redis.call('PEXPIRE', key, math.floor(tat + rate[1] - now_ms) + 86400000)
  return due
end

local function waited(reason, due_ms)
  redis.call('HINCRBY', K_WEBHOOK_WAITS, 'count|' .. reason, 1)
  redis.call('HINCRBYFLOAT', K_WEBHOOK_WAITS, 'seconds|' .. reason, (due_ms - now_ms) / 1000)
end

-- When job `id`'s webhook (JSON `webhook`) asks for `event`, record a delivery of it and queue its
-- first attempt at the moment its destination's rate reserves for it. Its webhook-id derives from
-- the event's position in the job's log: unique, stable.
local function webhook_enqueue(id, tenant, status, event, job_sid, webhook, progress)
  local wanted = false
  local spec = cjson.decode(webhook)
  for _, name in ipairs(spec.events) do
    if name == event then wanted = true end
  end
  if not wanted then return end
  local wid = 'msg_' .. string.sub(id, 5) .. '_' .. job_sid
  local dest = destination_of(spec.url)
  local due, reason = now_ms, ''
  -- A disabled destination's deliveries are dead-lettered when they come up: at once, not in turn.
  -- With several cells the turn is reserved when the attempt comes up ('admit'; reserved 0).
  local reserved = 0
  if not CFG_SHARED_RATES and redis.call('HGET', health_key(tenant, dest), 'state') ~= 'disabled' then
    due, reserved = reserve(dest, now_ms), 1
  end
  if due > now_ms then reason = 'rate_limit'; waited(reason, due) end
  redis.call('HSET', delivery_key(wid), 'id', wid, 'tenant', tenant, 'job_id', id, 'event', event,
    'job_status', status, 'url', spec.url, 'timestamp', now_iso, 'created_at', now_iso, 'updated_at', now_iso,
    'state', 'pending', 'seq', 1, 'tries', 0, 'attempts', 0, 'next_attempt_at', now_iso,
    'destination', dest, 'due_ms', due, 'reserved', reserved, 'wait_reason', reason)
  if event == 'job.progress' then redis.call('HSET', delivery_key(wid), 'progress', progress) end
  redis.call('ZADD', K_TENANT_DESTINATIONS .. tenant, now_ms, dest)
  redis.call('RPUSH', K_JOB_DELIVERIES .. id, wid)
  delivery_enqueue(wid, 1, due)
end

-- A job type as a JSON string: quoted as it is when it needs no escaping (the names job types may
-- have, worker/types.py), which is cheaper than cjson.
-- The last type's is remembered.
local last_type, last_type_json = '', '""'
local function type_json(jtype)
  if jtype ~= last_type then
    last_type = jtype
    if string.find(jtype, '^[%w._-]+$') then
      last_type_json = '"' .. jtype .. '"'
    else
      last_type_json = cjson.encode(jtype)
    end
  end
  return last_type_json
end

-- Append the event to both logs, ring the doorbell and queue the webhook delivery, if any; the
-- payload comes from `r`, the record as the transition left it. `extra` is a pre-encoded
-- ',"key":value' tail.
local function emit(id, r, event, extra)
  local data = '{"job_id":"' .. id .. '","type":' .. type_json(r.type) .. ',"status":"' .. r.status
    .. '","attempt":' .. r.attempt .. ',"progress":' .. r.progress .. ',"at":"' .. now_iso .. '"' .. (extra or '') .. '}'
  local job_sid = redis.call('XADD', log_key(id), 'MAXLEN', '~', S_JOB_LOG_MAX, '*',
    'event', event, 'data', data)
  tenant_keys(r.tenant)
  local tenant_sid = redis.call('XADD', tenant_log, 'MAXLEN', '~', S_TENANT_LOG_MAX, '*',
    'event', event, 'job', id, 'data', data)
  redis.call('PUBLISH', tenant_channel,
    job_sid .. '\n' .. tenant_sid .. '\n' .. r.tenant .. '\n' .. id .. '\n' .. event .. '\n' .. data)
  if r.webhook and r.webhook ~= '' and not r.webhook_gone then
    webhook_enqueue(id, r.tenant, r.status, event, job_sid, r.webhook, r.progress)
  end
  return job_sid
end

-- Move job `id` (`r`, as load read it, updated here) to `status` and announce `event`: one HSET of
-- the status, a new version, the history entry and the fields in `set` (field, value, ...); the
-- status index; the count of queued jobs; the metrics; the event.
local function transition(id, r, status, event, extra, set)
  local from = r.status
  local version, history_field = version_after(r.version)
  r.status, r.version = status, version
  -- The indexes first, the record after them: a call that fails part-way (an error reply from
  -- Redis ends a script where it stands, writes made so far stay) on a key it did not declare
  -- leaves the record as it was, so the run can be tried again (test_faults).
  if from then redis.call('ZREM', status_key(r.tenant, from), id) end
  redis.call('ZADD', status_key(r.tenant, status), '0', id)
  redis.call('HSET', job_key(id), 'status', status, 'updated_at', now_iso, 'version', version,
    history_field, history_entry(status, r.attempt), unpack(set))
  if from == 'queued' then redis.call('INCRBY', K_QUEUED_COUNT, '-1') end
  if status == 'queued' then redis.call('INCRBY', K_QUEUED_COUNT, '1') end
  count_event(r, from, event)
  return emit(id, r, event, extra)
end

-- Put run `run` of job `id` on arq's queue, ahead of lower priorities (arq takes the lowest scores
-- that are <= now first, so a boost in the past orders by priority, then by time). The caller sets
-- the record's ready_ms (pickup latency runs from there) in its own write.
local function arq_enqueue(id, run, priority)
  local rid = run_id(id, run)
  arq_put(K_ARQ_QUEUE, rid, CFG_ARQ_FUNCTION, '"' .. id .. '",' .. run,
    now_ms - (PRIORITY_BOOST[priority] or PRIORITY_BOOST.normal))
  redis.call('PUBLISH', K_DOORBELL_CHANNEL, rid)
end

-- A queued run released from a wait (its retry's backoff, its tenant's waiting line).
local function arq_release(id, run, priority)
  arq_enqueue(id, run, priority)
  redis.call('HSET', job_key(id), 'ready_ms', now_ms)
end

-- Remove every trace of run `run` from arq (queue entry, job payload, locks), from our schedule
-- and from its tenant's waiting line. A run that was processing left the queue when it started and
-- never waited: only arq's keys remain.
local function arq_forget(id, run, tenant, status)
  local rid = run_id(id, run)
  if status ~= 'processing' then
    redis.call('ZREM', K_ARQ_QUEUE, rid)
    redis.call('ZREM', K_SCHEDULED, rid)
    redis.call('ZREM', K_TENANT_WAITING .. tenant, rid)
  end
  redis.call('DEL', K_ARQ_JOB .. rid, K_ARQ_IN_PROGRESS .. rid, K_ARQ_RETRY .. rid)
end

-- Per-tenant concurrency (CFG_TENANT_CONCURRENCY > 0): a job whose tenant already runs that many
-- is parked in the tenant's waiting line (with a new run number) instead of starting, so it does
-- not hold a worker; each job of the tenant that stops processing lets parked ones back onto the
-- arq queue, best priority first. Other tenants' jobs never wait behind a parked one. Without a
-- limit, starts are not recorded in the tenant's running set (jobs started then do not count
-- against a limit set later, until they end).
local function promote_waiting(tenant)
  local limit = tonumber(CFG_TENANT_CONCURRENCY)
  local free = 1000
  if limit > 0 then free = limit - redis.call('SCARD', K_TENANT_RUNNING .. tenant) end
  while free > 0 do
    local popped = redis.call('ZPOPMIN', K_TENANT_WAITING .. tenant)
    if #popped == 0 then
      redis.call('SREM', K_WAITING_TENANTS, tenant)
      return
    end
    local id, run = run_of(popped[1])
    local r = fields(id, 'status', 'run', 'priority')
    if r[1] == 'queued' and r[2] == run then
      arq_release(id, tonumber(run), r[3])
      free = free - 1
    end
  end
end

local function release(tenant, id)
  if redis.call('SREM', K_TENANT_RUNNING .. tenant, id) == 1
      and redis.call('EXISTS', K_TENANT_WAITING .. tenant) == 1 then
    promote_waiting(tenant)
  end
end

local function error_extra(error_json)
  if error_json ~= '' then return ',"error":' .. error_json end
  return ''
end

-- Move a queued or processing job to a terminal status: `extra` goes into the event, `set` into the
-- record, and `drop` (a field name) out of it. A job that is no longer running has no time left:
-- its progress keeps the percent and step it reached (100 once completed), and its eta becomes null.
local function finish(id, r, status, extra, set, drop)
  local from = r.status
  arq_forget(id, r.run, r.tenant, from)
  local progress = r.progress or NO_PROGRESS
  if progress == NO_PROGRESS then  -- (the usual case, without pattern matching)
    if status == 'completed' then progress = DONE_PROGRESS end
  else
    progress = string.gsub(progress, '"eta":"[^"]*"', '"eta":null', 1)
    if status == 'completed' then progress = string.gsub(progress, '"percent":[^,}]*', '"percent":100.0', 1) end
  end
  r.progress = progress
  set = set or {}
  set[#set + 1] = 'progress'; set[#set + 1] = progress
  set[#set + 1] = 'finished_at'; set[#set + 1] = now_iso
  if drop and not r[drop] then drop = nil end
  if r.cancel and drop then
    redis.call('HDEL', job_key(id), 'cancel', drop)
  elseif r.cancel or drop then
    redis.call('HDEL', job_key(id), drop or 'cancel')
  end
  local sid = transition(id, r, status, EVENT[status], extra, set)
  if from == 'processing' then
    redis.call('ZREM', K_RUNNING, id)
    release(r.tenant, id)
  end
  redis.call('ZADD', K_FINISHED, now_ms_s, id)  -- the archiver takes it from here after ARCHIVE_AFTER
  redis.call('EXPIRE', job_key(id), S_RETENTION_S)
  redis.call('EXPIRE', log_key(id), S_RETENTION_S)
  if r.webhook and r.webhook ~= '' then redis.call('EXPIRE', K_JOB_DELIVERIES .. id, S_RETENTION_S) end
  return sid
end

-- Back to queued for another run (attempt `attempt`), from processing. delay_ms > 0 schedules it;
-- 0 puts it on the arq queue now. `set`: more fields for the record.
local function requeue(id, r, attempt, delay_ms, event, extra, set)
  local run = tonumber(r.run) + 1
  arq_forget(id, tonumber(r.run), r.tenant, 'processing')
  redis.call('ZREM', K_RUNNING, id)
  release(r.tenant, id)
  if delay_ms > 0 then
    redis.call('ZADD', K_SCHEDULED, now_ms + delay_ms, run_id(id, run))
  else
    arq_enqueue(id, run, r.priority)
    set[#set + 1] = 'ready_ms'; set[#set + 1] = now_ms
  end
  r.run, r.attempt, r.progress = run, attempt, NO_PROGRESS
  local n = #set
  set[n + 1], set[n + 2], set[n + 3], set[n + 4] = 'run', run, 'attempt', attempt
  set[n + 5], set[n + 6], set[n + 7], set[n + 8] = 'percent', '0', 'progress', NO_PROGRESS
  transition(id, r, 'queued', event, extra, set)
end


-- Delivery `wid` (attempt `seq`) waits until `due_ms` for `reason`: its next attempt, seq + 1, is
-- queued then. `keep_reservation`: the rate was already paid for, the next attempt need not pay again.
local function defer(wid, seq, due_ms, reason, keep_reservation)
  local key = delivery_key(wid)
  local next_seq = tonumber(seq) + 1
  redis.call('HSET', key, 'seq', next_seq, 'due_ms', due_ms, 'wait_reason', reason, 'updated_at', now_iso)
  if keep_reservation then redis.call('HSET', key, 'reserved', next_seq) end
  waited(reason, due_ms)
  delivery_enqueue(wid, next_seq, due_ms)
  return {'wait', tostring(due_ms), reason}
end

-- An attempt to `dest` ended: free its slot and let the first delivery waiting for one go now.
local function release_slot(dest, rid)
  local slots = K_DESTINATION_SLOTS .. dest
  redis.call('ZREM', slots, rid)
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
  if redis.call('ZCARD', slots) >= CFG_DESTINATION_CONCURRENCY then return end
  for _ = 1, 10 do
    local first = redis.call('ZPOPMIN', K_DESTINATION_WAITING .. dest)
    if not first[1] then return end
    local d = redis.call('HMGET', delivery_key(first[1]), 'state', 'seq')
    local queued = attempt_id(first[1], d[2] or '')
    if d[1] == 'pending' and redis.call('ZSCORE', K_WEBHOOK_QUEUE, queued) then
      redis.call('ZADD', K_WEBHOOK_QUEUE, 'XX', now_ms, queued)
      redis.call('HSET', delivery_key(first[1]), 'due_ms', now_ms)
      redis.call('PUBLISH', K_WEBHOOK_DOORBELL_CHANNEL, first[1])
      return
    end
  end
end

-- Health of `dest` for `tenant` after an attempt: a success ends a failure streak; a streak longer
-- than CFG_DISABLE_AFTER_MS disables the destination for the tenant. Returns 'disabled' then.
local function record_health(tenant, dest, ok, error_text)
  local key = health_key(tenant, dest)
  redis.call('ZADD', K_TENANT_DESTINATIONS .. tenant, now_ms, dest)
  redis.call('EXPIRE', key, CFG_RETENTION_S)
  if ok then
    redis.call('HSET', key, 'failures', 0, 'last_success_at', now_iso)
    redis.call('HDEL', key, 'failing_since', 'failing_since_ms')
    redis.call('HINCRBY', key, 'delivered', 1)
    return ''
  end
  redis.call('HINCRBY', key, 'failures', 1)
  redis.call('HINCRBY', key, 'failed', 1)
  redis.call('HSET', key, 'last_failure_at', now_iso, 'last_error', error_text)
  local h = redis.call('HMGET', key, 'failing_since_ms', 'state')
  local since = tonumber(h[1])
  if not since then
    since = now_ms
    redis.call('HSET', key, 'failing_since_ms', now_ms, 'failing_since', now_iso)
  end
  if CFG_DISABLE_AFTER_MS > 0 and now_ms - since >= CFG_DISABLE_AFTER_MS and h[2] ~= 'disabled' then
    redis.call('HSET', key, 'state', 'disabled', 'disabled_at', now_iso)
    redis.call('HSET', K_DISABLED_DESTINATIONS, tenant .. ' ' .. dest, now_ms)
    return 'disabled'
  end
  return ''
end

-- Delivery `wid` ends as `outcome` ('dead' or 'gone') now.
local function delivery_finish(wid, tenant, outcome)
  local key = delivery_key(wid)
  redis.call('HSET', key, 'state', outcome, 'finished_at', now_iso)
  redis.call('HDEL', key, 'next_attempt_at', 'due_ms', 'wait_reason')
  -- Pending deliveries never expire (a retry may be a day away); finished ones are kept as long as jobs.
  redis.call('EXPIRE', key, CFG_RETENTION_S)
  redis.call('EXPIRE', key .. ':attempts', CFG_RETENTION_S)
  if outcome == 'dead' then
    redis.call('ZADD', K_DEAD_LETTERS .. tenant, now_ms, wid)
    redis.call('SADD', K_DEAD_LETTER_TENANTS, tenant)
  end
end


-- Start run `run` of job `id` (queued -> processing), leased until `deadline` (ms, a string): the
-- record as it now is, or nil and why not ('parked': its tenant is at its limit, the run was put in
-- the tenant's waiting line with a new run number; else the job's status, or 'missing').
local function start(id, run, deadline)
  local r = load(id, 'params')
  if r.status ~= 'queued' or r.run ~= run then return nil, r.status or 'missing' end
  local limit = tonumber(CFG_TENANT_CONCURRENCY)
  if limit > 0 then
    if redis.call('SCARD', K_TENANT_RUNNING .. r.tenant) >= limit then
      local parked = tonumber(run) + 1
      arq_forget(id, tonumber(run), r.tenant, 'queued')
      redis.call('HSET', job_key(id), 'run', parked)
      redis.call('ZADD', K_TENANT_WAITING .. r.tenant,
        now_ms - (PRIORITY_BOOST[r.priority] or PRIORITY_BOOST.normal), run_id(id, parked))
      redis.call('SADD', K_WAITING_TENANTS, r.tenant)
      return nil, 'parked'
    end
    redis.call('SADD', K_TENANT_RUNNING .. r.tenant, id)
  end
  r.progress = NO_PROGRESS
  transition(id, r, 'processing', EVENT.processing, '',
    {'started_at', now_iso, 'started_ms', now_ms_s, 'percent', '0', 'progress', NO_PROGRESS})
  redis.call('ZADD', K_RUNNING, deadline, id)
  -- Taken off arq's queue now (arq would keep it there until the run ends): the queue then holds
  -- only runs nobody took yet, so a worker's read of its head never wades through running ones.
  -- Last, once everything else is written: a start that fails part-way (an error reply from Redis
  -- ends a script where it stands) leaves the run on the queue, where a worker's next claim finds
  -- it again.
  redis.call('ZREM', K_ARQ_QUEUE, run_id(id, run))
  return r
end


----------------------------------------------------------------------------------------------------
-- One call: everything above is defined once per load (a Redis Function library, see
-- worker/schema.py), the op runs here.

-- The ops are split in two functions, jobs and deliveries, because Lua allows one function at most
-- 60 upvalues (the helpers above): run dispatches.
local run_delivery

local function run_job(KEYS, ARGV)
if op == 'create' then
  -- id tenant type priority max_attempts params webhook idem_key idem_value idem_ttl
  local id, tenant, jtype, priority = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local idem_key, idem_value = ARGV[11], ARGV[12]
  if idem_key ~= '' then
    local seen = redis.call('GET', idem_key)
    if seen then
      local sep = string.find(seen, '|', 1, true)
      local seen_id, seen_hash = string.sub(seen, 1, sep - 1), string.sub(seen, sep + 1)
      if seen_hash == idem_value and redis.call('EXISTS', job_key(seen_id)) == 1 then
        return {'existing', seen_id}
      elseif seen_hash == idem_value and ARGV[14] ~= '1' then
        -- Not in Redis: archived, or expired. The caller asks the archive, and calls again with
        -- ARGV[14] = '1' (create anew) only when the archive does not have it either.
        return {'vanished', seen_id}
      elseif seen_hash ~= idem_value then
        return {'conflict', seen_id}
      end
    end
  end
  local queued = tonumber(redis.call('GET', K_QUEUED_COUNT) or 0)
  if queued >= tonumber(CFG_MAX_QUEUED) then
    return {'full', tostring(queued)}
  end
  -- Each tenant's share of the queue (0: none), so that one tenant cannot fill it for all.
  local share = tonumber(CFG_MAX_QUEUED_PER_TENANT)
  if share > 0 and redis.call('ZCARD', K_INDEX .. tenant .. ':status:queued') >= share then
    return {'tenant_full', tostring(share)}
  end
  redis.call('ZADD', K_INDEX .. tenant, '0', id)
  redis.call('ZADD', K_INDEX .. tenant .. ':type:' .. jtype, '0', id)
  if idem_key ~= '' then
    redis.call('SET', idem_key, id .. '|' .. idem_value, 'EX', ARGV[13])
  end
  arq_enqueue(id, 1, priority)
  local r = {tenant = tenant, type = jtype, priority = priority, attempt = '1', progress = NO_PROGRESS,
    webhook = ARGV[10]}
  transition(id, r, 'queued', EVENT.queued, '', {'id', id, 'tenant', tenant, 'type', jtype, 'priority', priority,
    'attempt', '1', 'max_attempts', ARGV[8], 'run', '1', 'params', ARGV[9], 'webhook', ARGV[10],
    'progress', NO_PROGRESS, 'percent', '0', 'created_at', now_iso, 'ready_ms', now_ms_s})
  return {'created', id}

elseif op == 'start' then
  -- id run lease_deadline_ms -> {'ok', type, params, attempt, max_attempts} or {'skip', status}
  local r, status = start(ARGV[4], ARGV[5], ARGV[6])
  if not r then return {'skip', status} end
  return {'ok', r.type, r.params, r.attempt, r.max_attempts}

elseif op == 'claim' then
  -- lease_deadline_ms limit rid... -> {rid, type, params, attempt, max_attempts, ...}: the runs
  -- started, at most `limit`, in the order given (the queue's head, best first). KEYS: the queue,
  -- then each rid's job's record and log.
  -- A worker's claim of the runs it read from the queue *is* their start: there is no arq lock
  -- and no arq run_job for a job run (docs/design/redis-layout.md, "Claim is start"). The record is
  -- the lock: only a run that is its job's current one, queued, starts, so two workers (or an old
  -- worker that runs it through arq, during a rolling upgrade) never both start it. The due time is
  -- not checked again (the worker read only due entries; see the design note). A run that is not
  -- its job's current queued one is stale: its queue entry and payload go (arq's finish_job did that).
  local deadline, limit = ARGV[4], tonumber(ARGV[5])
  local out, started = {}, 0
  for i = 6, #ARGV do
    if started >= limit then break end
    local rid = ARGV[i]
    local id, run = run_of(rid)
    local r, status = start(id, run, deadline)
    if r then
      started = started + 1
      out[#out + 1] = rid
      out[#out + 1] = r.type
      out[#out + 1] = r.params
      out[#out + 1] = r.attempt
      out[#out + 1] = r.max_attempts
    elseif status ~= 'parked' then
      redis.call('ZREM', K_ARQ_QUEUE, rid)
      redis.call('DEL', K_ARQ_JOB .. rid)
    end
  end
  return out

elseif op == 'progress' then
  -- id run percent progress_json -> 1 written, 0 ignored (stale run, not processing, or going down)
  local id, run = ARGV[4], ARGV[5]
  -- (Not load: only what this op and emit read. Progress events outnumber transitions.)
  local v = redis.call('HMGET', job_key(id), 'status', 'run', 'percent', 'version', 'tenant', 'type', 'attempt',
    'webhook', 'webhook_gone')
  local r = {status = v[1], run = v[2], percent = v[3], version = v[4], tenant = v[5], type = v[6], attempt = v[7],
    webhook = v[8], webhook_gone = v[9]}
  if r.status ~= 'processing' or r.run ~= run then return 0 end
  if tonumber(ARGV[6]) < tonumber(r.percent) then return 0 end
  r.progress = ARGV[7]
  redis.call('HSET', job_key(id), 'percent', ARGV[6], 'progress', ARGV[7], 'updated_at', now_iso,
    'version', string.format('%d', r.version + 1))
  redis.call('HINCRBY', K_STATS, 'progress', '1')
  emit(id, r, EVENT.progress, '')
  return 1

elseif op == 'heartbeat' then
  -- lease_deadline_ms (id run)... -> for each: 'ok' | 'cancel' | 'lost'
  local deadline = ARGV[4]
  local out = {}
  for i = 5, #ARGV, 2 do
    local id, run = ARGV[i], ARGV[i + 1]
    local r = fields(id, 'status', 'run', 'cancel')
    if r[1] ~= 'processing' or r[2] ~= run then
      out[#out + 1] = 'lost'
    else
      redis.call('ZADD', K_RUNNING, 'XX', deadline, id)
      out[#out + 1] = r[3] and 'cancel' or 'ok'
    end
  end
  return out

elseif op == 'complete' or op == 'fail' or op == 'cancelled' or op == 'retry' or op == 'handback' then
  -- id run payload(result json | error json | '') delay_ms
  -- -> {'ok', status} or {'stale', current status}
  local id, run = ARGV[4], ARGV[5]
  local r = load(id)
  if r.status ~= 'processing' or r.run ~= run then return {'stale', r.status or 'missing'} end
  local attempt = tonumber(r.attempt)
  if op == 'cancelled' or ((op == 'retry' or op == 'handback') and r.cancel) then
    -- (A cancellation accepted (202) while this attempt ran wins over another attempt.)
    finish(id, r, 'cancelled', '')
    return {'ok', 'cancelled'}
  elseif op == 'complete' then
    local result = ARGV[6]
    local extra = ',"result_url":"/jobs/' .. id .. '/result"'
    if result ~= '' and #result <= CFG_INLINE_MAX then extra = ',"result":' .. result end
    -- (An earlier attempt's error no longer applies.)
    finish(id, r, 'completed', extra, {'result', result, 'percent', '100'}, 'error')
    return {'ok', 'completed'}
  elseif op == 'fail' then
    finish(id, r, 'failed', error_extra(ARGV[6]), {'error', ARGV[6]})
    return {'ok', 'failed'}
  elseif op == 'retry' then
    local delay = tonumber(ARGV[7])
    requeue(id, r, attempt + 1, delay, EVENT.retrying,
      ',"error":' .. ARGV[6] .. ',"retry_in_s":' .. string.format('%.3f', delay / 1000), {'error', ARGV[6]})
    return {'ok', 'queued'}
  else
    -- handback: the worker is shutting down; the attempt was not the job's fault.
    requeue(id, r, attempt, 0, EVENT.queued, '', {})
    return {'ok', 'queued'}
  end

elseif op == 'cancel' then
  -- id tenant -> {'cancelled'} | {'requested'} | {'terminal', status} | {'missing'}
  local id = ARGV[4]
  local r = load(id)
  if not r.tenant or r.tenant ~= ARGV[5] then return {'missing'} end
  if r.status == 'queued' then
    finish(id, r, 'cancelled', '')
    return {'cancelled'}
  elseif r.status == 'processing' then
    -- The resource shows cancel_requested: a new version (ETag, long-polls wake).
    redis.call('HSET', job_key(id), 'cancel', '1', 'updated_at', now_iso, 'version', tonumber(r.version) + 1)
    redis.call('PUBLISH', K_CONTROL_CHANNEL, 'cancel ' .. id)
    return {'requested'}
  end
  return {'terminal', r.status}

elseif op == 'reap' then
  -- id error_json_if_failed -> 'alive' | 'gone' | 'cancelled' | 'queued' | 'failed'
  -- A processing job whose lease lapsed lost its worker: retry it if attempts remain, else fail it.
  local id = ARGV[4]
  local deadline = redis.call('ZSCORE', K_RUNNING, id)
  if deadline and tonumber(deadline) > now_ms then return 'alive' end
  local r = load(id)
  if r.status ~= 'processing' then
    redis.call('ZREM', K_RUNNING, id)
    return 'gone'
  end
  local attempt = tonumber(r.attempt)
  if r.cancel then
    finish(id, r, 'cancelled', '')
    return 'cancelled'
  end
  if attempt < tonumber(r.max_attempts) then
    requeue(id, r, attempt + 1, 0, EVENT.retrying, ',"error":' .. ARGV[5] .. ',"retry_in_s":0.000',
      {'error', ARGV[5]})
    return 'queued'
  end
  finish(id, r, 'failed', ',"error":' .. ARGV[5], {'error', ARGV[5]})
  return 'failed'

elseif op == 'promote' then
  -- limit -> {moved count, next due ms or -1}: move due retries onto the arq queue.
  local due = redis.call('ZRANGEBYSCORE', K_SCHEDULED, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[4]))
  local moved = 0
  for _, rid in ipairs(due) do
    redis.call('ZREM', K_SCHEDULED, rid)
    local id, run = run_of(rid)
    local r = fields(id, 'status', 'run', 'priority')
    if r[1] == 'queued' and r[2] == run then
      arq_release(id, tonumber(run), r[3])
      moved = moved + 1
    end
  end
  -- Parked jobs whose tenant has room again (e.g. after the limit was raised).
  for _, tenant in ipairs(redis.call('SMEMBERS', K_WAITING_TENANTS)) do
    promote_waiting(tenant)
  end
  local next_due = redis.call('ZRANGE', K_SCHEDULED, 0, 0, 'WITHSCORES')
  return {moved, next_due[2] or '-1'}

elseif op == 'evict' then
  -- (id version last_sid deliveries)... -> for each: 'evicted' | 'changed' | 'missing'
  -- The second half of the move to the archive (worker/archiver.py): the archiver copied the job
  -- as it read it (version, last event id, number of deliveries); delete it from Redis only if it
  -- is still exactly that, finished, with no delivery that may still change.
  local out = {}
  for i = 4, #ARGV, 4 do
    local id, version, last_sid, ndeliveries = ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])
    local r = fields(id, 'status', 'version', 'tenant', 'type')
    local verdict = 'evicted'
    if not r[1] then
      verdict = 'missing'
    elseif not TERMINAL[r[1]] or r[2] ~= version then
      verdict = 'changed'
    else
      local tip = redis.call('XREVRANGE', K_JOB_LOG .. id, '+', '-', 'COUNT', 1)
      local wids = redis.call('LRANGE', K_JOB_DELIVERIES .. id, 0, -1)
      if (tip[1] and tip[1][1] or '') ~= last_sid or #wids ~= ndeliveries then verdict = 'changed' end
      for _, wid in ipairs(wids) do
        local state = redis.call('HGET', delivery_key(wid), 'state')
        if state == 'pending' or state == 'dead' then verdict = 'changed' end
      end
      if verdict == 'evicted' then
        for _, wid in ipairs(wids) do
          redis.call('DEL', delivery_key(wid), delivery_key(wid) .. ':attempts')
        end
        redis.call('DEL', job_key(id), K_JOB_LOG .. id, K_JOB_DELIVERIES .. id)
        redis.call('ZREM', K_INDEX .. r[3], id)
        redis.call('ZREM', K_INDEX .. r[3] .. ':status:' .. r[1], id)
        redis.call('ZREM', K_INDEX .. r[3] .. ':type:' .. r[4], id)
      end
    end
    if verdict ~= 'changed' then redis.call('ZREM', K_FINISHED, id) end
    out[#out + 1] = verdict
  end
  return out
end
return run_delivery(KEYS, ARGV)
end

----------------------------------------------------------------------------------------------------
-- Webhook deliveries. States: pending -> delivered | gone (410) | dead (dead-letter list);
-- dead -> pending again on a replay (fresh schedule, same webhook-id).

run_delivery = function(KEYS, ARGV)
if op == 'attempted' then
  -- wid seq outcome attempt_json last_error delay_ms next_attempt_iso pause_ms
  --   -> {'ok', state, health} | {'stale', state}
  -- outcome: 'delivered' | 'retry' (queue attempt seq+1 in delay_ms) | 'dead' | 'gone'.
  -- An empty attempt_json records the outcome without an attempt (a delivery skipped as gone, or
  -- one dead-lettered because arq gives up on its attempt); last_error may still say why.
  -- pause_ms > 0: the receiver asked (Retry-After) that nothing more be sent to it for that long.
  -- health is 'disabled' when this attempt disabled the destination for the tenant.
  local wid, seq, outcome, attempt = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local key = delivery_key(wid)
  local d = redis.call('HMGET', key, 'state', 'seq', 'tenant', 'job_id', 'destination')
  if d[1] ~= 'pending' or d[2] ~= seq then return {'stale', d[1] or 'missing'} end
  local health = ''
  if d[5] then
    release_slot(d[5], attempt_id(wid, seq))
    local pause_ms = tonumber(ARGV[11] or 0)
    if pause_ms > 0 then
      local dkey = K_DESTINATION .. d[5]
      local paused = math.max(tonumber(redis.call('HGET', dkey, 'paused_until') or 0), now_ms + pause_ms)
      redis.call('HSET', dkey, 'paused_until', paused)
      redis.call('PEXPIRE', dkey, paused - now_ms + 86400000)
    end
    if attempt ~= '' then
      health = record_health(d[3], d[5], outcome == 'delivered' or outcome == 'gone', ARGV[8])
    end
  end
  if attempt ~= '' then
    redis.call('RPUSH', key .. ':attempts', attempt)
    redis.call('LTRIM', key .. ':attempts', -CFG_ATTEMPTS_KEPT, -1)
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HINCRBY', key, 'tries', 1)
  end
  if ARGV[8] ~= '' then redis.call('HSET', key, 'last_error', ARGV[8]) end
  redis.call('HINCRBY', K_WEBHOOK_STATS, outcome, 1)
  redis.call('HSET', key, 'updated_at', now_iso)
  if outcome == 'retry' then
    local next_seq = tonumber(seq) + 1
    local due = now_ms + tonumber(ARGV[9])
    redis.call('HSET', key, 'seq', next_seq, 'next_attempt_at', ARGV[10], 'due_ms', due, 'wait_reason', '')
    delivery_enqueue(wid, next_seq, due)
    return {'ok', 'pending', health}
  end
  delivery_finish(wid, d[3], outcome)
  if outcome == 'gone' and redis.call('EXISTS', job_key(d[4])) == 1 then
    -- The receiver said 410 Gone: no later event of this job is sent to it.
    redis.call('HSET', job_key(d[4]), 'webhook_gone', '1')
  end
  return {'ok', outcome, health}

elseif op == 'admit' then
  -- wid seq slot_ms [turn_ms turn_reason] -> {'send'} | {'wait', due_ms, reason} | {'disabled', error}
  --   | {'stale', state}
  -- May attempt `seq` of delivery `wid` go now? Not to a destination disabled for the tenant (the
  -- delivery is dead-lettered at once), nor while it is paused, over its rate or out of slots (the
  -- attempt is deferred, never dropped). 'send' holds one of the destination's slots for slot_ms.
  -- An attempt not reserved yet takes its turn here, unless the destination's home cell reserved it
  -- (turn_ms, turn_reason 'rate_limit'), or could not be asked: it then waits until turn_ms with
  -- turn_reason 'rate_home_unreachable' and asks again (nothing was reserved for it).
  local wid, seq, slot_ms = ARGV[4], ARGV[5], tonumber(ARGV[6])
  local key = delivery_key(wid)
  local d = redis.call('HMGET', key, 'state', 'seq', 'tenant', 'destination', 'reserved', 'due_ms')
  if d[1] ~= 'pending' or d[2] ~= seq then return {'stale', d[1] or 'missing'} end
  local tenant, dest = d[3], d[4]
  if not dest then return {'send'} end  -- queued by a version without destinations
  local h = redis.call('HMGET', health_key(tenant, dest), 'state', 'failing_since')
  if h[1] == 'disabled' then
    local err = 'not sent: destination ' .. dest .. ' is disabled for this tenant (nothing but failures since '
      .. (h[2] or '?') .. '); re-enable it with POST /webhooks/destinations/{destination}/enable, then replay'
    redis.call('HSET', key, 'last_error', err, 'dead_reason', 'disabled', 'updated_at', now_iso)
    redis.call('HINCRBY', K_WEBHOOK_STATS, 'disabled', 1)
    redis.call('ZADD', K_TENANT_DESTINATIONS .. tenant, now_ms, dest)
    redis.call('EXPIRE', health_key(tenant, dest), CFG_RETENTION_S)
    delivery_finish(wid, tenant, 'dead')
    return {'disabled', err}
  end
  local paused = tonumber(redis.call('HGET', K_DESTINATION .. dest, 'paused_until') or 0)
  if paused > now_ms then return defer(wid, seq, paused, 'retry_after', false) end
  if d[5] ~= seq then  -- a retry or a replay (with several cells, any attempt): it takes its turn now
    local due, reason = tonumber(ARGV[7]), ARGV[8]
    if not due then due, reason = reserve(dest, now_ms), 'rate_limit' end
    local reserved = reason == 'rate_limit'
    if due > now_ms or not reserved then return defer(wid, seq, math.max(due, now_ms), reason, reserved) end
  elseif tonumber(d[6] or 0) > now_ms then
    -- Its reserved turn has not come yet: the queue hands attempts out to the millisecond it rounds
    -- to, which may be before the turn; it waits out the rest, never leaving early.
    return defer(wid, seq, tonumber(d[6]), 'rate_limit', true)
  end
  local slots = K_DESTINATION_SLOTS .. dest
  redis.call('ZREMRANGEBYSCORE', slots, '-inf', now_ms)
  if redis.call('ZCARD', slots) >= CFG_DESTINATION_CONCURRENCY then
    -- Released by the next attempt to end (release_slot); at the latest when a slot would lapse.
    redis.call('ZADD', K_DESTINATION_WAITING .. dest, now_ms, wid)
    -- Nothing is lost if it lapses: every waiting delivery also has its fallback attempt queued.
    redis.call('PEXPIRE', K_DESTINATION_WAITING .. dest, 2 * slot_ms)
    return defer(wid, seq, now_ms + slot_ms, 'destination_busy', true)
  end
  redis.call('ZADD', slots, now_ms + slot_ms, attempt_id(wid, seq))
  redis.call('PEXPIRE', slots, slot_ms)
  -- The attempt stays on arq's queue until it ends (that is how a killed worker's attempt is taken
  -- up again), but no longer at its front: workers read the first due entries, as many as they have
  -- free slots, and hanging attempts there would hide everything behind them. It falls due again
  -- when its in-progress lock lapses (delivery.py: slot + 1 s).
  redis.call('ZADD', K_WEBHOOK_QUEUE, 'XX', now_ms + slot_ms + 1000, attempt_id(wid, seq))
  redis.call('HSET', key, 'wait_reason', '')
  return {'send'}

elseif op == 'lock_job' then
  -- wid seq ttl_ms token -> {'locked'} | {'busy', deferrals, due_ms} | {'stale', state}
  -- A job's deliveries are attempted one at a time, and those never attempted yet in the order of
  -- the job's events: attempt `seq` of `wid` takes the job's lock (`token`; it lapses after ttl_ms
  -- if its holder dies) unless another attempt holds it or, when `wid` was never attempted, the
  -- delivery of the job's previous event was not attempted yet either and its attempt is still
  -- queued (each waited for its own previous one, so one look back is enough). Busy: the put-off is
  -- counted ('deferrals.<seq>': a put-off run is not an interrupted one) and due_ms says when to
  -- try again (that previous delivery's due time, or when the held lock lapses).
  local wid, seq, ttl_ms, token = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  local key = delivery_key(wid)
  local d = redis.call('HMGET', key, 'state', 'seq', 'job_id', 'attempts')
  if d[1] ~= 'pending' or d[2] ~= seq then return {'stale', d[1] or 'missing'} end
  local due = 0
  local turn = true
  if d[4] == '0' then
    local list = K_JOB_DELIVERIES .. d[3]
    local at = redis.call('LPOS', list, wid, 'RANK', -1)
    if at and at > 0 then
      local pid = redis.call('LINDEX', list, at - 1)
      local p = redis.call('HMGET', delivery_key(pid), 'state', 'attempts', 'due_ms', 'seq')
      -- it goes first only while its attempt is still queued (arq may have given up on it)
      if p[1] == 'pending' and p[2] == '0' and p[4] and redis.call('ZSCORE', K_WEBHOOK_QUEUE, attempt_id(pid, p[4])) then
        turn = false; due = tonumber(p[3] or 0)
      end
    end
  end
  if turn then
    if redis.call('SET', K_WEBHOOK_LOCK .. d[3], token, 'NX', 'PX', ttl_ms) then return {'locked'} end
    local left = redis.call('PTTL', K_WEBHOOK_LOCK .. d[3])
    if left > 0 then due = now_ms + left end  -- wait out the attempt in flight
  end
  return {'busy', redis.call('HINCRBY', key, 'deferrals.' .. seq, 1), due}

elseif op == 'reserve' then
  -- destination -> due_ms: the next turn of a destination whose home is this cell, for an attempt
  -- of another cell (its 'admit' then takes that turn as turn_ms).
  return reserve(ARGV[4], now_ms)

elseif op == 'unlock_job' then
  -- job_id token -> 1 | 0: free the job's delivery lock if `token` still holds it.
  local lock = K_WEBHOOK_LOCK .. ARGV[4]
  if redis.call('GET', lock) == ARGV[5] then return redis.call('DEL', lock) end
  return 0

elseif op == 'enable' then
  -- tenant destination -> 'ok' | 'missing'
  local tenant, dest = ARGV[4], ARGV[5]
  local key = health_key(tenant, dest)
  if redis.call('EXISTS', key) == 0 then return 'missing' end
  redis.call('HSET', key, 'state', 'enabled', 'failures', 0)
  redis.call('HDEL', key, 'failing_since', 'failing_since_ms', 'disabled_at')
  redis.call('HDEL', K_DISABLED_DESTINATIONS, tenant .. ' ' .. dest)
  return 'ok'

elseif op == 'replay' then
  -- wid tenant -> 'ok' | 'missing' (not a dead letter of this tenant)
  local wid, tenant = ARGV[4], ARGV[5]
  local dead = K_DEAD_LETTERS .. tenant
  if not redis.call('ZSCORE', dead, wid) then return 'missing' end
  redis.call('ZREM', dead, wid)
  local key = delivery_key(wid)
  local d = redis.call('HMGET', key, 'state', 'seq', 'tenant')
  if d[1] ~= 'dead' or d[3] ~= tenant then return 'missing' end  -- its record expired: drop the entry
  local seq = tonumber(d[2]) + 1
  redis.call('HSET', key, 'state', 'pending', 'seq', seq, 'tries', 0, 'updated_at', now_iso, 'next_attempt_at', now_iso,
    'due_ms', now_ms)
  redis.call('HDEL', key, 'dead_reason')
  redis.call('HINCRBY', key, 'replays', 1)
  redis.call('HDEL', key, 'finished_at')
  redis.call('PERSIST', key)
  redis.call('PERSIST', key .. ':attempts')
  delivery_enqueue(wid, seq, now_ms)
  return 'ok'
end

return redis.error_reply('jobs.lua: unknown op ' .. tostring(op))
end

local function run(KEYS, ARGV)
  op, now_iso, now_ms, now_ms_s = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[3]
  return run_job(KEYS, ARGV)
end
