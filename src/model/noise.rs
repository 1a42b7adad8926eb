//! Seeded Gaussian noise, generated on the CPU so every device starts from the same numbers.
//!
//! The generator is documented so that any client can reproduce an image's noise:
//! - each image has a `u64` seed;
//! - stream 0 of that seed gives the initial latents (shape `[4, h/8, w/8]`, row-major),
//!   stream `k >= 1` gives the Euler-ancestral noise added after denoising step `k-1` (of the
//!   whole schedule: an edit that starts at step 1 draws stream 2 after its first step);
//! - an edit adds stream 0 to its image's latents (times the start step's sigma) and samples
//!   the VAE encoder's posterior with stream [`IMAGE_STREAM`];
//! - a stream is `ChaCha20` (`rand_chacha::ChaCha20Rng::seed_from_u64(seed)`, then
//!   `set_stream(k)`), read as `u64`s; each pair `(a, b)` of draws becomes two standard normals
//!   by the Box–Muller transform with `u1 = ((a >> 11) + 1) * 2^-53` (in (0, 1]) and
//!   `u2 = (b >> 11) * 2^-53`: `r = sqrt(-2 ln u1)`, values `r cos(2π u2)`, `r sin(2π u2)`,
//!   computed in f64 and rounded to f32.
//!
//! An image's noise depends only on its own seed, never on the batch it runs in.

use candle_core::{Device, Result, Tensor};
use rand::{RngCore, SeedableRng};

/// The stream that samples an edit's VAE posterior (2^32: far from any step's stream).
pub const IMAGE_STREAM: u64 = 1 << 32;

/// `n` standard-normal f32 values from stream `stream` of `seed`.
pub fn standard_normal(seed: u64, stream: u64, n: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut out = Vec::with_capacity(n + 1);
    const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
    while out.len() < n {
        let u1 = ((rng.next_u64() >> 11) + 1) as f64 * SCALE;
        let u2 = (rng.next_u64() >> 11) as f64 * SCALE;
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// A `[seeds.len(), c, h, w]` f32 tensor on `device`: row `i` is stream `stream` of `seeds[i]`.
pub fn batch_noise(
    seeds: &[u64],
    stream: u64,
    (c, h, w): (usize, usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let per = c * h * w;
    let mut data = Vec::with_capacity(per * seeds.len());
    for &s in seeds {
        data.extend(standard_normal(s, stream, per));
    }
    // Through page-locked memory on CUDA: the upload is queued behind the batch still running
    // there instead of waiting for it (see `ops::upload_f32`).
    crate::ops::upload_f32(&data, (seeds.len(), c, h, w), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = standard_normal(42, 0, 1001);
        assert_eq!(a.len(), 1001);
        assert_eq!(a, standard_normal(42, 0, 1001));
        assert_ne!(a, standard_normal(43, 0, 1001));
        assert_ne!(a, standard_normal(42, 1, 1001));
        // A prefix of a longer draw is the shorter draw: the length never changes the values.
        assert_eq!(&standard_normal(42, 0, 5000)[..1001], &a[..]);
    }

    #[test]
    fn moments_are_standard_normal() {
        let v = standard_normal(7, 3, 200_000);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!(v.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn batch_rows_match_single_seeds() -> Result<()> {
        let t = batch_noise(&[1, 2, 3], 0, (4, 2, 3), &Device::Cpu)?;
        assert_eq!(t.dims(), &[3, 4, 2, 3]);
        let row1: Vec<f32> = t.get(1)?.flatten_all()?.to_vec1()?;
        assert_eq!(row1, standard_normal(2, 0, 24));
        Ok(())
    }
}
