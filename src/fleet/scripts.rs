//! The Lua scripts: each fleet decision is one script, so Redis runs it atomically (no other
//! replica's command can land between its reads and its writes).

use std::sync::LazyLock;

use redis::Script;

/// The token a stored entry carries: Redis's `run_id` (`ARGV[1]` of the caller's choosing: a
/// restarted or failed-over Redis, whose data may have rolled back, has another), then each
/// version of `KEYS[from..]` joined with `,`, `-` for one that does not exist. Lookups create
/// nothing (a miss on any path, even one the upstream will answer 404, costs Redis no memory);
/// a store starts the missing versions (see [`STORE`]).
const TOKEN: &str = r"
local function token(run_id, from)
  local out = {run_id}
  for i = from, #KEYS do
    out[#out + 1] = redis.call('GET', KEYS[i]) or '-'
  end
  return table.concat(out, ',')
end
";

/// `KEYS[1]`: an entry; `KEYS[2..]`: the version keys of its path; `ARGV[1]`: Redis's run id as
/// the replica knows it. Returns `{token}` or `{token, data}`: the versions' current token, and
/// the entry's data if it was stored under that same token. An entry stored under another token
/// (a write invalidated its path since, or a version was evicted) is deleted, not returned.
pub static LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{TOKEN}{}",
        r"
local t = token(ARGV[1], 2)
local e = redis.call('HMGET', KEYS[1], 'v', 'd')
if e[1] and e[1] == t then
  return {t, e[2]}
end
if e[1] then redis.call('DEL', KEYS[1]) end
return {t}
"
    ))
});

/// `KEYS` as [`LOOKUP`]; `ARGV[1]`: the token the fill read before it asked the upstream,
/// `ARGV[2]`: the data, `ARGV[3]`: its lifetime in milliseconds, `ARGV[4]`: how long a version
/// is kept, `ARGV[5]`: Redis's run id. Stores only if no covering scope was invalidated since
/// the fill began (the token is unchanged): a fill racing a write on any replica never stores
/// what the write changed. Versions that do not exist yet start at Redis's clock in
/// microseconds, so a version never returns to a value it had (eviction and expiry cannot make
/// an old entry current), and the entry is stored under the token they make. Returns 1 when
/// stored, 0 when not.
pub static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{TOKEN}{}",
        r"
if token(ARGV[5], 2) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = string.format('%d%06d', t[1], t[2])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], now, 'NX', 'PX', ARGV[4])
end
redis.call('HSET', KEYS[1], 'v', token(ARGV[5], 2), 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"
    ))
});

/// `KEYS`: the version keys a write invalidates; `ARGV[1]`: the channel, `ARGV[2]`: the
/// message, `ARGV[3]`: how long a version is kept (ms; longer than any entry lives). Moves
/// every version (a missing one starts at Redis's clock, like [`LOOKUP`]'s), then publishes
/// the message, in one step: once a replica sees the message, Redis already refuses every
/// fill that read the old versions.
pub static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = string.format('%d%06d', t[1], t[2])
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCR', KEYS[i])
  else
    redis.call('SET', KEYS[i], now)
  end
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return redis.call('PUBLISH', ARGV[1], ARGV[2])
",
    )
});

/// GCRA on Redis's own clock (replicas' clocks do not matter). `KEYS[1]`: the budget's
/// theoretical arrival time in µs; `ARGV[1]`: the emission interval in µs (`period / count`),
/// `ARGV[2]`: the burst (`count`). Returns `{1, 0}` when admitted, `{0, µs to wait}` when not:
/// the same decisions as governor's GCRA for one process.
pub static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, math.ceil(new_tat - tolerance - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, 0}
",
    )
});

/// `KEYS[1]`: the replicas' sorted set; `ARGV[1]`: this instance; `ARGV[2]`: how long a
/// heartbeat counts (ms); `ARGV[3]`: the invalidation channel; `ARGV[4]`: this replica's
/// heartbeat message. Records this replica's heartbeat, forgets the silent ones, publishes the
/// heartbeat on the invalidation channel (so the replica hears itself: a subscription that
/// stays silent is dead, even if its socket never says so), and returns how many are alive.
pub static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return redis.call('ZCARD', KEYS[1])
",
    )
});
