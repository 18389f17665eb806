//! CUDA graphs for decode steps.
//!
//! A decode step of the 7B model is about 310 kernel launches (11 per layer), each a few
//! microseconds of host work in candle and the driver, while most kernels run for only a few
//! microseconds on an H100/H200: single-stream decode is bound by launching, not by the GPU.
//! A CUDA graph records one step's launches once and replays them with one launch.
//!
//! A graph is recorded per batch size and *span bucket* (the longest sequence's length rounded
//! up to a power of two, at least [`MIN_SPAN`]): every kernel argument of a step is fixed but
//! the contents of one small `u32` input buffer, which holds the step's tokens, positions,
//! lengths, KV-pool write rows and read rows, and is refreshed with one host-to-device copy
//! before each replay. The decode attention kernel reads each sequence's length from that
//! buffer and never touches the padding of the bucket, so a graph serves every step whose
//! sequences fit its span. Intermediate tensors are allocated and freed inside the graph
//! (stream-ordered allocation nodes); the logits land in an output buffer allocated outside
//! it, and each replay hands back a copy of them.
//!
//! A shape's first two steps run the usual way; its third runs eagerly through the graph's
//! input buffer (which loads kernels and fills candle's parameter cache) and is the step's real
//! result; its launches are then recorded. A shape whose
//! recording fails is remembered and runs eagerly from then on (with a warning), so graphs can
//! only make a step faster, never fail it. `SLUICE_CUDA_GRAPHS=off` turns them off (for
//! side-by-side measurements).

#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, result, sys};
use candle_core::{DType, Device, Result, Storage, Tensor};

/// The smallest span bucket: steps of sequences up to this many tokens share one graph.
pub const MIN_SPAN: usize = 256;

/// Graphs kept at most (least recently used dropped first); each holds its input and output
/// buffers and the device memory of its intermediates.
const CAPACITY: usize = 64;

/// A shape is recorded on its third step, not its first: recording costs about one more
/// step, which a shape seen once or twice (a batch size that lasts a step while jobs come and
/// go) would never earn back.
const RECORD_AT: u32 = 3;

/// Whether decode steps may run as CUDA graphs (`SLUICE_CUDA_GRAPHS=off` says no).
pub fn enabled() -> bool {
    static ENABLED: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        std::env::var("SLUICE_CUDA_GRAPHS").map_or(true, |v| v != "off")
    });
    *ENABLED
}

/// The span bucket of a step whose longest sequence holds `len` tokens after it.
pub fn span_bucket(len: usize) -> usize {
    len.next_power_of_two().max(MIN_SPAN)
}

/// Where each part of a step's input buffer lives (in `u32`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub batch: usize,
    pub span: usize,
    pub width: usize,
}

impl StepShape {
    pub fn tokens(&self) -> (usize, usize) {
        (0, self.batch)
    }
    pub fn positions(&self) -> (usize, usize) {
        (self.batch, self.batch)
    }
    pub fn lens(&self) -> (usize, usize) {
        (2 * self.batch, self.batch)
    }
    pub fn write(&self) -> (usize, usize) {
        (3 * self.batch, self.batch * self.width)
    }
    pub fn read(&self) -> (usize, usize) {
        (
            3 * self.batch + self.batch * self.width,
            self.batch * self.span,
        )
    }
    pub fn len(&self) -> usize {
        let (at, n) = self.read();
        at + n
    }
}

struct Entry {
    // Dropped first (field order), so no replay can follow the buffers it reads and writes.
    graph: candle_core::cuda_backend::cudarc::driver::CudaGraph,
    shape: StepShape,
    inputs: Tensor,
    out: Tensor,
    last_used: u64,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised
// (CUDA's graph thread-safety rules); every use goes through the `Mutex` in `DecodeGraphs`.
unsafe impl Send for Entry {}

#[derive(Default)]
struct Cache {
    entries: Vec<Entry>,
    failed: HashSet<StepShape>,
    /// Steps run eagerly per shape not recorded yet.
    seen: HashMap<StepShape, u32>,
    last_error: Option<String>,
    clock: u64,
}

/// The recorded decode graphs of one model.
#[derive(Default)]
pub struct DecodeGraphs {
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for DecodeGraphs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.cache.lock().map(|c| c.entries.len()).unwrap_or(0);
        f.debug_struct("DecodeGraphs").field("graphs", &n).finish()
    }
}

impl DecodeGraphs {
    /// Runs one decode step of `shape` with the input buffer `host`: replays its graph, or,
    /// on the [`RECORD_AT`]th step of a shape, runs `step` eagerly and then records it. `step`
    /// reads its inputs from the tensor it is given (`u32`, `shape.len()`) and returns the
    /// logits; it must not copy between host and device. Returns `None` for the steps before
    /// that, and where the shape's recording failed before: the caller then runs the step its
    /// own way.
    pub fn run(
        &self,
        device: &Device,
        shape: StepShape,
        host: &[u32],
        step: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        if host.len() != shape.len() {
            candle_core::bail!(
                "decode graph: {} inputs for a shape of {}",
                host.len(),
                shape.len()
            );
        }
        let Device::Cuda(cuda) = device else {
            return Ok(None);
        };
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::msg("decode graphs lock poisoned"))?;
        cache.clock += 1;
        let now = cache.clock;
        if let Some(entry) = cache.entries.iter_mut().find(|e| e.shape == shape) {
            entry.last_used = now;
            upload(&entry.inputs, host)?;
            entry.graph.launch().w()?;
            return entry.out.copy().map(Some);
        }
        if cache.failed.contains(&shape) {
            return Ok(None);
        }
        if cache.seen.len() > 4096 {
            cache.seen.clear();
        }
        let seen = cache.seen.entry(shape).or_insert(0);
        *seen += 1;
        if *seen < RECORD_AT {
            return Ok(None);
        }
        cache.seen.remove(&shape);

        let inputs = Tensor::zeros(host.len(), DType::U32, device)?;
        upload(&inputs, host)?;
        // Layout parameters that candle uploads for strided operations are cached by content
        // while this guard lives, so the recording finds them on the device.
        let _cached_params = cuda.enable_cuda_graph_htod_cache();
        let logits = step(&inputs)?;
        let out = logits.zeros_like()?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .w()?;
        let recorded = step(&inputs).and_then(|l| out.slice_set(&l, 0, 0));
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        match (recorded, graph) {
            (Ok(()), Ok(Some(graph))) => {
                if cache.entries.len() >= CAPACITY
                    && let Some(oldest) =
                        (0..cache.entries.len()).min_by_key(|&i| cache.entries[i].last_used)
                {
                    cache.entries.swap_remove(oldest);
                }
                tracing::debug!(
                    batch = shape.batch,
                    span = shape.span,
                    "decode step recorded as a CUDA graph"
                );
                cache.entries.push(Entry {
                    shape,
                    inputs,
                    out,
                    graph,
                    last_used: now,
                });
            }
            (recorded, graph) => {
                let why: String = match (recorded, graph) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "empty graph".to_string(),
                };
                tracing::warn!(
                    batch = shape.batch,
                    span = shape.span,
                    error = %why,
                    "recording a decode step as a CUDA graph failed; steps of this shape run without one"
                );
                cache.failed.insert(shape);
                cache.last_error = Some(why);
            }
        }
        Ok(Some(logits))
    }

    /// One line for reports: graphs held, shapes whose recording failed, and the last error.
    pub fn summary(&self) -> String {
        let Ok(c) = self.cache.lock() else {
            return "decode graphs: lock poisoned".to_string();
        };
        let mut line = format!(
            "{} held, {} shapes failed to record",
            c.entries.len(),
            c.failed.len()
        );
        if let Some(e) = &c.last_error {
            line.push_str(&format!(" (last error: {e})"));
        }
        line
    }
}

/// Copies `host` into the device buffer `t` (contiguous `u32`, from its start), ordered on the
/// device's stream before whatever is launched next.
fn upload(t: &Tensor, host: &[u32]) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("decode graph inputs must be on the GPU");
    };
    if layout.start_offset() != 0 || t.elem_count() != host.len() {
        candle_core::bail!("decode graph inputs: buffer and data disagree");
    }
    let slice = cs.as_cuda_slice::<u32>()?;
    let stream = cs.device().cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    // SAFETY: `ptr` addresses `host.len()` u32s of device memory that `t` owns and keeps alive;
    // a copy from pageable memory returns once `host` has been staged.
    unsafe { result::memcpy_htod_async(ptr, host, stream.cu_stream()) }.w()
}
