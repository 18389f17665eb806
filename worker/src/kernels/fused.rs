//! The small per-layer steps of the forward pass, each one kernel on CUDA
//! (`src/kernels/fused.cu`) and plain candle operations elsewhere:
//!
//! - [`qkv_rope`]: bias of the stacked q/k/v projection, rotary embedding of q and k, and the
//!   split into three contiguous tensors (candle: a bias add, three copies, two rope kernels);
//! - [`silu_mul`]: `silu(gate) · up` from the stacked gate/up projection (candle: two copies,
//!   silu, mul; on the CPU in f32 one parallel pass too);
//! - [`add_rms_norm`]: the residual add and the next RMS norm (candle: add, norm);
//! - [`linear`]: a bf16 projection of a single-stream decode step as a matrix-vector kernel
//!   that streams the weights (candle: cuBLAS).
//!
//! A single-token decode step of a 7B model on an H100/H200 is bound by kernel launches as
//! much as by weight reads (about 110 µs of weight traffic per layer against some twenty
//! launches); these three take a layer from 21 launches to 11. Everything is computed in f32
//! and rounded once to the storage type. `SLUICE_CUDA_FUSION=off` keeps candle's operations on
//! CUDA too (for side-by-side measurements).
//!
//! The kernel launches are FFI, hence the CUDA part's `unsafe`.

use candle_core::{D, Result, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{DType, Device};

/// An RMS norm's weight and epsilon (Qwen's `input_layernorm`, `post_attention_layernorm`
/// and the final `norm`).
#[derive(Debug, Clone)]
pub struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

/// Whether the CUDA kernels serve tensors on `device` in `dtype`.
#[cfg(feature = "cuda")]
fn on_gpu(device: &Device, dtype: DType) -> bool {
    device.is_cuda() && matches!(dtype, DType::BF16 | DType::F32) && *cuda::ENABLED
}

/// From the stacked projection `all` `(b, t, (heads + 2 · kv_heads) · head_dim)`, its `bias`
/// and the rows' rotary tables `cos`, `sin` `(b · t, head_dim / 2)`: q `(b, t, heads,
/// head_dim)` and k `(b, t, kv_heads, head_dim)` with the rotary embedding (the
/// rotate-half form, as Qwen2 and `candle_nn::rotary_emb::rope_thd`), and v `(b, t, kv_heads,
/// head_dim)`; all contiguous.
pub fn qkv_rope(
    all: &Tensor,
    bias: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, t, width) = all.dims3()?;
    if width != (heads + 2 * kv_heads) * head_dim || !head_dim.is_multiple_of(2) {
        candle_core::bail!("qkv_rope: width {width} for {heads}+2x{kv_heads} heads of {head_dim}");
    }
    let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
    #[cfg(feature = "cuda")]
    if on_gpu(all.device(), all.dtype()) {
        let n = b * t;
        let planar = cuda::qkv_rope(all, bias, cos, sin, heads, kv_heads, head_dim)?;
        return Ok((
            planar
                .narrow(0, 0, n * qw)?
                .reshape((b, t, heads, head_dim))?,
            planar
                .narrow(0, n * qw, n * kw)?
                .reshape((b, t, kv_heads, head_dim))?,
            planar
                .narrow(0, n * (qw + kw), n * kw)?
                .reshape((b, t, kv_heads, head_dim))?,
        ));
    }
    let all = all.broadcast_add(bias)?;
    let half = head_dim / 2;
    let (cos, sin) = (cos.reshape((b, t, half))?, sin.reshape((b, t, half))?);
    let part = |start: usize, len: usize, n_heads: usize| {
        all.narrow(D::Minus1, start, len)?
            .contiguous()?
            .reshape((b, t, n_heads, head_dim))
    };
    let rope = |x: Tensor| candle_nn::rotary_emb::rope_thd(&x, &cos, &sin);
    Ok((
        rope(part(0, qw, heads)?)?,
        rope(part(qw, kw, kv_heads)?)?,
        part(qw + kw, kw, kv_heads)?,
    ))
}

/// `silu(gate) · up` of the stacked gate/up projection `(…, 2 · i)`, as `(…, i)`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let width = gate_up.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("silu_mul: odd width {width}");
    }
    #[cfg(feature = "cuda")]
    if on_gpu(gate_up.device(), gate_up.dtype()) {
        return cuda::silu_mul(gate_up);
    }
    if gate_up.device().is_cpu() && gate_up.dtype() == candle_core::DType::F32 {
        return cpu_silu_mul(gate_up);
    }
    let i = width / 2;
    candle_nn::ops::silu(&gate_up.narrow(D::Minus1, 0, i)?)? * gate_up.narrow(D::Minus1, i, i)?
}

/// [`silu_mul`] on the CPU in f32: one parallel pass over the rows (candle's operations made
/// two strided copies and two more passes), with candle's formula `g / (1 + e^-g) · u`.
fn cpu_silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let mut dims = gate_up.dims().to_vec();
    let width = dims.pop().unwrap_or(0);
    let half = width / 2;
    let gate_up = gate_up.contiguous()?;
    let (guard, layout) = gate_up.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*guard else {
        candle_core::bail!("silu_mul: not a CPU tensor");
    };
    let src = &storage.as_slice::<f32>()?[layout.start_offset()..][..gate_up.elem_count()];
    let mut out = vec![0f32; src.len() / 2];
    out.par_chunks_mut(half.max(1))
        .zip(src.par_chunks(width.max(1)))
        .for_each(|(out, row)| {
            let (gate, up) = row.split_at(half);
            for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / ((-g).exp() + 1.0) * u;
            }
        });
    drop(guard);
    dims.push(half);
    Tensor::from_vec(out, dims, &candle_core::Device::Cpu)
}

/// `x · Wᵀ` of a dense projection without bias. On CUDA in bf16 with at most
/// [`GEMV_MAX_ROWS`] rows (a single-stream decode step), Sluice's matrix-vector kernel;
/// otherwise candle's (cuBLAS) matmul.
/// `SLUICE_CUDA_GEMV=off` keeps cuBLAS throughout (for side-by-side measurements).
pub fn linear(x: &Tensor, l: &candle_nn::Linear) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if l.bias().is_none()
        && x.dtype() == DType::BF16
        && *cuda::GEMV_ENABLED
        && on_gpu(x.device(), x.dtype())
    {
        let w = l.weight();
        let (n, k) = w.dims2()?;
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / k.max(1);
        let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
        if dims.last() == Some(&k)
            && k % 8 == 0
            && (1..=GEMV_MAX_ROWS).contains(&rows)
            && aligned(x)
            && aligned(w)
        {
            let y = cuda::gemv(x, w, rows, n, k)?;
            if let Some(last) = dims.last_mut() {
                *last = n;
            }
            return y.reshape(dims);
        }
    }
    candle_core::Module::forward(l, x)
}

/// The most rows (sequences in a decode step) the CUDA matrix-vector kernel takes: one. At
/// eight rows it measured at half cuBLAS's throughput (`src/kernels/fused.cu`).
pub const GEMV_MAX_ROWS: usize = 1;

/// The residual sum `x + y` and its RMS norm, both shaped as `x`.
pub fn add_rms_norm(x: &Tensor, y: &Tensor, norm: &Norm) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if on_gpu(x.device(), x.dtype()) && x.shape() == y.shape() {
        let cols = x.dim(D::Minus1)?;
        let rows = x.elem_count() / cols.max(1);
        let planar = cuda::add_rms_norm(x, y, norm)?;
        return Ok((
            planar.narrow(0, 0, rows * cols)?.reshape(x.shape())?,
            planar
                .narrow(0, rows * cols, rows * cols)?
                .reshape(x.shape())?,
        ));
    }
    let sum = (x + y)?;
    let normed = norm.forward(&sum)?;
    Ok((sum, normed))
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{
        CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage,
        Tensor,
    };

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
    const MODULE: &str = "sluice_fused";

    pub static ENABLED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("SLUICE_CUDA_FUSION").map_or(true, |v| v != "off")
    });

    pub static GEMV_ENABLED: std::sync::LazyLock<bool> =
        std::sync::LazyLock::new(|| std::env::var("SLUICE_CUDA_GEMV").map_or(true, |v| v != "off"));

    fn view<'a, T: CudaDType + DeviceRepr>(
        s: &'a CudaStorage,
        l: &Layout,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::msg(format!("{what} must be contiguous")))?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..b))
    }

    fn kernel_name(base: &str, dtype: DType) -> Result<String> {
        match dtype {
            DType::BF16 => Ok(format!("{base}_bf16")),
            DType::F32 => Ok(format!("{base}_f32")),
            other => candle_core::bail!("{base}: unsupported dtype {other:?}"),
        }
    }

    fn blocks(n: usize, threads: usize) -> u32 {
        n.div_ceil(threads).max(1) as u32
    }

    /// Runs `f` with a tensor's storage as a contiguous CUDA view.
    fn with_view<T: CudaDType + DeviceRepr, R>(
        t: &Tensor,
        what: &str,
        f: impl FnOnce(CudaView<'_, T>) -> Result<R>,
    ) -> Result<R> {
        let (guard, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*guard else {
            candle_core::bail!("{what} must be on the GPU");
        };
        f(view::<T>(s, layout, what)?)
    }

    /// `CustomOp3` for an op that runs on CUDA only, in bf16 or f32, through its
    /// `launch::<T>(a, la, b, lb, c, lc) -> (output, length)`; the output is flat.
    macro_rules! cuda_op3 {
        ($op:ty, $name:literal) => {
            impl CustomOp3 for $op {
                fn name(&self) -> &'static str {
                    $name
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
                    candle_core::bail!(concat!($name, " runs on CUDA only"))
                }

                fn cuda_fwd(
                    &self,
                    a: &CudaStorage,
                    la: &Layout,
                    b: &CudaStorage,
                    lb: &Layout,
                    c: &CudaStorage,
                    lc: &Layout,
                ) -> Result<(CudaStorage, Shape)> {
                    let dev = a.device().clone();
                    match a.dtype() {
                        DType::BF16 => {
                            let (out, n) = self.launch::<half::bf16>(a, la, b, lb, c, lc)?;
                            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
                        }
                        DType::F32 => {
                            let (out, n) = self.launch::<f32>(a, la, b, lb, c, lc)?;
                            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(n)))
                        }
                        other => candle_core::bail!("{}: unsupported dtype {other:?}", $name),
                    }
                }
            }
        };
    }

    // ---- qkv_rope ----

    struct QkvRope {
        bias: Tensor,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    }

    pub fn qkv_rope(
        all: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Tensor> {
        let dtype = all.dtype();
        let op = QkvRope {
            bias: bias.to_dtype(dtype)?.contiguous()?,
            heads,
            kv_heads,
            head_dim,
        };
        all.contiguous()?.apply_op3_no_bwd(
            &cos.to_dtype(dtype)?.contiguous()?,
            &sin.to_dtype(dtype)?.contiguous()?,
            &op,
        )
    }

    impl QkvRope {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            all: &CudaStorage,
            la: &Layout,
            cos: &CudaStorage,
            lc: &Layout,
            sin: &CudaStorage,
            ls: &Layout,
        ) -> Result<(CudaSlice<T>, usize)> {
            let dev = all.device().clone();
            let width = (self.heads + 2 * self.kv_heads) * self.head_dim;
            let half = self.head_dim / 2;
            let a = view::<T>(all, la, "qkv")?;
            let (c, s) = (view::<T>(cos, lc, "cos")?, view::<T>(sin, ls, "sin")?);
            let rows = a.len() / width;
            if a.len() != rows * width || c.len() != rows * half || s.len() != rows * half {
                candle_core::bail!("qkv_rope: {rows} rows disagree with the rotary tables");
            }
            let name = kernel_name("qkv_rope", all.dtype())?;
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            // SAFETY: the kernel writes every element (one thread per rotary pair).
            let out = unsafe { dev.alloc::<T>(rows * width)? };
            let pairs = rows * width / 2;
            let cfg = LaunchConfig {
                grid_dim: (blocks(pairs, 256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (heads, kv_heads, head_dim, n) = (
                self.heads as i32,
                self.kv_heads as i32,
                self.head_dim as i32,
                rows as i32,
            );
            with_view::<T, _>(&self.bias, "bias", |bias| {
                if bias.len() != width {
                    candle_core::bail!("qkv_rope: bias of {} for width {width}", bias.len());
                }
                let mut b = func.builder();
                b.arg(&a);
                b.arg(&bias);
                b.arg(&c);
                b.arg(&s);
                b.arg(&out);
                b.arg(&n);
                b.arg(&heads);
                b.arg(&kv_heads);
                b.arg(&head_dim);
                // SAFETY: arguments match the kernel's signature; sizes checked above.
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            })?;
            Ok((out, rows * width))
        }
    }

    cuda_op3!(QkvRope, "sluice-qkv-rope");

    // ---- gemv ----

    struct Gemv {
        rows: usize,
        n: usize,
        k: usize,
    }

    /// Warps (output features) per block of the matrix-vector kernel.
    const GEMV_WARPS: usize = 8;

    pub fn gemv(x: &Tensor, w: &Tensor, rows: usize, n: usize, k: usize) -> Result<Tensor> {
        x.apply_op2_no_bwd(w, &Gemv { rows, n, k })
    }

    impl candle_core::CustomOp2 for Gemv {
        fn name(&self) -> &'static str {
            "sluice-gemv"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("gemv kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            w: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            if x.dtype() != DType::BF16 || w.dtype() != DType::BF16 {
                candle_core::bail!("gemv: bf16 only");
            }
            let dev = x.device().clone();
            let xv = view::<half::bf16>(x, lx, "x")?;
            let wv = view::<half::bf16>(w, lw, "weight")?;
            if xv.len() != self.rows * self.k
                || wv.len() != self.n * self.k
                || !(1..=super::GEMV_MAX_ROWS).contains(&self.rows)
            {
                candle_core::bail!("gemv: shapes disagree");
            }
            let name = format!("gemv_bf16_m{}", self.rows);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            // SAFETY: one warp writes each output feature for every row.
            let out = unsafe { dev.alloc::<half::bf16>(self.rows * self.n)? };
            let cfg = LaunchConfig {
                grid_dim: (blocks(self.n, GEMV_WARPS), 1, 1),
                block_dim: ((GEMV_WARPS * 32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, k) = (self.n as i32, self.k as i32);
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&wv);
            b.arg(&out);
            b.arg(&n);
            b.arg(&k);
            // SAFETY: arguments match the kernel's signature; sizes and 16-byte alignment
            // (offsets multiple of 8 elements, k multiple of 8) checked by the caller and above.
            unsafe { b.launch(cfg) }.w()?;
            Ok((
                CudaStorage::wrap_cuda_slice(out, dev),
                Shape::from((self.rows, self.n)),
            ))
        }
    }

    // ---- silu_mul ----

    struct SiluMul;

    pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
        gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)
    }

    impl SiluMul {
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            l: &Layout,
        ) -> Result<CudaSlice<T>> {
            let dev = x.device().clone();
            let width = *l.shape().dims().last().unwrap_or(&0);
            let v = view::<T>(x, l, "gate_up")?;
            let n = v.len() / 2;
            let name = kernel_name("silu_mul", x.dtype())?;
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            // SAFETY: one thread per output element.
            let out = unsafe { dev.alloc::<T>(n)? };
            let cfg = LaunchConfig {
                grid_dim: (blocks(n, 256), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (total, inner) = (n as i32, (width / 2) as i32);
            let mut b = func.builder();
            b.arg(&v);
            b.arg(&out);
            b.arg(&total);
            b.arg(&inner);
            // SAFETY: arguments match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            Ok(out)
        }
    }

    impl CustomOp1 for SiluMul {
        fn name(&self) -> &'static str {
            "sluice-silu-mul"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("silu_mul kernel runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = x.device().clone();
            let mut dims = l.shape().dims().to_vec();
            if let Some(last) = dims.last_mut() {
                *last /= 2;
            }
            let out = match x.dtype() {
                DType::BF16 => CudaStorage::wrap_cuda_slice(self.launch::<half::bf16>(x, l)?, dev),
                DType::F32 => CudaStorage::wrap_cuda_slice(self.launch::<f32>(x, l)?, dev),
                other => candle_core::bail!("silu_mul: unsupported dtype {other:?}"),
            };
            Ok((out, Shape::from(dims)))
        }
    }

    // ---- add_rms_norm ----

    struct AddRmsNorm {
        eps: f32,
    }

    /// Threads per row of the norm kernel (its block reduction needs a power of two).
    const NORM_THREADS: usize = 512;

    pub fn add_rms_norm(x: &Tensor, y: &Tensor, norm: &super::Norm) -> Result<Tensor> {
        let w = norm.weight.to_dtype(x.dtype())?.contiguous()?;
        x.contiguous()?.apply_op3_no_bwd(
            &y.contiguous()?,
            &w,
            &AddRmsNorm {
                eps: norm.eps as f32,
            },
        )
    }

    impl AddRmsNorm {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: CudaDType + DeviceRepr>(
            &self,
            x: &CudaStorage,
            lx: &Layout,
            y: &CudaStorage,
            ly: &Layout,
            w: &CudaStorage,
            lw: &Layout,
        ) -> Result<(CudaSlice<T>, usize)> {
            let dev = x.device().clone();
            let (xv, yv, wv) = (
                view::<T>(x, lx, "x")?,
                view::<T>(y, ly, "y")?,
                view::<T>(w, lw, "norm weight")?,
            );
            let cols = wv.len();
            if cols == 0 || xv.len() != yv.len() || xv.len() % cols != 0 {
                candle_core::bail!("add_rms_norm: {} + {} over {cols}", xv.len(), yv.len());
            }
            let rows = xv.len() / cols;
            let name = kernel_name("add_rms_norm", x.dtype())?;
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            // SAFETY: each row's block writes its sum and its norm in full.
            let out = unsafe { dev.alloc::<T>(2 * rows * cols)? };
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (NORM_THREADS as u32, 1, 1),
                shared_mem_bytes: (NORM_THREADS * std::mem::size_of::<f32>()) as u32,
            };
            let (r, c) = (rows as i32, cols as i32);
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(&yv);
            b.arg(&wv);
            b.arg(&out);
            b.arg(&r);
            b.arg(&c);
            b.arg(&self.eps);
            // SAFETY: arguments match the kernel's signature; sizes checked above.
            unsafe { b.launch(cfg) }.w()?;
            Ok((out, 2 * rows * cols))
        }
    }

    cuda_op3!(AddRmsNorm, "sluice-add-rms-norm");
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }

    #[test]
    fn qkv_rope_matches_separate_bias_and_rope() {
        let dev = Device::Cpu;
        let (b, t, h, kvh, d) = (2, 3, 4, 2, 8);
        let width = (h + 2 * kvh) * d;
        let all = Tensor::randn(0f32, 1., (b, t, width), &dev).expect("all");
        let bias = Tensor::randn(0f32, 1., width, &dev).expect("bias");
        let cos = Tensor::randn(0f32, 1., (b * t, d / 2), &dev).expect("cos");
        let sin = Tensor::randn(0f32, 1., (b * t, d / 2), &dev).expect("sin");
        let (q, k, v) = qkv_rope(&all, &bias, &cos, &sin, h, kvh, d).expect("fused");
        let biased = all.broadcast_add(&bias).expect("bias add");
        // Reference rotate-half rope written out element by element.
        let rows = biased.to_vec3::<f32>().expect("rows");
        let (cs, sn) = (
            cos.to_vec2::<f32>().expect("cos"),
            sin.to_vec2::<f32>().expect("sin"),
        );
        let mut want_q = vec![0f32; b * t * h * d];
        let mut want_k = vec![0f32; b * t * kvh * d];
        let mut want_v = vec![0f32; b * t * kvh * d];
        for (bi, seq) in rows.iter().enumerate() {
            for (ti, row) in seq.iter().enumerate() {
                let r = bi * t + ti;
                for head in 0..h + 2 * kvh {
                    let x = &row[head * d..(head + 1) * d];
                    let mut out = x.to_vec();
                    if head < h + kvh {
                        for i in 0..d / 2 {
                            let (x1, x2) = (x[i], x[i + d / 2]);
                            out[i] = x1 * cs[r][i] - x2 * sn[r][i];
                            out[i + d / 2] = x1 * sn[r][i] + x2 * cs[r][i];
                        }
                    }
                    let (dst, hh, nh) = if head < h {
                        (&mut want_q, head, h)
                    } else if head < h + kvh {
                        (&mut want_k, head - h, kvh)
                    } else {
                        (&mut want_v, head - h - kvh, kvh)
                    };
                    dst[(r * nh + hh) * d..(r * nh + hh + 1) * d].copy_from_slice(&out);
                }
            }
        }
        let want = |v: Vec<f32>, nh: usize| Tensor::from_vec(v, (b, t, nh, d), &dev).expect("t");
        assert!(close(&q, &want(want_q, h)) < 1e-5);
        assert!(close(&k, &want(want_k, kvh)) < 1e-5);
        assert!(close(&v, &want(want_v, kvh)) < 1e-6);
        assert!(q.is_contiguous() && k.is_contiguous() && v.is_contiguous());
    }

    #[test]
    fn silu_mul_and_add_rms_norm_match_their_definitions() {
        let dev = Device::Cpu;
        let gu = Tensor::randn(0f32, 1., (2, 1, 12), &dev).expect("gu");
        let got = silu_mul(&gu).expect("silu_mul");
        let g = gu.narrow(2, 0, 6).expect("g");
        let u = gu.narrow(2, 6, 6).expect("u");
        let sig = (g.neg().expect("neg").exp().expect("exp") + 1.0)
            .expect("1+")
            .recip()
            .expect("recip");
        let want = ((g * sig).expect("silu") * u).expect("mul");
        assert!(close(&got, &want) < 1e-6);

        let x = Tensor::randn(0f32, 1., (3, 16), &dev).expect("x");
        let y = Tensor::randn(0f32, 1., (3, 16), &dev).expect("y");
        let w = Tensor::randn(0f32, 1., 16, &dev).expect("w");
        let (sum, normed) = add_rms_norm(&x, &y, &Norm::new(w.clone(), 1e-6)).expect("fused");
        let s = (&x + &y).expect("sum");
        assert!(close(&sum, &s) < 1e-7);
        let ms = s.sqr().expect("sq").mean_keepdim(1).expect("mean");
        let want = s
            .broadcast_div(&(ms + 1e-6).expect("eps").sqrt().expect("sqrt"))
            .expect("div")
            .broadcast_mul(&w)
            .expect("w");
        assert!(close(&normed, &want) < 1e-5);
    }
}
