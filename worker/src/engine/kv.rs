//! The KV cache: one pool of rows per layer, handed out to sequences in pages.
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
//! Isolation: a sequence's row list only ever names its own pages; rows past its length are
//! read from its own first row and masked out of attention (weight exactly 0). Pages return
//! to the pool when the [`SeqCache`] is dropped.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

/// Rows per page.
pub const PAGE: usize = 16;

/// Every layer's K and V rows, and the free pages.
pub struct KvPool {
    pub(crate) k: Vec<Tensor>,
    pub(crate) v: Vec<Tensor>,
    free: Arc<Mutex<Vec<u32>>>,
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
        Ok(Arc::new(Self {
            k,
            v,
            free: Arc::new(Mutex::new(free)),
            pages,
            dtype,
            device: device.clone(),
        }))
    }

    /// Tokens the pool holds.
    pub fn capacity(&self) -> usize {
        self.pages * PAGE
    }

    pub fn free_pages(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
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

    /// Forgets every token from `len` on (their rows are overwritten by later writes).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `extra` more tokens, taking pages from the pool.
    pub(crate) fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = (self.len + extra).div_ceil(PAGE);
        if need <= self.pages.len() {
            return Ok(());
        }
        let mut free = self
            .pool
            .free
            .lock()
            .map_err(|_| candle_core::Error::msg("KV pool lock poisoned"))?;
        let more = need - self.pages.len();
        if free.len() < more {
            return Err(candle_core::Error::msg(format!(
                "KV pool exhausted: {more} pages needed, {} free",
                free.len()
            )));
        }
        let at = free.len() - more;
        self.pages.extend(free.drain(at..).rev());
        Ok(())
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
        if let Ok(mut free) = self.pool.free.lock() {
            free.extend(self.pages.drain(..));
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
    /// CUDA decode kernel; only for single-token steps on a GPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub lens: Option<Tensor>,
    /// For single-token steps on the CPU: the read rows and each sequence's key count on the
    /// host, for [`crate::kernels::cpu_attention`].
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
    /// For `new` tokens appended to each cache (reserved already), with a causal mask.
    pub(crate) fn new(
        caches: &[&SeqCache],
        new: usize,
        width: usize,
        device: &Device,
    ) -> Result<Self> {
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
        let host = (new == 1 && device.is_cpu()).then(|| HostStep {
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
        let lens = if new == 1 && device.is_cuda() {
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
        let rows = StepRows::new(&caches, 1, 2, &Device::Cpu).expect("rows");
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
}
