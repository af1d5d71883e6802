"""Lua scripts for the steps that must be atomic: lease, requeue, renew, release, push, ack,
epoch.

All times come from the Redis server's clock (`TIME`), so workers on hosts with skewed
clocks agree on every deadline. Scripts run atomically on the server; a push that completes
its lease and the requeue of that same lease can therefore never both succeed.
"""

from __future__ import annotations

# KEYS/ARGV layouts are documented at the top of each script.

_PRELUDE = r"""
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- move expired leases back to the retry list; returns how many
local function requeue_expired(leases, deadlines, retry, stats, now, limit)
  local lids = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, limit)
  local n = 0
  for _, lid in ipairs(lids) do
    local raw = redis.call('HGET', leases, lid)
    if raw then
      local l = cjson.decode(raw)
      redis.call('RPUSH', retry, tostring(l.e) .. '|' .. l.p)
      redis.call('HDEL', leases, lid)
      n = n + 1
    end
    redis.call('ZREM', deadlines, lid)
  end
  if n > 0 then redis.call('HINCRBY', stats, 'lease_expiries', n) end
  return n
end
"""

# KEYS: leases, deadlines, retry, stats   ARGV: limit
REQUEUE = (
    _PRELUDE
    + r"""
return requeue_expired(KEYS[1], KEYS[2], KEYS[3], KEYS[4], now_s(), tonumber(ARGV[1]))
"""
)

# KEYS: order, cursor, retry, leases, deadlines, stats, rows, lease_seq
# ARGV: k, worker, lease_seconds, requeue_limit
# returns {{lease_id, prompt_id, deadline, epoch, row_json}, ...}, epoch, at_end (0/1)
LEASE = (
    _PRELUDE
    + r"""
local now = now_s()
requeue_expired(KEYS[4], KEYS[5], KEYS[3], KEYS[6], now, tonumber(ARGV[4]))
local k = tonumber(ARGV[1])
local deadline = now + tonumber(ARGV[3])
local out = {}
local function grant(pid, epoch)
  local lid = 'L' .. redis.call('INCR', KEYS[8])
  redis.call('HSET', KEYS[4], lid, cjson.encode({p = pid, w = ARGV[2], e = epoch}))
  redis.call('ZADD', KEYS[5], deadline, lid)
  out[#out + 1] = {lid, pid, string.format('%.6f', deadline), epoch,
                   redis.call('HGET', KEYS[7], pid)}
end
while #out < k do
  local item = redis.call('LPOP', KEYS[3])
  if not item then break end
  local sep = string.find(item, '|', 1, true)
  grant(string.sub(item, sep + 1), tonumber(string.sub(item, 1, sep - 1)))
end
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local pos = tonumber(redis.call('HGET', KEYS[2], 'pos') or '0')
local n = redis.call('LLEN', KEYS[1])
if #out < k and pos < n then
  local take = math.min(k - #out, n - pos)
  local ids = redis.call('LRANGE', KEYS[1], pos, pos + take - 1)
  redis.call('HINCRBY', KEYS[2], 'pos', take)
  for _, pid in ipairs(ids) do grant(pid, epoch) end
  pos = pos + take
end
local at_end = 0
if pos >= n then at_end = 1 end
return {out, epoch, at_end}
"""
)

# KEYS: order, cursor   ARGV: expected_epoch, id1, id2, ...
# Installs the next epoch's order iff the current one is `expected_epoch` and fully leased.
ADVANCE_EPOCH = r"""
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local pos = tonumber(redis.call('HGET', KEYS[2], 'pos') or '0')
if epoch ~= tonumber(ARGV[1]) or pos < redis.call('LLEN', KEYS[1]) then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 4000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 3999, #ARGV)))
end
redis.call('HSET', KEYS[2], 'epoch', epoch + 1, 'pos', 0)
return 1
"""

# KEYS: leases, deadlines   ARGV: lease_id, lease_seconds
# returns the new deadline as a string, or false if the lease is gone
RENEW = (
    _PRELUDE
    + r"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return false end
local deadline = now_s() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], deadline, ARGV[1])
return string.format('%.6f', deadline)
"""
)

# KEYS: leases, deadlines, retry, stats   ARGV: lease_id, done (0/1)
# done=0: the prompt goes to the front of the queue; done=1: it is finished without a group
# (counted as filtered). Returns 1, or 0 if the lease was gone.
RELEASE = r"""
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local l = cjson.decode(raw)
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[4], 'prompts_filtered', 1)
else
  redis.call('LPUSH', KEYS[3], tostring(l.e) .. '|' .. l.p)
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: leases, deadlines, stream, stats, then per push: done_key, payload_key
# ARGV: capacity, group, payload_ttl_s, then per push: lease_id ('' for none), prompt_id,
#       payload token, oldest_version
# Several pushes in one call (one per group of a put_groups batch), each decided as if it ran
# alone, in order: the capacity check counts the entries the earlier pushes of this call
# added. The records themselves were written to the payload keys by an MSET just before, in
# the same transaction (MULTI/EXEC: both run or neither does, so a producer that dies
# mid-send leaves nothing behind): passing ~30 KB through Lua costs the single-threaded
# server ~2 us per KB (an ad-hoc check, not a bench: EVALSHA handing a 27 KB record to XADD
# took 108 us of server CPU per group against 52 us for a plain pipelined XADD), a plain
# MSET does not. The stream entry carries the token; PERSIST keeps the payload until it is
# acked (a payload re-sent after NOPAYLOAD, or one that waited for room, has a TTL until
# then). A push refused for good deletes its payload; one that must wait for room (FULL)
# gives it a TTL of payload_ttl_s, so a producer that dies waiting leaves nothing behind.
# returns one reply per push, in order:
#   {'OK', id} | {'DONE', id} (this lease was already pushed: its entry id) | {'LATE'} |
#   {'MISMATCH', leased prompt id} | {'FULL'} | {'NOPAYLOAD'} (write it again)
PUSH = r"""
local leases, deadlines, stream, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local capacity, ttl = tonumber(ARGV[1]), ARGV[3]
local unconsumed = redis.call('XLEN', stream) - redis.call('XPENDING', stream, ARGV[2])[1]
local put, done = 0, 0

local function push(lid, pid, token, oldest, done_key, payload_key)
  local epoch = nil
  if lid ~= '' then
    local prev = redis.call('GET', done_key)
    if prev then
      redis.call('DEL', payload_key)
      local sep = string.find(prev, '|', 1, true)
      local done_pid = string.sub(prev, sep + 1)
      if done_pid ~= pid then return {'MISMATCH', done_pid} end
      return {'DONE', string.sub(prev, 1, sep - 1)}
    end
    local raw = redis.call('HGET', leases, lid)
    if not raw then
      redis.call('DEL', payload_key)
      redis.call('HINCRBY', stats, 'late_pushes', 1)
      return {'LATE'}
    end
    local l = cjson.decode(raw)
    if l.p ~= pid then
      redis.call('DEL', payload_key)
      return {'MISMATCH', l.p}
    end
    epoch = tostring(l.e)
  end
  if unconsumed >= capacity then  -- it waits for room: a TTL, in case its producer dies
    redis.call('EXPIRE', payload_key, ttl)
    return {'FULL'}
  end
  if redis.call('PERSIST', payload_key) == 0 and redis.call('EXISTS', payload_key) == 0 then
    return {'NOPAYLOAD'}
  end
  local id
  if epoch then  -- the epoch lets a consumer requeue the prompt if the group is too stale
    id = redis.call('XADD', stream, '*', 'r', token, 'v', oldest, 'p', pid, 'e', epoch)
  else
    id = redis.call('XADD', stream, '*', 'r', token, 'v', oldest, 'p', pid)
  end
  if lid ~= '' then
    redis.call('HDEL', leases, lid)
    redis.call('ZREM', deadlines, lid)
    redis.call('SET', done_key, id .. '|' .. pid, 'EX', 3600)
    done = done + 1
  end
  unconsumed = unconsumed + 1
  put = put + 1
  return {'OK', id}
end

local out = {}
for i = 1, (#ARGV - 3) / 4 do
  local a, k = 3 + (i - 1) * 4, 4 + (i - 1) * 2
  out[i] = push(ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], KEYS[k + 1], KEYS[k + 2])
end
if put > 0 then redis.call('HINCRBY', stats, 'groups_put', put) end
if done > 0 then redis.call('HINCRBY', stats, 'prompts_done', done) end
return out
"""

# KEYS: stream, stats   ARGV: group, payload key prefix, n, n entry ids, n payload tokens
# Acknowledge and delete entries together with their payloads; returns how many were pending.
# A token is '' when the caller does not know it (an entry taken by an earlier process): it
# is read from the entry. Known tokens spare an XRANGE per entry, and the rest is one XACK,
# one XDEL and one DEL per chunk of entries. (The payload keys are built here from the
# tokens; they share the namespace's hash tag, so this stays in one cluster slot.)
ACK = r"""
local n = tonumber(ARGV[3])
local ids, payloads = {}, {}
for i = 1, n do
  local id, token = ARGV[3 + i], ARGV[3 + n + i]
  ids[i] = id
  if token == '' then
    local entry = redis.call('XRANGE', KEYS[1], id, id)[1]
    if entry then
      local fields = entry[2]
      for j = 1, #fields, 2 do
        if fields[j] == 'r' then token = fields[j + 1] end
      end
    end
  end
  if token ~= '' then payloads[#payloads + 1] = ARGV[2] .. token end
end
local acked = 0
for i = 1, #ids, 1000 do  -- unpack() is bounded by Lua's C stack
  local chunk = {unpack(ids, i, math.min(i + 999, #ids))}
  acked = acked + redis.call('XACK', KEYS[1], ARGV[1], unpack(chunk))
  redis.call('XDEL', KEYS[1], unpack(chunk))
end
for i = 1, #payloads, 1000 do
  redis.call('DEL', unpack(payloads, i, math.min(i + 999, #payloads)))
end
if acked > 0 then redis.call('HINCRBY', KEYS[2], 'groups_acked', acked) end
return acked
"""
