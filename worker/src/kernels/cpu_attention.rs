//! Single-token (decode) attention on the CPU, straight out of the paged KV pool.
//!
//! The generic path gathers each sequence's keys and values out of the pool
//! (`index_select`), transposes them to `(batch, kv_heads, span, head_dim)`, pads every
//! sequence to the longest and runs two batched matmuls and a masked softmax: three copies
//! of the whole context per layer and step. Here each (sequence, KV head) is one task that
//! reads its rows where they sit, scores them against the query heads that share the KV head
//! (each key row is loaded once for all of them), and stops at the sequence's own length:
//! no copies, no padding, no mask. A sequence's result depends only on its own rows, so it is
//! the same alone and in a batch.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

/// Where a decode step's attention reads: per sequence, its pool rows (the first `lens[i]`
/// of `read[i · span ..]` are its keys, oldest first).
pub(crate) struct HostRows<'a> {
    pub read: &'a [u32],
    pub lens: &'a [usize],
    pub span: usize,
}

/// Shapes of the heads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q` `(batch, 1, heads, head_dim)` f32 attending over `k` and `v`, the layer's pool
/// `(rows, kv_heads · head_dim)` f32; returns `(batch, 1, heads · head_dim)`.
pub(crate) fn decode(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: &HostRows<'_>,
    h: Heads,
) -> Result<Tensor> {
    let (b, t, heads, d) = q.dims4()?;
    if t != 1 || heads != h.heads || d != h.head_dim || !heads.is_multiple_of(h.kv_heads) {
        candle_core::bail!("cpu decode attention: query {:?} for {h:?}", q.dims());
    }
    if rows.lens.len() != b || rows.read.len() != b * rows.span {
        candle_core::bail!(
            "cpu decode attention: rows for {} sequences, batch {b}",
            rows.lens.len()
        );
    }
    let width = h.kv_heads * d;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let (q_guard, q_layout) = q.storage_and_layout();
    let (k_guard, k_layout) = k.storage_and_layout();
    let (v_guard, v_layout) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*q_guard, &*k_guard, &*v_guard)
    else {
        candle_core::bail!("cpu decode attention on a non-CPU tensor");
    };
    if !k_layout.is_contiguous() || !v_layout.is_contiguous() || k.dim(1)? != width {
        candle_core::bail!("cpu decode attention: pool {:?}, width {width}", k.dims());
    }
    let qs = &qs.as_slice::<f32>()?[q_layout.start_offset()..];
    let ks = &ks.as_slice::<f32>()?[k_layout.start_offset()..];
    let vs = &vs.as_slice::<f32>()?[v_layout.start_offset()..];
    let pool_rows = k.dim(0)?;
    if rows.read.iter().any(|&r| r as usize >= pool_rows) || v.dims() != k.dims() {
        candle_core::bail!("cpu decode attention: a row outside the pool");
    }
    if rows.lens.iter().any(|&n| n == 0 || n > rows.span) {
        candle_core::bail!(
            "cpu decode attention: lengths {:?} for span {}",
            rows.lens,
            rows.span
        );
    }
    let n_rep = heads / h.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; b * heads * d];
    // One task per (sequence, KV head): its n_rep query heads are adjacent in q and in out.
    out.par_chunks_mut(n_rep * d)
        .enumerate()
        .for_each(|(task, out)| {
            let (i, g) = (task / h.kv_heads, task % h.kv_heads);
            let len = rows.lens[i];
            let read = &rows.read[i * rows.span..i * rows.span + len];
            let q = &qs[(i * heads + g * n_rep) * d..(i * heads + (g + 1) * n_rep) * d];
            let at = |row: u32| row as usize * width + g * d;
            let mut scores = vec![0f32; n_rep * len];
            for (p, &row) in read.iter().enumerate() {
                let key = &ks[at(row)..at(row) + d];
                for (r, q) in q.chunks_exact(d).enumerate() {
                    scores[r * len + p] = dot(q, key) * scale;
                }
            }
            for s in scores.chunks_exact_mut(len) {
                let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in s.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                for x in s.iter_mut() {
                    *x *= inv;
                }
            }
            for (p, &row) in read.iter().enumerate() {
                let value = &vs[at(row)..at(row) + d];
                for (r, o) in out.chunks_exact_mut(d).enumerate() {
                    let w = scores[r * len + p];
                    for (o, x) in o.iter_mut().zip(value) {
                        *o += w * x;
                    }
                }
            }
        });
    drop((q_guard, k_guard, v_guard));
    Tensor::from_vec(out, (b, 1, heads * d), &Device::Cpu)
}

/// A dot product in eight independent lanes (so it vectorises), then summed.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qmm::tests::lcg;

    /// Attention of one query head over explicit key and value rows, in f64.
    fn reference(q: &[f32], keys: &[&[f32]], values: &[&[f32]]) -> Vec<f64> {
        let d = q.len();
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        (0..d)
            .map(|c| {
                e.iter()
                    .zip(values)
                    .map(|(w, v)| w * f64::from(v[c]))
                    .sum::<f64>()
                    / sum
            })
            .collect()
    }

    #[test]
    fn matches_a_reference_over_scattered_rows_of_different_lengths() {
        let mut seed = 3;
        let h = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let width = h.kv_heads * h.head_dim;
        let pool_rows = 40;
        let kp: Vec<f32> = (0..pool_rows * width)
            .map(|_| lcg(&mut seed) * 2.0)
            .collect();
        let vp: Vec<f32> = (0..pool_rows * width).map(|_| lcg(&mut seed)).collect();
        let k = Tensor::from_vec(kp.clone(), (pool_rows, width), &Device::Cpu).expect("k");
        let v = Tensor::from_vec(vp.clone(), (pool_rows, width), &Device::Cpu).expect("v");
        // Three sequences, lengths 5, 1 and 9 (span 9), rows scattered over the pool; past a
        // sequence's length its read rows point anywhere (they must be ignored).
        let lens = [5usize, 1, 9];
        let span = 9;
        let read: Vec<u32> = (0..3 * span)
            .map(|i| ((i * 7 + 3) % pool_rows) as u32)
            .collect();
        let b = lens.len();
        let qv: Vec<f32> = (0..b * h.heads * h.head_dim)
            .map(|_| lcg(&mut seed))
            .collect();
        let q = Tensor::from_vec(qv.clone(), (b, 1, h.heads, h.head_dim), &Device::Cpu).expect("q");
        let rows = HostRows {
            read: &read,
            lens: &lens,
            span,
        };
        let got = decode(&q, &k, &v, &rows, h).expect("attention");
        assert_eq!(got.dims(), &[b, 1, h.heads * h.head_dim]);
        let got = got
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let d = h.head_dim;
        for i in 0..b {
            for head in 0..h.heads {
                let g = head / (h.heads / h.kv_heads);
                let row = |pool: &[f32], p: usize| {
                    let r = read[i * span + p] as usize;
                    pool[r * width + g * d..r * width + (g + 1) * d].to_vec()
                };
                let keys: Vec<Vec<f32>> = (0..lens[i]).map(|p| row(&kp, p)).collect();
                let values: Vec<Vec<f32>> = (0..lens[i]).map(|p| row(&vp, p)).collect();
                let qh = &qv[(i * h.heads + head) * d..(i * h.heads + head + 1) * d];
                let want = reference(
                    qh,
                    &keys.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                    &values.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                );
                let at = (i * h.heads + head) * d;
                for (c, w) in want.iter().enumerate() {
                    let g = got[at + c];
                    assert!(
                        (f64::from(g) - w).abs() < 1e-5,
                        "seq {i} head {head} [{c}]: {g} vs {w}"
                    );
                }
            }
        }
        // A sequence's result is the same alone.
        let alone = HostRows {
            read: &read[2 * span..],
            lens: &lens[2..],
            span,
        };
        let q2 = q.narrow(0, 2, 1).expect("narrow");
        let one = decode(&q2, &k, &v, &alone, h).expect("alone");
        let one = one
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let per = h.heads * d;
        assert_eq!(one, got[2 * per..3 * per].to_vec());
    }

    #[test]
    fn rejects_rows_outside_the_pool_and_bad_lengths() {
        let h = Heads {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let k = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).expect("k");
        let q = Tensor::zeros((1, 1, 2, 4), DType::F32, &Device::Cpu).expect("q");
        let outside = HostRows {
            read: &[0, 3],
            lens: &[2],
            span: 2,
        };
        assert!(decode(&q, &k, &k, &outside, h).is_err());
        let empty = HostRows {
            read: &[0, 1],
            lens: &[0],
            span: 2,
        };
        assert!(decode(&q, &k, &k, &empty, h).is_err());
    }
}
