//! The KV cache: one pool of rows per layer, handed out to sequences in pages, and a prefix
//! cache of full prompt pages that later sequences of the same tenant reuse.
//!
//! Each layer's keys and values live in one preallocated tensor of `rows × (kv_heads ·
//! head_dim)`, sized by the worker's KV token budget (`--max-batch-total-tokens`), so a running
//! worker never allocates cache memory and never runs out of it: the engine admits a job only
//! when its worst case fits. A sequence owns a list of pages (`PAGE` rows each) and nothing
//! else; its token at position `p` lives in row `pages[p / PAGE] * PAGE + p % PAGE`. Writes are
//! one `scatter_set` per layer for the whole batch and reads one `index_select`, whatever the
//! number of sequences, which is what lets a GPU decode step cost the same few kernel launches
//! at batch 32 as at batch 1.
//!
//! Isolation: a sequence's row list only ever names its own pages and cached pages of its own
//! tenant; rows past its length are read from its own first row and masked out of attention
//! (weight exactly 0). Pages return to the pool when the [`SeqCache`] is dropped.
//!
//! **Prefix caching.** A full page of prompt tokens is named by a key chained from the keys of
//! the pages before it, its own 16 tokens and a salt (the tenant): [`prefix_keys`]. Once a
//! sequence has prefilled such a page it publishes it ([`SeqCache::publish`]), and when it
//! ends, the full pages of its output as well (a conversation's next turn repeats the prompt
//! and the answer); a later sequence
//! whose prompt starts with the same pages, under the same salt, takes them read-only
//! ([`SeqCache::attach_prefix`]) and prefills only the rest. Where the prompt then goes on
//! with the first tokens of a cached page but not all of them (a tenant's system prompt ends
//! inside a page, or two users' messages start with the same words), the sequence copies the
//! keys and values of those leading tokens into a page of its own and prefills from the first
//! token that differs: a cached page is found by the key of the chain before it, so only pages
//! of the same salt are candidates. Because the salt is in every key,
//! a tenant never reuses, and so can never time, another tenant's pages. A published page is
//! never written again: a sequence writes only at positions past its length, and every page it
//! shares lies wholly before that. Pages are reference-counted; a cached page that no sequence
//! holds is idle, and idle pages are evicted least recently used when a sequence needs a page
//! and none is free. A page in use is never evicted, so eviction cannot touch a running
//! sequence. Since the engine admits by worst case as before (counting a shared page once per
//! sequence), free plus idle pages always cover what a running sequence reserves.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Result, Tensor};
use sha2::{Digest, Sha256};

/// Rows per page.
pub const PAGE: usize = 16;

/// The name of a cached page: 128 bits of a SHA-256 chain over the salt and every token up to
/// the page's end.
pub type PageKey = u128;

/// The keys of `tokens`' full pages under `salt` (the tenant): key `i` names tokens
/// `0 .. (i + 1) · PAGE`. A partial last page has no key.
pub fn prefix_keys(salt: &str, tokens: &[u32]) -> Vec<PageKey> {
    let mut keys = Vec::new();
    extend_prefix_keys(&mut keys, salt, tokens);
    keys
}

/// Appends to `keys` (those of `tokens`' first pages under `salt`, as [`prefix_keys`] made
/// them) the keys of `tokens`' further full pages, continuing the chain.
pub fn extend_prefix_keys(keys: &mut Vec<PageKey>, salt: &str, tokens: &[u32]) {
    let mut parent = keys.last().copied().unwrap_or_else(|| root_key(salt));
    for page in tokens.chunks_exact(PAGE).skip(keys.len()) {
        let mut h = Sha256::new();
        h.update(parent.to_le_bytes());
        for t in page {
            h.update(t.to_le_bytes());
        }
        parent = truncate_digest(&h.finalize());
        keys.push(parent);
    }
}

/// The key of the empty chain under `salt`: the parent of every first page.
fn root_key(salt: &str) -> PageKey {
    let mut h = Sha256::new();
    h.update(b"sluice-prefix-v1\0");
    h.update((salt.len() as u64).to_le_bytes());
    h.update(salt.as_bytes());
    truncate_digest(&h.finalize())
}

/// The key of the chain before page `i` of `keys` (made from `salt` by [`prefix_keys`]).
fn parent_key(root: PageKey, keys: &[PageKey], i: usize) -> PageKey {
    if i == 0 { root } else { keys[i - 1] }
}

fn truncate_digest(d: &[u8]) -> PageKey {
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    u128::from_le_bytes(b)
}

/// What the prefix cache did, since the pool was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Pages cached (in use or idle) now.
    pub cached_pages: usize,
    /// Cached pages no sequence holds now (evictable).
    pub idle_pages: usize,
    /// Cached pages evicted to make room.
    pub evicted_pages: u64,
}

/// What the prefix cache knows of one cached page.
#[derive(Debug, Clone)]
struct Cached {
    /// Its key: the chain through its own tokens.
    key: PageKey,
    /// The key of the chain before it.
    parent: PageKey,
    tokens: [u32; PAGE],
}

/// Who holds each page and what the prefix cache knows.
#[derive(Debug)]
struct PoolState {
    /// Pages with no holder and no cached content, popped from the end.
    free: Vec<u32>,
    /// Holders of each page.
    refs: Vec<u32>,
    /// Each cached page's key, parent key and tokens.
    cached: Vec<Option<Cached>>,
    /// Cached pages by key.
    by_key: HashMap<PageKey, u32>,
    /// Cached pages by their parent key: the candidates for a prompt that goes on with some of
    /// a cached page's tokens.
    children: HashMap<PageKey, Vec<u32>>,
    /// Idle cached pages by the tick they went idle (oldest first), and each idle page's tick.
    idle: BTreeMap<u64, u32>,
    idle_at: Vec<Option<u64>>,
    tick: u64,
    evicted: u64,
}

impl PoolState {
    /// A page for a sequence: a free one, else the least recently used idle cached one.
    fn take(&mut self) -> Option<u32> {
        let page = match self.free.pop() {
            Some(p) => p,
            None => {
                let (_, page) = self.idle.pop_first()?;
                self.idle_at[page as usize] = None;
                self.forget(page);
                self.evicted += 1;
                page
            }
        };
        self.refs[page as usize] = 1;
        Some(page)
    }

    fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// One holder fewer; an unheld page becomes idle (cached) or free.
    fn release(&mut self, page: u32) {
        let i = page as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        if self.cached[i].is_some() {
            self.tick += 1;
            self.idle.insert(self.tick, page);
            self.idle_at[i] = Some(self.tick);
        } else {
            self.free.push(page);
        }
    }

    /// One holder more of a cached page (idle or not).
    fn hold(&mut self, page: u32) {
        let i = page as usize;
        if let Some(t) = self.idle_at[i].take() {
            self.idle.remove(&t);
        }
        self.refs[i] += 1;
    }

    /// Makes `page` a cached page (indexed by its key and by its parent's).
    fn remember(&mut self, page: u32, cached: Cached) {
        self.by_key.insert(cached.key, page);
        self.children.entry(cached.parent).or_default().push(page);
        self.cached[page as usize] = Some(cached);
    }

    /// Drops `page` from the prefix cache, if it was cached.
    fn forget(&mut self, page: u32) {
        let Some(cached) = self.cached[page as usize].take() else {
            return;
        };
        self.by_key.remove(&cached.key);
        if let Some(siblings) = self.children.get_mut(&cached.parent) {
            siblings.retain(|p| *p != page);
            if siblings.is_empty() {
                self.children.remove(&cached.parent);
            }
        }
    }

    /// The cached child of `parent` whose first tokens agree longest with `next`, and how many
    /// agree (0 when none does).
    fn longest_child(&self, parent: PageKey, next: &[u32]) -> (u32, usize) {
        let mut best = (0, 0);
        for &page in self.children.get(&parent).into_iter().flatten() {
            if let Some(cached) = &self.cached[page as usize] {
                let agree = cached
                    .tokens
                    .iter()
                    .zip(next)
                    .take_while(|(a, b)| a == b)
                    .count();
                if agree > best.1 {
                    best = (page, agree);
                }
            }
        }
        best
    }
}

/// Every layer's K and V rows, and who holds each page.
pub struct KvPool {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    state: Mutex<PoolState>,
    pages: usize,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("pages", &self.pages)
            .field("free_pages", &self.free_pages())
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl KvPool {
    /// A pool that holds at least `tokens` tokens, zero-filled (so a row never holds
    /// anything but finite numbers).
    pub fn new(
        layers: usize,
        width: usize,
        tokens: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<Self>> {
        let pages = tokens.div_ceil(PAGE).max(1);
        let rows = pages * PAGE;
        let zeros = || Tensor::zeros((rows, width), dtype, device);
        let k = (0..layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        let v = (0..layers).map(|_| zeros()).collect::<Result<Vec<_>>>()?;
        // Popped from the end: pages are handed out from 0 upwards.
        let free = (0..pages as u32).rev().collect();
        let state = PoolState {
            free,
            refs: vec![0; pages],
            cached: vec![None; pages],
            by_key: HashMap::new(),
            children: HashMap::new(),
            idle: BTreeMap::new(),
            idle_at: vec![None; pages],
            tick: 0,
            evicted: 0,
        };
        Ok(Arc::new(Self {
            k,
            v,
            state: Mutex::new(state),
            pages,
            dtype,
            device: device.clone(),
        }))
    }

    /// Tokens the pool holds.
    pub fn capacity(&self) -> usize {
        self.pages * PAGE
    }

    fn state(&self) -> Result<MutexGuard<'_, PoolState>> {
        self.state
            .lock()
            .map_err(|_| candle_core::Error::msg("KV pool lock poisoned"))
    }

    /// Pages a sequence can take now: free ones and idle cached ones (evicted on demand).
    pub fn free_pages(&self) -> usize {
        self.state().map(|s| s.available()).unwrap_or(0)
    }

    /// The prefix cache's size and evictions.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.state()
            .map(|s| PrefixStats {
                cached_pages: s.by_key.len(),
                idle_pages: s.idle.len(),
                evicted_pages: s.evicted,
            })
            .unwrap_or_default()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(self: &Arc<Self>) -> SeqCache {
        SeqCache {
            pool: Arc::clone(self),
            pages: Vec::new(),
            len: 0,
        }
    }
}

/// One sequence's share of the pool: its pages and how many tokens it holds.
#[derive(Debug)]
pub struct SeqCache {
    pool: Arc<KvPool>,
    pages: Vec<u32>,
    len: usize,
}

impl SeqCache {
    /// Tokens cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    /// Forgets every token from `len` on (their rows are overwritten by later writes). Fails,
    /// changing nothing, where a later write would land in a cached page, which is read-only.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = self.len.min(len);
        let state = self.pool.state()?;
        if self.pages[len / PAGE..]
            .iter()
            .any(|p| state.cached[*p as usize].is_some())
        {
            return Err(candle_core::Error::msg(format!(
                "truncating to {len} would rewrite a cached prefix page"
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Makes room for `extra` more tokens, taking pages from the pool (free ones first, then
    /// the least recently used idle cached ones).
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = (self.len + extra).div_ceil(PAGE);
        if need <= self.pages.len() {
            return Ok(());
        }
        let mut state = self.pool.state()?;
        let more = need - self.pages.len();
        if state.available() < more {
            return Err(candle_core::Error::msg(format!(
                "KV pool exhausted: {more} pages needed, {} available",
                state.available()
            )));
        }
        for _ in 0..more {
            let page = state
                .take()
                .ok_or_else(|| candle_core::Error::msg("KV pool exhausted"))?;
            self.pages.push(page);
        }
        Ok(())
    }

    /// Takes the longest run of cached pages of `tokens` (named by `keys`, made from `salt`
    /// by [`prefix_keys`], from the first), read-only, as this empty sequence's first tokens;
    /// then, where the prompt goes on with the first tokens of a cached page of the same chain
    /// but not all of them, copies those tokens' keys and values into a page of its own.
    /// Returns how many tokens this sequence now holds: at most `max_tokens`.
    pub fn attach_prefix(
        &mut self,
        salt: &str,
        keys: &[PageKey],
        tokens: &[u32],
        max_tokens: usize,
    ) -> Result<usize> {
        if !self.pages.is_empty() || self.len > 0 {
            return Err(candle_core::Error::msg(
                "a prefix attaches to an empty sequence only",
            ));
        }
        let max_tokens = max_tokens.min(tokens.len());
        let mut state = self.pool.state()?;
        for key in keys.iter().take(max_tokens / PAGE) {
            let Some(&page) = state.by_key.get(key) else {
                break;
            };
            state.hold(page);
            self.pages.push(page);
        }
        self.len = self.pages.len() * PAGE;
        let parent = parent_key(root_key(salt), keys, self.pages.len());
        let next = &tokens[self.len..max_tokens];
        let (source, agree) = state.longest_child(parent, next);
        // A whole page that agrees was taken above, unless `max_tokens` ends inside it.
        let agree = agree.min(PAGE - 1);
        if agree == 0 {
            return Ok(self.len);
        }
        // Held while it is copied, so taking a page for the copy cannot evict it.
        state.hold(source);
        let Some(page) = state.take() else {
            state.release(source);
            return Ok(self.len);
        };
        let copied = self.copy_rows(source, page, agree);
        state.release(source);
        match copied {
            Ok(()) => {
                self.pages.push(page);
                self.len += agree;
            }
            Err(e) => {
                state.release(page);
                return Err(e);
            }
        }
        Ok(self.len)
    }

    /// Copies the first `rows` rows of page `from` to page `to`, in every layer's keys and
    /// values.
    fn copy_rows(&self, from: u32, to: u32, rows: usize) -> Result<()> {
        let from = from * PAGE as u32;
        let ids = Tensor::arange(from, from + rows as u32, &self.pool.device)?;
        for layer in self.pool.k.iter().chain(&self.pool.v) {
            // Gathered into a tensor of their own: the source rows live in the storage being
            // written (and `Tensor::copy` of a narrowed view would clone the whole layer).
            let src = layer.index_select(&ids, 0)?;
            layer.slice_set(&src, 0, to as usize * PAGE)?;
        }
        Ok(())
    }

    /// Publishes this sequence's full pages named by `keys` (its tokens', made from `salt` by
    /// [`prefix_keys`], from the first) that it has computed, so later sequences can reuse
    /// them; returns how many pages were newly cached. A page whose key is cached already
    /// (another sequence computed the same prefix at the same time) stays private.
    pub fn publish(&self, salt: &str, keys: &[PageKey], tokens: &[u32]) -> Result<usize> {
        let full = (self.len / PAGE)
            .min(keys.len())
            .min(self.pages.len())
            .min(tokens.len() / PAGE);
        let root = root_key(salt);
        let mut state = self.pool.state()?;
        let mut added = 0;
        for (i, (page, key)) in self.pages[..full].iter().zip(keys).enumerate() {
            if state.cached[*page as usize].is_some() || state.by_key.contains_key(key) {
                continue;
            }
            let mut page_tokens = [0u32; PAGE];
            page_tokens.copy_from_slice(&tokens[i * PAGE..(i + 1) * PAGE]);
            let cached = Cached {
                key: *key,
                parent: parent_key(root, keys, i),
                tokens: page_tokens,
            };
            state.remember(*page, cached);
            added += 1;
        }
        Ok(added)
    }

    /// The pool row of position `pos`.
    pub(crate) fn row(&self, pos: usize) -> u32 {
        self.pages[pos / PAGE] * PAGE as u32 + (pos % PAGE) as u32
    }

    /// The `span` pool rows an attention over this sequence's first `total` tokens reads:
    /// past `total`, its own first row (masked out, or never read by the CUDA decode kernel).
    pub(crate) fn read_rows(&self, total: usize, span: usize) -> impl Iterator<Item = u32> + '_ {
        (0..span).map(move |p| if p < total { self.row(p) } else { self.row(0) })
    }

    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl Drop for SeqCache {
    fn drop(&mut self) {
        if let Ok(mut state) = self.pool.state.lock() {
            for page in self.pages.drain(..) {
                state.release(page);
            }
        }
    }
}

/// Where one forward pass writes its new keys and values and which rows its attention reads,
/// computed once per pass on the host and shared by every layer.
pub(crate) struct StepRows {
    /// `(batch · new, width)` row ids for `scatter_set` (each row id repeated across the width).
    pub write: Tensor,
    /// `(batch · span)` row ids for `index_select`.
    pub read: Tensor,
    /// Additive f32 mask `(batch, 1, 1, new, span)` (0 or -inf), or `None` when nothing is
    /// masked.
    pub mask: Option<Tensor>,
    /// Keys each sequence attends over, padded to the longest.
    pub span: usize,
    /// `(batch)` keys each sequence attends over (its cache length after this step), for the
    /// CUDA decode kernel; only for decode steps on a GPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub lens: Option<Tensor>,
    /// For decode steps on the CPU: the read rows and each sequence's key count on the host,
    /// for [`crate::kernels::cpu_attention`].
    pub host: Option<HostStep>,
}

/// A CPU decode step's rows, on the host.
pub(crate) struct HostStep {
    /// `(batch · span)` pool rows, as in [`StepRows::read`].
    pub read: Vec<u32>,
    /// Keys each sequence attends over.
    pub lens: Vec<usize>,
}

impl StepRows {
    /// For `new` tokens appended to each cache (reserved already), with a causal mask. Only a
    /// `decode` step (one new token per sequence) gets the rows the single-token attention
    /// kernels read; a prefill chunk, even of one token, attends through the general path, as
    /// the chunk that first computed the prompt did: a job that the prefix cache leaves one
    /// prompt token to prefill gets that token's logits with the same bits.
    pub(crate) fn new(
        caches: &[&SeqCache],
        new: usize,
        width: usize,
        device: &Device,
        decode: bool,
    ) -> Result<Self> {
        let decode = decode && new == 1;
        let span = caches.iter().map(|c| c.len + new).max().unwrap_or(0);
        let mut write = Vec::with_capacity(caches.len() * new);
        let mut read = Vec::with_capacity(caches.len() * span);
        let mut mask = Vec::with_capacity(caches.len() * new * span);
        let mut masked = false;
        for c in caches {
            let total = c.len + new;
            write.extend((c.len..total).map(|p| c.row(p)));
            read.extend(c.read_rows(total, span));
            for q in 0..new {
                // New token q sits at position c.len + q and sees keys up to it.
                let last = c.len + q;
                mask.extend((0..span).map(|p| {
                    if p <= last {
                        0f32
                    } else {
                        masked = true;
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        let host = (decode && device.is_cpu()).then(|| HostStep {
            read: read.clone(),
            lens: caches.iter().map(|c| c.len + new).collect(),
        });
        let n = write.len();
        let write = Tensor::from_vec(write, (n, 1), device)?
            .broadcast_as((n, width))?
            .contiguous()?;
        let read = Tensor::from_vec(read, caches.len() * span, device)?;
        let mask = if masked {
            Some(Tensor::from_vec(
                mask,
                (caches.len(), 1, 1, new, span),
                device,
            )?)
        } else {
            None
        };
        let lens = if decode && device.is_cuda() {
            let lens: Vec<u32> = caches.iter().map(|c| (c.len + new) as u32).collect();
            Some(Tensor::from_vec(lens, caches.len(), device)?)
        } else {
            None
        };
        Ok(Self {
            write,
            read,
            mask,
            span,
            lens,
            host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_handed_out_and_returned() {
        let pool = KvPool::new(2, 4, 40, DType::F32, &Device::Cpu).expect("pool");
        assert_eq!(pool.capacity(), 48);
        let mut a = pool.new_cache();
        a.reserve(17).expect("reserve");
        assert_eq!(pool.free_pages(), 1);
        let mut b = pool.new_cache();
        assert!(b.reserve(17).is_err(), "only one page is left");
        b.reserve(16).expect("one page");
        assert_eq!(pool.free_pages(), 0);
        drop(a);
        assert_eq!(pool.free_pages(), 2, "a's pages are back");
        // Rows of one sequence never name another's pages.
        b.advance(16);
        let rows: Vec<u32> = (0..16).map(|p| b.row(p)).collect();
        assert_eq!(rows, (32..48).collect::<Vec<u32>>());
    }

    #[test]
    fn padding_reads_the_sequences_own_rows_and_is_masked() {
        let pool = KvPool::new(1, 2, 64, DType::F32, &Device::Cpu).expect("pool");
        let (mut a, mut b) = (pool.new_cache(), pool.new_cache());
        a.reserve(3).expect("a");
        a.advance(2);
        b.reserve(20).expect("b");
        b.advance(19);
        let caches = [&a, &b];
        let rows = StepRows::new(&caches, 1, 2, &Device::Cpu, true).expect("rows");
        assert_eq!(rows.span, 20);
        let read = rows.read.to_vec1::<u32>().expect("read");
        let (a_rows, b_rows) = read.split_at(20);
        assert!(a_rows.iter().all(|r| *r < 16), "a reads its own page only");
        assert!(
            b_rows.iter().all(|r| *r >= 16),
            "b reads its own pages only"
        );
        let mask = rows.mask.expect("mask").flatten_all().expect("flat");
        let mask = mask.to_vec1::<f32>().expect("mask");
        assert!(mask[..3].iter().all(|m| *m == 0.0));
        assert!(mask[3..20].iter().all(|m| m.is_infinite()));
        assert!(mask[20..].iter().all(|m| *m == 0.0));
    }

    /// A sequence that prefilled `tokens` (the rows are not written: the pool's bookkeeping
    /// is what these tests look at) and published its full pages under `salt`.
    fn prefilled(pool: &Arc<KvPool>, salt: &str, tokens: &[u32]) -> (SeqCache, Vec<PageKey>) {
        let keys = prefix_keys(salt, tokens);
        let mut c = pool.new_cache();
        let reused = c
            .attach_prefix(salt, &keys, tokens, tokens.len() - 1)
            .expect("attach");
        c.reserve(tokens.len() - reused).expect("reserve");
        c.advance(tokens.len() - reused);
        c.publish(salt, &keys, tokens).expect("publish");
        (c, keys)
    }

    fn tokens(n: usize, from: u32) -> Vec<u32> {
        (from..from + n as u32).collect()
    }

    #[test]
    fn keys_chain_every_token_before_them_and_the_salt() {
        let a = prefix_keys("acme", &tokens(40, 0));
        assert_eq!(a.len(), 2, "only full pages have keys");
        assert_eq!(a, prefix_keys("acme", &tokens(32, 0)));
        // Extending the keys of a start gives the keys of the whole.
        let mut extended = prefix_keys("acme", &tokens(20, 0));
        extend_prefix_keys(&mut extended, "acme", &tokens(40, 0));
        assert_eq!(extended, a);
        assert_ne!(a[0], prefix_keys("globex", &tokens(32, 0))[0], "salted");
        let mut other = tokens(32, 0);
        other[3] = 999;
        let b = prefix_keys("acme", &other);
        assert_ne!(a[0], b[0]);
        assert_ne!(
            a[1], b[1],
            "a later page's key depends on every earlier token"
        );
        // A tenant name cannot run into the tokens: the salt's length is hashed too.
        assert_ne!(
            prefix_keys("a", &tokens(16, 0)),
            prefix_keys("", &tokens(16, 0))
        );
    }

    #[test]
    fn a_later_sequence_shares_the_cached_pages_of_its_own_salt_only() {
        let pool = KvPool::new(1, 2, 16 * 10, DType::F32, &Device::Cpu).expect("pool");
        let prompt = tokens(40, 100);
        let (first, keys) = prefilled(&pool, "acme", &prompt);
        assert_eq!(pool.prefix_stats().cached_pages, 2);
        // Same tenant, same prompt: two pages shared, read-only.
        let mut again = pool.new_cache();
        assert_eq!(
            again
                .attach_prefix("acme", &keys, &prompt, 32)
                .expect("attach"),
            32
        );
        assert_eq!(again.pages[..2], first.pages[..2]);
        // Another tenant with the same tokens: nothing.
        let mut other = pool.new_cache();
        let other_keys = prefix_keys("globex", &prompt);
        assert_eq!(
            other
                .attach_prefix("globex", &other_keys, &prompt, 32)
                .expect("attach"),
            0
        );
        // At most what the caller allows (the prompt's last token is always prefilled).
        let mut capped = pool.new_cache();
        assert_eq!(
            capped
                .attach_prefix("acme", &keys, &prompt, 16)
                .expect("attach"),
            16
        );
        // A longer prompt with the same start reuses the start.
        let mut longer = pool.new_cache();
        let longer_tokens = tokens(64, 100);
        let longer_keys = prefix_keys("acme", &longer_tokens);
        assert_eq!(
            longer
                .attach_prefix("acme", &longer_keys, &longer_tokens, 48)
                .expect("attach"),
            32
        );
        // Writing goes to fresh pages after the shared ones.
        again.reserve(10).expect("reserve");
        assert!(!first.pages.contains(&again.pages[2]));
        // The shared pages cannot be rewritten through truncation.
        assert!(again.truncate(20).is_err());
        assert_eq!(again.len(), 32);
        again.advance(10);
        again.truncate(33).expect("past the shared pages");
    }

    #[test]
    fn idle_cached_pages_are_evicted_least_recently_used_and_used_ones_never() {
        // Eight pages: two sequences of three full pages each cache six.
        let pool = KvPool::new(1, 2, 16 * 8, DType::F32, &Device::Cpu).expect("pool");
        let (old, old_keys) = prefilled(&pool, "acme", &tokens(49, 0));
        let (held, held_keys) = prefilled(&pool, "acme", &tokens(49, 500));
        let held_pages = held.pages.clone();
        drop(old);
        // `held`'s pages stay in use by a sequence that reused them.
        drop(held);
        let mut user = pool.new_cache();
        assert_eq!(
            user.attach_prefix("acme", &held_keys, &tokens(49, 500), 48)
                .expect("attach"),
            48
        );
        let stats = pool.prefix_stats();
        assert_eq!((stats.cached_pages, stats.idle_pages), (6, 3));
        // Eight pages: the 2 free ones (the partial last pages) go first, then the idle ones,
        // oldest first; the pages in use are never handed out.
        assert_eq!(pool.free_pages(), 5);
        let mut big = pool.new_cache();
        big.reserve(16 * 5).expect("every free and idle page");
        assert!(big.pages.iter().all(|p| !held_pages[..3].contains(p)));
        assert!(
            big.reserve(16 * 6).is_err(),
            "pages in use are never evicted"
        );
        assert_eq!(pool.prefix_stats().evicted_pages, 3);
        let mut late = pool.new_cache();
        assert_eq!(
            late.attach_prefix("acme", &old_keys, &tokens(49, 0), 48)
                .expect("attach"),
            0,
            "evicted"
        );
        drop(late);
        drop(user);
        // Unheld again, `held`'s pages are idle and still cached.
        let mut back = pool.new_cache();
        assert_eq!(
            back.attach_prefix("acme", &held_keys, &tokens(49, 500), 48)
                .expect("attach"),
            48
        );
    }

    /// Gives every row of every layer of `pool` its own values.
    fn fill_distinct(pool: &KvPool) {
        for (i, layer) in pool.k.iter().chain(&pool.v).enumerate() {
            let (rows, width) = layer.dims2().expect("dims");
            let start = (i * rows * width) as f32;
            let values = Tensor::arange(start, start + (rows * width) as f32, &Device::Cpu)
                .and_then(|t| t.reshape((rows, width)))
                .expect("values");
            layer.slice_set(&values, 0, 0).expect("fill");
        }
    }

    fn row_values(layer: &Tensor, row: u32) -> Vec<f32> {
        layer
            .narrow(0, row as usize, 1)
            .and_then(|r| r.flatten_all())
            .and_then(|r| r.to_vec1::<f32>())
            .expect("row")
    }

    #[test]
    fn a_prompt_that_goes_on_with_part_of_a_cached_page_copies_those_rows() {
        let pool = KvPool::new(2, 3, 16 * 8, DType::F32, &Device::Cpu).expect("pool");
        let prompt = tokens(40, 100);
        let (first, _) = prefilled(&pool, "acme", &prompt);
        fill_distinct(&pool);
        // The first page and 5 tokens of the second, then other tokens.
        let mut next = tokens(21, 100);
        next.extend(tokens(10, 900));
        let keys = prefix_keys("acme", &next);
        let mut second = pool.new_cache();
        assert_eq!(
            second
                .attach_prefix("acme", &keys, &next, next.len() - 1)
                .expect("attach"),
            21
        );
        assert_eq!(second.pages[0], first.pages[0], "the full page is shared");
        assert_ne!(
            second.pages[1], first.pages[1],
            "the partial page is a copy"
        );
        for layer in pool.k.iter().chain(&pool.v) {
            for pos in 0..21 {
                assert_eq!(
                    row_values(layer, second.row(pos)),
                    row_values(layer, first.row(pos)),
                    "position {pos}"
                );
            }
        }
        // The copy is the sequence's own: it writes on from the first token that differs.
        second.reserve(9).expect("reserve");
        second.advance(9);
        second.truncate(25).expect("its own page");
        // No more than the caller allows.
        let mut capped = pool.new_cache();
        assert_eq!(
            capped
                .attach_prefix("acme", &keys, &next, 18)
                .expect("attach"),
            18
        );
        // Within the first page too.
        let mut short = tokens(7, 100);
        short.push(5);
        let mut within = pool.new_cache();
        assert_eq!(
            within
                .attach_prefix("acme", &prefix_keys("acme", &short), &short, 7)
                .expect("attach"),
            7
        );
        // Another tenant's prompt with the same tokens copies nothing.
        let mut other = pool.new_cache();
        let other_keys = prefix_keys("globex", &next);
        assert_eq!(
            other
                .attach_prefix("globex", &other_keys, &next, next.len() - 1)
                .expect("attach"),
            0
        );
    }

    #[test]
    fn a_page_is_copied_from_only_while_it_is_cached() {
        // Two pages: `a` caches its first.
        let pool = KvPool::new(1, 2, 16 * 2, DType::F32, &Device::Cpu).expect("pool");
        let (a, _) = prefilled(&pool, "t", &tokens(17, 0));
        drop(a);
        let mut part = tokens(10, 0);
        part.push(77);
        let part_keys = prefix_keys("t", &part);
        // With the cached page the only one left, copying from it cannot evict it for the
        // copy: nothing is reused, and it stays cached.
        let mut holder = pool.new_cache();
        holder.reserve(16).expect("the free page");
        let mut probe = pool.new_cache();
        assert_eq!(
            probe
                .attach_prefix("t", &part_keys, &part, 10)
                .expect("attach"),
            0
        );
        assert_eq!(pool.prefix_stats().cached_pages, 1);
        drop(probe);
        drop(holder);
        // Evicted, it is no candidate any more.
        let mut big = pool.new_cache();
        big.reserve(32).expect("every page");
        assert_eq!(pool.prefix_stats().evicted_pages, 1);
        drop(big);
        let mut probe = pool.new_cache();
        assert_eq!(
            probe
                .attach_prefix("t", &part_keys, &part, 10)
                .expect("attach"),
            0
        );
    }

    #[test]
    fn eviction_takes_the_page_idle_the_longest() {
        let pool = KvPool::new(1, 2, 16 * 4, DType::F32, &Device::Cpu).expect("pool");
        let (a, a_keys) = prefilled(&pool, "t", &tokens(17, 0));
        let (b, b_keys) = prefilled(&pool, "t", &tokens(17, 100));
        drop(a);
        drop(b);
        // `a`'s page is used again, so `b`'s is now the older idle one.
        let mut again = pool.new_cache();
        again
            .attach_prefix("t", &a_keys, &tokens(17, 0), 16)
            .expect("attach");
        drop(again);
        let mut one = pool.new_cache();
        one.reserve(16 * 3).expect("two free pages and one idle");
        let mut probe = pool.new_cache();
        assert_eq!(
            probe
                .attach_prefix("t", &b_keys, &tokens(17, 100), 16)
                .expect("attach"),
            0,
            "b went"
        );
        let mut probe = pool.new_cache();
        assert_eq!(
            probe
                .attach_prefix("t", &a_keys, &tokens(17, 0), 16)
                .expect("attach"),
            16,
            "a stayed"
        );
    }

    #[test]
    fn a_prefix_computed_twice_at_once_is_cached_once() {
        let pool = KvPool::new(1, 2, 16 * 8, DType::F32, &Device::Cpu).expect("pool");
        let (a, _) = prefilled(&pool, "t", &tokens(33, 0));
        // `b` prefilled the same prompt before `a` published (it attached nothing).
        let keys = prefix_keys("t", &tokens(33, 0));
        let mut b = pool.new_cache();
        b.reserve(33).expect("reserve");
        b.advance(33);
        assert_eq!(b.publish("t", &keys, &tokens(33, 0)).expect("publish"), 0);
        assert_eq!(pool.prefix_stats().cached_pages, 2);
        let private = b.pages.clone();
        drop(b);
        // Its pages went back free, not cached.
        assert_eq!(pool.prefix_stats().idle_pages, 0);
        assert_eq!(pool.free_pages(), 8 - a.pages.len());
        assert!(private.iter().all(|p| !a.pages.contains(p)));
    }
}
