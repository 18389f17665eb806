//! With the `cuda` feature, compiles Sluice's own CUDA kernels (`src/kernels/*.cu`) to PTX,
//! which the binary embeds and the driver compiles for the GPU at first use. The nvcc and the
//! architecture are the ones candle's kernels use (`NVCC`, else `CUDA_HOME/bin/nvcc`, else
//! `nvcc` on PATH; `CUDA_COMPUTE_CAP`, default 90). Without the feature it does nothing, so
//! the CPU build needs no CUDA.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for kernel in ["paged_attention", "fused"] {
        let src = format!("src/kernels/{kernel}.cu");
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--use_fast_math"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {src}");
    }
}
