// Decode attention over the paged KV pool, one kernel per layer for the whole batch.
//
// One block per (sequence, query head). The block reads the query head, scores it against the
// sequence's keys (row ids in `read`, the first `lens[b]` of its `span`), takes the softmax and
// the weighted sum of the values, all in f32 whatever the storage type. It replaces the gather,
// transposes, two matmuls, scale, mask and softmax of the generic path (eight launches per
// layer) and never touches padding rows.
//
// Layouts (all contiguous): q (b, H, D); k_pool and v_pool (rows, KVH * D); read (b, span) u32;
// lens (b) u32; out (b, H, D). Query head h reads KV head h / (H / KVH) (grouped-query
// attention). Dynamic shared memory: (D + span + blockDim.x) floats. Requires blockDim.x to be a
// multiple of D.

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

template <typename T>
__device__ void paged_decode_attention(const T* __restrict__ q, const T* __restrict__ k_pool,
                                       const T* __restrict__ v_pool,
                                       const uint32_t* __restrict__ read,
                                       const uint32_t* __restrict__ lens, T* __restrict__ out,
                                       int heads, int kv_heads, int head_dim, int span,
                                       float scale) {
  extern __shared__ float smem[];
  float* qs = smem;                    // head_dim
  float* scores = smem + head_dim;     // span
  float* scratch = scores + span;      // blockDim.x
  const int tid = threadIdx.x;
  const int nt = blockDim.x;
  const int b = blockIdx.x / heads;
  const int h = blockIdx.x % heads;
  const int kvh = h / (heads / kv_heads);
  const int len = min((int)lens[b], span);
  const size_t width = (size_t)kv_heads * head_dim;
  const uint32_t* rows = read + (size_t)b * span;

  const T* qh = q + ((size_t)b * heads + h) * head_dim;
  for (int i = tid; i < head_dim; i += nt) qs[i] = to_f32(qh[i]) * scale;
  __syncthreads();

  // Scores, one key per thread at a time.
  float local_max = -INFINITY;
  for (int j = tid; j < len; j += nt) {
    const T* k = k_pool + (size_t)rows[j] * width + (size_t)kvh * head_dim;
    float s = 0.f;
#pragma unroll 8
    for (int i = 0; i < head_dim; ++i) s = fmaf(qs[i], to_f32(k[i]), s);
    scores[j] = s;
    local_max = fmaxf(local_max, s);
  }
  scratch[tid] = local_max;
  __syncthreads();
  for (int stride = nt / 2; stride > 0; stride >>= 1) {
    if (tid < stride) scratch[tid] = fmaxf(scratch[tid], scratch[tid + stride]);
    __syncthreads();
  }
  const float m = scratch[0];
  __syncthreads();

  float local_sum = 0.f;
  for (int j = tid; j < len; j += nt) {
    const float e = __expf(scores[j] - m);
    scores[j] = e;
    local_sum += e;
  }
  scratch[tid] = local_sum;
  __syncthreads();
  for (int stride = nt / 2; stride > 0; stride >>= 1) {
    if (tid < stride) scratch[tid] += scratch[tid + stride];
    __syncthreads();
  }
  const float inv = 1.f / scratch[0];
  __syncthreads();

  // Weighted values: thread t sums dimension t % D over the keys j ≡ t / D (mod groups); the
  // threads of one key read its value row together (coalesced).
  const int groups = nt / head_dim;
  const int dim = tid % head_dim;
  const int group = tid / head_dim;
  float acc = 0.f;
  if (group < groups) {
    for (int j = group; j < len; j += groups) {
      const T* v = v_pool + (size_t)rows[j] * width + (size_t)kvh * head_dim;
      acc = fmaf(scores[j], to_f32(v[dim]), acc);
    }
  }
  scratch[tid] = acc;
  __syncthreads();
  if (tid < head_dim) {
    float total = 0.f;
    for (int g = 0; g < groups; ++g) total += scratch[g * head_dim + tid];
    store(out + ((size_t)b * heads + h) * head_dim + tid, total * inv);
  }
}

extern "C" __global__ void paged_decode_attention_bf16(
    const __nv_bfloat16* q, const __nv_bfloat16* k_pool, const __nv_bfloat16* v_pool,
    const uint32_t* read, const uint32_t* lens, __nv_bfloat16* out, int heads, int kv_heads,
    int head_dim, int span, float scale) {
  paged_decode_attention(q, k_pool, v_pool, read, lens, out, heads, kv_heads, head_dim, span,
                         scale);
}

extern "C" __global__ void paged_decode_attention_f32(const float* q, const float* k_pool,
                                                      const float* v_pool, const uint32_t* read,
                                                      const uint32_t* lens, float* out, int heads,
                                                      int kv_heads, int head_dim, int span,
                                                      float scale) {
  paged_decode_attention(q, k_pool, v_pool, read, lens, out, heads, kv_heads, head_dim, span,
                         scale);
}
