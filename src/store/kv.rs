//! An ordered key-value tree kept in sled (one node) or in Redis (a cluster), with the
//! operations the store uses: point reads and writes, compare-and-swap, batches, and ordered
//! scans that run both ways.
//!
//! On Redis a tree is two keys: a hash (`…:v`, key → value) and a sorted set (`…:z`) of its
//! keys, all with score 0, so that Redis orders them bytewise, as sled does (`ZRANGEBYLEX`).
//! Every write touches both in one Lua script, so the two never disagree; scans read pages of
//! keys with their values in one round trip. With `appendfsync always` a write is on disk when
//! Redis answers it, so the store's flush has nothing left to do.

use std::collections::VecDeque;
use std::ops::{Bound, RangeBounds};
use std::sync::LazyLock;

use redis::Script;
use sled::IVec;

use super::StoreError;
use crate::cluster::redis::Redis;

/// Keys read per round trip of a scan.
const PAGE: usize = 256;

/// A compare-and-swap that found another value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conflict;

#[derive(Clone)]
pub enum Tree {
    Sled(sled::Tree),
    Redis(RedisTree),
}

/// A tree in Redis: its hash of values and its sorted set of keys.
#[derive(Clone)]
pub struct RedisTree {
    redis: Redis,
    values: String,
    keys: String,
}

impl RedisTree {
    pub fn new(redis: &Redis, name: &str) -> Self {
        Self {
            values: redis.key(&format!("t:{name}:v")),
            keys: redis.key(&format!("t:{name}:z")),
            redis: redis.clone(),
        }
    }
}

static SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if not old then redis.call('ZADD', KEYS[2], 0, ARGV[1]) end
return old",
    )
});

static DEL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return old",
    )
});

/// ARGV: key, '1' + old value or '0' (expects none), '1' + new value or '0' (removes).
static CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[3] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
  redis.call('ZADD', KEYS[2], 0, ARGV[1])
elseif cur then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return 1",
    )
});

/// A transaction over several trees: KEYS are the trees' (values, keys) pairs; ARGV is the
/// number of checks, then per check (tree, kind, key, value) with kind `e` (exists), `a`
/// (absent) or `=` (equals value), then per write (tree, `s`et or `d`elete, key, value). The
/// writes happen only when every check holds; answers 1 if they did, else 0.
static TXN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local checks = tonumber(ARGV[1])
local i = 2
for _ = 1, checks do
  local t = tonumber(ARGV[i]) * 2 - 1
  local cur = redis.call('HGET', KEYS[t], ARGV[i + 2])
  local kind = ARGV[i + 1]
  if kind == 'e' and not cur then return 0 end
  if kind == 'a' and cur then return 0 end
  if kind == '=' and cur ~= ARGV[i + 3] then return 0 end
  i = i + 4
end
while i <= #ARGV do
  local t = tonumber(ARGV[i]) * 2 - 1
  if ARGV[i + 1] == 's' then
    redis.call('HSET', KEYS[t], ARGV[i + 2], ARGV[i + 3])
    redis.call('ZADD', KEYS[t + 1], 0, ARGV[i + 2])
  else
    redis.call('HDEL', KEYS[t], ARGV[i + 2])
    redis.call('ZREM', KEYS[t + 1], ARGV[i + 2])
  end
  i = i + 4
end
return 1",
    )
});

/// One page of a scan: ARGV = min, max, count, command (`ZRANGEBYLEX` or `ZREVRANGEBYLEX`,
/// whose bounds come max first). Answers the last key read (even if its value vanished
/// meanwhile), then key, value pairs.
static PAGE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local ks = redis.call(ARGV[4], KEYS[2], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
if #ks == 0 then return {} end
local vs = redis.call('HMGET', KEYS[1], unpack(ks))
local out = { ks[#ks] }
for j = 1, #ks do
  if vs[j] then
    out[#out + 1] = ks[j]
    out[#out + 1] = vs[j]
  end
end
return out",
    )
});

/// Writes applied together (sled: one batch; Redis: one script).
#[derive(Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops
            .push((key.as_ref().to_vec(), Some(value.as_ref().to_vec())));
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.ops.push((key.as_ref().to_vec(), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What a [`Txn`] checks before it writes.
pub enum Expect {
    Exists,
    Absent,
    /// The value is exactly this.
    Equals(Vec<u8>),
}

/// An all-or-nothing set of writes over Redis trees, guarded by checks (Redis only: sled has
/// its own transactions).
#[derive(Default)]
pub struct Txn<'a> {
    trees: Vec<&'a RedisTree>,
    checks: Vec<(usize, Expect, Vec<u8>)>,
    writes: Vec<(usize, Vec<u8>, Option<Vec<u8>>)>,
}

impl<'a> Txn<'a> {
    fn slot(&mut self, tree: &'a RedisTree) -> usize {
        if let Some(i) = self.trees.iter().position(|t| t.values == tree.values) {
            return i + 1;
        }
        self.trees.push(tree);
        self.trees.len()
    }

    pub fn require(mut self, tree: &'a RedisTree, key: &[u8], expect: Expect) -> Self {
        let t = self.slot(tree);
        self.checks.push((t, expect, key.to_vec()));
        self
    }

    pub fn insert(mut self, tree: &'a RedisTree, key: &[u8], value: &[u8]) -> Self {
        let t = self.slot(tree);
        self.writes.push((t, key.to_vec(), Some(value.to_vec())));
        self
    }

    pub fn remove(mut self, tree: &'a RedisTree, key: &[u8]) -> Self {
        let t = self.slot(tree);
        self.writes.push((t, key.to_vec(), None));
        self
    }

    /// Applies the writes if every check holds; answers whether they were applied.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn commit(self) -> Result<bool, StoreError> {
        let Some(first) = self.trees.first() else {
            return Ok(true);
        };
        let mut inv = TXN.prepare_invoke();
        for t in &self.trees {
            inv.key(&t.values).key(&t.keys);
        }
        inv.arg(self.checks.len());
        for (t, expect, key) in &self.checks {
            let (kind, value) = match expect {
                Expect::Exists => ("e", &[][..]),
                Expect::Absent => ("a", &[][..]),
                Expect::Equals(v) => ("=", v.as_slice()),
            };
            inv.arg(t).arg(kind).arg(key.as_slice()).arg(value);
        }
        for (t, key, value) in &self.writes {
            match value {
                Some(v) => inv.arg(t).arg("s").arg(key.as_slice()).arg(v.as_slice()),
                None => inv.arg(t).arg("d").arg(key.as_slice()).arg(""),
            };
        }
        let done: i64 = first.redis.run(|c| inv.invoke(c))?;
        Ok(done == 1)
    }
}

fn lex(bound: &Bound<Vec<u8>>, low: bool) -> Vec<u8> {
    match bound {
        Bound::Included(k) => [b"[".as_slice(), k].concat(),
        Bound::Excluded(k) => [b"(".as_slice(), k].concat(),
        Bound::Unbounded if low => b"-".to_vec(),
        Bound::Unbounded => b"+".to_vec(),
    }
}

fn owned<K: AsRef<[u8]>>(b: Bound<&K>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(k) => Bound::Included(k.as_ref().to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.as_ref().to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The smallest key above every key that starts with `prefix` (none for an all-0xff prefix).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut s = prefix.to_vec();
    while let Some(last) = s.pop() {
        if last < 0xff {
            s.push(last + 1);
            return Some(s);
        }
    }
    None
}

impl Tree {
    /// # Errors
    /// On a storage failure.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.get(key)?),
            Self::Redis(t) => {
                let v: Option<Vec<u8>> = t
                    .redis
                    .run(|c| redis::cmd("HGET").arg(&t.values).arg(key.as_ref()).query(c))?;
                Ok(v.map(IVec::from))
            }
        }
    }

    /// # Errors
    /// On a storage failure.
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.contains_key(key)?),
            Self::Redis(t) => t.redis.run(|c| {
                redis::cmd("HEXISTS")
                    .arg(&t.values)
                    .arg(key.as_ref())
                    .query(c)
            }),
        }
    }

    /// Sets `key` to `value`; answers the value it had.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<IVec>, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.insert(key.as_ref(), value.as_ref())?),
            Self::Redis(t) => {
                let old: Option<Vec<u8>> = t.redis.run(|c| {
                    SET.key(&t.values)
                        .key(&t.keys)
                        .arg(key.as_ref())
                        .arg(value.as_ref())
                        .invoke(c)
                })?;
                Ok(old.map(IVec::from))
            }
        }
    }

    /// Removes `key`; answers the value it had.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<IVec>, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.remove(key)?),
            Self::Redis(t) => {
                let old: Option<Vec<u8>> = t
                    .redis
                    .run(|c| DEL.key(&t.values).key(&t.keys).arg(key.as_ref()).invoke(c))?;
                Ok(old.map(IVec::from))
            }
        }
    }

    /// Sets `key` to `new` (removes it for `None`) if its value is `old` (absent for `None`).
    ///
    /// # Errors
    /// On a storage failure; `Err(Conflict)` inside when the value was another.
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        old: Option<impl AsRef<[u8]>>,
        new: Option<impl AsRef<[u8]>>,
    ) -> Result<Result<(), Conflict>, StoreError> {
        match self {
            Self::Sled(t) => Ok(t
                .compare_and_swap(
                    key,
                    old.as_ref().map(AsRef::as_ref),
                    new.as_ref().map(AsRef::as_ref),
                )?
                .map_err(|_| Conflict)),
            Self::Redis(t) => {
                let (has_old, old) = match &old {
                    Some(o) => ("1", o.as_ref()),
                    None => ("0", &[][..]),
                };
                let (has_new, new) = match &new {
                    Some(n) => ("1", n.as_ref()),
                    None => ("0", &[][..]),
                };
                let swapped: i64 = t.redis.run(|c| {
                    CAS.key(&t.values)
                        .key(&t.keys)
                        .arg(key.as_ref())
                        .arg(has_old)
                        .arg(old)
                        .arg(has_new)
                        .arg(new)
                        .invoke(c)
                })?;
                Ok(if swapped == 1 { Ok(()) } else { Err(Conflict) })
            }
        }
    }

    /// Replaces the value of `key` by `f` of it, atomically; answers the new value.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn update_and_fetch(
        &self,
        key: impl AsRef<[u8]>,
        mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<IVec>, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.update_and_fetch(key, f)?),
            Self::Redis(_) => loop {
                let old = self.get(key.as_ref())?;
                let new = f(old.as_deref());
                if self
                    .compare_and_swap(key.as_ref(), old.as_ref(), new.as_ref())?
                    .is_ok()
                {
                    return Ok(new.map(IVec::from));
                }
            },
        }
    }

    /// Applies every write of `batch` at once.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn apply_batch(&self, batch: Batch) -> Result<(), StoreError> {
        match self {
            Self::Sled(t) => {
                let mut b = sled::Batch::default();
                for (k, v) in batch.ops {
                    match v {
                        Some(v) => b.insert(k, v),
                        None => b.remove(k),
                    }
                }
                Ok(t.apply_batch(b)?)
            }
            Self::Redis(t) => {
                if batch.ops.is_empty() {
                    return Ok(());
                }
                let mut txn = Txn::default();
                for (k, v) in &batch.ops {
                    txn = match v {
                        Some(v) => txn.insert(t, k, v),
                        None => txn.remove(t, k),
                    };
                }
                txn.commit().map(|_| ())
            }
        }
    }

    /// How many keys the tree holds.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn len(&self) -> Result<usize, StoreError> {
        match self {
            Self::Sled(t) => Ok(t.len()),
            Self::Redis(t) => t.redis.run(|c| redis::cmd("ZCARD").arg(&t.keys).query(c)),
        }
    }

    /// Whether the tree holds no key.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Removes every key.
    ///
    /// # Errors
    /// On a storage failure.
    pub fn clear(&self) -> Result<(), StoreError> {
        match self {
            Self::Sled(t) => Ok(t.clear()?),
            Self::Redis(t) => t
                .redis
                .run(|c| redis::cmd("DEL").arg(&t.values).arg(&t.keys).query::<()>(c)),
        }
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Iter {
        self.range::<Vec<u8>, _>(..)
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        match self {
            Self::Sled(t) => Iter::Sled(t.scan_prefix(prefix)),
            Self::Redis(t) => {
                let p = prefix.as_ref().to_vec();
                let hi = successor(&p).map_or(Bound::Unbounded, Bound::Excluded);
                Iter::Redis(RedisIter::new(t.clone(), Bound::Included(p), hi))
            }
        }
    }

    /// The entries in `range`, in key order.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        match self {
            Self::Sled(t) => Iter::Sled(t.range::<&[u8], _>((
                range.start_bound().map(AsRef::as_ref),
                range.end_bound().map(AsRef::as_ref),
            ))),
            Self::Redis(t) => Iter::Redis(RedisIter::new(
                t.clone(),
                owned(range.start_bound()),
                owned(range.end_bound()),
            )),
        }
    }
}

/// An ordered scan, lazy and double-ended.
pub enum Iter {
    Sled(sled::Iter),
    Redis(RedisIter),
}

impl Iter {
    pub fn keys(self) -> impl DoubleEndedIterator<Item = Result<IVec, StoreError>> {
        self.map(|kv| kv.map(|(k, _)| k))
    }

    pub fn values(self) -> impl DoubleEndedIterator<Item = Result<IVec, StoreError>> {
        self.map(|kv| kv.map(|(_, v)| v))
    }
}

impl Iterator for Iter {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Sled(i) => i.next().map(|r| r.map_err(StoreError::from)),
            Self::Redis(i) => i.next(),
        }
    }
}

impl DoubleEndedIterator for Iter {
    fn next_back(&mut self) -> Option<Self::Item> {
        match self {
            Self::Sled(i) => i.next_back().map(|r| r.map_err(StoreError::from)),
            Self::Redis(i) => i.next_back(),
        }
    }
}

/// A scan of a Redis tree: pages read from whichever end is asked for, the range narrowed past
/// what was read, so the two ends never read an entry twice.
pub struct RedisIter {
    tree: RedisTree,
    lo: Bound<Vec<u8>>,
    hi: Bound<Vec<u8>>,
    front: VecDeque<(IVec, IVec)>,
    back: VecDeque<(IVec, IVec)>,
    /// Nothing is left between `lo` and `hi`.
    drained: bool,
    failed: bool,
}

impl RedisIter {
    fn new(tree: RedisTree, lo: Bound<Vec<u8>>, hi: Bound<Vec<u8>>) -> Self {
        Self {
            tree,
            lo,
            hi,
            front: VecDeque::new(),
            back: VecDeque::new(),
            drained: false,
            failed: false,
        }
    }

    /// Reads a page from the front (or the back); answers false when nothing was left.
    fn fetch(&mut self, from_front: bool) -> Result<bool, StoreError> {
        if self.drained {
            return Ok(false);
        }
        let (cmd, a, b) = if from_front {
            ("ZRANGEBYLEX", lex(&self.lo, true), lex(&self.hi, false))
        } else {
            ("ZREVRANGEBYLEX", lex(&self.hi, false), lex(&self.lo, true))
        };
        let t = &self.tree;
        let page: Vec<Vec<u8>> = t.redis.run(|c| {
            PAGE_SCRIPT
                .key(&t.values)
                .key(&t.keys)
                .arg(a.as_slice())
                .arg(b.as_slice())
                .arg(PAGE)
                .arg(cmd)
                .invoke(c)
        })?;
        let mut page = page.into_iter();
        let Some(last) = page.next() else {
            self.drained = true;
            return Ok(false);
        };
        let mut read = Vec::with_capacity(page.len() / 2);
        while let (Some(k), Some(v)) = (page.next(), page.next()) {
            read.push((IVec::from(k), IVec::from(v)));
        }
        if from_front {
            self.lo = Bound::Excluded(last);
            self.front.extend(read);
        } else {
            self.hi = Bound::Excluded(last);
            self.back.extend(read);
        }
        Ok(true)
    }

    fn next_from(&mut self, from_front: bool) -> Option<Result<(IVec, IVec), StoreError>> {
        if self.failed {
            return None;
        }
        loop {
            let own = if from_front {
                self.front.pop_front()
            } else {
                self.back.pop_front()
            };
            if let Some(kv) = own {
                return Some(Ok(kv));
            }
            match self.fetch(from_front) {
                Ok(true) => continue,
                Ok(false) => {
                    // The range is read out: what remains was read by the other end.
                    return if from_front {
                        self.back.pop_back().map(Ok)
                    } else {
                        self.front.pop_back().map(Ok)
                    };
                }
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl Iterator for RedisIter {
    type Item = Result<(IVec, IVec), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_from(true)
    }
}

impl DoubleEndedIterator for RedisIter {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.next_from(false)
    }
}

#[cfg(test)]
mod tests {
    use super::successor;

    #[test]
    fn successor_carries() {
        assert_eq!(successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(successor(&[0xff, 0xff]), None);
        assert_eq!(successor(b""), None);
    }
}
