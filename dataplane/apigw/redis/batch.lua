-- ARGV[1..n]: per check, its kind ('L' limit or 'R' revoked?) then its parameters; KEYS in check order.
-- A limit check ('L', interval, capacity in microseconds) returns 3 numbers: allowed 1|0, microseconds
-- until its bucket is full, microseconds until a request may pass. A revocation check ('R') returns 1|0.
-- A check whose own command fails (its key holds another type, Redis refuses a write for memory) returns
-- that error in its first place instead, and 0 in the others: it fails alone, not every check of the call.
-- An error that says this node cannot serve (a replica since a failover) still fails the whole call, for
-- the connection to be left (`apigw.redis.link.NOT_SERVING`).
local NOT_SERVING = {READONLY = true, LOADING = true, MASTERDOWN = true}
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local out = {}
local a = 1
for k = 1, #KEYS do
  local key = KEYS[k]
  local failed
  if ARGV[a] == 'L' then
    local interval = tonumber(ARGV[a + 1])
    local capacity = tonumber(ARGV[a + 2])
    a = a + 3
    local got = redis.pcall('GET', key)
    if type(got) == 'table' then
      failed = got
    else
      local tat = tonumber(got) or now
      if tat < now then tat = now end
      -- a bucket spent under a stricter policy of the same name (a reload loosened it): the new one bounds
      -- it, and the bound is stored, or the bucket would never refill under the new policy
      local clamped = tat > now + capacity
      if clamped then tat = now + capacity end
      local allow_at = tat + interval - capacity
      local allowed = now >= allow_at
      if allowed then tat = tat + interval end
      if allowed or clamped then
        -- string.format: Redis would turn a number into text with 14 significant digits, too few (and a
        -- PX of 1e17 into '1e+17', which it refuses); the PX is capped below what Redis takes (a period of
        -- ages), as an error here would fail the check
        local px = math.min(math.ceil((tat - now) / 1000), 1e15)
        local set = redis.pcall('SET', key, string.format('%.0f', tat), 'PX', string.format('%.0f', px))
        if set.err then failed = set end
      end
      if not failed then
        out[#out + 1] = allowed and 1 or 0; out[#out + 1] = tat - now
        out[#out + 1] = allowed and 0 or allow_at - now
      end
    end
    if failed then
      out[#out + 1] = failed; out[#out + 1] = 0; out[#out + 1] = 0
    end
  else
    a = a + 1
    local exists = redis.pcall('EXISTS', key)
    if type(exists) == 'table' then failed = exists end
    out[#out + 1] = exists
  end
  if failed and NOT_SERVING[string.match(failed.err, '^%S+')] then
    return failed
  end
end
return out
