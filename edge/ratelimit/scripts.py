"""The Lua scripts that keep the limits in Redis, and the key layout they work on.

Every limit per minute is a sliding-window log: a sorted set of charges, each member
``<charge id>|<amount>`` scored by the server's clock in ms, plus the running sum of the
amounts. A charge is admitted when the sum of the last 60 s plus the charge fits the limit,
so no 60-second window ever holds more than the limit, however many edges share the
Redis (a token bucket of the same capacity lets up to twice the limit through in a rolling
minute). Parallel requests are a sorted set of leases scored by their expiry.

Each script runs atomically in Redis and reads the time there (``TIME``), so edges with
skewed clocks agree. Every key of one API key carries the hash tag ``{<key id>}``: the
scripts stay valid on a Redis Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

# Shared by the scripts: the server's time, and the window helpers.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local window = tonumber(ARGV[2])

local function amount(member)
  return tonumber(string.match(member, '|(%d+)$'))
end

-- Drop the charges that left the window, from the log and from its sum; returns the sum.
local function trim(log, sum)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window)
  if #old == 0 then
    return tonumber(redis.call('GET', sum) or '0')
  end
  local freed = 0
  for _, m in ipairs(old) do freed = freed + amount(m) end
  redis.call('ZREMRANGEBYSCORE', log, '-inf', now - window)
  return redis.call('DECRBY', sum, freed)
end

local function keep(log, sum)
  redis.call('PEXPIRE', log, window + 1000)
  redis.call('PEXPIRE', sum, window + 1000)
end
"""

_ADMIT = """
-- KEYS: requests log, requests sum, tokens log, tokens sum, images log, images sum, leases
-- ARGV: charge id, window ms, lease ttl ms, rpm, tpm, image budget, max parallel,
--       token cost, image cost (a limit of 0 is no limit)
-- Returns: denied (0 none, 1 requests, 2 tokens, 3 images, 4 parallel), retry after ms,
--          requests used, requests reset ms, tokens used, tokens reset ms.
local ttl = tonumber(ARGV[3])
local max_parallel = tonumber(ARGV[7])
local windows = {
  {KEYS[1], KEYS[2], tonumber(ARGV[4]), 1},
  {KEYS[3], KEYS[4], tonumber(ARGV[5]), tonumber(ARGV[8])},
  {KEYS[5], KEYS[6], tonumber(ARGV[6]), tonumber(ARGV[9])},
}

-- Milliseconds until enough of the oldest charges leave for `cost` more to fit.
local function wait(log, used, cost, limit)
  local need = used + cost - limit
  local entries = redis.call('ZRANGE', log, 0, 255, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + amount(entries[i])
    if freed >= need then return tonumber(entries[i + 1]) + window - now end
  end
  if #entries > 0 then return tonumber(entries[#entries]) + window - now end
  return window
end

-- Milliseconds until the oldest charge leaves the window (when the remainder next grows).
local function reset(w)
  if w[3] == 0 then return 0 end
  local oldest = redis.call('ZRANGE', w[1], 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return tonumber(oldest[2]) + window - now
end

local used = {0, 0, 0}
local denied, retry = 0, 0
for i, w in ipairs(windows) do
  if w[3] > 0 then
    used[i] = trim(w[1], w[2])
    if denied == 0 and w[4] > 0 and used[i] + w[4] > w[3] then
      denied, retry = i, wait(w[1], used[i], w[4], w[3])
    end
  end
end
if denied == 0 and max_parallel > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
  if redis.call('ZCARD', KEYS[7]) >= max_parallel then denied = 4 end
end
if denied == 0 then
  for i, w in ipairs(windows) do
    if w[3] > 0 and w[4] > 0 then
      redis.call('ZADD', w[1], now, id .. '|' .. w[4])
      used[i] = redis.call('INCRBY', w[2], w[4])
      keep(w[1], w[2])
    end
  end
  if max_parallel > 0 then
    redis.call('ZADD', KEYS[7], now + ttl, id)
    redis.call('PEXPIRE', KEYS[7], ttl + 1000)
  end
end
return {denied, retry, used[1], reset(windows[1]), used[2], reset(windows[2])}
"""

_SETTLE = """
-- KEYS: tokens log, tokens sum, leases
-- ARGV: charge id, window ms, tokens charged at admission, tokens used (-1: leave them),
--       release the lease (1/0)
local charged = tonumber(ARGV[3])
local used = tonumber(ARGV[4])
if used >= 0 then
  trim(KEYS[1], KEYS[2])
  local member = id .. '|' .. charged
  local at = redis.call('ZSCORE', KEYS[1], member)
  local delta = used - charged
  if at then
    -- Replace the estimate with the real usage, keeping its place in the window.
    redis.call('ZREM', KEYS[1], member)
    if used > 0 then redis.call('ZADD', KEYS[1], at, id .. '|' .. used) end
  elseif delta > 0 then
    -- The estimate already left the window (a long job): charge the excess now.
    redis.call('ZADD', KEYS[1], now, id .. '+|' .. delta)
  else
    delta = 0
  end
  if delta ~= 0 then
    redis.call('INCRBY', KEYS[2], delta)
    keep(KEYS[1], KEYS[2])
  end
end
if ARGV[5] == '1' then redis.call('ZREM', KEYS[3], id) end
return {}
"""

_RENEW = """
-- KEYS: leases; ARGV: unused, unused, lease ttl ms, lease ids...
local ttl = tonumber(ARGV[3])
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return {}
"""


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA-1, the name Redis caches it under (EVALSHA)."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


ADMIT = Script("admit", _PRELUDE + _ADMIT)
SETTLE = Script("settle", _PRELUDE + _SETTLE)
RENEW = Script("renew", _PRELUDE + _RENEW)
SCRIPTS = (ADMIT, SETTLE, RENEW)

# Index of a denied limit in ADMIT's answer.
DENIED = {1: "requests", 2: "tokens", 3: "images", 4: "parallel_requests"}


def keys_of(key_id: str) -> dict[str, str]:
    """The Redis keys of one API key, under its hash tag."""
    base = f"hr:rl:{{{key_id}}}"
    return {
        "req": f"{base}:req",
        "req_sum": f"{base}:req:sum",
        "tok": f"{base}:tok",
        "tok_sum": f"{base}:tok:sum",
        "img": f"{base}:img",
        "img_sum": f"{base}:img:sum",
        "par": f"{base}:par",
    }
