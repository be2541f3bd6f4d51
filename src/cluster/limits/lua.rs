//! The Lua of the shared limits. Every script reads the time from Redis (`TIME`), so the
//! nodes' clocks never matter to a limiter, and runs as one atomic step: a check and the grant
//! it allows cannot be split by another node's request.
//!
//! A limiter is two keys and a mode. `b` (token bucket): a hash `{level, ts}` in the first key,
//! refilled continuously at `per_minute` a minute, full when missing. `w` (sliding window): a
//! sorted set of grants by time (first key) and a hash (second key) of each grant's units, their
//! sum (`used`) and a sequence (`seq`).

use std::sync::LazyLock;

use redis::Script;

/// Functions every script shares.
const PRELUDE: &str = r"
local WINDOW = 60000000
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function str(x) return string.format('%.0f', x) end
local function ms(us) return str(math.max(math.ceil(us / 1000), 1)) end

local function bucket_level(key, cap, now)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level, ts = tonumber(v[1]), tonumber(v[2])
  if not level or not ts then return cap, now end
  if now > ts then
    level = math.min(cap, level + (now - ts) * cap / WINDOW)
    ts = now
  end
  return level, ts
end

local function bucket_save(key, cap, level, ts)
  redis.call('HSET', key, 'level', string.format('%.17g', level), 'ts', str(ts))
  redis.call('PEXPIRE', key, str(math.ceil((cap - level) * 60000 / cap) + 1000))
end

-- Expires grants that left the window; answers the units still in it.
local function window_used(z, h, now)
  while true do
    local old = redis.call('ZRANGEBYSCORE', z, '-inf', str(now - WINDOW), 'LIMIT', 0, 256)
    if #old == 0 then break end
    local amounts = redis.call('HMGET', h, unpack(old))
    local freed = 0
    for i = 1, #old do freed = freed + (tonumber(amounts[i]) or 0) end
    redis.call('HDEL', h, unpack(old))
    redis.call('ZREM', z, unpack(old))
    redis.call('HINCRBY', h, 'used', str(-freed))
  end
  return tonumber(redis.call('HGET', h, 'used')) or 0
end

-- How long until enough of the oldest grants leave the window for n more units.
local function window_wait(z, h, limit, n, used, now)
  local freed, start = 0, 0
  while true do
    local page = redis.call('ZRANGE', z, start, start + 255, 'WITHSCORES')
    if #page == 0 then return WINDOW end
    local members = {}
    for i = 1, #page, 2 do members[#members + 1] = page[i] end
    local amounts = redis.call('HMGET', h, unpack(members))
    for i = 1, #members do
      freed = freed + (tonumber(amounts[i]) or 0)
      if used - freed + n <= limit then
        return tonumber(page[2 * i]) + WINDOW - now
      end
    end
    start = start + 256
  end
end

local function window_add(z, h, n, now)
  local seq = redis.call('HINCRBY', h, 'seq', 1)
  local entry = str(now) .. ':' .. str(seq)
  redis.call('ZADD', z, str(now), entry)
  redis.call('HSET', h, entry, str(n))
  redis.call('HINCRBY', h, 'used', str(n))
  redis.call('PEXPIRE', z, 61000)
  redis.call('PEXPIRE', h, 61000)
  return entry
end

-- A limiter: {a, b (keys), mode, cap (per minute, 0 unlimited), n (units wanted)}.
-- How long until its n units fit (0: now).
local function lim_wait(l, now)
  if l.cap <= 0 or l.n <= 0 then return 0 end
  local n = math.min(l.n, l.cap)
  if l.mode == 'b' then
    l.level, l.ts = bucket_level(l.a, l.cap, now)
    if l.level >= n then return 0 end
    return (n - l.level) * WINDOW / l.cap
  end
  local used = window_used(l.a, l.b, now)
  if used + n <= l.cap then return 0 end
  return window_wait(l.a, l.b, l.cap, n, used, now)
end

-- Takes what lim_wait found room for: the units counted and the window entry ('' for none).
local function lim_take(l, now)
  if l.cap <= 0 or l.n <= 0 then return 0, '' end
  local n = math.min(l.n, l.cap)
  if l.mode == 'b' then
    bucket_save(l.a, l.cap, l.level - n, l.ts)
    return n, ''
  end
  return n, window_add(l.a, l.b, n, now)
end

-- Lowers a bucket to `lower` (nil: no change), then gives back `delta` units (negative: takes
-- more). A window gives back only to its own grant `entry`, and counts more use as a new grant.
local function lim_adjust(l, delta, entry, lower, now)
  if l.cap <= 0 then return end
  if l.mode == 'b' then
    if delta == 0 and not lower then return end
    local level, ts = bucket_level(l.a, l.cap, now)
    if lower then level = math.min(level, lower) end
    bucket_save(l.a, l.cap, math.min(l.cap, level + delta), ts)
  elseif delta > 0 then
    local held = tonumber(redis.call('HGET', l.b, entry))
    if not held then return end
    local back = math.min(held, delta)
    if back >= held then
      redis.call('HDEL', l.b, entry)
      redis.call('ZREM', l.a, entry)
    else
      redis.call('HINCRBY', l.b, entry, str(-back))
    end
    redis.call('HINCRBY', l.b, 'used', str(-back))
  elseif delta < 0 then
    window_used(l.a, l.b, now)
    window_add(l.a, l.b, -delta, now)
  end
end
";

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// Takes from every limiter or from none. KEYS: two per limiter; ARGV: per limiter mode,
/// per_minute, n. Answers `ok` then (units counted, entry) per limiter, or `wait`, the first
/// refusing limiter (1-based) and the longest wait in ms.
pub static TAKE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local lims = {}
for i = 1, #KEYS / 2 do
  lims[i] = {a = KEYS[2 * i - 1], b = KEYS[2 * i], mode = ARGV[3 * i - 2],
             cap = tonumber(ARGV[3 * i - 1]), n = tonumber(ARGV[3 * i])}
end
local first, longest = nil, 0
for i, l in ipairs(lims) do
  local wait = lim_wait(l, now)
  if wait > 0 then
    first = first or i
    longest = math.max(longest, wait)
  end
end
if first then return {'wait', str(first), ms(longest)} end
local out = {'ok'}
for _, l in ipairs(lims) do
  local n, entry = lim_take(l, now)
  out[#out + 1] = str(n)
  out[#out + 1] = entry
end
return out",
    )
});

/// Corrects limiters. KEYS: two per limiter; ARGV: per limiter mode, per_minute, delta, entry,
/// lower ('' for none).
pub static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
for i = 1, #KEYS / 2 do
  local l = {a = KEYS[2 * i - 1], b = KEYS[2 * i], mode = ARGV[5 * i - 4],
             cap = tonumber(ARGV[5 * i - 3])}
  lim_adjust(l, tonumber(ARGV[5 * i - 2]), ARGV[5 * i - 1], tonumber(ARGV[5 * i]), now)
end
return 'ok'",
    )
});

/// The bucket levels, without changing them. KEYS: one per bucket; ARGV: per bucket per_minute.
pub static PEEK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local out = {}
for i = 1, #KEYS do
  local level = bucket_level(KEYS[i], tonumber(ARGV[i]), now)
  out[i] = string.format('%.17g', level)
end
return out",
    )
});

/// Admits one request of a key: budgets, then requests and tokens per minute, all or nothing.
/// KEYS: rpm (2), tpm (2), day counter, month counter. ARGV: 1 mode, 2 rpm, 3 tpm, 4 prompt,
/// 5 wanted reply, 6 daily limit, 7 monthly limit, 8 spend limit (micro-units; '' for none),
/// 9 input and 10 output price (micro-units a token), 11 seeded ('1'), 12 day tokens, 13 month
/// tokens, 14 month spend (the seeds), 15 and 16 when the day and month counters expire (ms).
/// Answers `seed` (a counter is missing: call again with seeds), `quota` + `day` / `month` /
/// `spend`, `limited` + `requests` / `tokens` + wait in ms, or `ok`, reply tokens, spend,
/// tokens counted per minute and the window entry.
pub static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local day, month = KEYS[5], KEYS[6]
local daily, monthly, spendlim = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local prompt, wanted = tonumber(ARGV[4]), tonumber(ARGV[5])
local need_day = daily ~= nil
local need_month = monthly ~= nil or spendlim ~= nil
if (need_day and redis.call('EXISTS', day) == 0)
    or (need_month and redis.call('EXISTS', month) == 0) then
  if ARGV[11] ~= '1' then return {'seed'} end
  if need_day and redis.call('HSETNX', day, 'tokens', ARGV[12]) == 1 then
    redis.call('PEXPIREAT', day, ARGV[15])
  end
  if need_month and redis.call('HSETNX', month, 'tokens', ARGV[13]) == 1 then
    redis.call('HSET', month, 'spend', ARGV[14])
    redis.call('PEXPIREAT', month, ARGV[16])
  end
end
local day_tokens = 0
if need_day then day_tokens = tonumber(redis.call('HGET', day, 'tokens')) or 0 end
local mv = redis.call('HMGET', month, 'tokens', 'spend')
local month_tokens, month_spend = tonumber(mv[1]) or 0, tonumber(mv[2]) or 0
-- A budget that covers the prompt serves it; the reply is clamped to what is left.
if daily and day_tokens + prompt + 1 > daily then return {'quota', 'day'} end
if monthly and month_tokens + prompt + 1 > monthly then return {'quota', 'month'} end
local reply = wanted
if daily then reply = math.min(reply, math.max(daily - day_tokens - prompt, 0)) end
if monthly then reply = math.min(reply, math.max(monthly - month_tokens - prompt, 0)) end
local spend = math.floor(prompt * tonumber(ARGV[9]) + reply * tonumber(ARGV[10]) + 0.5)
if spendlim and month_spend + spend > spendlim then return {'quota', 'spend'} end
local tokens = prompt + reply
local rpm = {a = KEYS[1], b = KEYS[2], mode = ARGV[1], cap = tonumber(ARGV[2]), n = 1}
local tpm = {a = KEYS[3], b = KEYS[4], mode = ARGV[1], cap = tonumber(ARGV[3]), n = tokens}
local wait = lim_wait(rpm, now)
if wait > 0 then return {'limited', 'requests', ms(wait)} end
wait = lim_wait(tpm, now)
if wait > 0 then return {'limited', 'tokens', ms(wait)} end
lim_take(rpm, now)
local counted, entry = lim_take(tpm, now)
if need_day then redis.call('HINCRBY', day, 'tokens', str(tokens)) end
if need_month then
  redis.call('HINCRBY', month, 'tokens', str(tokens))
  redis.call('HINCRBY', month, 'spend', str(spend))
end
return {'ok', str(reply), str(spend), str(counted), entry}",
    )
});

/// Replaces a reservation by the real use. KEYS: tpm (2), the day and month it was counted in,
/// the current day and month. ARGV: 1 mode, 2 tpm, 3 tpm delta, 4 window entry, 5 reserved
/// tokens, 6 used tokens, 7 reserved spend, 8 real spend (micro-units). A period that is over
/// is left alone; the current one gets the real use. Counters that do not exist are not made.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r"
local now = now_us()
local function add(key, field, delta)
  if delta == 0 or redis.call('EXISTS', key) == 0 then return end
  if redis.call('HINCRBY', key, field, str(delta)) < 0 then
    redis.call('HSET', key, field, '0')
  end
end
local reserved, used = tonumber(ARGV[5]), tonumber(ARGV[6])
local held, spent = tonumber(ARGV[7]), tonumber(ARGV[8])
if KEYS[3] == KEYS[5] then add(KEYS[5], 'tokens', used - reserved)
else add(KEYS[5], 'tokens', used) end
if KEYS[4] == KEYS[6] then
  add(KEYS[6], 'tokens', used - reserved)
  add(KEYS[6], 'spend', spent - held)
else
  add(KEYS[6], 'tokens', used)
  add(KEYS[6], 'spend', spent)
end
local tpm = {a = KEYS[1], b = KEYS[2], mode = ARGV[1], cap = tonumber(ARGV[2])}
lim_adjust(tpm, tonumber(ARGV[3]), ARGV[4], nil, now)
return 'ok'",
    )
});
