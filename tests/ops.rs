//! The fused ops of `turbine::ops` against plain compositions of candle ops, on the CPU (the
//! reference implementations) and, when this test binary has CUDA and a GPU, on CUDA (our kernels).
//!
//! Inputs are random and fresh every run (the seed is printed; `TURBINE_TEST_SEED` replays one),
//! never zero, and every op's output buffer is poisoned with NaN before the op runs, so an element
//! a kernel forgets to write fails the comparison. The composition runs in f32 on the CPU from the
//! same (already rounded) inputs; errors are max|got - want| / max|want|.
//!
//! Without a GPU the CUDA half prints "CUDA half skipped: no GPU" on stderr;
//! `TURBINE_REQUIRE_GPU=1` (set by scripts/gpu_check.sh) turns that into a failure.
//! gpu_check.sh also sets `TURBINE_KERNELS=all,-conv-graph`, the default kernel set of tests that
//! do not choose one, so that cuDNN graph-API plans run only in their own test.

use std::io::Write;

use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, SeedableRng};
use turbine::ops;

/// Relative error bounds by dtype: f32 from the brief (1e-5); bf16 (8-bit mantissa) 1e-2; f16
/// (11-bit mantissa) 2e-3.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1e-2,
        other => panic!("no tolerance for {other:?}"),
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The devices to test: the CPU, and CUDA when the binary was built with it and a GPU answers.
fn devices(test: &str) -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    let cuda = if candle_core::utils::cuda_is_available() {
        // The first line only: candle appends a backtrace.
        Device::new_cuda(0).map_err(|e| {
            let e = e.to_string();
            format!("no GPU ({})", e.lines().next().unwrap_or_default())
        })
    } else {
        Err("no GPU (built without the `cuda` feature)".to_string())
    };
    match cuda {
        Ok(dev) => devices.push(dev),
        Err(why) => {
            if std::env::var("TURBINE_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: TURBINE_REQUIRE_GPU=1 but {why}");
            }
            // Written to the stream directly: the test harness captures println!/eprintln! of
            // passing tests, and this line must be seen.
            let _ = writeln!(std::io::stderr(), "{test}: CUDA half skipped: {why}");
        }
    }
    devices
}

fn rng(test: &str) -> rand::rngs::StdRng {
    let seed = match std::env::var("TURBINE_TEST_SEED") {
        Ok(s) => s.parse().expect("TURBINE_TEST_SEED must be an integer"),
        Err(_) => rand::rng().random(),
    };
    let _ = writeln!(std::io::stderr(), "{test}: seed {seed}");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random values with magnitude in [0.05, 2) and random sign, plus `offset`: never zero.
fn random(rng: &mut impl Rng, shape: &[usize], offset: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let m: f32 = rng.random_range(0.05..2.0);
            let v = if rng.random::<bool>() { m } else { -m };
            v + offset
        })
        .collect();
    assert!(data.iter().all(|v| *v != 0.0));
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Rounds an f32 CPU tensor to `dtype` and moves it to `dev`; also returns the rounded values in
/// f32 on the CPU, the composition's input.
fn place(t: &Tensor, dtype: DType, dev: &Device) -> (Tensor, Tensor) {
    let rounded = t.to_dtype(dtype).unwrap();
    let exact = rounded.to_dtype(DType::F32).unwrap();
    (rounded.to_device(dev).unwrap(), exact)
}

/// Fills the device's allocator with a NaN buffer of the output's size and frees it, so an
/// output allocated next likely starts as NaN rather than as a previous run's results. (The CPU
/// references allocate their outputs NaN-filled themselves.)
fn poison(dev: &Device, elems: usize, dtype: DType) {
    if dev.is_cuda() {
        let t = Tensor::full(f32::NAN, elems, dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        dev.synchronize().unwrap();
        drop(t);
    }
}

fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (got, want) = (host_f32(got), host_f32(want));
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (not written?)", got[i]);
    }
    let (rel, worst, at) = worst_err(&got, &want);
    let _ = writeln!(
        std::io::stderr(),
        "{what}: rel err {rel:.2e} (max abs {worst:.2e} at {at}, bound {tol:.0e})"
    );
    assert!(
        rel <= tol,
        "{what}: rel err {rel:.3e} > {tol:.0e} (element {at}: got {}, want {})",
        got[at],
        want[at]
    );
}

/// The largest absolute difference between `got` and `want` relative to `want`'s largest
/// magnitude (as [`assert_close`] measures it).
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let (got, want) = (host_f32(got), host_f32(want));
    assert_eq!(got.len(), want.len());
    worst_err(&got, &want).0
}

/// `t`'s elements as f32 on the host, flattened.
fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// (largest absolute difference relative to `want`'s largest magnitude, that difference, its
/// first index).
fn worst_err(got: &[f32], want: &[f32]) -> (f64, f64, usize) {
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let (mut worst, mut at) = (0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - *w as f64).abs();
        if e > worst {
            (worst, at) = (e, i);
        }
    }
    (worst / scale.max(1e-12), worst, at)
}

fn dev_name(dev: &Device) -> &'static str {
    if dev.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

// ---- GroupNorm ----

/// torch's F.group_norm (+ F.silu) as plain candle ops in f32.
fn group_norm_composed(
    x: &Tensor,
    groups: usize,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    silu: bool,
) -> Tensor {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let xs = x.reshape((n, groups, ())).unwrap();
    let mean = xs.mean_keepdim(2).unwrap();
    let centered = xs.broadcast_sub(&mean).unwrap();
    let var = centered.sqr().unwrap().mean_keepdim(2).unwrap();
    let normed = centered
        .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .reshape(dims.as_slice())
        .unwrap();
    let mut wshape = vec![1; dims.len()];
    wshape[1] = c;
    let y = normed
        .broadcast_mul(&w.reshape(wshape.as_slice()).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape(wshape.as_slice()).unwrap())
        .unwrap();
    if silu {
        candle_nn::ops::silu(&y).unwrap()
    } else {
        y
    }
}

#[test]
fn group_norm_matches_composition() {
    let mut rng = rng("group_norm");
    // (shape, groups): SDXL-like 4D, odd spatial sizes, rank 3 and rank 2 (HW = 1), groups large
    // enough for several statistics blocks (> 8192 elements) and planes for several apply blocks
    // (HW > 4096) on CUDA.
    let cases: [(&[usize], usize); 7] = [
        (&[2, 32, 8, 8], 8),
        (&[1, 64, 16, 16], 32),
        (&[3, 12, 5, 7], 4),
        (&[2, 40, 33], 8),
        (&[4, 16], 4),
        (&[1, 128, 48, 48], 32),
        (&[1, 8, 96, 96], 2),
    ];
    for dev in devices("group_norm") {
        for (shape, groups) in cases {
            let c = shape[1];
            // A mean far from zero exercises the variance's cancellation guard.
            let x = random(&mut rng, shape, 3.0);
            let w = random(&mut rng, &[c], 0.0);
            let b = random(&mut rng, &[c], 0.0);
            for dtype in DTYPES {
                for silu in [false, true] {
                    let (xd, xe) = place(&x, dtype, &dev);
                    let (wd, we) = place(&w, dtype, &dev);
                    let (bd, be) = place(&b, dtype, &dev);
                    let want = group_norm_composed(&xe, groups, &we, &be, 1e-5, silu);
                    poison(&dev, x.elem_count(), dtype);
                    let got = ops::group_norm(&xd, groups, &wd, &bd, 1e-5, silu).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let what = format!(
                        "group_norm {} {dtype:?} {shape:?} groups={groups} silu={silu}",
                        dev_name(&dev)
                    );
                    assert_close(&got, &want, tolerance(dtype), &what);
                }
            }
        }
    }
}

#[test]
fn group_norm_accepts_strided_input_and_other_weight_dtype() {
    let mut rng = rng("group_norm strided");
    for dev in devices("group_norm strided") {
        // [N, H, W, C] transposed to [N, C, W, H]: not contiguous.
        let x = random(&mut rng, &[2, 6, 5, 16], 0.5)
            .permute((0, 3, 2, 1))
            .unwrap();
        let w = random(&mut rng, &[16], 0.0);
        let b = random(&mut rng, &[16], 0.0);
        let want = group_norm_composed(&x.contiguous().unwrap(), 4, &w, &b, 1e-6, true);
        let (xd, _) = place(&x, DType::F32, &dev);
        // f32 input, bf16 weights: the op casts the weights to the input's dtype.
        let wd = w.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let bd = b.to_dtype(DType::BF16).unwrap().to_device(&dev).unwrap();
        let got = ops::group_norm(&xd, 4, &wd, &bd, 1e-6, true).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        // Weights rounded to bf16 bound the error, not the f32 arithmetic.
        assert_close(
            &got,
            &want,
            1e-2,
            &format!("group_norm strided {}", dev_name(&dev)),
        );
    }
}

#[test]
fn group_norm_rejects_bad_arguments() {
    let x = Tensor::ones((2, 12, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(12, DType::F32, &Device::Cpu).unwrap();
    let bad_w = Tensor::ones(10, DType::F32, &Device::Cpu).unwrap();
    let err = ops::group_norm(&x, 5, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("5 groups do not divide the input's 12 channels"),
        "{err}"
    );
    let err = ops::group_norm(&x, 0, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("0 groups"), "{err}");
    let err = ops::group_norm(&x, 4, &bad_w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight has shape [10]"), "{err}");
    let err = ops::group_norm(&x, 4, &w, &bad_w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias has shape [10]"), "{err}");
    let flat = Tensor::ones(12, DType::F32, &Device::Cpu).unwrap();
    let err = ops::group_norm(&flat, 4, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be [N, C, ...]"), "{err}");
}

// ---- GEGLU ----

fn geglu_composed(x: &Tensor) -> Tensor {
    let d = x.dim(D::Minus1).unwrap() / 2;
    let a = x.narrow(D::Minus1, 0, d).unwrap();
    let gate = x.narrow(D::Minus1, d, d).unwrap();
    (a * gate.gelu_erf().unwrap()).unwrap()
}

#[test]
fn geglu_matches_composition() {
    let mut rng = rng("geglu");
    // Widths below, at and above one 256-thread column block, and SDXL's 4·640 projection.
    let cases: [&[usize]; 5] = [&[2, 7, 80], &[3, 640], &[1, 5, 600], &[20], &[2, 9, 5120]];
    for dev in devices("geglu") {
        for shape in cases {
            let x = random(&mut rng, shape, 0.0);
            for dtype in DTYPES {
                let (xd, xe) = place(&x, dtype, &dev);
                let want = geglu_composed(&xe);
                poison(&dev, x.elem_count() / 2, dtype);
                let got = ops::geglu(&xd).unwrap();
                assert_eq!(got.dtype(), dtype);
                let what = format!("geglu {} {dtype:?} {shape:?}", dev_name(&dev));
                assert_close(&got, &want, tolerance(dtype), &what);
            }
        }
    }
}

#[test]
fn geglu_bias_matches_composition() {
    // The projection's bias added inside the op: against the bias add then GEGLU, in f32 from
    // the same rounded inputs; the bias also in another dtype than the input (converted).
    let mut rng = rng("geglu_bias");
    let cases: [&[usize]; 4] = [&[2, 7, 80], &[1, 5, 600], &[20], &[2, 9, 5120]];
    for dev in devices("geglu_bias") {
        for shape in cases {
            let x = random(&mut rng, shape, 0.0);
            let bias = random(&mut rng, &shape[shape.len() - 1..], 0.0);
            for dtype in DTYPES {
                let (xd, xe) = place(&x, dtype, &dev);
                let (bd, be) = place(&bias, dtype, &dev);
                let want = geglu_composed(&xe.broadcast_add(&be).unwrap());
                for (label, b) in [
                    ("same dtype", bd.clone()),
                    ("f32 bias", be.to_device(&dev).unwrap()),
                ] {
                    poison(&dev, x.elem_count() / 2, dtype);
                    let got = ops::geglu_bias(&xd, &b).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let what = format!("geglu_bias {} {dtype:?} {shape:?} {label}", dev_name(&dev));
                    assert_close(&got, &want, tolerance(dtype), &what);
                }
            }
        }
    }
}

#[test]
fn geglu_rejects_odd_width() {
    let x = Tensor::ones((2, 7), DType::F32, &Device::Cpu).unwrap();
    let err = ops::geglu(&x).unwrap_err().to_string();
    assert!(err.contains("must be even"), "{err}");
    let b = Tensor::ones(7, DType::F32, &Device::Cpu).unwrap();
    let err = ops::geglu_bias(&x, &b).unwrap_err().to_string();
    assert!(err.contains("must be even"), "{err}");
    let x = Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap();
    let err = ops::geglu_bias(&x, &b).unwrap_err().to_string();
    assert!(err.contains("bias has shape [7], expected [8]"), "{err}");
}

// ---- Attention ----

fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Tensor {
    let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    if causal {
        let (lq, lk) = (q.dim(D::Minus2).unwrap(), k.dim(D::Minus2).unwrap());
        let mask: Vec<f32> = (0..lq * lk)
            .map(|i| {
                if i % lk > i / lk {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        s = s
            .broadcast_add(&Tensor::from_vec(mask, (lq, lk), &Device::Cpu).unwrap())
            .unwrap();
    }
    candle_nn::ops::softmax(&s, D::Minus1)
        .unwrap()
        .matmul(v)
        .unwrap()
}

/// (batch, heads, Lq, Lk, D, Dv, causal)
type AttnCase = (usize, usize, usize, usize, usize, usize, bool);

const ATTN_CASES: [AttnCase; 6] = [
    (2, 3, 17, 17, 64, 64, false), // self-attention, head dim 64
    (2, 3, 17, 17, 64, 64, true),  // CLIP-style causal
    (1, 2, 33, 77, 64, 64, false), // cross-attention onto 77 text tokens
    (2, 2, 40, 9, 8, 8, false),    // small head dim, fewer keys than a warp
    (1, 2, 6, 11, 16, 24, true),   // Lq < Lk causal, Dv != D
    (1, 2, 130, 300, 64, 64, false),
];

fn run_attention(
    rng: &mut rand::rngs::StdRng,
    dev: &Device,
    (b, h, lq, lk, d, dv, causal): AttnCase,
    apply: impl Fn(&Tensor, &Tensor, &Tensor, f64, bool) -> Tensor,
    label: &str,
) {
    let scale = 1.0 / (d as f64).sqrt();
    let q = random(rng, &[b, h, lq, d], 0.0);
    let k = random(rng, &[b, h, lk, d], 0.0);
    let v = random(rng, &[b, h, lk, dv], 0.0);
    for dtype in DTYPES {
        let (qd, qe) = place(&q, dtype, dev);
        let (kd, ke) = place(&k, dtype, dev);
        let (vd, ve) = place(&v, dtype, dev);
        let want = attention_composed(&qe, &ke, &ve, scale, causal);
        poison(dev, b * h * lq * dv, dtype);
        let got = apply(&qd, &kd, &vd, scale, causal);
        assert_eq!(got.dtype(), dtype);
        let what = format!(
            "{label} {} {dtype:?} b={b} h={h} lq={lq} lk={lk} d={d} dv={dv} causal={causal}",
            dev_name(dev)
        );
        assert_close(&got, &want, tolerance(dtype), &what);
    }
}

#[test]
fn fused_attention_matches_composition() {
    let mut rng = rng("fused_attention");
    for dev in devices("fused_attention") {
        for case in ATTN_CASES {
            let op = |q: &Tensor, k: &Tensor, v: &Tensor, s, c| {
                ops::fused_attention(q, k, v, s, c).unwrap()
            };
            run_attention(&mut rng, &dev, case, op, "fused_attention");
        }
    }
}

#[test]
fn attention_matches_composition() {
    let mut rng = rng("attention");
    for dev in devices("attention") {
        for case in ATTN_CASES {
            let op =
                |q: &Tensor, k: &Tensor, v: &Tensor, s, c| ops::attention(q, k, v, s, c).unwrap();
            run_attention(&mut rng, &dev, case, op, "attention");
        }
    }
}

#[test]
fn fused_attention_in_chunks_matches_composition() {
    // A scores budget of three (batch·head) slices forces the CUDA path through several chunks,
    // the last one partial (8 slices = 3 + 3 + 2).
    let mut rng = rng("attention chunks");
    for dev in devices("attention chunks") {
        let (lq, lk) = (20, 30);
        let op = ops::AttentionOp {
            scale: 0.125,
            causal: false,
            chunk_bytes: 3 * lq * lk * (4 + 4),
        };
        let apply =
            |q: &Tensor, k: &Tensor, v: &Tensor, _s, _c| q.apply_op3_no_bwd(k, v, &op).unwrap();
        run_attention(
            &mut rng,
            &dev,
            (2, 4, lq, lk, 64, 64, false),
            apply,
            "attention chunks",
        );
    }
}

#[test]
fn attention_rejects_mismatched_shapes() {
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let err = ops::attention(
        &t(&[2, 3, 4, 8]),
        &t(&[2, 3, 5, 7]),
        &t(&[2, 3, 5, 8]),
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("head dim 7"), "{err}");
    let err = ops::attention(
        &t(&[2, 3, 4, 8]),
        &t(&[2, 3, 5, 8]),
        &t(&[2, 3, 6, 8]),
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("has 6 positions"), "{err}");
    let err = ops::attention(
        &t(&[2, 3, 4, 8]),
        &t(&[2, 4, 5, 8]),
        &t(&[2, 4, 5, 8]),
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("leading (batch, head) dims"), "{err}");
    let half = Tensor::ones((2, 3, 5, 8), DType::F16, &Device::Cpu).unwrap();
    let err = ops::attention(&t(&[2, 3, 4, 8]), &half, &half, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must share a dtype"), "{err}");
}

// ---- Bias + residual ----

/// `y + bias + residual` as plain candle ops in f32, `bias` broadcast as numpy would.
fn bias_residual_composed(y: &Tensor, bias: &Tensor, residual: &Tensor) -> Tensor {
    (y.broadcast_add(bias).unwrap() + residual).unwrap()
}

#[test]
fn bias_residual_matches_composition() {
    let mut rng = rng("bias_residual");
    // (y shape, bias shape): a Linear's output with rows narrower and wider than a 256-thread
    // block (bias on the last dim), and NCHW-like per-channel biases whose planes span one and
    // several 4096-element chunks on CUDA.
    let cases: [(&[usize], &[usize]); 6] = [
        (&[2, 7, 40], &[40]),
        (&[3, 640], &[640]),
        (&[1, 5, 1280], &[1280]),
        (&[2, 5, 33], &[5, 1]),
        (&[1, 3, 90, 90], &[3, 1, 1]),
        (&[6], &[6]),
    ];
    for dev in devices("bias_residual") {
        for (shape, bias_shape) in cases {
            let y = random(&mut rng, shape, 0.0);
            let b = random(&mut rng, bias_shape, 0.0);
            let r = random(&mut rng, shape, 0.0);
            for dtype in DTYPES {
                let (yd, ye) = place(&y, dtype, &dev);
                let (bd, be) = place(&b, dtype, &dev);
                let (rd, re) = place(&r, dtype, &dev);
                let want = bias_residual_composed(&ye, &be, &re);
                poison(&dev, y.elem_count(), dtype);
                let got = ops::bias_residual(&yd, &bd, &rd).unwrap();
                assert_eq!(got.dtype(), dtype);
                let what = format!(
                    "bias_residual {} {dtype:?} {shape:?} bias {bias_shape:?}",
                    dev_name(&dev)
                );
                assert_close(&got, &want, tolerance(dtype), &what);
            }
        }
    }
}

#[test]
fn bias_residual_accepts_strided_input_and_other_bias_dtype() {
    let mut rng = rng("bias_residual strided");
    for dev in devices("bias_residual strided") {
        // y transposed [B, C, S] -> [B, S, C]: not contiguous; the bias in bf16 for f32 data.
        let y = random(&mut rng, &[2, 24, 9], 0.0).transpose(1, 2).unwrap();
        let r = random(&mut rng, &[2, 9, 24], 0.0);
        let b = random(&mut rng, &[24], 0.0).to_dtype(DType::BF16).unwrap();
        let want = bias_residual_composed(
            &y.contiguous().unwrap(),
            &b.to_dtype(DType::F32).unwrap(),
            &r,
        );
        let (yd, _) = place(&y, DType::F32, &dev);
        let (rd, _) = place(&r, DType::F32, &dev);
        let got = ops::bias_residual(&yd, &b.to_device(&dev).unwrap(), &rd).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let what = format!("bias_residual strided {}", dev_name(&dev));
        assert_close(&got, &want, tolerance(DType::F32), &what);
    }
}

#[test]
fn bias_residual_rejects_bad_arguments() {
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let err = |y: &[usize], b: &[usize], r: &[usize]| {
        ops::bias_residual(&t(y), &t(b), &t(r))
            .unwrap_err()
            .to_string()
    };
    let e = err(&[2, 3, 4], &[4], &[2, 3, 5]);
    assert!(e.contains("differ in shape"), "{e}");
    let e = err(&[2, 3, 4], &[3], &[2, 3, 4]);
    assert!(e.contains("does not broadcast onto y [2, 3, 4]"), "{e}");
    let e = err(&[2, 3, 4], &[3, 4], &[2, 3, 4]);
    assert!(e.contains("[C] or [C, 1, ..., 1]"), "{e}");
    let half = Tensor::ones((2, 3), DType::F16, &Device::Cpu).unwrap();
    let e = ops::bias_residual(&t(&[2, 3]), &t(&[3]), &half)
        .unwrap_err()
        .to_string();
    assert!(e.contains("residual has dtype F16"), "{e}");
}

// ---- Multi-head attention on interleaved heads ----

/// `[B, L, H*D]` to `[B, H, L, D]` and back, for the composition.
fn heads_apart(x: &Tensor, heads: usize) -> Tensor {
    let (b, l, w) = x.dims3().unwrap();
    x.reshape((b, l, heads, w / heads))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
}

fn heads_together(x: &Tensor) -> Tensor {
    let (b, h, l, d) = x.dims4().unwrap();
    x.transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, l, h * d))
        .unwrap()
}

/// (batch, heads, Lq, Lk, D, Dv, causal, chunk_bytes: None for the default)
type MhaCase = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    bool,
    Option<usize>,
);

/// Runs `apply` on `[B, L, H*D]` inputs and compares with the composition on split heads.
fn run_multi_head(
    rng: &mut rand::rngs::StdRng,
    dev: &Device,
    (b, h, lq, lk, d, dv, causal, _): MhaCase,
    apply: impl Fn(&Tensor, &Tensor, &Tensor, f64, bool) -> Tensor,
    label: &str,
) {
    let scale = 1.0 / (d as f64).sqrt();
    let q = random(rng, &[b, lq, h * d], 0.0);
    let k = random(rng, &[b, lk, h * d], 0.0);
    let v = random(rng, &[b, lk, h * dv], 0.0);
    for dtype in DTYPES {
        let (qd, qe) = place(&q, dtype, dev);
        let (kd, ke) = place(&k, dtype, dev);
        let (vd, ve) = place(&v, dtype, dev);
        let want = heads_together(&attention_composed(
            &heads_apart(&qe, h),
            &heads_apart(&ke, h),
            &heads_apart(&ve, h),
            scale,
            causal,
        ));
        poison(dev, b * lq * h * dv, dtype);
        let got = apply(&qd, &kd, &vd, scale, causal);
        assert_eq!(got.dtype(), dtype);
        let what = format!(
            "{label} {} {dtype:?} b={b} h={h} lq={lq} lk={lk} d={d} dv={dv} causal={causal}",
            dev_name(dev)
        );
        assert_close(&got, &want, tolerance(dtype), &what);
    }
}

const MHA_CASES: [MhaCase; 10] = [
    (2, 3, 17, 17, 64, 64, false, None), // self-attention, head dim 64
    (2, 3, 17, 17, 64, 64, true, None),  // CLIP-style causal
    (1, 5, 33, 77, 64, 64, false, None), // cross-attention onto 77 text tokens
    (3, 2, 40, 9, 8, 8, false, None),    // batch > 2, few keys
    (4, 3, 10, 12, 16, 16, true, None),  // batch > 2, causal
    (1, 2, 6, 11, 16, 24, true, None),   // Lq < Lk causal, Dv != D
    (2, 1, 50, 50, 32, 32, false, None), // one head: the images are the GEMM batch
    // Scores budget of 2 slices of 20x30 (f32 + f16/bf16 probabilities): chunks of heads.
    (2, 5, 20, 30, 16, 16, false, Some(2 * 20 * 30 * 8)),
    // Budget of 7 query rows (of 30 keys): row chunks of one slice, the last one partial, with
    // the causal mask offset by each chunk's first row.
    (2, 3, 20, 30, 16, 8, true, Some(7 * 30 * 8)),
    (3, 1, 20, 20, 16, 16, true, Some(6 * 20 * 8)),
];

#[test]
fn fused_multi_head_attention_matches_composition() {
    let mut rng = rng("fused_multi_head_attention");
    for dev in devices("fused_multi_head_attention") {
        for case in MHA_CASES {
            let (_, heads, .., chunk_bytes) = case;
            let apply = |q: &Tensor, k: &Tensor, v: &Tensor, scale, causal| match chunk_bytes {
                None => ops::fused_multi_head_attention(q, k, v, heads, scale, causal).unwrap(),
                Some(chunk_bytes) => {
                    let op = ops::MultiHeadAttentionOp {
                        heads,
                        attention: ops::AttentionOp {
                            scale,
                            causal,
                            chunk_bytes,
                        },
                    };
                    q.apply_op3_no_bwd(k, v, &op).unwrap()
                }
            };
            run_multi_head(&mut rng, &dev, case, apply, "fused_multi_head_attention");
        }
    }
}

#[test]
fn multi_head_attention_matches_composition() {
    // The dispatching entry point: on CUDA the interleaved op, or for small problems at batch > 2
    // with several heads the op on heads copied apart (the two "batch > 2" cases of MHA_CASES);
    // on the CPU the composition.
    let mut rng = rng("multi_head_attention");
    for dev in devices("multi_head_attention") {
        for case in MHA_CASES {
            let heads = case.1;
            let apply = |q: &Tensor, k: &Tensor, v: &Tensor, scale, causal| {
                ops::multi_head_attention(q, k, v, heads, scale, causal).unwrap()
            };
            run_multi_head(&mut rng, &dev, case, apply, "multi_head_attention");
            let composed = |q: &Tensor, k: &Tensor, v: &Tensor, scale, causal| {
                ops::multi_head_attention_composed(q, k, v, heads, scale, causal).unwrap()
            };
            run_multi_head(
                &mut rng,
                &dev,
                case,
                composed,
                "multi_head_attention_composed",
            );
        }
    }
}

#[test]
fn fused_attention_in_row_chunks_matches_composition() {
    // A scores budget below one (batch·head) slice: query rows in chunks of 6 (of 20), causal,
    // through the split-layout op.
    let mut rng = rng("attention row chunks");
    for dev in devices("attention row chunks") {
        let (lq, lk) = (20, 24);
        let apply = |q: &Tensor, k: &Tensor, v: &Tensor, scale, causal| {
            let op = ops::AttentionOp {
                scale,
                causal,
                chunk_bytes: 6 * lk * (4 + 4),
            };
            q.apply_op3_no_bwd(k, v, &op).unwrap()
        };
        run_attention(
            &mut rng,
            &dev,
            (2, 2, lq, lk, 32, 16, true),
            apply,
            "attention row chunks",
        );
        let composed = |q: &Tensor, k: &Tensor, v: &Tensor, s, c| {
            ops::attention_composed(q, k, v, s, c).unwrap()
        };
        run_attention(
            &mut rng,
            &dev,
            (2, 2, lq, lk, 32, 16, true),
            composed,
            "attention_composed",
        );
    }
}

#[test]
fn multi_head_attention_rejects_bad_heads() {
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let e = ops::multi_head_attention(
        &t(&[2, 4, 12]),
        &t(&[2, 5, 12]),
        &t(&[2, 5, 12]),
        5,
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a multiple of 5 heads"), "{e}");
    let e = ops::multi_head_attention(
        &t(&[2, 4, 12]),
        &t(&[2, 5, 12]),
        &t(&[2, 5, 12]),
        0,
        1.0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("heads must be at least 1"), "{e}");
    let e = ops::multi_head_attention(&t(&[4, 12]), &t(&[5, 12]), &t(&[5, 12]), 2, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be [B, L, heads * D]"), "{e}");
}

// ---- Convolution ----

/// One convolution case: input `[n, c, h, w]` (NCHW sizes), `o` outputs, a `k`x`k` kernel.
#[derive(Debug, Clone, Copy)]
struct ConvCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    padding: usize,
    stride: usize,
    residual: bool,
}

/// 1x1 and 3x3, padding 0/1, stride 1/2, odd sizes and channel counts, with and without residual.
const CONV_CASES: [ConvCase; 7] = [
    ConvCase {
        n: 2,
        c: 8,
        h: 9,
        w: 7,
        o: 16,
        k: 3,
        padding: 1,
        stride: 1,
        residual: true,
    },
    ConvCase {
        n: 1,
        c: 5,
        h: 11,
        w: 13,
        o: 3,
        k: 3,
        padding: 1,
        stride: 1,
        residual: false,
    },
    ConvCase {
        n: 2,
        c: 16,
        h: 8,
        w: 8,
        o: 8,
        k: 1,
        padding: 0,
        stride: 1,
        residual: true,
    },
    ConvCase {
        n: 3,
        c: 7,
        h: 6,
        w: 5,
        o: 9,
        k: 1,
        padding: 0,
        stride: 1,
        residual: false,
    },
    ConvCase {
        n: 2,
        c: 8,
        h: 9,
        w: 10,
        o: 8,
        k: 3,
        padding: 1,
        stride: 2,
        residual: false,
    },
    ConvCase {
        n: 1,
        c: 6,
        h: 10,
        w: 9,
        o: 4,
        k: 3,
        padding: 0,
        stride: 2,
        residual: true,
    },
    ConvCase {
        n: 2,
        c: 4,
        h: 7,
        w: 7,
        o: 6,
        k: 3,
        padding: 0,
        stride: 1,
        residual: true,
    },
];

/// NCHW `[n, c, h, w]` → `[n, h, w, c]` (also weight `[o, c, k, k]` → KRSC `[o, k, k, c]`).
fn to_channels_last(t: &Tensor) -> Tensor {
    t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
}

/// The case's random f32 tensors in NCHW: x, weight, bias, residual.
fn conv_inputs(rng: &mut rand::rngs::StdRng, k: &ConvCase) -> [Tensor; 4] {
    let (oh, ow) = (
        (k.h + 2 * k.padding - k.k) / k.stride + 1,
        (k.w + 2 * k.padding - k.k) / k.stride + 1,
    );
    [
        random(rng, &[k.n, k.c, k.h, k.w], 0.0),
        random(rng, &[k.o, k.c, k.k, k.k], 0.0),
        random(rng, &[k.o], 0.0),
        random(rng, &[k.n, k.o, oh, ow], 0.0),
    ]
}

/// `conv(x, w) + bias (+ residual)` with candle's ops in f32 on the CPU, NCHW.
fn conv_composed(x: &Tensor, w: &Tensor, b: &Tensor, r: Option<&Tensor>, k: &ConvCase) -> Tensor {
    let y = x
        .conv2d(w, k.padding, k.stride, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
        .unwrap();
    match r {
        Some(r) => (y + r).unwrap(),
        None => y,
    }
}

/// Runs `ops::conv2d` on `dev` for one case, dtype and layout; compares with the composition
/// from the same rounded inputs.
fn check_conv(
    dev: &Device,
    inputs: &[Tensor; 4],
    case: &ConvCase,
    dtype: DType,
    channels_last: bool,
    tol: f64,
    label: &str,
) {
    let [x, w, b, r] = inputs;
    let (xd, xe) = place(x, dtype, dev);
    let (wd, we) = place(w, dtype, dev);
    let (bd, be) = place(b, dtype, dev);
    let (rd, re) = place(r, dtype, dev);
    let mut want = conv_composed(&xe, &we, &be, case.residual.then_some(&re), case);
    let (xd, wd, rd) = if channels_last {
        want = to_channels_last(&want);
        (
            to_channels_last(&xd),
            to_channels_last(&wd),
            to_channels_last(&rd),
        )
    } else {
        (xd, wd, rd)
    };
    let params = ops::ConvParams {
        padding: case.padding,
        stride: case.stride,
        channels_last,
    };
    poison(dev, want.elem_count(), dtype);
    let got = ops::conv2d(&xd, &wd, &bd, case.residual.then_some(&rd), params).unwrap();
    assert_eq!(got.dtype(), dtype);
    let what = format!(
        "{label} {} {dtype:?} channels_last={channels_last} {case:?}",
        dev_name(dev)
    );
    assert_close(&got, &want, tol, &what);
}

#[test]
fn conv2d_matches_composition_on_cpu() {
    let mut rng = rng("conv2d cpu");
    for case in CONV_CASES {
        let inputs = conv_inputs(&mut rng, &case);
        for dtype in DTYPES {
            for channels_last in [false, true] {
                check_conv(
                    &Device::Cpu,
                    &inputs,
                    &case,
                    dtype,
                    channels_last,
                    tolerance(dtype),
                    "conv2d",
                );
            }
        }
    }
}

#[test]
fn conv2d_composed_equals_op_on_cpu() {
    // On the CPU the op is the composition; the public baseline must be the very same numbers.
    let mut rng = rng("conv2d composed");
    let case = CONV_CASES[0];
    let [x, w, b, r] = conv_inputs(&mut rng, &case);
    let (x, w, r) = (
        to_channels_last(&x),
        to_channels_last(&w),
        to_channels_last(&r),
    );
    let p = ops::ConvParams {
        padding: 1,
        stride: 1,
        channels_last: true,
    };
    for dtype in DTYPES {
        let t = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let a = ops::conv2d(&t(&x), &t(&w), &b, Some(&t(&r)), p).unwrap();
        let c = ops::conv2d_composed(&t(&x), &t(&w), &b, Some(&t(&r)), p).unwrap();
        let diff = (a.to_dtype(DType::F32).unwrap() - c.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{dtype:?}");
    }
}

#[test]
fn conv2d_rejects_bad_arguments() {
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let nchw = ops::ConvParams {
        padding: 1,
        stride: 1,
        channels_last: false,
    };
    let err = |x: &Tensor, w: &Tensor, b: &Tensor, r: Option<&Tensor>, p| {
        ops::conv2d(x, w, b, r, p).unwrap_err().to_string()
    };
    let e = err(&t(&[1, 4, 5, 5]), &t(&[8, 3, 3, 3]), &t(&[8]), None, nchw);
    assert!(
        e.contains("has 3 input channels") && e.contains("has 4"),
        "{e}"
    );
    // The same weight read as KRSC has 3 input channels too, x [N, H, W, C] has 5.
    let cl = ops::ConvParams {
        channels_last: true,
        ..nchw
    };
    let e = err(&t(&[1, 4, 5, 5]), &t(&[8, 3, 3, 3]), &t(&[8]), None, cl);
    assert!(e.contains("channels-last"), "{e}");
    let e = err(&t(&[1, 4, 5, 5]), &t(&[8, 4, 3, 3]), &t(&[7]), None, nchw);
    assert!(e.contains("bias has shape [7]"), "{e}");
    let e = err(
        &t(&[1, 4, 5, 5]),
        &t(&[8, 4, 3, 3]),
        &t(&[8]),
        Some(&t(&[1, 8, 4, 5])),
        nchw,
    );
    assert!(
        e.contains("residual has shape [1, 8, 4, 5]") && e.contains("[1, 8, 5, 5]"),
        "{e}"
    );
    let e = err(&t(&[1, 4, 2, 2]), &t(&[8, 4, 5, 5]), &t(&[8]), None, nchw);
    assert!(e.contains("does not fit"), "{e}");
    let e = err(&t(&[4, 5, 5]), &t(&[8, 4, 3, 3]), &t(&[8]), None, nchw);
    assert!(e.contains("must both be 4-D"), "{e}");
    let zero = ops::ConvParams { stride: 0, ..nchw };
    let e = err(&t(&[1, 4, 5, 5]), &t(&[8, 4, 3, 3]), &t(&[8]), None, zero);
    assert!(e.contains("stride"), "{e}");
    let half = t(&[8, 4, 3, 3]).to_dtype(DType::BF16).unwrap();
    let e = err(&t(&[1, 4, 5, 5]), &half, &t(&[8]), None, nchw);
    assert!(e.contains("weight has dtype BF16"), "{e}");
}

/// CUDA bounds for the cuDNN path: bf16 1e-2 (the brief's), f16 4e-3 and f32 1e-4 (twice and ten
/// times the CPU bounds): cuDNN may pick Winograd or FFT algorithms, whose transforms round more
/// than a direct sum, and the prefill epilogue rounds `bias + residual` once before the sum.
fn cuda_conv_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        DType::BF16 => 1e-2,
        other => panic!("no tolerance for {other:?}"),
    }
}

/// Larger than any of [`CONV_CASES`], SDXL-like channel counts: a second plan, and most likely a
/// larger workspace than the small cases needed (the shared workspace grows).
const CONV_BIG_CASES: [ConvCase; 2] = [
    ConvCase {
        n: 2,
        c: 64,
        h: 40,
        w: 40,
        o: 64,
        k: 3,
        padding: 1,
        stride: 1,
        residual: true,
    },
    ConvCase {
        n: 1,
        c: 32,
        h: 64,
        w: 48,
        o: 64,
        k: 3,
        padding: 1,
        stride: 2,
        residual: false,
    },
];

/// Every conv case (the small ones, then the SDXL-like ones) on `dev` in each dtype, both layouts
/// and each of `modes_for(dtype)`, twice: the second call runs the plan the first one built.
fn check_conv_cases<'m>(
    dev: &Device,
    rng: &mut rand::rngs::StdRng,
    dtypes: &[DType],
    modes_for: impl Fn(DType) -> &'m [ops::ConvEpilogue],
    label: &str,
) {
    for case in CONV_CASES.iter().chain(&CONV_BIG_CASES) {
        let inputs = conv_inputs(rng, case);
        for &dtype in dtypes {
            for channels_last in [false, true] {
                for &mode in modes_for(dtype) {
                    for call in ["first", "cached"] {
                        ops::with_conv_epilogue(mode, || {
                            check_conv(
                                dev,
                                &inputs,
                                case,
                                dtype,
                                channels_last,
                                cuda_conv_tolerance(dtype),
                                &format!("{label} {mode:?} {call}"),
                            )
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn conv2d_cuda_matches_cpu_reference() {
    let rng = rng("conv2d cuda");
    let Some(dev) = devices("conv2d cuda").into_iter().find(|d| d.is_cuda()) else {
        return;
    };
    // The legacy cuDNN path alone: graph-API plans (`conv-graph`) have their own test below, so
    // that gpu_check.sh can leave that lever out without losing `conv`.
    ops::with_kernels(ops::Kernels::ALL.without(ops::Kernels::CONV_GRAPH), || {
        conv2d_cuda_legacy(rng, dev)
    });
}

/// Batches that run as several calls of fewer images (`ops::CONV_SUB_BATCHES`): with the cap
/// that decides the split forced to one byte, every shape whose fast algorithm asks for any
/// workspace runs one image per call, each on its own slice of x, residual and y.
const CONV_SPLIT_CASES: [ConvCase; 2] = [
    ConvCase {
        n: 5,
        c: 64,
        h: 20,
        w: 16,
        o: 64,
        k: 3,
        padding: 1,
        stride: 1,
        residual: true,
    },
    ConvCase {
        n: 3,
        c: 32,
        h: 17,
        w: 13,
        o: 48,
        k: 3,
        padding: 1,
        stride: 2,
        residual: false,
    },
];

#[test]
fn conv2d_in_sub_batches_matches_cpu_reference() {
    let mut rng = rng("conv2d sub-batches");
    let Some(dev) = devices("conv2d sub-batches")
        .into_iter()
        .find(|d| d.is_cuda())
    else {
        return;
    };
    for case in &CONV_SPLIT_CASES {
        let inputs = conv_inputs(&mut rng, case);
        for dtype in [DType::F32, DType::BF16] {
            for channels_last in [false, true] {
                let tol = cuda_conv_tolerance(dtype);
                // Split (twice: the second call runs the cached split and plans), then whole.
                for call in ["split", "split cached"] {
                    ops::with_conv_sub_batch_cap(1, || {
                        check_conv(&dev, &inputs, case, dtype, channels_last, tol, call)
                    });
                }
                check_conv(&dev, &inputs, case, dtype, channels_last, tol, "whole");
            }
        }
    }
    let plans = ops::conv_plans();
    for p in &plans {
        let _ = writeln!(std::io::stderr(), "conv2d plan: {p}");
    }
    let splits: Vec<&String> = plans
        .iter()
        .filter(|p| p.contains(ops::CONV_SUB_BATCHES))
        .collect();
    // The 64-channel bf16 NCHW case at least: implicit precomputed GEMM keeps offsets per pixel
    // (on the H200 about 7 MiB for one 320-channel 64x64 image).
    assert!(
        splits
            .iter()
            .any(|p| p.starts_with("BF16 NCHW x[n=5 c=64 h=20 w=16]")),
        "no split of the 64-channel bf16 NCHW batch: {splits:?}"
    );
    for split in &splits {
        // A one-byte cap: one image per call, and a plan of one image for the same shape.
        assert!(
            split.contains(&format!("{} 1 ", ops::CONV_SUB_BATCHES)),
            "{split}"
        );
        // "BF16 NCHW x[n=5 c=64 h=20 w=16] ..." -> "BF16 NCHW x[n=1 c=64 h=20 w=16"
        let head = &split[..split.find(']').unwrap()];
        let (layout, batch_dims) = head.split_once(" x[n=").unwrap();
        let (_, dims) = batch_dims.split_once(' ').unwrap();
        let single = format!("{layout} x[n=1 {dims}");
        assert!(
            plans.iter().any(|p| p.starts_with(&single)),
            "no plan of one image for {split}"
        );
    }
    // The whole batches ran with their own plans (no split without the forced cap).
    for case in &CONV_SPLIT_CASES {
        let whole = format!("BF16 NCHW x[n={} c={} h={}", case.n, case.c, case.h);
        assert!(
            plans
                .iter()
                .any(|p| p.starts_with(&whole) && !ops::is_conv_plan_followup(p)),
            "no plan of the whole batch {whole}"
        );
    }
}

/// The bound on cuDNN plans (`ops::MAX_CONV_PLANS`, here 2): a third shape drops the least
/// recently used plan; that shape, run again, is planned again and still matches the CPU
/// reference, and a shape still held is not planned again.
#[test]
fn conv2d_plans_over_the_limit_drop_the_least_recently_used() {
    let mut rng = rng("conv2d plan limit");
    let Some(dev) = devices("conv2d plan limit")
        .into_iter()
        .find(|d| d.is_cuda())
    else {
        return;
    };
    let cases = &CONV_CASES[..3];
    let inputs: Vec<_> = cases.iter().map(|c| conv_inputs(&mut rng, c)).collect();
    let tol = cuda_conv_tolerance(DType::BF16);
    let run = |i: usize, label: &str| {
        check_conv(&dev, &inputs[i], &cases[i], DType::BF16, false, tol, label)
    };
    ops::with_conv_plan_limit(2, || {
        run(0, "plan limit: 0");
        run(1, "plan limit: 1");
        // 0 is the least recently used: dropped for 2.
        run(2, "plan limit: 2");
        // 0 again: planned again, which drops 1; then 2, still held.
        run(0, "plan limit: 0 again");
        run(2, "plan limit: 2 again");
    });
    let plans = ops::conv_plans();
    for p in &plans {
        let _ = writeln!(std::io::stderr(), "conv2d plan: {p}");
    }
    let shape = |i: usize| {
        let c = &cases[i];
        format!("BF16 NCHW x[n={} c={} h={} w={}]", c.n, c.c, c.h, c.w)
    };
    let built: Vec<&String> = plans
        .iter()
        .filter(|p| !ops::is_conv_plan_followup(p))
        .collect();
    assert_eq!(built.len(), 4, "plans built: {built:?}");
    for (p, i) in built.iter().zip([0, 1, 2, 0]) {
        assert!(p.starts_with(&shape(i)), "plan of case {i}: {p}");
    }
    let dropped: Vec<&String> = plans
        .iter()
        .filter(|p| p.contains(ops::CONV_PLAN_EVICTED))
        .collect();
    assert_eq!(dropped.len(), 2, "plans dropped: {dropped:?}");
    for (p, i) in dropped.iter().zip([0, 1]) {
        assert!(p.starts_with(&shape(i)), "dropped plan of case {i}: {p}");
    }
}

fn conv2d_cuda_legacy(mut rng: rand::rngs::StdRng, dev: Device) {
    let modes = [
        ops::ConvEpilogue::Measure,
        ops::ConvEpilogue::Fused,
        ops::ConvEpilogue::Prefill,
    ];
    // Every epilogue for bf16 (the model's dtype on CUDA), the default (measured) one for f32 and
    // f16: each new (shape, dtype, layout, mode) runs cudnnFind, and gpu_check gives this whole
    // binary 150 s.
    let modes_for = |dtype: DType| {
        if dtype == DType::BF16 {
            &modes[..]
        } else {
            &modes[..1]
        }
    };
    check_conv_cases(&dev, &mut rng, &DTYPES, modes_for, "conv2d");
    // After the big shapes, the small ones again: their cached plans with the grown workspace.
    for case in &CONV_CASES[..2] {
        let inputs = conv_inputs(&mut rng, case);
        check_conv(
            &dev,
            &inputs,
            case,
            DType::BF16,
            true,
            1e-2,
            "conv2d after growth",
        );
    }
    let plans = ops::conv_plans();
    // One plan per (case, dtype, layout, mode): the cached calls built none.
    let per_layout: usize = DTYPES.iter().map(|&d| modes_for(d).len()).sum();
    let expected = (CONV_CASES.len() + CONV_BIG_CASES.len()) * 2 * per_layout;
    for p in &plans {
        let _ = writeln!(std::io::stderr(), "conv2d plan: {p}");
    }
    let built = plans_built(&plans);
    assert_eq!(built, expected, "plans built");
    // cuDNN may decline a channels-last shape with odd channel counts (the op then runs candle's
    // ops, checked above all the same), but never NCHW (candle's own cuDNN call runs those) nor
    // the SDXL-like channel counts: a fallback there would hide a broken cuDNN path.
    for p in &plans {
        let sdxl_like = CONV_BIG_CASES
            .iter()
            .any(|k| p.contains(&format!("x[n={} c={} h={} w={}]", k.n, k.c, k.h, k.w)));
        assert!(
            !(p.contains(ops::CONV_FALLBACK) && (p.contains(" NCHW ") || sdxl_like)),
            "unexpected fallback: {p}"
        );
    }
}

/// Plans built, from `ops::conv_plans()`'s lines: a plan whose first call failed, or whose
/// graph plan failed later, has a second line.
fn plans_built(plans: &[String]) -> usize {
    plans
        .iter()
        .filter(|p| !ops::is_conv_plan_followup(p))
        .count()
}

/// The `conv-graph` lever: cuDNN graph-API plans, forced (`ConvEpilogue::Graph`) and weighed by
/// time (`Measure` with the lever), against the CPU reference, in both layouts and half dtypes.
/// Forced, the SDXL-like channels-last shapes must actually run a graph plan: a GPU where none is
/// usable fails here (its plan lines say why), and gpu_check.sh then leaves `conv-graph` out of
/// the sweep.
#[test]
fn conv_graph_cuda_matches_cpu_reference() {
    let mut rng = rng("conv graph cuda");
    let Some(dev) = devices("conv graph cuda").into_iter().find(|d| d.is_cuda()) else {
        return;
    };
    let modes = [ops::ConvEpilogue::Graph, ops::ConvEpilogue::Measure];
    ops::with_kernels(ops::Kernels::ALL, || {
        check_conv_cases(
            &dev,
            &mut rng,
            &[DType::BF16, DType::F16],
            |_| &modes[..],
            "conv graph",
        );
        // f32 never builds graph plans (the graph engines may run TF32): forced, it is Prefill.
        let case = &CONV_CASES[0];
        let inputs = conv_inputs(&mut rng, case);
        ops::with_conv_epilogue(ops::ConvEpilogue::Graph, || {
            check_conv(
                &dev,
                &inputs,
                case,
                DType::F32,
                false,
                1e-5,
                "conv graph f32",
            )
        });
    });
    let plans = ops::conv_plans();
    for p in &plans {
        let _ = writeln!(std::io::stderr(), "conv graph plan: {p}");
    }
    // One plan per (case, half dtype, layout, mode), and the f32 one.
    let expected = (CONV_CASES.len() + CONV_BIG_CASES.len()) * 2 * 2 * modes.len() + 1;
    let built = plans_built(&plans);
    assert_eq!(built, expected, "plans built");
    assert!(
        plans
            .iter()
            .filter(|p| p.starts_with("F32"))
            .all(|p| p.contains("graph=false") && !p.contains(": Graph ")),
        "f32 must stay on the legacy path"
    );
    for p in plans.iter().filter(|p| !p.starts_with("F32")) {
        assert!(
            p.contains("graph=true"),
            "the lever or the mode did not ask: {p}"
        );
        let sdxl_like = CONV_BIG_CASES
            .iter()
            .any(|k| p.contains(&format!("x[n={} c={} h={} w={}]", k.n, k.c, k.h, k.w)));
        // The VAE decoder's layout (60% of the FLOPs) must have graph engines; NCHW (the UNet's)
        // may fall back to the legacy algorithm, which its plan line then explains.
        if sdxl_like && p.contains("mode=Graph") && p.contains(" NHWC ") {
            assert!(p.contains(": Graph engine"), "no graph plan ran: {p}");
        }
    }
}

/// `layers::Conv2d` on a random 3x3 layer: NCHW and its channels-last copy, with and without the
/// `conv` lever, against the lever-off NCHW layer on the CPU (candle's path, the baseline).
#[test]
fn conv2d_layer_layouts_and_lever_agree() {
    use candle_core::Module;
    use std::collections::HashMap;
    use turbine::model::unet::layers::Conv2d;

    let mut rng = rng("conv2d layer");
    let (c, o) = (8, 12);
    let weight = random(&mut rng, &[o, c, 3, 3], 0.0);
    let bias = random(&mut rng, &[o], 0.0);
    let x = random(&mut rng, &[2, c, 9, 11], 0.0);
    let r = random(&mut rng, &[2, o, 9, 11], 0.0);
    let layer = |dev: &Device| {
        let weights = HashMap::from([
            ("weight".to_string(), weight.to_device(dev).unwrap()),
            ("bias".to_string(), bias.to_device(dev).unwrap()),
        ]);
        let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, dev);
        Conv2d::new(vb, c, o, 3, 1, 1).unwrap()
    };
    let want = ops::with_kernels(ops::Kernels::NONE, || {
        layer(&Device::Cpu).forward_residual(&x, Some(&r)).unwrap()
    });
    for dev in devices("conv2d layer") {
        let nchw = layer(&dev);
        let cl = nchw.to_channels_last().unwrap();
        assert!(cl.is_channels_last() && !nchw.is_channels_last());
        let (xd, rd) = (x.to_device(&dev).unwrap(), r.to_device(&dev).unwrap());
        for k in [ops::Kernels::NONE, ops::Kernels::CONV] {
            // candle's f32 convolution on CUDA (the lever off) runs cuDNN's default math, which
            // may use TF32 tensor cores (10-bit mantissa); ours keeps f32 (FMA math).
            let tol = match (dev.is_cuda(), k == ops::Kernels::CONV) {
                (false, _) => 1e-5,
                (true, true) => 1e-4,
                (true, false) => 5e-3,
            };
            let what = format!("conv2d layer {} kernels={k}", dev_name(&dev));
            ops::with_kernels(k, || {
                let got = nchw.forward_residual(&xd, Some(&rd)).unwrap();
                assert_close(&got, &want, tol, &format!("{what} NCHW"));
                let got = cl
                    .forward_residual(&to_channels_last(&xd), Some(&to_channels_last(&rd)))
                    .unwrap();
                assert_close(&got, &to_channels_last(&want), tol, &format!("{what} NHWC"));
                let plain = (nchw.forward(&xd).unwrap() + &rd).unwrap();
                assert_close(&plain, &want, tol, &format!("{what} forward + r"));
            });
        }
    }
}

// ---- GroupNorm, channels last ----

/// `[N, ..., C]` → `[N, C, ...]` (contiguous), the layout `group_norm_composed` takes.
fn channels_first(x: &Tensor) -> Tensor {
    let r = x.rank();
    let mut order: Vec<usize> = vec![0, r - 1];
    order.extend(1..r - 1);
    x.permute(order).unwrap().contiguous().unwrap()
}

/// `[N, C, ...]` → `[N, ..., C]` (contiguous).
fn channels_last(x: &Tensor) -> Tensor {
    let r = x.rank();
    let mut order: Vec<usize> = vec![0];
    order.extend(2..r);
    order.push(1);
    x.permute(order).unwrap().contiguous().unwrap()
}

#[test]
fn group_norm_channels_last_matches_composition() {
    let mut rng = rng("group_norm_channels_last");
    // (shape [N, ..., C], groups), chosen against the CUDA kernels' tiling (blocks of
    // positions x all channels, channel strips of 256 channels or 16-byte vectors, per-group
    // accumulators; vectors over 1 or 2 groups, or not at all):
    let cases: [(&[usize], usize); 10] = [
        // fewer channels than a strip, idle threads (256 % 12 != 0), several samples
        (&[3, 5, 7, 12], 4),
        // the VAE's 32 groups of 4; > 1024 positions, several per block, the last block short,
        // more partials per group (834) than gn_finalize has threads
        (&[1, 50, 50, 32], 8),
        (&[2, 24, 24, 128], 32),
        // two full strips of 256 channels
        (&[1, 40, 40, 512], 32),
        // groups of 10 straddle the strip boundary at channel 256
        (&[1, 37, 41, 320], 32),
        // one group wider than a strip
        (&[2, 6, 6, 512], 1),
        // a group per channel
        (&[2, 9, 9, 64], 64),
        // many positions per thread
        (&[1, 128, 128, 64], 32),
        // rank 3 and rank 2 (one position)
        (&[2, 33, 40], 8),
        (&[4, 16], 4),
    ];
    for dev in devices("group_norm_channels_last") {
        for (shape, groups) in cases {
            let c = shape[shape.len() - 1];
            let x = random(&mut rng, shape, 3.0);
            let w = random(&mut rng, &[c], 0.0);
            let b = random(&mut rng, &[c], 0.0);
            for dtype in DTYPES {
                for silu in [false, true] {
                    let (xd, xe) = place(&x, dtype, &dev);
                    let (wd, we) = place(&w, dtype, &dev);
                    let (bd, be) = place(&b, dtype, &dev);
                    let want = channels_last(&group_norm_composed(
                        &channels_first(&xe),
                        groups,
                        &we,
                        &be,
                        1e-6,
                        silu,
                    ));
                    // Each input as it is and as a view one element into its buffer: on CUDA
                    // the first takes the 16-byte-vector kernels where the channels allow, the
                    // misaligned view always the scalar ones.
                    for offset in [0, 1] {
                        let input = if offset == 0 {
                            xd.clone()
                        } else {
                            let pad = Tensor::zeros(1, dtype, &dev).unwrap();
                            Tensor::cat(&[&pad, &xd.flatten_all().unwrap()], 0)
                                .unwrap()
                                .narrow(0, 1, x.elem_count())
                                .unwrap()
                                .reshape(shape)
                                .unwrap()
                        };
                        poison(&dev, x.elem_count(), dtype);
                        let got =
                            ops::group_norm_channels_last(&input, groups, &wd, &bd, 1e-6, silu)
                                .unwrap();
                        assert_eq!(got.dtype(), dtype);
                        let what = format!(
                            "group_norm_channels_last {} {dtype:?} {shape:?} groups={groups} \
                             silu={silu} offset={offset}",
                            dev_name(&dev)
                        );
                        assert_close(&got, &want, tolerance(dtype), &what);
                    }
                }
            }
        }
    }
}

#[test]
fn group_norm_channels_last_equals_channels_first_permuted() {
    // The same statistics in both layouts: the two CPU references (and, on a GPU, the two
    // kernel families) agree to rounding, in the model's own dtype.
    let mut rng = rng("group_norm layouts");
    for dev in devices("group_norm layouts") {
        let x = random(&mut rng, &[2, 64, 20, 20], -1.0);
        let w = random(&mut rng, &[64], 0.0);
        let b = random(&mut rng, &[64], 0.0);
        for dtype in DTYPES {
            let (xd, _) = place(&x, dtype, &dev);
            let (wd, _) = place(&w, dtype, &dev);
            let (bd, _) = place(&b, dtype, &dev);
            let first = ops::group_norm(&xd, 16, &wd, &bd, 1e-6, true).unwrap();
            let xl = xd.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
            poison(&dev, x.elem_count(), dtype);
            let last = ops::group_norm_channels_last(&xl, 16, &wd, &bd, 1e-6, true).unwrap();
            let want = first
                .permute((0, 2, 3, 1))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let what = format!("group_norm layouts {} {dtype:?}", dev_name(&dev));
            // Both round the same f32 (CUDA) or f64 (CPU) value once; the statistics are summed
            // in different orders, so allow one rounding step of the dtype.
            assert_close(&last, &want, tolerance(dtype), &what);
        }
    }
}

#[test]
fn group_norm_channels_last_accepts_strided_input() {
    let mut rng = rng("group_norm_channels_last strided");
    for dev in devices("group_norm_channels_last strided") {
        // [N, C, H, W] permuted to [N, H, W, C]: channels last, not contiguous.
        let x = random(&mut rng, &[2, 16, 5, 6], 0.5)
            .permute((0, 2, 3, 1))
            .unwrap();
        let w = random(&mut rng, &[16], 0.0);
        let b = random(&mut rng, &[16], 0.0);
        let want = channels_last(&group_norm_composed(
            &channels_first(&x.contiguous().unwrap()),
            4,
            &w,
            &b,
            1e-5,
            false,
        ));
        let (xd, _) = place(&x, DType::F32, &dev);
        let (wd, _) = place(&w, DType::F32, &dev);
        let (bd, _) = place(&b, DType::F32, &dev);
        let got = ops::group_norm_channels_last(&xd, 4, &wd, &bd, 1e-5, false).unwrap();
        assert_close(
            &got,
            &want,
            tolerance(DType::F32),
            &format!("group_norm_channels_last strided {}", dev_name(&dev)),
        );
    }
}

#[test]
fn group_norm_channels_last_rejects_bad_arguments() {
    let x = Tensor::ones((2, 4, 4, 12), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(12, DType::F32, &Device::Cpu).unwrap();
    let wrong = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let err = ops::group_norm_channels_last(&x, 5, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("5 groups do not divide the input's 12 channels"),
        "{err}"
    );
    // A weight sized for dim 1 (the channels-first reading of this tensor) is refused.
    let err = ops::group_norm_channels_last(&x, 4, &wrong, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("weight has shape [4], expected [12]"), "{err}");
    let flat = Tensor::ones(12, DType::F32, &Device::Cpu).unwrap();
    let err = ops::group_norm_channels_last(&flat, 4, &w, &w, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be [N, ..., C]"), "{err}");
}

#[test]
fn group_norm_channels_last_bounds_groups_on_cuda() {
    // The CPU reference takes any group count; the CUDA stats kernel keeps one accumulator per
    // group in shared memory and must refuse more than it holds, by name, not fail to launch.
    for dev in devices("group_norm_channels_last groups bound") {
        let x = Tensor::ones((1, 2, 4096), DType::F32, &dev).unwrap();
        let w = Tensor::ones(4096, DType::F32, &dev).unwrap();
        let got = ops::group_norm_channels_last(&x, 4096, &w, &w, 1e-5, false);
        if dev.is_cuda() {
            let err = got.unwrap_err().to_string();
            assert!(err.contains("4096 groups exceed the 2048"), "{err}");
        } else {
            // One element per group: each normalises to 0, plus the bias of 1.
            let v: Vec<f32> = got.unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|&v| v == 1.0));
        }
    }
}

// ---- Nearest 2x upsampling, channels last ----

#[test]
fn upsample_nearest2x_channels_last_matches_candle() {
    let mut rng = rng("upsample_nearest2x_channels_last");
    // Channel counts whose pixels move in 16-, 8-, 4- and 2-byte units depending on the dtype
    // (3 x bf16 = 6 bytes: 2-byte units; 3 x f32: 4; 4 x bf16: 8; 8 x bf16, 512 x any: 16), odd
    // sizes, a batch, and rows wider than one 256-unit block.
    let cases: [&[usize]; 6] = [
        &[2, 3, 5, 3],
        &[1, 4, 7, 4],
        &[3, 2, 3, 8],
        &[1, 5, 9, 512],
        &[1, 2, 300, 16],
        &[2, 1, 1, 1],
    ];
    for dev in devices("upsample_nearest2x_channels_last") {
        for shape in cases {
            let x = random(&mut rng, shape, 0.0);
            for dtype in DTYPES {
                let (xd, xe) = place(&x, dtype, &dev);
                let (_, h, w, _) = xe.dims4().unwrap();
                let want = xe
                    .permute((0, 3, 1, 2))
                    .unwrap()
                    .upsample_nearest2d(2 * h, 2 * w)
                    .unwrap()
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                poison(&dev, 4 * x.elem_count(), dtype);
                let got = ops::upsample_nearest2x_channels_last(&xd).unwrap();
                assert_eq!(got.dtype(), dtype);
                let what = format!(
                    "upsample_nearest2x_channels_last {} {dtype:?} {shape:?}",
                    dev_name(&dev)
                );
                // A copy: exact.
                assert_close(&got, &want, 0.0, &what);
            }
        }
    }
}

#[test]
fn upsample_nearest2x_channels_last_reads_views_at_any_offset() {
    // Views that start inside their buffer: one sample in (a whole number of pixels), and one
    // element in (a flat buffer reshaped, so a 16-byte pixel starts at a 2- or 4-byte boundary
    // and the CUDA kernel must move narrower units); a channel slice is strided, which the op
    // copies first.
    let mut rng = rng("upsample views");
    for dev in devices("upsample views") {
        let x = random(&mut rng, &[3, 4, 5, 8], 0.0);
        let flat = random(&mut rng, &[1 + 2 * 2 * 3 * 8], 0.0);
        for dtype in DTYPES {
            let (xd, xe) = place(&x, dtype, &dev);
            let (fd, fe) = place(&flat, dtype, &dev);
            let shifted = |t: &Tensor| t.narrow(0, 1, 2 * 2 * 3 * 8).unwrap().reshape((2, 2, 3, 8));
            let views = [
                ("sample offset", xd.narrow(0, 1, 2), xe.narrow(0, 1, 2)),
                ("element offset", shifted(&fd), shifted(&fe)),
                ("channel slice", xd.narrow(3, 1, 3), xe.narrow(3, 1, 3)),
            ];
            for (label, got_in, want_in) in views {
                let want_in = want_in.unwrap().contiguous().unwrap();
                let (_, h, w, _) = want_in.dims4().unwrap();
                let want = want_in
                    .permute((0, 3, 1, 2))
                    .unwrap()
                    .upsample_nearest2d(2 * h, 2 * w)
                    .unwrap()
                    .permute((0, 2, 3, 1))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let got = ops::upsample_nearest2x_channels_last(&got_in.unwrap()).unwrap();
                let what = format!("upsample {label} {} {dtype:?}", dev_name(&dev));
                assert_close(&got, &want, 0.0, &what);
            }
        }
    }
}

#[test]
fn upsample_nearest2x_channels_last_rejects_non_images() {
    let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let err = ops::upsample_nearest2x_channels_last(&x)
        .unwrap_err()
        .to_string();
    assert!(err.contains("must be [N, H, W, C]"), "{err}");
    let x = Tensor::ones((1, 2, 2, 3), DType::U8, &Device::Cpu).unwrap();
    assert!(ops::upsample_nearest2x_channels_last(&x).is_err());
}

// ---- Upsampling + 3x3 convolution as four 2x2 phases ----

/// `interleave_phases` composed from candle ops (narrows and stacks): `[N, H+1, W+1, 4O]` →
/// `[N, 2H, 2W, O]` channels-last, `[N, 4O, H+1, W+1]` → `[N, O, 2H, 2W]` otherwise.
fn interleave_composed(y: &Tensor, channels_last: bool) -> Tensor {
    let (hd, wd, cd) = if channels_last { (1, 2, 3) } else { (2, 3, 1) };
    let (h, w, o) = (
        y.dim(hd).unwrap() - 1,
        y.dim(wd).unwrap() - 1,
        y.dim(cd).unwrap() / 4,
    );
    let n = y.dim(0).unwrap();
    let phase = |a: usize, b: usize| {
        y.narrow(hd, a, h)
            .unwrap()
            .narrow(wd, b, w)
            .unwrap()
            .narrow(cd, (2 * a + b) * o, o)
            .unwrap()
    };
    let rows: Vec<Tensor> = (0..2)
        .map(|a| {
            // Columns 2j and 2j+1 side by side, then rows 2i and 2i+1.
            let pair = Tensor::stack(&[phase(a, 0), phase(a, 1)], wd + 1).unwrap();
            if channels_last {
                pair.reshape((n, h, 2 * w, o)).unwrap()
            } else {
                pair.reshape((n, o, h, 2 * w)).unwrap()
            }
        })
        .collect();
    let out = Tensor::stack(&rows, hd + 1).unwrap();
    if channels_last {
        out.reshape((n, 2 * h, 2 * w, o)).unwrap()
    } else {
        out.reshape((n, o, 2 * h, 2 * w)).unwrap()
    }
}

/// (N, C, H, W, O) of the upsampler cases: odd sizes, a batch, channel counts whose pixels move
/// in every copy unit on CUDA (3 x f32: 4-byte units, 3 x bf16: 2, 4 x bf16: 8, 8 x any: 16),
/// rows wider than one 256-thread block, and one SDXL-like width.
const PHASE_CASES: [(usize, usize, usize, usize, usize); 6] = [
    (2, 3, 5, 4, 3),
    (1, 4, 7, 3, 4),
    (2, 5, 2, 3, 8),
    (1, 2, 3, 150, 16),
    (1, 64, 6, 5, 64),
    (1, 2, 1, 1, 1),
];

#[test]
fn interleave_phases_equals_composition() {
    let mut rng = rng("interleave_phases");
    for dev in devices("interleave_phases") {
        for (n, _, h, w, o) in PHASE_CASES {
            for channels_last in [false, true] {
                let shape = if channels_last {
                    [n, h + 1, w + 1, 4 * o]
                } else {
                    [n, 4 * o, h + 1, w + 1]
                };
                let y = random(&mut rng, &shape, 0.0);
                for dtype in DTYPES {
                    let (yd, ye) = place(&y, dtype, &dev);
                    poison(&dev, 4 * n * o * h * w, dtype);
                    let got = ops::interleave_phases(&yd, channels_last).unwrap();
                    assert_eq!(got.dtype(), dtype);
                    let what = format!(
                        "interleave_phases {} {dtype:?} {shape:?} channels_last={channels_last}",
                        dev_name(&dev)
                    );
                    // A copy: exact.
                    assert_close(&got, &interleave_composed(&ye, channels_last), 0.0, &what);
                }
            }
        }
    }
}

#[test]
fn interleave_phases_reads_views_at_any_offset() {
    // A flat buffer one element in, reshaped: an 8-channel bf16 pixel (16 bytes) starts at a
    // 2-byte boundary, so the CUDA kernel must move narrower units; and a strided view, which the
    // op copies first.
    let mut rng = rng("interleave_phases views");
    let shape = [2, 3, 4, 8];
    let elems: usize = shape.iter().product();
    for dev in devices("interleave_phases views") {
        let flat = random(&mut rng, &[1 + elems], 0.0);
        let wide = random(&mut rng, &[2, 3, 4, 12], 0.0);
        for dtype in DTYPES {
            let (fd, fe) = place(&flat, dtype, &dev);
            let (wd, we) = place(&wide, dtype, &dev);
            let shifted = |t: &Tensor| t.narrow(0, 1, elems).unwrap().reshape(&shape[..]).unwrap();
            let views = [
                ("element offset", shifted(&fd), shifted(&fe)),
                (
                    "channel slice",
                    wd.narrow(3, 2, 8).unwrap(),
                    we.narrow(3, 2, 8).unwrap(),
                ),
            ];
            for (label, got_in, want_in) in views {
                let got = ops::interleave_phases(&got_in, true).unwrap();
                let want = interleave_composed(&want_in.contiguous().unwrap(), true);
                let what = format!("interleave_phases {label} {} {dtype:?}", dev_name(&dev));
                assert_close(&got, &want, 0.0, &what);
            }
        }
    }
}

#[test]
fn upsample_conv_phases_match_upsample_then_conv() {
    // The whole rewrite: the phase convolution (ops::conv2d, cuDNN on CUDA) then the interleave,
    // against candle's nearest upsampling and 3x3 convolution in f32 on the CPU, from the same
    // rounded inputs. The phase weights are sums of the rounded weights, rounded once more.
    let mut rng = rng("upsample_conv_phases");
    for dev in devices("upsample_conv_phases") {
        for (n, c, h, w, o) in PHASE_CASES {
            let x = random(&mut rng, &[n, c, h, w], 0.0);
            let weight = random(&mut rng, &[o, c, 3, 3], 0.0);
            let bias = random(&mut rng, &[o], 0.0);
            for dtype in DTYPES {
                let (xd, xe) = place(&x, dtype, &dev);
                let (wd, we) = place(&weight, dtype, &dev);
                let (bd, be) = place(&bias, dtype, &dev);
                let want = xe
                    .upsample_nearest2d(2 * h, 2 * w)
                    .unwrap()
                    .conv2d(&we, 1, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&be.reshape((1, o, 1, 1)).unwrap())
                    .unwrap();
                let tol = if dev.is_cuda() {
                    cuda_conv_tolerance(dtype)
                } else {
                    tolerance(dtype)
                };
                for channels_last in [false, true] {
                    let (xs, ws) = if channels_last {
                        (to_channels_last(&xd), to_channels_last(&wd))
                    } else {
                        (xd.clone(), wd.clone())
                    };
                    let (w4, b4) = ops::upsample_conv_phases(&ws, &bd, channels_last).unwrap();
                    assert_eq!(w4.dtype(), dtype);
                    let params = ops::ConvParams {
                        padding: 1,
                        stride: 1,
                        channels_last,
                    };
                    let ys = ops::conv2d(&xs, &w4, &b4, None, params).unwrap();
                    poison(&dev, want.elem_count(), dtype);
                    let mut got = ops::interleave_phases(&ys, channels_last).unwrap();
                    if channels_last {
                        got = got.permute((0, 3, 1, 2)).unwrap();
                    }
                    let what = format!(
                        "upsample + conv as phases {} {dtype:?} x [{n}, {c}, {h}, {w}] -> {o} \
                         channels, channels_last={channels_last}",
                        dev_name(&dev)
                    );
                    assert_close(&got, &want, tol, &what);
                }
            }
        }
    }
}

#[test]
fn upsample_conv_phases_and_interleave_reject_bad_shapes() {
    let t = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    let e = ops::upsample_conv_phases(&t(&[4, 2, 1, 1]), &t(&[4]), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be 3x3"), "{e}");
    let e = ops::upsample_conv_phases(&t(&[4, 2, 3, 3]), &t(&[3]), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bias has shape [3], expected [4]"), "{e}");
    let e = ops::upsample_conv_phases(&t(&[4, 3, 3]), &t(&[4]), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be 4-D"), "{e}");
    for (shape, channels_last) in [
        (&[1, 6, 3, 3][..], false),
        (&[1, 3, 3, 6][..], true),
        (&[1, 8, 1, 3][..], false),
        (&[1, 3, 3][..], true),
    ] {
        let e = ops::interleave_phases(&t(shape), channels_last)
            .unwrap_err()
            .to_string();
        assert!(e.contains("interleave_phases"), "{shape:?}: {e}");
    }
    let x = Tensor::ones((1, 2, 2, 4), DType::U8, &Device::Cpu).unwrap();
    assert!(ops::interleave_phases(&x, true).is_err());
}

// ---- The VAE decoder in channels-last layout, end to end ----

/// The channels-last decoder (channels-last GroupNorm, NHWC upsampling, channels-last
/// `ops::conv2d` with the shortcut fused, attention on `[N, HW, C]` tokens) against the NCHW
/// decoder of the same weights, on every device; on CUDA also `decode`'s choice of path. The
/// parity tests check the CPU path against diffusers; this is where the CUDA path is checked
/// (random weights built in code: this binary runs on the GPU machine without the source tree).
#[test]
fn vae_channels_last_decoder_matches_nchw() {
    use turbine::model::loader::RandomWeights;
    use turbine::model::vae::{AutoencoderKL, AutoencoderKLConfig};
    use turbine::ops::Kernels;

    // Three levels (two upsamplers), channel counts of the real model's order of magnitude
    // scaled down, 32 groups, a shortcut conv where the channels change (128 -> 64).
    let cfg: AutoencoderKLConfig = serde_json::from_str(
        r#"{"block_out_channels": [64, 128, 128], "layers_per_block": 1,
            "norm_num_groups": 32, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let mut rng = rng("vae channels-last");
    let z = random(&mut rng, &[2, 4, 12, 10], 0.0);
    let mut cpu_out: Vec<(DType, Tensor)> = Vec::new();
    for dev in devices("vae channels-last") {
        for dtype in [DType::F32, DType::BF16] {
            let vb = RandomWeights::new(7).into_var_builder(dtype, &dev);
            let vae = AutoencoderKL::new_with_channels_last(vb, &cfg, true).unwrap();
            let (zd, _) = place(&z, dtype, &dev);
            let nchw = ops::with_kernels(Kernels::NONE, || vae.decode(&zd)).unwrap();
            assert!(nchw.is_contiguous(), "NCHW decode");
            assert_eq!(nchw.dims(), [2, 3, 48, 40]);
            let nchw = nchw
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            poison(&dev, 2 * 64 * 48 * 40, dtype);
            let cl = vae.decode_channels_last(&zd).unwrap();
            assert_eq!(cl.dtype(), dtype);
            // bf16: both paths round every layer's output, at different points (fused vs
            // separate residual adds, f32 vs bf16 norm weights); f32 on CUDA: the channels-last
            // path's convolutions are ours (cuDNN in FMA math: f32 stays f32, checked against
            // the CPU below), the NCHW path's are candle's, which leaves cuDNN's math type at
            // its default, TF32 on tensor cores from Ampere on (10 mantissa bits: 1.2-1.4e-3 of
            // the output's scale on the H200).
            let tol = match (dtype, dev.is_cuda()) {
                (DType::F32, false) => 1e-5,
                (DType::F32, true) => 5e-3,
                _ => 5e-2,
            };
            let what = format!("vae channels-last vs NCHW {} {dtype:?}", dev_name(&dev));
            assert_close(&cl, &nchw, tol, &what);
            if dev.is_cuda() {
                // With its levers on, `decode` on CUDA is the channels-last path: an NCHW view
                // of NHWC memory; without CONV it is not.
                let levers = Kernels::CHANNELS_LAST.union(Kernels::CONV);
                let auto = ops::with_kernels(levers, || vae.decode(&zd)).unwrap();
                assert!(!auto.is_contiguous(), "decode on CUDA with CHANNELS_LAST");
                assert_eq!(auto.stride()[1], 1, "channels are the innermost dim");
                let without_conv =
                    ops::with_kernels(Kernels::CHANNELS_LAST, || vae.decode(&zd)).unwrap();
                assert!(without_conv.is_contiguous(), "decode without CONV");
                let (_, cpu) = cpu_out.iter().find(|(d, _)| *d == dtype).unwrap();
                let what = format!("vae channels-last cuda vs cpu {dtype:?}");
                // f32: FMA math throughout, as close to the CPU as its own convolutions' test
                // (`cuda_conv_tolerance`) allows for a dozen layers.
                let tol = if dtype == DType::F32 { 1e-3 } else { tol };
                assert_close(&cl, cpu, tol, &what);
            } else {
                let cl = cl.to_dtype(DType::F32).unwrap();
                cpu_out.push((dtype, cl));
            }
        }
    }
}

// ---- VAE output to 8-bit RGB ----

/// diffusers' postprocess in f32 candle ops: `(x / 2 + 0.5).clamp(0, 1)`, then numpy's
/// `(x * 255).round()` (half to even), NCHW to NHWC.
fn to_rgb8_composed(x: &Tensor) -> Vec<u8> {
    let v = x.affine(0.5, 0.5).unwrap().clamp(0f32, 1f32).unwrap();
    let v = (v * 255.0).unwrap().permute((0, 2, 3, 1)).unwrap();
    let v: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
    v.iter().map(|x| x.round_ties_even() as u8).collect()
}

#[test]
fn to_rgb8_matches_composition() {
    let mut rng = rng("to_rgb8");
    // Values in ±[0.05, 2): both clamp edges and the inside. A ragged last block (5·7·3 bytes),
    // a whole 64x64 image, and four channels.
    let cases: [&[usize]; 3] = [&[2, 3, 5, 7], &[1, 3, 64, 64], &[3, 4, 9, 11]];
    for dev in devices("to_rgb8") {
        for shape in cases {
            let x = random(&mut rng, shape, 0.0);
            for dtype in DTYPES {
                let (xd, xe) = place(&x, dtype, &dev);
                let want = to_rgb8_composed(&xe);
                if dev.is_cuda() {
                    // 0xab is no byte the op can write for every element: a skipped one shows.
                    let t = Tensor::full(0xabu8, x.elem_count(), &dev).unwrap();
                    dev.synchronize().unwrap();
                    drop(t);
                }
                let got = ops::to_rgb8(&xd).unwrap();
                let what = format!("to_rgb8 {} {dtype:?} {shape:?}", dev_name(&dev));
                assert_eq!(got.dtype(), DType::U8, "{what}");
                assert_eq!(
                    got.dims(),
                    [shape[0], shape[2], shape[3], shape[1]],
                    "{what}"
                );
                let got: Vec<u8> = got
                    .to_device(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let wrong: Vec<usize> = (0..want.len()).filter(|&i| got[i] != want[i]).collect();
                let _ = writeln!(std::io::stderr(), "{what}: {} bytes differ", wrong.len());
                assert!(
                    wrong.is_empty(),
                    "{what}: {} of {} bytes differ; first at {}: got {}, want {}",
                    wrong.len(),
                    want.len(),
                    wrong[0],
                    got[wrong[0]],
                    want[wrong[0]]
                );
            }
        }
    }
}

// ---- The batch's copy back, queued (the OVERLAP lever) ----

fn random_bytes(rng: &mut impl Rng, shape: &[usize], dev: &Device) -> (Tensor, Vec<u8>) {
    let n: usize = shape.iter().product();
    let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
    let t = Tensor::from_vec(bytes.clone(), shape, &Device::Cpu)
        .unwrap()
        .to_device(dev)
        .unwrap();
    (t, bytes)
}

/// A copy back queued behind ~a hundred milliseconds of device work (CUDA; a token amount on the
/// CPU), into a reused buffer that holds another copy's stale bytes, returns the new bytes: the
/// wait really waits for the device.
fn late_copy_back_matches(rng: &mut rand::rngs::StdRng, dev: &Device) {
    let name = dev_name(dev);
    let shape = [4, 256, 256, 3];
    // Stale bytes in the pool: a copy of the same size, collected and given back.
    let (stale, stale_bytes) = random_bytes(rng, &shape, dev);
    let got = ops::copy_to_host(&stale)
        .unwrap()
        .wait_with(|b| b.to_vec())
        .unwrap();
    assert!(got == stale_bytes, "{name}");
    drop(stale);
    let (a, a_bytes) = random_bytes(rng, &shape, dev);
    assert!(a_bytes != stale_bytes);
    // Work queued ahead of the bytes: on CUDA 24 products of 4096x4096 f32 (~3 TFLOP).
    let (n, reps) = if dev.is_cuda() { (4096, 24) } else { (64, 2) };
    let m = Tensor::randn(0f32, 1.0 / (n as f32).sqrt(), (n, n), dev).unwrap();
    let mut busy = m.clone();
    for _ in 0..reps {
        busy = busy.matmul(&m).unwrap();
    }
    // The bytes, recomputed on the device behind that work.
    let late = a.to_dtype(DType::F32).unwrap().to_dtype(DType::U8).unwrap();
    drop(a);
    let copy = ops::copy_to_host(&late).unwrap();
    drop(late);
    assert_eq!(copy.is_pending(), dev.is_cuda(), "{name}");
    let got = copy.wait_with(|b| b.to_vec()).unwrap();
    assert!(
        got == a_bytes,
        "{name}: the copy back was read before the device wrote it"
    );
    drop(busy);
}

/// The `stream-order` lever turns cudarc's event tracking off (and back on without it), and a
/// copy back waits for the device: behind ~a hundred milliseconds of queued work, into a reused
/// page-locked buffer that holds another copy's stale bytes. (cudarc never records the buffer's
/// own event on candle's per-thread stream, tracking or not: `copy_to_host` records its own.)
#[test]
fn stream_order_copy_back_waits_for_its_bytes() {
    let mut rng = rng("stream order");
    let Some(dev) = devices("stream order").into_iter().find(|d| d.is_cuda()) else {
        return;
    };
    ops::with_kernels(ops::Kernels::ALL, || {
        turbine::device::apply_stream_order(&dev).unwrap();
        assert!(
            !turbine::device::tracks_events(&dev),
            "the lever left tracking on"
        );
        late_copy_back_matches(&mut rng, &dev);
    });
    ops::with_kernels(
        ops::Kernels::ALL.without(ops::Kernels::STREAM_ORDER),
        || {
            turbine::device::apply_stream_order(&dev).unwrap();
            assert!(turbine::device::tracks_events(&dev), "tracking stayed off");
        },
    );
}

/// Uploads through the staging pool: behind ~a hundred milliseconds of queued device work (on
/// CUDA), more uploads than the pool keeps, of three staging sizes (so buffers are reused and
/// evicted while earlier copies may still be queued), each tensor holding its own values; an
/// empty upload and a shape that does not match the values.
#[test]
fn upload_f32_gives_each_upload_its_values() {
    let mut rng = rng("upload_f32");
    for dev in devices("upload_f32") {
        // The staging path is the overlap lever's.
        ops::with_kernels(ops::Kernels::ALL, || uploads_match(&mut rng, &dev));
    }
}

fn uploads_match(rng: &mut rand::rngs::StdRng, dev: &Device) {
    let name = dev_name(dev);
    let (n, reps) = if dev.is_cuda() { (4096, 24) } else { (64, 2) };
    let m = Tensor::randn(0f32, 1.0 / (n as f32).sqrt(), (n, n), dev).unwrap();
    let mut busy = m.clone();
    for _ in 0..reps {
        busy = busy.matmul(&m).unwrap();
    }
    let mut uploads = Vec::new();
    // More uploads than the staging pool keeps, while the first are still queued; sizes of
    // three staging classes.
    for i in 0..40 {
        let shape = match i % 3 {
            0 => vec![2, 4, 8, 8],
            1 => vec![3, 5],
            _ => vec![5, 4, 64, 64],
        };
        let len: usize = shape.iter().product();
        let values: Vec<f32> = (0..len).map(|_| rng.random_range(-4.0f32..4.0)).collect();
        let t = ops::upload_f32(&values, shape.as_slice(), dev).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert!(t.device().same_device(dev), "{name}");
        // Device work that reads it, queued behind the busy work.
        let doubled = (&t * 2.0).unwrap();
        uploads.push((values, t, doubled));
    }
    for (i, (values, t, doubled)) in uploads.iter().enumerate() {
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(&got == values, "{name}: upload {i} holds other values");
        let got: Vec<f32> = doubled.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = values.iter().map(|v| v * 2.0).collect();
        assert!(got == want, "{name}: upload {i} read by the device differs");
    }
    drop(busy);
    let empty = ops::upload_f32(&[], (0, 4), dev).unwrap();
    assert_eq!(empty.dims(), [0, 4], "{name}");
    let err = ops::upload_f32(&[1.0, 2.0], (3,), dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 values for shape [3]"), "{name}: {err}");
}

#[test]
fn copy_to_host_returns_the_bytes_of_each_copy() {
    let mut rng = rng("copy_to_host");
    for dev in devices("copy_to_host") {
        let name = dev_name(&dev);
        // Two copies in flight, collected in the other order, with device work queued after
        // them; a batch of 8 512x512 images is 6.3 MB.
        let (a, a_bytes) = random_bytes(&mut rng, &[8, 512, 512, 3], &dev);
        let (b, b_bytes) = random_bytes(&mut rng, &[3, 5, 7, 3], &dev);
        let copy_a = ops::copy_to_host(&a).unwrap();
        let copy_b = ops::copy_to_host(&b).unwrap();
        assert_eq!(copy_a.is_pending(), dev.is_cuda(), "{name}");
        let busy = (a.to_dtype(DType::F32).unwrap() * 2.0).unwrap();
        drop(a);
        let got_b = copy_b.wait_with(|bytes| bytes.to_vec()).unwrap();
        let got_a = copy_a.wait_with(|bytes| bytes.to_vec()).unwrap();
        assert!(got_b == b_bytes, "{name}: the second copy's bytes differ");
        assert!(got_a == a_bytes, "{name}: the first copy's bytes differ");
        drop(busy);

        // A copy dropped uncollected gives its buffer back; the next copy of that size reuses
        // it and still gets its own bytes.
        let (c, _) = random_bytes(&mut rng, &[3, 5, 7, 3], &dev);
        drop(ops::copy_to_host(&c).unwrap());
        let (d, d_bytes) = random_bytes(&mut rng, &[3, 5, 7, 3], &dev);
        let got_d = ops::copy_to_host(&d)
            .unwrap()
            .wait_with(|bytes| bytes.to_vec())
            .unwrap();
        assert!(got_d == d_bytes, "{name}: the reused buffer's bytes differ");

        // A strided view comes back in its logical order.
        let t = d.permute((0, 3, 1, 2)).unwrap();
        let want: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
        let got = ops::copy_to_host(&t)
            .unwrap()
            .wait_with(|bytes| bytes.to_vec())
            .unwrap();
        assert!(got == want, "{name}: the permuted view's bytes differ");

        let empty = Tensor::zeros((0, 3), DType::U8, &dev).unwrap();
        let got = ops::copy_to_host(&empty)
            .unwrap()
            .wait_with(|bytes| bytes.len())
            .unwrap();
        assert_eq!(got, 0, "{name}");
        let f = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let err = ops::copy_to_host(&f).err().unwrap().to_string();
        assert!(err.contains("u8 tensors only"), "{name}: {err}");

        late_copy_back_matches(&mut rng, &dev);
    }
}

// ---- Flash attention (the UNet's case of multi-head attention: head dim 64, not causal) ----

/// (batch, heads, Lq, Lk, gain on q). A gain of 10 makes logits of ±40 or so: each row has a
/// dominant key and the running max moves between key tiles, which exercises the rescaling.
type FlashCase = (usize, usize, usize, usize, f32);

const FLASH_CASES: [FlashCase; 9] = [
    (1, 1, 1, 1, 1.0),        // one query, one key: 63 masked keys, 63 unwritten rows
    (3, 5, 15, 77, 1.0),      // cross-attention: a full key tile + 13; Lq below one wmma tile
    (1, 10, 100, 100, 1.0),   // multiples of neither 64 nor 16
    (1, 1, 256, 256, 10.0),   // whole tiles, dominant keys
    (3, 1, 77, 1030, 10.0),   // 17 key tiles, the last of 6 keys
    (1, 5, 1030, 15, 1.0),    // 17 query tiles, the last of 6 rows; fewer keys than a wmma tile
    (2, 10, 64, 64, 1.0),     // exactly one tile each way
    (1, 20, 256, 77, 10.0),   // SDXL's 1280-channel cross-attention at 512x512
    (2, 10, 1024, 1024, 1.0), // SDXL's 640-channel self-attention at 512x512
];

/// Cases with more scores than this run on CUDA only: on the CPU the op is the reference itself.
const FLASH_CPU_MAX_SCORES: usize = 1 << 20;

/// The reference for `[B, L, H*64]` inputs: the f64 loops of `fused_multi_head_attention` on
/// the CPU, from the same rounded values.
fn flash_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
    ops::fused_multi_head_attention(q, k, v, heads, scale, false).unwrap()
}

#[test]
fn flash_attention_matches_reference() {
    let mut rng = rng("flash_attention");
    let devs = devices("flash_attention");
    let scale = 1.0 / 8.0;
    for (b, h, lq, lk, gain) in FLASH_CASES {
        let q = (random(&mut rng, &[b, lq, h * 64], 0.0) * gain as f64).unwrap();
        let k = random(&mut rng, &[b, lk, h * 64], 0.0);
        let v = random(&mut rng, &[b, lk, h * 64], 0.0);
        for dtype in [DType::BF16, DType::F16] {
            let (_, qe) = place(&q, dtype, &Device::Cpu);
            let (_, ke) = place(&k, dtype, &Device::Cpu);
            let (_, ve) = place(&v, dtype, &Device::Cpu);
            let want = flash_reference(&qe, &ke, &ve, h, scale);
            for dev in &devs {
                if !dev.is_cuda() && b * h * lq * lk > FLASH_CPU_MAX_SCORES {
                    continue;
                }
                let (qd, _) = place(&q, dtype, dev);
                let (kd, _) = place(&k, dtype, dev);
                let (vd, _) = place(&v, dtype, dev);
                poison(dev, b * lq * h * 64, dtype);
                let before = ops::flash_launches();
                let got = ops::flash_attention(&qd, &kd, &vd, h, scale).unwrap();
                assert_eq!(
                    ops::flash_launches() - before,
                    u64::from(dev.is_cuda()),
                    "one kernel launch on CUDA, none on the CPU"
                );
                assert_eq!(got.dtype(), dtype);
                let what = format!(
                    "flash_attention {} {dtype:?} b={b} h={h} lq={lq} lk={lk} gain={gain}",
                    dev_name(dev)
                );
                assert_close(&got, &want, tolerance(dtype), &what);
            }
        }
    }
}

#[test]
fn flash_attention_rejects_bad_arguments() {
    let t = |s: &[usize], dtype| Tensor::ones(s, dtype, &Device::Cpu).unwrap();
    let bf = |s: &[usize]| t(s, DType::BF16);
    let err = |q: &Tensor, k: &Tensor, v: &Tensor, heads, scale| {
        ops::flash_attention(q, k, v, heads, scale)
            .unwrap_err()
            .to_string()
    };
    let f32s = t(&[1, 4, 64], DType::F32);
    let e = err(&f32s, &f32s, &f32s, 1, 1.0);
    assert!(e.contains("q has dtype F32"), "{e}");
    let e = err(
        &bf(&[1, 4, 64]),
        &t(&[1, 4, 64], DType::F16),
        &bf(&[1, 4, 64]),
        1,
        1.0,
    );
    assert!(e.contains("share a dtype"), "{e}");
    let e = err(&bf(&[1, 4, 96]), &bf(&[1, 4, 96]), &bf(&[1, 4, 96]), 2, 1.0);
    assert!(e.contains("q [1, 4, 96] has width 96"), "{e}");
    let e = err(
        &bf(&[1, 4, 128]),
        &bf(&[1, 5, 128]),
        &bf(&[1, 5, 64]),
        2,
        1.0,
    );
    assert!(e.contains("v [1, 5, 64]"), "{e}");
    let e = err(
        &bf(&[1, 4, 64]),
        &bf(&[1, 5, 64]),
        &bf(&[1, 5, 64]),
        1,
        f64::NAN,
    );
    assert!(e.contains("scale NaN is not finite"), "{e}");
    // No queries: an empty result of the right shape, no kernel.
    let out = ops::flash_attention(
        &bf(&[2, 0, 128]),
        &bf(&[2, 3, 128]),
        &bf(&[2, 3, 128]),
        2,
        1.0,
    )
    .unwrap();
    assert_eq!(out.dims(), [2, 0, 128]);
}

/// `multi_head_attention` takes the flash kernel on CUDA exactly when FLASH is on and the call
/// is the UNet's case, and gives the same values either way; a contiguous view at an offset
/// that is not a multiple of 8 elements still works (copied to an aligned buffer first).
#[test]
fn multi_head_attention_takes_flash_path_when_it_applies() {
    use turbine::ops::Kernels;
    let mut rng = rng("flash dispatch");
    let (b, h, lq, lk) = (2, 3, 70, 77);
    let scale = 0.125;
    let q = random(&mut rng, &[b, lq, h * 64], 0.0);
    let k = random(&mut rng, &[b, lk, h * 64], 0.0);
    let v = random(&mut rng, &[b, lk, h * 64], 0.0);
    let no_flash = Kernels::ALL.without(Kernels::FLASH);
    for dev in devices("flash dispatch") {
        let flash = u64::from(dev.is_cuda());
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let (qd, qe) = place(&q, dtype, &dev);
            let (kd, ke) = place(&k, dtype, &dev);
            let (vd, ve) = place(&v, dtype, &dev);
            let want = flash_reference(&qe, &ke, &ve, h, scale);
            let expect = if dtype == DType::F32 { 0 } else { flash };
            let run = |kernels, q: &Tensor, causal| {
                let before = ops::flash_launches();
                let out = ops::with_kernels(kernels, || {
                    ops::multi_head_attention(q, &kd, &vd, h, scale, causal)
                })
                .unwrap();
                (out, ops::flash_launches() - before)
            };
            let what = |path: &str| format!("flash dispatch {} {dtype:?} {path}", dev_name(&dev));

            let (out, n) = run(Kernels::ALL, &qd, false);
            assert_eq!(n, expect, "{}", what("all"));
            assert_close(&out, &want, tolerance(dtype), &what("all"));
            let (out, n) = run(no_flash, &qd, false);
            assert_eq!(n, 0, "{}", what("without flash"));
            assert_close(&out, &want, tolerance(dtype), &what("without flash"));
            let (_, n) = run(Kernels::ALL, &qd, true);
            assert_eq!(n, 0, "{}", what("causal"));

            // q as a view 3 elements into a larger buffer.
            let n_q = b * lq * h * 64;
            let padded = Tensor::cat(
                &[
                    &Tensor::zeros(3, dtype, &dev).unwrap(),
                    &qd.flatten_all().unwrap(),
                ],
                0,
            )
            .unwrap();
            let view = padded
                .narrow(0, 3, n_q)
                .unwrap()
                .reshape((b, lq, h * 64))
                .unwrap();
            assert_eq!(view.layout().start_offset(), 3);
            let (out, n) = run(Kernels::ALL, &view, false);
            assert_eq!(n, expect, "{}", what("offset view"));
            assert_close(&out, &want, tolerance(dtype), &what("offset view"));
        }
        // Head dim 32 is not the kernel's.
        let (q32, _) = place(&random(&mut rng, &[1, 5, 64], 0.0), DType::BF16, &dev);
        let before = ops::flash_launches();
        ops::multi_head_attention(&q32, &q32, &q32, 2, 1.0, false).unwrap();
        assert_eq!(ops::flash_launches() - before, 0, "head dim 32");
    }
}

/// A UNet whose attention heads are 64 wide (as SDXL's), random weights: on CUDA the flash lever
/// must launch the kernel from the model's attention layers and change the prediction by
/// rounding only; on the CPU the lever changes nothing.
#[test]
fn unet_with_flash_matches_unet_without() {
    use turbine::model::loader::RandomWeights;
    use turbine::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    use turbine::ops::Kernels;

    // Two levels of 64 and 128 channels with 1 and 2 heads: head dim 64 everywhere.
    let cfg: UNet2DConditionConfig = serde_json::from_str(
        r#"{"block_out_channels": [64, 128], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": [1, 2], "cross_attention_dim": 64,
            "norm_num_groups": 32, "use_linear_projection": true}"#,
    )
    .unwrap();
    let mut rng = rng("unet flash");
    let sample = random(&mut rng, &[2, 4, 16, 16], 0.0);
    let context = random(&mut rng, &[2, 77, 64], 0.0);
    let unused = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    // The same weights in f32 on the CPU: the reference both attention paths are measured against.
    let reference = {
        let vb = RandomWeights::new(11).into_var_builder(DType::F32, &Device::Cpu);
        let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
        unet.forward(&sample, 500.0, &context, &unused, &unused)
            .unwrap()
    };
    for dev in devices("unet flash") {
        for dtype in [DType::BF16, DType::F16] {
            let vb = RandomWeights::new(11).into_var_builder(dtype, &dev);
            let unet = UNet2DConditionModel::new(vb, &cfg).unwrap();
            let (s, _) = place(&sample, dtype, &dev);
            let (c, _) = place(&context, dtype, &dev);
            let run = |kernels| {
                let before = ops::flash_launches();
                let out =
                    ops::with_kernels(kernels, || unet.forward(&s, 500.0, &c, &unused, &unused))
                        .unwrap();
                (out, ops::flash_launches() - before)
            };
            // Only the attention levers, so that the comparison isolates the flash kernel.
            let (without, n) = run(Kernels::ATTENTION);
            assert_eq!(n, 0);
            let without = without
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let (with, n) = run(Kernels::ATTENTION.union(Kernels::FLASH));
            // Self- and cross-attention in each of 7 transformer blocks: 1 per down block,
            // 1 in the mid block, 2 per up block (diffusers builds 14 `Attention`s from this
            // config).
            let expect = if dev.is_cuda() { 14 } else { 0 };
            assert_eq!(n, expect, "flash launches in the UNet");
            let what = format!(
                "unet flash vs cuBLAS attention {} {dtype:?}",
                dev_name(&dev)
            );
            // Both paths round every layer of a random UNet to 8 (bf16) or 11 (f16) bits, and
            // the two roundings drift apart through it: on the H200 1.5-2.2e-2 in both dtypes,
            // so the difference alone bounds only gross errors. The flash kernel's own accuracy
            // is `flash_attention_matches_reference`'s; here, flash must be no further from the
            // f32 model than the path it replaces.
            assert_close(&with, &without, 5e-2, &what);
            let err_with = rel_err(&with, &reference);
            let err_without = rel_err(&without, &reference);
            let _ = writeln!(
                std::io::stderr(),
                "{what}: vs f32 on the CPU, flash {err_with:.2e}, cuBLAS {err_without:.2e}"
            );
            assert!(
                err_with <= 1.5 * err_without + 1e-3,
                "{what}: flash is {err_with:.3e} from the f32 model, the cuBLAS path {err_without:.3e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Image edits on CUDA: the pipeline's edit path (the 8-bit pixel table, the VAE encoder and its
// posterior sample, the inpainting blend) on the tiny fixture model, against the CPU's images.
// No fused op of its own; it runs here because this is the binary gpu_check.sh carries.

/// The tiny fixture model: where the tests were built, or relative to the working directory
/// (the device machine runs the carried binary from a copy of the checkout elsewhere).
fn tiny_model() -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    if built.is_dir() {
        built
    } else {
        std::path::PathBuf::from("tests/fixtures/tiny-sdxl")
    }
}

#[test]
fn image_edits_on_cuda_match_the_cpu() {
    use turbine::cli::bench::image_diff;
    use turbine::model::pipeline::{GenerationSettings, ImageRequest, InitImage, Pipeline};

    let test = "image_edits_on_cuda_match_the_cpu";
    let devices = devices(test);
    let Some(cuda) = devices.iter().find(|d| d.is_cuda()) else {
        return;
    };
    let input = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x * y) % 251) as u8])
    });
    // Repaint a disc, keep the rest.
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        let (dx, dy) = (x as f32 - 26.0, y as f32 - 35.0);
        image::Luma([if dx * dx + dy * dy < 400.0 { 255 } else { 0 }])
    });
    let items = [
        ImageRequest {
            prompt: "a photo of a cat".into(),
            negative_prompt: String::new(),
            seed: 3,
            init_image: Some(InitImage::new(input.clone())),
            partials: None,
        },
        ImageRequest {
            prompt: "A red car on the beach".into(),
            negative_prompt: String::new(),
            seed: 4,
            init_image: Some(InitImage::with_mask(input, mask)),
            partials: None,
        },
    ];
    // Two steps of a four-step schedule at strength 0.5: the ancestral noise and the blend of
    // the kept latents at an intermediate level both run.
    let settings = GenerationSettings {
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 0.0,
        init_step: Some(2),
        adapter: None,
    };
    let model = tiny_model();
    let reference = Pipeline::load(&model, &Device::Cpu, DType::F32)
        .unwrap()
        .generate(&settings, &items, None)
        .unwrap()
        .images;
    // f32: the same arithmetic in another order (cuDNN, cuBLAS); bf16: the half-precision bound
    // of the CPU tests. A broken path (NaN, a wrong layout, an unwritten buffer) is tens of
    // levels off.
    for (dtype, max_bound, mean_bound) in [(DType::F32, 8u8, 1.0), (DType::BF16, 255, 6.0)] {
        let images = Pipeline::load(&model, cuda, dtype)
            .unwrap()
            .generate(&settings, &items, None)
            .unwrap()
            .images;
        let (max, mean) = image_diff(&images, &reference);
        let _ = writeln!(
            std::io::stderr(),
            "{test}: cuda {dtype:?} vs cpu f32: max {max}/255, mean {mean:.3}/255"
        );
        assert!(
            max <= max_bound && mean <= mean_bound,
            "{test}: cuda {dtype:?} differs from the CPU by max {max}, mean {mean:.3}"
        );
    }
}
