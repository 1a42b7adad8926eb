//! Splitting a batch so that no tensor of one model call outgrows 32-bit element counts.
//!
//! On CUDA a tensor of 2^31 elements or more breaks three things turbine relies on: cuDNN's
//! legacy tensor descriptors refuse it (PyTorch splits such convolutions along the batch for the
//! same reason), candle's kernels count elements in `unsigned int` (past 2^32 the loop index
//! wraps and the kernel never ends), and turbine's kernels take `int` sizes. The VAE decoder
//! meets that at ordinary settings: its 256-channel maps at full resolution are exactly 2^31
//! elements for 32 images of 512x512, or 8 of 1024x1024. The decoder and the UNet therefore run
//! a batch in the fewest even runs of images whose largest activation stays within
//! [`MAX_TENSOR_ELEMENTS`]; every image is independent of the others in both (GroupNorm and
//! attention are per image), so the runs give the images one call would.

use candle_core::{Result, Tensor};

/// The most elements one activation of a model call may hold: `i32::MAX`.
pub const MAX_TENSOR_ELEMENTS: usize = i32::MAX as usize;

/// `(start, len)` runs that cover `n` items in order: the fewest runs in which `len *
/// per_item <= limit`, as even as possible (longer runs first). Fails when one item alone is
/// over `limit`; `what` names the item in that message.
pub fn batch_runs(
    n: usize,
    per_item: usize,
    limit: usize,
    what: &str,
) -> Result<Vec<(usize, usize)>> {
    if per_item > limit {
        candle_core::bail!(
            "{what} needs {per_item} elements in one tensor, over the {limit} one call can hold \
             (2^31 - 1 on CUDA): ask for a smaller image"
        );
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let per_run = (limit / per_item.max(1)).max(1);
    let runs = n.div_ceil(per_run);
    let (base, extra) = (n / runs, n % runs);
    let mut start = 0;
    Ok((0..runs)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let run = (start, len);
            start += len;
            run
        })
        .collect())
}

/// `f` over each run of `xs`'s first dimension (see [`batch_runs`]), results concatenated along
/// it; one run is `f(xs)` itself, without a copy.
pub fn map_runs(
    xs: &Tensor,
    per_item: usize,
    limit: usize,
    what: &str,
    mut f: impl FnMut(&Tensor, usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = xs.dim(0)?;
    let runs = batch_runs(n, per_item, limit, what)?;
    if runs.len() <= 1 {
        return f(xs, 0, n);
    }
    let parts = runs
        .into_iter()
        .map(|(start, len)| f(&xs.narrow(0, start, len)?, start, len))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_the_fewest_and_even() {
        // SDXL's decoder at 512x512: 2^26 elements per image, 31 images fit in 2^31 - 1.
        let per = 1 << 26;
        assert_eq!(
            batch_runs(31, per, MAX_TENSOR_ELEMENTS, "x").unwrap(),
            vec![(0, 31)]
        );
        assert_eq!(
            batch_runs(32, per, MAX_TENSOR_ELEMENTS, "x").unwrap(),
            vec![(0, 16), (16, 16)]
        );
        assert_eq!(
            batch_runs(8, 10, 30, "x").unwrap(),
            vec![(0, 3), (3, 3), (6, 2)]
        );
        assert_eq!(batch_runs(5, 10, 10, "x").unwrap().len(), 5);
        assert_eq!(batch_runs(0, 10, 10, "x").unwrap(), vec![]);
        // Items of no elements never split.
        assert_eq!(batch_runs(4, 0, 10, "x").unwrap(), vec![(0, 4)]);
    }

    #[test]
    fn runs_cover_every_item_once_within_the_limit() {
        for n in 1..40 {
            for per in 1..12 {
                for limit in per..40 {
                    let runs = batch_runs(n, per, limit, "x").unwrap();
                    let mut next = 0;
                    for &(s, l) in &runs {
                        assert_eq!(s, next);
                        assert!(l >= 1 && l * per <= limit, "{n} {per} {limit}: {runs:?}");
                        next += l;
                    }
                    assert_eq!(next, n);
                    assert_eq!(runs.len(), n.div_ceil(limit / per));
                    let (lo, hi) = runs
                        .iter()
                        .fold((usize::MAX, 0), |(a, b), r| (a.min(r.1), b.max(r.1)));
                    assert!(hi - lo <= 1, "{runs:?}");
                }
            }
        }
    }

    #[test]
    fn one_item_over_the_limit_is_an_error_that_says_so() {
        let err = batch_runs(2, 11, 10, "a 4096x4096 image")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a 4096x4096 image needs 11 elements"), "{err}");
    }

    #[test]
    fn map_runs_concatenates_in_order() -> Result<()> {
        let xs = Tensor::arange(0f32, 10., &candle_core::Device::Cpu)?.reshape((5, 2))?;
        let mut seen = Vec::new();
        let ys = map_runs(&xs, 2, 4, "x", |t, s, l| {
            seen.push((s, l, t.dim(0)?));
            t * 2.0
        })?;
        assert_eq!(seen, vec![(0, 2, 2), (2, 2, 2), (4, 1, 1)]);
        assert_eq!(ys.to_vec2::<f32>()?, (xs * 2.0)?.to_vec2::<f32>()?);
        Ok(())
    }
}
