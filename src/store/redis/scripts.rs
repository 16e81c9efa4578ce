//! The Lua scripts: every decision about a record is one atomic script
//! inside Redis, judged by Redis's own clock (`TIME`) and by key expiry,
//! never by a replica's clock.
//!
//! Keys of one record (one hash tag, so one Cluster slot):
//!
//! | key | what |
//! |---|---|
//! | `K` | the record hash (see the module docs of `redis`) |
//! | `K:rec` | a completed record's response |
//! | `K:w` | set of claim tokens waiting for the current owner (other replicas) |
//! | `K:end` | hash: `=<owner>` → ending, `<waiter>` → owner, `!<token>` → cancelled claim |

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation};

use super::ending::Ending;
use crate::store::record::{Completed, Finish, Token};

/// The claim rule of `record::claim`, atomically, with leases.
///
/// KEYS: 1 record, 2 response, 3 waiters, 4 endings. ARGV: 1 token,
/// 2 fingerprint, 3 now (replica clock; shown as started_at), 4 expires_at
/// (shown only), 5 retry delay (ms), 6 in-flight ttl (ms), 7 lost_retry
/// ("1"/"0"), 8 lease (ms), 9 channel.
///
/// Returns `{0}` acquired (also when the record already holds the caller's
/// own token: its reply was lost and the call repeated), `{1, started_at}`
/// in flight (the caller is registered as a waiter; also when the owner it
/// waited for has ended and left it an ending: it must read that, never
/// take the key), `{2, record}`
/// completed, `{3, fp, started, ms_left, retry_in}` lost, `{4}` mismatch,
/// `{5, fp, stored, tombstone_until}` expired, `{6}` this token's claim was
/// cancelled (a late repeat of a claim whose caller gave up).
const CLAIM_LUA: &str = r"
local key, tok = KEYS[1], ARGV[1]
local t = redis.call('TIME')
local srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function take()
  if redis.call('HEXISTS', KEYS[4], '!' .. tok) == 1 then return {6} end
  redis.call('DEL', key, KEYS[2], KEYS[3])
  redis.call('HSET', key, 's', 'f', 't', tok, 'fp', ARGV[2], 'b', ARGV[3], 'e', ARGV[4],
    'r', string.format('%.0f', srv + tonumber(ARGV[5])), 'l', string.format('%.0f', srv + tonumber(ARGV[8])))
  redis.call('PEXPIRE', key, ARGV[6])
  return {0}
end
local h = redis.call('HMGET', key, 's', 't', 'fp', 'b', 'r', 'l', 'x')
local s = h[1]
if s == 'f' and h[2] == tok then return {0} end
if redis.call('HEXISTS', KEYS[4], tok) == 1 then return {1, '0'} end
if not s then return take() end
if ARGV[2] ~= '' and h[3] ~= '' and ARGV[2] ~= h[3] then return {4} end
if s == 'c' then
  local rec = redis.call('GET', KEYS[2])
  if rec then return {2, rec} end
  return {5, h[3], h[4], h[7] or '0'}
end
if s == 'f' and srv < tonumber(h[6]) then
  redis.call('SADD', KEYS[3], tok)
  redis.call('PEXPIRE', KEYS[3], math.max(redis.call('PTTL', key), 1))
  return {1, h[4]}
end
if ARGV[7] == '1' and srv >= tonumber(h[5]) then return take() end
if s == 'f' then
  redis.call('HSET', key, 's', 'l')
  redis.call('HDEL', key, 'l')
  redis.call('DEL', KEYS[3])
  redis.call('PUBLISH', ARGV[9], 'l')
end
return {3, h[3], h[4], math.max(redis.call('PTTL', key), 0), math.max(tonumber(h[5]) - srv, 0)}
";

/// The finish rule of `record::finish`: only the current owner may.
///
/// KEYS: 1 record, 2 response, 3 waiters, 4 endings. ARGV: 1 token, 2 how
/// (`s` store, `r` release, `l` lost), 3 channel, 4 ending (`""`: none),
/// 5 how long to keep the ending (ms); with `s`: 6 record, 7 ttl of the
/// record (ms), 8 fingerprint, 9 expires_at, 10 tombstone_until,
/// 11 stored_at, 12 ttl of the response (ms; 0: not kept).
///
/// Returns 1, also when this token already completed the record (a repeat
/// after a lost reply), or 0 when the token no longer owns the key. A
/// record that turned `lost` because this owner's lease ran out (Redis was
/// unreachable longer than the lease) still carries its token: nobody took
/// it over, so the owner's late outcome replaces "unknown". When
/// nothing is stored and other replicas registered waiters, the ending is
/// left for them under this token.
const FINISH_LUA: &str = r"
local key, tok = KEYS[1], ARGV[1]
local h = redis.call('HMGET', key, 's', 't')
if h[2] ~= tok then return 0 end
if h[1] == 'c' then return 1 end
local waiters = redis.call('SMEMBERS', KEYS[3])
redis.call('DEL', KEYS[3])
if ARGV[2] == 's' then
  redis.call('DEL', key, KEYS[2])
  redis.call('HSET', key, 's', 'c', 't', tok, 'fp', ARGV[8], 'b', ARGV[11], 'e', ARGV[9], 'x', ARGV[10])
  if tonumber(ARGV[12]) > 0 then redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[12]) end
  redis.call('PEXPIRE', key, ARGV[7])
else
  if ARGV[2] == 'r' then
    redis.call('DEL', key, KEYS[2])
  else
    redis.call('HSET', key, 's', 'l')
    redis.call('HDEL', key, 'l')
  end
  if #waiters > 0 and ARGV[4] ~= '' then
    redis.call('HSET', KEYS[4], '=' .. tok, ARGV[4])
    for _, w in ipairs(waiters) do redis.call('HSET', KEYS[4], w, tok) end
    local keep = tonumber(ARGV[5])
    if redis.call('PTTL', KEYS[4]) < keep then redis.call('PEXPIRE', KEYS[4], keep) end
  end
end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
";

/// Gives up a claim whose reply never came (the caller answered 503 and
/// forwarded nothing): frees the key if the claim landed, and marks the
/// token cancelled so a late repeat of it (a client-side retry) cannot take
/// the key afterwards. Waiters are woken and claim afresh: nothing ran.
///
/// KEYS: 1 record, 2 response, 3 waiters, 4 endings. ARGV: 1 token,
/// 2 channel, 3 how long the mark lasts (ms). Returns 1.
const CANCEL_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] == 'f' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  redis.call('PUBLISH', ARGV[2], 'r')
end
redis.call('HSET', KEYS[4], '!' .. ARGV[1], '1')
local keep = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[4]) < keep then redis.call('PEXPIRE', KEYS[4], keep) end
return 1
";

/// Extends the owner's lease. KEYS[1] record; ARGV: 1 token, 2 lease (ms).
const RENEW_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't')
if h[1] ~= 'f' or h[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local srv = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], 'l', string.format('%.0f', srv + tonumber(ARGV[2])))
return 1
";

/// What a waiter on another replica finds: the ending its owner left for
/// it, or how long the owner's lease still runs.
///
/// KEYS: 1 record, 2 endings. ARGV: 1 the waiter's token. Returns
/// `{2, ending}`, `{1, lease_left_ms}` while a live owner runs, else `{0}`.
const AWAIT_LUA: &str = r"
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner then
  local e = redis.call('HGET', KEYS[2], '=' .. owner)
  if e then return {2, e} end
end
local h = redis.call('HMGET', KEYS[1], 's', 'l')
if h[1] == 'f' then
  local t = redis.call('TIME')
  local left = tonumber(h[2]) - (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  if left > 0 then return {1, left} end
end
return {0}
";

/// Reads a record for the records API. KEYS[1] record, KEYS[2] its
/// response. Returns `{s, t, fp, b, e, r, l, x, rec, server_now,
/// record_ms_left, response_ms_left}` (absent fields nil).
const READ_LUA: &str = r"
local h = redis.call('HMGET', KEYS[1], 's', 't', 'fp', 'b', 'e', 'r', 'l', 'x')
h[9] = false
if h[1] == 'c' then h[9] = redis.call('GET', KEYS[2]) end
local t = redis.call('TIME')
h[10] = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
h[11] = redis.call('PTTL', KEYS[1])
h[12] = redis.call('PTTL', KEYS[2])
return h
";

/// Deletes a record, its response and its waiters, and wakes the waiters
/// (who then claim afresh). KEYS: 1 record, 2 response, 3 waiters; ARGV[1]
/// channel.
const DELETE_LUA: &str = r"
local n = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('DEL', KEYS[3])
if n > 0 then redis.call('PUBLISH', ARGV[1], 'd') end
return n
";

pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_LUA));
pub(super) static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(FINISH_LUA));
pub(super) static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(CANCEL_LUA));
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW_LUA));
pub(super) static AWAIT: LazyLock<Script> = LazyLock::new(|| Script::new(AWAIT_LUA));
pub(super) static READ: LazyLock<Script> = LazyLock::new(|| Script::new(READ_LUA));
pub(super) static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(DELETE_LUA));

/// Every script, to load at start.
pub(super) fn all() -> [&'static Script; 7] {
    [&CLAIM, &FINISH, &CANCEL, &RENEW, &AWAIT, &READ, &DELETE]
}

/// How long a cancelled claim's token stays refused: longer than any
/// client-side retry of the claim can be delayed.
const CANCEL_MARK_MS: u64 = 60_000;

/// A finish: how the owner ends, and what it answered when nothing is stored.
#[derive(Debug, Clone)]
pub(super) struct Finishing {
    pub how: Finish,
    /// The encoded [`Ending`] and how long to keep it (ms).
    pub ending: Option<(Vec<u8>, u64)>,
}

impl Finishing {
    pub fn new(how: Finish, ending: Option<&Ending>, keep_ms: u64) -> Self {
        Finishing {
            how,
            ending: ending.map(|e| (e.encode(), keep_ms)),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.how {
            Finish::Store(_) => "store",
            Finish::Release => "release",
            Finish::Lost => "lost",
        }
    }
}

/// The Redis keys of the record at `k`, in the scripts' `KEYS` order.
#[derive(Clone)]
pub(super) struct Keys {
    pub record: String,
    pub response: String,
    pub waiters: String,
    pub endings: String,
    pub channel: String,
}

impl Keys {
    pub fn of(record: String) -> Keys {
        Keys {
            response: format!("{record}:rec"),
            waiters: format!("{record}:w"),
            endings: format!("{record}:end"),
            channel: format!("{record}:changed"),
            record,
        }
    }

    fn all4<'a>(&self, inv: &mut ScriptInvocation<'a>) {
        inv.key(&self.record)
            .key(&self.response)
            .key(&self.waiters)
            .key(&self.endings);
    }
}

pub(super) fn token_str(t: Token) -> String {
    format!("{:016x}.{:016x}", t.instance, t.seq)
}

pub(super) fn parse_token(b: &[u8]) -> Option<Token> {
    let s = std::str::from_utf8(b).ok()?;
    let (i, q) = s.split_once('.')?;
    Some(Token {
        instance: u64::from_str_radix(i, 16).ok()?,
        seq: u64::from_str_radix(q, 16).ok()?,
    })
}

pub(super) fn fp_bytes(fp: Option<&crate::store::Fingerprint>) -> &[u8] {
    fp.map_or(&[][..], |f| &f[..])
}

fn gone_at(c: &Completed) -> u64 {
    c.expires_at.max(c.tombstone_until)
}

/// The finish script's invocation; true when it stores a response. TTLs
/// are relative (`gone_at - now` on the finishing replica), so clock skew
/// between replicas moves nothing inside Redis.
pub(super) fn finish(k: &Keys, token: Token, f: &Finishing, now: u64) -> (ScriptInvocation<'static>, bool) {
    let mut inv = FINISH.prepare_invoke();
    k.all4(&mut inv);
    inv.arg(token_str(token));
    let (ending, keep) = f.ending.as_ref().map_or((&[][..], 0), |(e, keep)| (&e[..], *keep));
    let stored = match &f.how {
        Finish::Store(c) if gone_at(c) > now => {
            inv.arg("s")
                .arg(&k.channel)
                .arg("")
                .arg(0)
                .arg(crate::store::Record::Completed(c.clone()).encode())
                .arg(gone_at(c) - now)
                .arg(fp_bytes(c.fingerprint.as_ref()))
                .arg(c.expires_at)
                .arg(c.tombstone_until)
                .arg(c.stored_at)
                .arg(c.expires_at.saturating_sub(now));
            true
        }
        Finish::Store(_) | Finish::Release => {
            inv.arg("r").arg(&k.channel).arg(ending).arg(keep);
            false
        }
        Finish::Lost => {
            inv.arg("l").arg(&k.channel).arg(ending).arg(keep);
            false
        }
    };
    (inv, stored)
}

pub(super) fn cancel(k: &Keys, token: Token) -> ScriptInvocation<'static> {
    let mut inv = CANCEL.prepare_invoke();
    k.all4(&mut inv);
    inv.arg(token_str(token)).arg(&k.channel).arg(CANCEL_MARK_MS);
    inv
}

pub(super) fn claim_keys(k: &Keys, inv: &mut ScriptInvocation<'_>) {
    k.all4(inv);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = Token {
            instance: u64::MAX - 3,
            seq: 42,
        };
        assert_eq!(parse_token(token_str(t).as_bytes()), Some(t));
        assert_eq!(parse_token(b"nonsense"), None);
    }

    #[test]
    fn every_key_of_a_record_is_in_its_slot() {
        let k = Keys::of(format!("p:{{{}}}", "ab".repeat(16)));
        let slot = redis::cluster_routing::Slot::for_key(&k.record);
        for other in [&k.response, &k.waiters, &k.endings, &k.channel] {
            assert_eq!(redis::cluster_routing::Slot::for_key(other), slot);
        }
    }
}
