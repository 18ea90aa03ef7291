"""The Lua scripts that make each shared update atomic in Redis (loaded at every (re)connection, called by
SHA). Keys other replicas own (their slot hashes) are reached by name: a plain Redis, not a cluster.

- ``COUNT``: write this replica's requests in flight on one backend, and when a limit is given, only if
  every live replica's count on it plus ours stays within it. Returns ``{admitted, {replica, count, ...}}``
  (the others' counts on that backend). Tells the others (an ``s`` event on this replica's stream). One per
  claim, one per release.
- ``HEARTBEAT``: rewrite this replica's whole slot hash (leased: it expires ``lease`` after the last
  write, so a replica killed takes its counts with it), stamp it seen (Redis's clock), keep its event
  stream for ``events_ttl`` more, forget replicas unseen for ``forget_ms``; returns Redis's time and every
  replica with its slot hash (empty when past its lease).
- ``FLEET_PUT``: store a backend's record unless a newer one is there (last writer wins, by time then
  replica), and tell the others (an ``f`` event).
"""

from __future__ import annotations

import hashlib

# KEYS: my slots, replicas, events. ARGV: me, backend, mine, limit (-1: none), lease_ms, slots prefix, maxlen.
COUNT = """
local me, backend = ARGV[1], ARGV[2]
local mine, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local others, total = {}, 0
for _, id in ipairs(redis.call('HKEYS', KEYS[2])) do
  if id ~= me then
    local n = tonumber(redis.call('HGET', ARGV[6] .. id, backend) or '0')
    if n > 0 then
      total = total + n
      others[#others + 1] = id
      others[#others + 1] = n
    end
  end
end
if limit >= 0 and total + mine > limit then
  return {0, others}
end
if mine > 0 then
  redis.call('HSET', KEYS[1], backend, mine)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
else
  redis.call('HDEL', KEYS[1], backend)
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'o', me, 't', 's', 'd', backend .. '\\n' .. mine)
return {1, others}
"""

# KEYS: replicas, my slots, my events. ARGV: me, info json, lease_ms, forget_ms, slots prefix, events ttl_ms,
# then backend, count pairs.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[2])
for i = 7, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
end
if #ARGV >= 7 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
redis.call('PEXPIRE', KEYS[3], ARGV[6])
redis.call('HSET', KEYS[1], ARGV[1], now .. '\\n' .. ARGV[2])
local out = {now}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local id, value = all[i], all[i + 1]
  local seen = tonumber(string.match(value, '^(%d+)')) or 0
  if now - seen > tonumber(ARGV[4]) then
    redis.call('HDEL', KEYS[1], id)
  else
    out[#out + 1] = id
    out[#out + 1] = value
    if id ~= ARGV[1] and now - seen <= tonumber(ARGV[3]) then
      out[#out + 1] = redis.call('HGETALL', ARGV[5] .. id)
    else
      out[#out + 1] = {}
    end
  end
end
return out
"""

# KEYS: fleet, events. ARGV: name, record json, at, by, me, maxlen.
FLEET_PUT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current then
  local ok, held = pcall(cjson.decode, current)
  if ok and type(held) == 'table' then
    local at, by = tonumber(held['at']) or 0, tostring(held['by'] or '')
    local new_at = tonumber(ARGV[3])
    if at > new_at or (at == new_at and by >= ARGV[4]) then
      return 0
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'o', ARGV[5], 't', 'f', 'd', ARGV[2])
return 1
"""

SCRIPTS = {"count": COUNT, "heartbeat": HEARTBEAT, "fleet_put": FLEET_PUT}
SHA = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}
