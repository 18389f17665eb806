//! The batched 8-bit CPU matmul ([`sluice_worker::kernels::qmm`]) at Qwen2.5-0.5B's shapes, for 1, 2, 4
//! and 8 activation rows (one decode step of that many sequences) and 64 rows (a prefill
//! chunk), on the engine's compute pool. `cargo bench -p sluice-worker --bench qmm`;
//! `SLUICE_CPU_KERNEL` (`avx2`, `avxvnni`, `avx512vnni`, `portable`) runs another kernel.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use sluice_worker::kernels::qmm::Q8Matrix;

fn weights(n: usize, k: usize) -> Q8Matrix {
    let mut seed = 1u32;
    let w: Vec<f32> = (0..n * k)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect();
    Q8Matrix::quantize(&w, n, k).expect("quantize")
}

fn bench(c: &mut Criterion) {
    // (name, output features, inputs): the MLP's up projection and its down projection.
    for (name, n, k) in [("ffn_up", 4864, 896), ("ffn_down", 896, 4864)] {
        let w = weights(n, k);
        let mut group = c.benchmark_group(format!("qmm/{name}"));
        for m in [1usize, 2, 4, 8, 64] {
            let x = vec![0.25f32; m * k];
            group.throughput(Throughput::Elements((m * n * k) as u64));
            group.bench_with_input(BenchmarkId::from_parameter(m), &m, |b, &m| {
                b.iter(|| w.matmul(&x, m).expect("matmul"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);

fn main() {
    // Inside the pool, as the engine runs its forward passes (`engine::compute_pool`).
    let pool = sluice_worker::engine::compute_pool().expect("compute pool");
    pool.install(benches);
    Criterion::default().configure_from_args().final_summary();
}
