//! Batched 8-bit matrix multiplication for CPU workers.
//!
//! A decode step on CPU is bound by memory bandwidth: every weight is read once per step. candle
//! 0.11's quantized CPU matmul loops over the rows of the activations outside the weight
//! columns, so a batch of `m` sequences streams the whole weight matrix `m` times and batching
//! buys almost nothing. Here the loop order is turned around: each weight row (one output
//! feature, a few KB) is loaded once and multiplied with every activation row while it sits in
//! L1, so a batch of 8 costs little more memory traffic than a batch of 1, and prefill chunks
//! become compute-bound.
//!
//! Format: Q8_0 (blocks of 32 signed bytes with one scale), the format llama.cpp and candle use,
//! with the scale widened to f32 and stored in front of its block, so a weight row is one
//! sequential stream for the hardware prefetcher. Every GGUF tensor type is
//! converted to it at load (Q5/Q4_K/Q6_K values fit in 8 bits with room to spare). Activations
//! are quantised to the same format per row before the product, and each block's integer dot
//! product is exact; only the f32 accumulation of block results rounds.
//!
//! The kernel is chosen at run time (AVX-512 VNNI, AVX-VNNI, AVX2, else the portable loop;
//! `SLUICE_CPU_KERNEL` picks another this CPU supports); all give the same integer block sums.
//!
//! Measured against candle's kernels in the same run on the 2-core reference machine
//! (`benches/llama-cpp/compare.sh`), it is faster for prompt processing and for single and
//! batched decode, so CPU workers use it. Batched, it is compute-bound: about 30 G
//! multiply-adds/s on those 2 cores with AVX2 (about 2x at batch 8, not more); 70 to 90 G on
//! a 2-core AVX-512 VNNI VM (`cargo bench -p sluice-worker --bench qmm`, 8 and 64 rows).

use rayon::prelude::*;

/// Elements per quantisation block.
pub const BLOCK: usize = 32;

/// How far ahead (in 36-byte blocks, 2.3 KB) the SIMD kernels prefetch weights. Measured on a
/// 2-core Intel VM with the AVX2 kernel, single-stream decode of the 0.5B test model: none 20.5
/// to 21.6 tok/s, 16 blocks 23.5 to 25.1, 32 blocks 26.3 to 27.6, 64 blocks 27.9 to 30.1, 128
/// blocks 29.7 to 30.8 (no better than 64).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 64;

/// One block: its scale, then its 32 quantised values.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Block {
    d: f32,
    qs: [i8; BLOCK],
}

/// A weight matrix of `n` output features by `k` inputs, Q8_0-quantised, row-major.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    n: usize,
    k: usize,
    blocks: Vec<Block>,
    /// Per block, `128 · d · Σ qs`, row-major (`n x k/32`): what a block's product gains when
    /// its activations are read as unsigned bytes offset by 128 ([`Layout::Paired`]), up to
    /// the activations' scale.
    offsets: Vec<f32>,
}

/// Activations quantised per row: `m` rows of `k`.
struct Q8Rows {
    m: usize,
    /// Row-major; within a row, block after block, or in the kernel's [`Layout`].
    qs: Vec<i8>,
    scales: Vec<f32>,
    layout: Layout,
}

/// How a row's quantised values are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Block after block, 32 values each.
    Blocks,
    /// Unsigned bytes, each value plus 128 (`vpdpbusd` multiplies unsigned by signed bytes;
    /// the weights stay signed and [`Q8Matrix::offsets`] takes the excess back out), with the
    /// blocks in pairs (an odd last block stays as it is) whose groups of four values
    /// alternate: `b0[0..4], b1[0..4], b0[4..8], b1[4..8], ...`. A 32-bit lane of a pair then
    /// belongs to one block, the even lanes to the first and the odd to the second, so two
    /// adjacent scales broadcast as one 64-bit value line up with their lanes.
    Paired,
}

#[derive(Debug, thiserror::Error)]
pub enum QmmError {
    #[error("inner dimension {k} is not a multiple of {BLOCK}")]
    Unaligned { k: usize },
    #[error("shape mismatch: {0}")]
    Shape(String),
}

/// Quantises one block of 32 floats; returns the scale.
fn quantize_block(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (o, v) in out.iter_mut().zip(x) {
        // |v * inv| <= 127 by construction, so the cast never saturates.
        *o = (v * inv).round() as i8;
    }
    d
}

impl Q8Matrix {
    /// Quantises a dense row-major `n x k` matrix.
    pub fn quantize(weights: &[f32], n: usize, k: usize) -> Result<Self, QmmError> {
        if !k.is_multiple_of(BLOCK) {
            return Err(QmmError::Unaligned { k });
        }
        if weights.len() != n * k {
            return Err(QmmError::Shape(format!(
                "{} values for {n} x {k}",
                weights.len()
            )));
        }
        let blocks = weights
            .chunks_exact(BLOCK)
            .map(|x| {
                let mut qs = [0i8; BLOCK];
                let d = quantize_block(x, &mut qs);
                Block { d, qs }
            })
            .collect();
        Ok(Self::new(n, k, blocks))
    }

    /// From GGUF Q8_0 bytes (blocks of an f16 scale followed by 32 signed bytes), without
    /// re-quantising.
    pub fn from_q8_0_bytes(bytes: &[u8], n: usize, k: usize) -> Result<Self, QmmError> {
        const BYTES: usize = 2 + BLOCK;
        if !k.is_multiple_of(BLOCK) {
            return Err(QmmError::Unaligned { k });
        }
        if bytes.len() != n * k / BLOCK * BYTES {
            return Err(QmmError::Shape(format!(
                "{} bytes of Q8_0 for {n} x {k}",
                bytes.len()
            )));
        }
        let blocks = bytes
            .chunks_exact(BYTES)
            .map(|raw| {
                let mut qs = [0i8; BLOCK];
                for (q, b) in qs.iter_mut().zip(&raw[2..]) {
                    *q = *b as i8;
                }
                Block {
                    d: half::f16::from_le_bytes([raw[0], raw[1]]).to_f32(),
                    qs,
                }
            })
            .collect();
        Ok(Self::new(n, k, blocks))
    }

    /// The rows of several matrices with the same inputs, one after another: one matmul then
    /// computes all their outputs, concatenated (Qwen's q, k and v projections, say).
    pub fn stack(parts: &[&Q8Matrix]) -> Result<Self, QmmError> {
        let k = parts.first().map_or(0, |p| p.k);
        if let Some(p) = parts.iter().find(|p| p.k != k) {
            return Err(QmmError::Shape(format!(
                "stacking a {}-input matrix onto {k}-input ones",
                p.k
            )));
        }
        Ok(Self::new(
            parts.iter().map(|p| p.n).sum(),
            k,
            parts
                .iter()
                .flat_map(|p| p.blocks.iter().copied())
                .collect(),
        ))
    }

    fn new(n: usize, k: usize, blocks: Vec<Block>) -> Self {
        let offsets = blocks
            .iter()
            .map(|b| 128.0 * b.d * b.qs.iter().map(|&q| i32::from(q)).sum::<i32>() as f32)
            .collect();
        Self {
            n,
            k,
            blocks,
            offsets,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// `x` is `m x k` row-major; returns `m x n` row-major (`x · Wᵀ`).
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>, QmmError> {
        if x.len() != m * self.k {
            return Err(QmmError::Shape(format!(
                "{} activations for {m} x {}",
                x.len(),
                self.k
            )));
        }
        let kernel = *KERNEL;
        let rows = Q8Rows::quantize(x, m, self.k, kernel.layout());
        // Each task owns a run of output features and computes them for every activation row,
        // writing feature-major (`n x m`); the result is transposed at the end.
        let chunk = chunk_len(self.n, m);
        let mut by_feature = vec![0f32; self.n * m];
        by_feature
            .par_chunks_mut(chunk * m)
            .enumerate()
            .for_each(|(c, out)| {
                let first = c * chunk;
                for (i, dst) in out.chunks_exact_mut(m).enumerate() {
                    kernel.row(self, first + i, &rows, dst);
                }
            });
        if m == 1 {
            return Ok(by_feature);
        }
        let mut out = vec![0f32; m * self.n];
        out.par_chunks_mut(self.n).enumerate().for_each(|(r, row)| {
            for (o, feature) in row.iter_mut().zip(by_feature.chunks_exact(m)) {
                *o = feature[r];
            }
        });
        Ok(out)
    }

    fn row(&self, j: usize) -> &[Block] {
        let nb = self.k / BLOCK;
        &self.blocks[j * nb..(j + 1) * nb]
    }
}

/// Output features per parallel task: enough work per task to hide scheduling, and enough
/// tasks to keep every core busy.
fn chunk_len(n: usize, m: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = n.div_ceil(threads * 8);
    let min = (256 / m.max(1)).max(8);
    by_threads.max(min).min(n.max(1))
}

impl Q8Rows {
    /// Quantises `m` rows of `k` values, in parallel (pairs of blocks at a time, so the
    /// serial part of a batched matmul stays small).
    fn quantize(x: &[f32], m: usize, k: usize, layout: Layout) -> Self {
        let nb = k / BLOCK;
        let mut qs = vec![0i8; m * k];
        let mut scales = vec![0f32; m * nb];
        qs.par_chunks_mut(k)
            .zip(scales.par_chunks_mut(nb))
            .zip(x.par_chunks(k))
            .for_each(|((qs, scales), x)| {
                qs.par_chunks_mut(2 * BLOCK)
                    .zip(scales.par_chunks_mut(2))
                    .zip(x.par_chunks(2 * BLOCK))
                    .with_min_len(8)
                    .for_each(|((q, d), x)| quantize_pair(x, q, d, layout));
            });
        Self {
            m,
            qs,
            scales,
            layout,
        }
    }
}

/// One or two blocks (a row's odd last block comes alone) into `layout`.
fn quantize_pair(x: &[f32], q: &mut [i8], d: &mut [f32], layout: Layout) {
    for ((x, q), d) in x
        .chunks_exact(BLOCK)
        .zip(q.chunks_exact_mut(BLOCK))
        .zip(d.iter_mut())
    {
        *d = quantize_block(x, q);
    }
    if layout == Layout::Paired {
        for v in q.iter_mut() {
            // x + 128 as an unsigned byte, kept in the i8 buffer bit for bit.
            *v = (*v as u8 ^ 0x80) as i8;
        }
        if let Ok(pair) = <&mut [i8; 2 * BLOCK]>::try_from(q) {
            let plain = *pair;
            for (g, out) in pair.chunks_exact_mut(8).enumerate() {
                out[..4].copy_from_slice(&plain[4 * g..4 * g + 4]);
                out[4..].copy_from_slice(&plain[BLOCK + 4 * g..BLOCK + 4 * g + 4]);
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with AVX-VNNI: one `vpdpbusd` in place of `vpmaddubsw` + `vpmaddwd`.
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX-512 (F, BW) with AVX512-VNNI: two blocks per 512-bit `vpdpbusd`, eight activation
    /// rows per pass over a weight row.
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

/// The name of the kernel this process's matmuls run (`portable`, `avx2`, `avxvnni` or
/// `avx512vnni`; `SLUICE_CPU_KERNEL` picks another the CPU supports).
pub fn kernel_name() -> &'static str {
    KERNEL.name()
}

/// The kernel this CPU runs, chosen once per process (every matmul asks).
static KERNEL: std::sync::LazyLock<Kernel> = std::sync::LazyLock::new(Kernel::detect);

impl Kernel {
    fn detect() -> Self {
        let supported = Self::supported();
        let best = supported.last().copied().unwrap_or(Kernel::Portable);
        // SLUICE_CPU_KERNEL names a kernel to use instead (for side-by-side measurements); one
        // this CPU cannot run is ignored.
        std::env::var("SLUICE_CPU_KERNEL")
            .ok()
            .and_then(|name| supported.into_iter().find(|k| k.name() == name))
            .unwrap_or(best)
    }

    /// Every kernel this CPU can run, slowest first.
    fn supported() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") {
                all.push(Kernel::Avx2);
                if has!("avxvnni") {
                    all.push(Kernel::AvxVnni);
                }
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    all.push(Kernel::Avx512Vnni);
                }
            }
        }
        all
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avxvnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    /// The activation layout the kernel reads.
    fn layout(self) -> Layout {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => Layout::Paired,
            _ => Layout::Blocks,
        }
    }

    /// Output feature `j` for every activation row: `dst[r] = x_r · w_j`.
    fn row(self, w: &Q8Matrix, j: usize, x: &Q8Rows, dst: &mut [f32]) {
        match self {
            Kernel::Portable => portable_row(w, j, x, dst),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::row(w, j, x, dst, false),
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => avx2::row(w, j, x, dst, true),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::row(w, j, x, dst),
        }
    }
}

fn portable_row(w: &Q8Matrix, j: usize, x: &Q8Rows, dst: &mut [f32]) {
    assert_eq!(x.layout, Layout::Blocks);
    let k = w.k;
    let row = w.row(j);
    let nb = k / BLOCK;
    for (r, out) in dst.iter_mut().enumerate().take(x.m) {
        let xq = &x.qs[r * k..(r + 1) * k];
        let xd = &x.scales[r * nb..(r + 1) * nb];
        let mut acc = 0f32;
        for (b, block) in row.iter().enumerate() {
            let s: i32 = block
                .qs
                .iter()
                .zip(&xq[b * BLOCK..(b + 1) * BLOCK])
                .map(|(a, c)| i32::from(*a) * i32::from(*c))
                .sum();
            acc += block.d * xd[b] * s as f32;
        }
        *out = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! The AVX2 kernel. Per block: `|w|` as unsigned bytes times `x·sign(w)` as signed bytes
    //! (`vpmaddubsw`, pairs summed to i16 without overflow because |w|, |x| <= 127), pairs of
    //! those summed to i32 (`vpmaddwd`), converted to f32 and accumulated with the block's
    //! combined scale. One weight block is loaded once for up to four activation rows. Where
    //! the CPU has AVX-VNNI, `vpdpbusd` does the byte products and their sums to i32 at once.

    use std::arch::x86_64::*;

    use super::{BLOCK, Layout, PREFETCH_BLOCKS, Q8Matrix, Q8Rows};

    pub(super) fn row(w: &Q8Matrix, j: usize, x: &Q8Rows, dst: &mut [f32], vnni: bool) {
        assert_eq!(x.layout, Layout::Blocks);
        let mut r = 0;
        while r < x.m {
            let left = x.m - r;
            // SAFETY: `Kernel::Avx2` is only chosen after `is_x86_feature_detected!` confirmed
            // AVX2 and FMA, `Kernel::AvxVnni` AVX-VNNI as well (the only precondition of a
            // `#[target_feature]` function).
            unsafe {
                match (left, vnni) {
                    (1, false) => rows::<1>(w, j, x, r, dst),
                    (2, false) => rows::<2>(w, j, x, r, dst),
                    (3, false) => rows::<3>(w, j, x, r, dst),
                    (_, false) => rows::<4>(w, j, x, r, dst),
                    (1, true) => rows_vnni::<1>(w, j, x, r, dst),
                    (2, true) => rows_vnni::<2>(w, j, x, r, dst),
                    (3, true) => rows_vnni::<3>(w, j, x, r, dst),
                    (_, true) => rows_vnni::<4>(w, j, x, r, dst),
                }
            }
            r += left.min(4);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Rows `first..first + R` of `x` against weight row `j`, as `$name` with `$features`;
    /// `$dot(aw, sx)` sums `|w| · (x · sign(w))` over each group of four bytes to i32.
    macro_rules! rows_kernel {
        ($name:ident, $features:literal, $dot:expr) => {
            #[target_feature(enable = $features)]
            fn $name<const R: usize>(
                w: &Q8Matrix,
                j: usize,
                x: &Q8Rows,
                first: usize,
                dst: &mut [f32],
            ) {
                let k = w.k;
                let nb = k / BLOCK;
                let row = w.row(j);
                assert!(first + R <= x.m && dst.len() >= first + R && row.len() == nb);
                assert!(x.qs.len() >= (first + R) * k && x.scales.len() >= (first + R) * nb);
                let mut acc = [_mm256_setzero_ps(); R];
                // SAFETY: every pointer below stays inside the slices asserted above: block
                // b < nb of weight row j, and block b of activation rows first..first+R.
                // Loads are unaligned.
                unsafe {
                    let xq: [*const i8; R] =
                        std::array::from_fn(|r| x.qs.as_ptr().add((first + r) * k));
                    let xd: [*const f32; R] =
                        std::array::from_fn(|r| x.scales.as_ptr().add((first + r) * nb));
                    for (b, block) in row.iter().enumerate() {
                        // Weights stream from memory once per token: ask for them ahead of
                        // use (a prefetch past the end is harmless, it never faults).
                        _mm_prefetch::<_MM_HINT_T0>(
                            (block as *const super::Block)
                                .wrapping_add(PREFETCH_BLOCKS)
                                .cast(),
                        );
                        let wv = _mm256_loadu_si256(block.qs.as_ptr().cast());
                        let aw = _mm256_sign_epi8(wv, wv);
                        let ws = _mm256_set1_ps(block.d);
                        let off = b * BLOCK;
                        for r in 0..R {
                            let xv = _mm256_loadu_si256(xq[r].add(off).cast());
                            let p32 = $dot(aw, _mm256_sign_epi8(xv, wv));
                            let scale = _mm256_mul_ps(ws, _mm256_broadcast_ss(&*xd[r].add(b)));
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[r]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    dst[first + r] = hsum(*a);
                }
            }
        };
    }

    rows_kernel!(rows, "avx2,fma", |aw, sx| _mm256_madd_epi16(
        _mm256_maddubs_epi16(aw, sx),
        _mm256_set1_epi16(1)
    ));
    rows_kernel!(rows_vnni, "avx2,fma,avxvnni", |aw, sx| {
        _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), aw, sx)
    });
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    //! The AVX-512 kernel. A pair of consecutive blocks fills one 512-bit register with their
    //! groups of four bytes alternating ([`Layout::Paired`]: the activations are quantised
    //! that way, the weights permuted so per pair, once for all rows): even 32-bit lanes belong
    //! to the first block, odd ones to the second. Per pair and row, one `vpdpbusd` multiplies
    //! the activations (unsigned, offset by 128) with the signed weights and sums each lane's
    //! four products to i32; that is converted to f32 and accumulated with the lanes' scales:
    //! the two weight scales times the row's two scales, which sit next to each other and
    //! broadcast as one 64-bit value. After the last pair, the offset's share (Σ over blocks
    //! of [`Q8Matrix::offsets`] times the row's scale) comes off. One weight pair is loaded
    //! once for up to eight activation rows. Each row's arithmetic is the same whatever rows
    //! share its pass, so a sequence's results do not depend on the batch it runs in.

    use std::arch::x86_64::*;

    use super::{BLOCK, Block, Layout, PREFETCH_BLOCKS, Q8Matrix, Q8Rows};

    pub(super) fn row(w: &Q8Matrix, j: usize, x: &Q8Rows, dst: &mut [f32]) {
        assert_eq!(x.layout, Layout::Paired);
        let mut r = 0;
        while r < x.m {
            let left = x.m - r;
            // SAFETY: `Kernel::Avx512Vnni` is only chosen after `is_x86_feature_detected!`
            // confirmed AVX2, FMA, AVX512F, AVX512BW and AVX512-VNNI.
            unsafe {
                match left {
                    1 => rows::<1>(w, j, x, r, dst),
                    2 => rows::<2>(w, j, x, r, dst),
                    3 => rows::<3>(w, j, x, r, dst),
                    4 => rows::<4>(w, j, x, r, dst),
                    5 => rows::<5>(w, j, x, r, dst),
                    6 => rows::<6>(w, j, x, r, dst),
                    7 => rows::<7>(w, j, x, r, dst),
                    _ => rows::<8>(w, j, x, r, dst),
                }
            }
            r += left.min(8);
        }
    }

    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vnni")]
    fn rows<const R: usize>(w: &Q8Matrix, j: usize, x: &Q8Rows, first: usize, dst: &mut [f32]) {
        let k = w.k;
        let nb = k / BLOCK;
        let row = w.row(j);
        let offsets = &w.offsets[j * nb..(j + 1) * nb];
        assert!(first + R <= x.m && dst.len() >= first + R && row.len() == nb);
        assert!(x.qs.len() >= (first + R) * k && x.scales.len() >= (first + R) * nb);
        let mut acc = [_mm512_setzero_ps(); R];
        let zero = _mm512_setzero_si512();
        // Dword i of the result is dword `paired[i]` of `[first block | second block]`.
        let paired = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        // SAFETY: every pointer read below stays inside the slices asserted above: blocks
        // b, b + 1 < nb of weight row j (only b in the odd tail), and the same blocks of
        // activation rows first..first+R (their bytes and their two scales). Loads are
        // unaligned; prefetches never fault.
        unsafe {
            let xq: [*const i8; R] = std::array::from_fn(|r| x.qs.as_ptr().add((first + r) * k));
            let xd: [*const f32; R] =
                std::array::from_fn(|r| x.scales.as_ptr().add((first + r) * nb));
            let blocks: *const Block = row.as_ptr();
            let mut b = 0;
            while b + 2 <= nb {
                let b0 = blocks.add(b);
                let ahead = b0.wrapping_add(PREFETCH_BLOCKS).cast::<i8>();
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                let lo = _mm256_loadu_si256((*b0).qs.as_ptr().cast());
                let hi = _mm256_loadu_si256((*b0.add(1)).qs.as_ptr().cast());
                let wv = _mm512_permutexvar_epi32(
                    paired,
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                );
                // [d0, d1] in every 64-bit lane.
                let wd = _mm_setr_ps((*b0).d, (*b0.add(1)).d, 0.0, 0.0);
                let ws = _mm512_castpd_ps(_mm512_broadcastsd_pd(_mm_castps_pd(wd)));
                let off = b * BLOCK;
                for r in 0..R {
                    let xv = _mm512_loadu_si512(xq[r].add(off).cast());
                    let p32 = _mm512_dpbusd_epi32(zero, xv, wv);
                    let two = xd[r].add(b).cast::<f64>().read_unaligned();
                    let scale = _mm512_mul_ps(ws, _mm512_castpd_ps(_mm512_set1_pd(two)));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), scale, acc[r]);
                }
                b += 2;
            }
            if b < nb {
                // An odd block count: the last block alone (not paired), in the low half.
                const LOW: __mmask64 = 0xFFFF_FFFF;
                let blk = blocks.add(b);
                let wv = _mm512_maskz_loadu_epi8(LOW, (*blk).qs.as_ptr());
                let off = b * BLOCK;
                for r in 0..R {
                    let xv = _mm512_maskz_loadu_epi8(LOW, xq[r].add(off));
                    let p32 = _mm512_dpbusd_epi32(zero, xv, wv);
                    let scale = _mm512_set1_ps((*blk).d * *xd[r].add(b));
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p32), scale, acc[r]);
                }
            }
            // The offset's share: Σ_b offsets[b] · xd[r][b], sixteen blocks at a time.
            let mut excess = [_mm512_setzero_ps(); R];
            let mut b = 0;
            while b < nb {
                let lanes: __mmask16 = if nb - b >= 16 {
                    0xFFFF
                } else {
                    (1u16 << (nb - b)) - 1
                };
                let o = _mm512_maskz_loadu_ps(lanes, offsets.as_ptr().add(b));
                for r in 0..R {
                    let s = _mm512_maskz_loadu_ps(lanes, xd[r].add(b));
                    excess[r] = _mm512_fmadd_ps(o, s, excess[r]);
                }
                b += 16;
            }
            for r in 0..R {
                dst[first + r] = _mm512_reduce_add_ps(acc[r]) - _mm512_reduce_add_ps(excess[r]);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) for tests.
    pub(crate) fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn dense(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k).map(|i| x[r * k + i] * w[j * k + i]).sum();
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_kernel_gives_the_avx2_kernels_results_bit_for_bit() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("avxvnni"))
        {
            eprintln!("skipped: this CPU has no AVX-VNNI");
            return;
        }
        let mut seed = 11;
        let (n, k) = (9, 256);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let q = Q8Matrix::quantize(&w, n, k).expect("quantize");
        for m in [1, 3, 4, 7] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let rows = Q8Rows::quantize(&x, m, k, Layout::Blocks);
            for j in 0..n {
                let (mut a, mut b) = (vec![0f32; m], vec![0f32; m]);
                Kernel::Avx2.row(&q, j, &rows, &mut a);
                Kernel::AvxVnni.row(&q, j, &rows, &mut b);
                assert_eq!(a, b, "feature {j}, {m} rows");
            }
        }
    }

    #[test]
    fn every_kernel_this_cpu_runs_matches_the_portable_one_for_any_rows_and_blocks() {
        let mut seed = 23;
        // 7 blocks per row (an odd count: the AVX-512 kernel's tail) and 8 (pairs only).
        for k in [224, 256] {
            let n = 5;
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed) * 2.0).collect();
            let q = Q8Matrix::quantize(&w, n, k).expect("quantize");
            for m in [1, 3, 4, 7, 8, 9, 13, 16] {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
                for kernel in Kernel::supported() {
                    let rows = Q8Rows::quantize(&x, m, k, kernel.layout());
                    let plain = Q8Rows::quantize(&x, m, k, Layout::Blocks);
                    for j in 0..n {
                        let (mut a, mut b) = (vec![0f32; m], vec![0f32; m]);
                        portable_row(&q, j, &plain, &mut a);
                        kernel.row(&q, j, &rows, &mut b);
                        for (x, y) in a.iter().zip(&b) {
                            assert!(
                                (x - y).abs() <= 1e-4 * x.abs().max(1.0),
                                "{kernel:?}, k {k}, {m} rows, feature {j}: {x} vs {y}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_the_rows_beside_it() {
        // Batch isolation at the kernel: row r of a batch gives bit for bit what it gives
        // alone, whatever kernel this CPU runs and wherever the row falls in a pass.
        let mut seed = 5;
        let (n, k, m) = (6, 288, 13);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let q = Q8Matrix::quantize(&w, n, k).expect("quantize");
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 4.0).collect();
        for kernel in Kernel::supported() {
            let rows = Q8Rows::quantize(&x, m, k, kernel.layout());
            let mut together = vec![0f32; m];
            for j in 0..n {
                kernel.row(&q, j, &rows, &mut together);
                for r in 0..m {
                    let alone = Q8Rows::quantize(&x[r * k..(r + 1) * k], 1, k, kernel.layout());
                    let mut one = [0f32];
                    kernel.row(&q, j, &alone, &mut one);
                    assert_eq!(
                        one[0].to_bits(),
                        together[r].to_bits(),
                        "{kernel:?} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stacked_matrix_computes_its_parts_outputs_side_by_side() {
        let mut seed = 7;
        let k = 64;
        let parts: Vec<Q8Matrix> = [5, 3, 3]
            .iter()
            .map(|&n| {
                let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
                Q8Matrix::quantize(&w, n, k).expect("quantize")
            })
            .collect();
        let stacked = Q8Matrix::stack(&parts.iter().collect::<Vec<_>>()).expect("stack");
        assert_eq!((stacked.rows(), stacked.cols()), (11, k));
        let m = 3;
        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let got = stacked.matmul(&x, m).expect("matmul");
        let each: Vec<Vec<f32>> = parts
            .iter()
            .map(|p| p.matmul(&x, m).expect("part"))
            .collect();
        for r in 0..m {
            let want: Vec<f32> = each
                .iter()
                .zip(&parts)
                .flat_map(|(out, p)| out[r * p.rows()..(r + 1) * p.rows()].iter().copied())
                .collect();
            assert_eq!(&got[r * 11..(r + 1) * 11], want.as_slice(), "row {r}");
        }
        let other = Q8Matrix::quantize(&vec![0.5; 2 * 32], 2, 32).expect("quantize");
        assert!(Q8Matrix::stack(&[&parts[0], &other]).is_err());
    }

    #[test]
    fn matches_a_dense_product_for_every_batch_size() {
        let mut seed = 42;
        let (n, k) = (67, 256);
        let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
        let q = Q8Matrix::quantize(&w, n, k).expect("quantize");
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let got = q.matmul(&x, m).expect("matmul");
            let want = dense(&x, &w, m, n, k);
            for (g, e) in got.iter().zip(&want) {
                // Two 8-bit quantisations of uniform values: error well under 1% of the
                // sum's scale (sqrt(k) ~ 16 here).
                assert!((g - e).abs() < 0.15, "m={m}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn gguf_q8_0_bytes_round_trip() {
        // Two blocks: scale 0.5 then 32 bytes, scale 2.0 then 32 bytes.
        let mut bytes = Vec::new();
        for (scale, base) in [(0.5f32, -16i8), (2.0, 3)] {
            bytes.extend(half::f16::from_f32(scale).to_le_bytes());
            bytes.extend((0..32).map(|i| (base + i as i8) as u8));
        }
        let q = Q8Matrix::from_q8_0_bytes(&bytes, 1, 64).expect("bytes");
        let x = vec![1f32; 64];
        let got = q.matmul(&x, 1).expect("matmul")[0];
        let want: f32 = (0..32).map(|i| 0.5 * (-16 + i) as f32).sum::<f32>()
            + (0..32).map(|i| 2.0 * (3 + i) as f32).sum::<f32>();
        assert!((got - want).abs() < 1e-3 * want.abs(), "{got} vs {want}");
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        assert!(matches!(
            Q8Matrix::quantize(&[0.0; 30], 1, 30),
            Err(QmmError::Unaligned { k: 30 })
        ));
        let q = Q8Matrix::quantize(&[0.0; 64], 2, 32).expect("quantize");
        assert!(matches!(q.matmul(&[0.0; 31], 1), Err(QmmError::Shape(_))));
    }
}
