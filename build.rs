//! Build script: with the `cuda` feature, compiles `kernels/*.cu` to PTX for the GPU named by
//! `CUDA_COMPUTE_CAP` and records that capability for the start-up check in `src/device.rs`.
//! Without the feature it does nothing, so CPU builds need no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(e) = build_kernels() {
        // A build script reports failure by exiting non-zero; the message is what the user sees.
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build_kernels() -> Result<(), String> {
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");

    let cap = compute_cap()?;
    println!("cargo::rustc-env=TURBINE_CUDA_COMPUTE_CAP={cap}");

    let nvcc = find_nvcc();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map_err(|e| format!("reading kernels/: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        compile_ptx(&nvcc, src, &out_dir, cap)?;
    }
    Ok(())
}

/// The target GPU's compute capability as a number like 90 (from `90`, `90a`, `9.0` or `sm_90`):
/// `CUDA_COMPUTE_CAP`, else the first GPU `nvidia-smi` reports. No guessing beyond that: PTX built
/// for the wrong capability fails at start-up, far from the build that caused it.
fn compute_cap() -> Result<u32, String> {
    if let Ok(s) = std::env::var("CUDA_COMPUTE_CAP") {
        return parse_cap(&s).ok_or_else(|| {
            format!("CUDA_COMPUTE_CAP={s:?} is not a compute capability (expected e.g. 90 or 89)")
        });
    }
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output();
    if let Ok(out) = smi {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(cap) = text.lines().next().and_then(parse_cap) {
                return Ok(cap);
            }
        }
    }
    Err(
        "the `cuda` feature needs the target GPU's compute capability: set CUDA_COMPUTE_CAP \
         (90 for H100/H200, 89 for RTX 4090/L40, 80 for A100); nvidia-smi was not available \
         to detect it"
            .to_string(),
    )
}

fn parse_cap(s: &str) -> Option<u32> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_prefix("sm_").unwrap_or(&s);
    let s = s.trim_end_matches(['a', 'f']);
    let cap: u32 = if let Some((major, minor)) = s.split_once('.') {
        major.parse::<u32>().ok()? * 10 + minor.parse::<u32>().ok()?
    } else {
        s.parse().ok()?
    };
    (30..=200).contains(&cap).then_some(cap)
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let candidate = Path::new(&home).join("bin").join("nvcc");
        if candidate.exists() {
            return candidate;
        }
    }
    "nvcc".into()
}

/// PTX for `compute_{cap}` (not the `a` variant: these kernels use no arch-specific features,
/// and plain PTX also JITs on later GPUs should the start-up check ever be relaxed).
fn compile_ptx(nvcc: &Path, src: &Path, out_dir: &Path, cap: u32) -> Result<(), String> {
    let stem = src
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("bad kernel file name {}", src.display()))?;
    let out = out_dir.join(format!("{stem}.ptx"));
    let status = Command::new(nvcc)
        .arg("--ptx")
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .args(["-O3", "-std=c++17", "-Ikernels", "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .map_err(|e| {
            format!(
                "running {} for {}: {e} (install the toolkit with scripts/setup_cuda_toolkit.sh \
                 and `source target/cuda13/env.sh`, or set NVCC)",
                nvcc.display(),
                src.display()
            )
        })?;
    if !status.success() {
        return Err(format!("nvcc failed on {} ({status})", src.display()));
    }
    Ok(())
}
