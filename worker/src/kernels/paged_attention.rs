//! Decode attention on CUDA as one kernel per layer (`src/kernels/paged_attention.cu`), reading
//! keys and values straight from the paged KV pool by row id, in f32 whatever the storage type.
//!
//! A single-token decode step on a GPU is bound by kernel launches, not by memory: the generic
//! path (gather, transposes, two matmuls, scale, mask, softmax) costs eight launches per layer,
//! this one costs one. Prefill (many tokens per sequence) keeps the generic path, where the
//! matmuls do real work.
//!
//! The kernel launch is FFI, hence the module's `unsafe`.
#![allow(unsafe_code)]

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));

/// Threads per block; a multiple of every supported head size.
const THREADS: usize = 256;

/// Longest span the kernel takes (its scores live in shared memory: 32 KiB at this length).
pub const MAX_SPAN: usize = 8192;

/// `SLUICE_CUDA_ATTENTION=generic` turns the kernel off (for side-by-side measurements).
static ENABLED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    std::env::var("SLUICE_CUDA_ATTENTION").map_or(true, |v| v != "generic")
});

/// Whether the kernel serves this shape (else the caller takes the generic path).
pub fn supports(head_dim: usize, span: usize, dtype: DType) -> bool {
    *ENABLED
        && head_dim > 0
        && head_dim <= THREADS
        && THREADS.is_multiple_of(head_dim)
        && span > 0
        && span <= MAX_SPAN
        && matches!(dtype, DType::BF16 | DType::F32)
}

/// Attention of the step's queries `q` `(b, heads, head_dim)` over each sequence's first
/// `lens[i]` rows of `read` `(b · span)` in the pools `(rows, kv_heads · head_dim)`; returns
/// `(b, heads · head_dim)`.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    read: &Tensor,
    lens: &Tensor,
    heads: usize,
    kv_heads: usize,
    span: usize,
) -> Result<Tensor> {
    let (_, h, head_dim) = q.dims3()?;
    if h != heads || !heads.is_multiple_of(kv_heads) || !supports(head_dim, span, q.dtype()) {
        candle_core::bail!("paged decode attention: unsupported shape");
    }
    let op = PagedDecode {
        read: read.clone(),
        lens: lens.clone(),
        heads,
        kv_heads,
        head_dim,
        span,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    q.contiguous()?.apply_op3_no_bwd(k_pool, v_pool, &op)
}

struct PagedDecode {
    read: Tensor,
    lens: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    span: usize,
    scale: f32,
}

impl PagedDecode {
    fn launch<T: DeviceRepr + candle_core::cuda_backend::CudaDType>(
        &self,
        kernel: &str,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<CudaStorage> {
        let dev = q.device().clone();
        let contiguous = |l: &Layout, what: &str| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::msg(format!("{what} must be contiguous")))
        };
        let (q0, q1) = contiguous(lq, "q")?;
        let (k0, k1) = contiguous(lk, "k pool")?;
        let (v0, v1) = contiguous(lv, "v pool")?;
        let q_s = q.as_cuda_slice::<T>()?.slice(q0..q1);
        let k_s = k.as_cuda_slice::<T>()?.slice(k0..k1);
        let v_s = v.as_cuda_slice::<T>()?.slice(v0..v1);
        let (read_guard, read_layout) = self.read.storage_and_layout();
        let (lens_guard, lens_layout) = self.lens.storage_and_layout();
        let (Storage::Cuda(read), Storage::Cuda(lens)) = (&*read_guard, &*lens_guard) else {
            candle_core::bail!("paged decode attention: row ids must be on the GPU");
        };
        let (r0, r1) = contiguous(read_layout, "row ids")?;
        let (l0, l1) = contiguous(lens_layout, "lengths")?;
        let read = read.as_cuda_slice::<u32>()?.slice(r0..r1);
        let lens = lens.as_cuda_slice::<u32>()?.slice(l0..l1);
        let batch = l1 - l0;
        if r1 - r0 != batch * self.span || q1 - q0 != batch * self.heads * self.head_dim {
            candle_core::bail!("paged decode attention: batch shapes disagree");
        }
        let n = batch * self.heads * self.head_dim;
        let func = dev.get_or_load_custom_func(kernel, "sluice_paged_attention", PTX)?;
        // SAFETY: every element is written by the kernel before it is read.
        let out = unsafe { dev.alloc::<T>(n)? };
        let shared = (self.head_dim + self.span + THREADS) * std::mem::size_of::<f32>();
        let cfg = LaunchConfig {
            grid_dim: ((batch * self.heads) as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (heads, kv_heads, head_dim, span) = (
            self.heads as i32,
            self.kv_heads as i32,
            self.head_dim as i32,
            self.span as i32,
        );
        let mut builder = func.builder();
        builder.arg(&q_s);
        builder.arg(&k_s);
        builder.arg(&v_s);
        builder.arg(&read);
        builder.arg(&lens);
        builder.arg(&out);
        builder.arg(&heads);
        builder.arg(&kv_heads);
        builder.arg(&head_dim);
        builder.arg(&span);
        builder.arg(&self.scale);
        // SAFETY: the argument list matches the kernel's signature; the sizes were checked
        // above and the row ids come from the pool's own page table.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

impl CustomOp3 for PagedDecode {
    fn name(&self) -> &'static str {
        "sluice-paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("paged decode attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let batch = lq.shape().dims()[0];
        let out = match q.dtype() {
            DType::BF16 => {
                self.launch::<half::bf16>("paged_decode_attention_bf16", q, lq, k, lk, v, lv)?
            }
            DType::F32 => self.launch::<f32>("paged_decode_attention_f32", q, lq, k, lk, v, lv)?,
            other => candle_core::bail!("paged decode attention: unsupported dtype {other:?}"),
        };
        Ok((out, Shape::from((batch, self.heads * self.head_dim))))
    }
}
