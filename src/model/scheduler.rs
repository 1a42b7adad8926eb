//! The Euler-ancestral sampler of SDXL-Turbo, mirroring diffusers'
//! `EulerAncestralDiscreteScheduler` (`schedulers/scheduling_euler_ancestral_discrete.py`).
//!
//! Unlike diffusers, the scheduler holds no step counter: every call names its step index, so
//! one schedule can serve many batches at once. The ancestral noise is passed in by the caller
//! (turbine draws it from each image's seed, see [`crate::model::noise`]).
//!
//! Precision: diffusers computes the betas, `alphas_cumprod` and sigmas in f32 (torch), then
//! interpolates in f64 (numpy) and stores the sigmas as f32. Here the whole schedule is f64.
//! The difference is largest where `1 - alphas_cumprod` cancels, at the smallest timesteps:
//! for the scaled-linear SDXL schedule the sigmas differ by up to 1.3e-5 relative at t = 0,
//! by < 1e-6 for t >= 99 (every timestep of the 1–10 step trailing schedules); for
//! `squaredcos_cap_v2` up to 2.6e-4 at t = 0. The timesteps themselves are integers or f32
//! values and match diffusers exactly, including numpy's quirks (see `trailing_timesteps`).

use std::path::Path;

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::loader::{read_json, LoadError, LoadResult};

/// `scheduler/scheduler_config.json`. Defaults are diffusers' constructor defaults; keys that
/// `EulerAncestralDiscreteScheduler` does not take (`clip_sample`, `use_karras_sigmas`, ...)
/// are ignored, as diffusers ignores them.
#[derive(Debug, Clone, Deserialize)]
pub struct EulerAncestralConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default = "default_timestep_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: i64,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction_type() -> String {
    "epsilon".into()
}
fn default_timestep_spacing() -> String {
    "linspace".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PredictionType {
    Epsilon,
    VPrediction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// A config value turbine cannot honour: (field, value, why).
type Rejection = (&'static str, String, String);

struct Parsed {
    beta_schedule: BetaSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
}

impl EulerAncestralConfig {
    /// Reads and validates `scheduler_config.json`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let cfg: Self = read_json(path)?;
        cfg.parse()
            .map_err(|(field, value, why)| LoadError::Unsupported {
                path: path.to_path_buf(),
                field: field.into(),
                value,
                why,
            })?;
        Ok(cfg)
    }

    fn parse(&self) -> std::result::Result<Parsed, Rejection> {
        if let Some(name) = &self.class_name {
            if name != "EulerAncestralDiscreteScheduler" {
                return Err((
                    "_class_name",
                    name.clone(),
                    "turbine implements only EulerAncestralDiscreteScheduler".into(),
                ));
            }
        }
        if self.num_train_timesteps < 2 {
            return Err((
                "num_train_timesteps",
                self.num_train_timesteps.to_string(),
                "must be at least 2".into(),
            ));
        }
        let beta_schedule = match self.beta_schedule.as_str() {
            "linear" => BetaSchedule::Linear,
            "scaled_linear" => BetaSchedule::ScaledLinear,
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            other => {
                return Err((
                    "beta_schedule",
                    other.into(),
                    "expected linear, scaled_linear or squaredcos_cap_v2".into(),
                ))
            }
        };
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps || b.iter().any(|&x| !(0.0..1.0).contains(&x)) {
                return Err((
                    "trained_betas",
                    format!("[{} values]", b.len()),
                    format!(
                        "expected num_train_timesteps ({}) values in [0, 1)",
                        self.num_train_timesteps
                    ),
                ));
            }
        }
        let prediction = match self.prediction_type.as_str() {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => {
                return Err((
                    "prediction_type",
                    other.into(),
                    "expected epsilon or v_prediction (diffusers implements no other for this \
                     scheduler)"
                        .into(),
                ))
            }
        };
        let spacing = match self.timestep_spacing.as_str() {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => {
                return Err((
                    "timestep_spacing",
                    other.into(),
                    "expected linspace, leading or trailing".into(),
                ))
            }
        };
        Ok(Parsed {
            beta_schedule,
            prediction,
            spacing,
        })
    }

    /// `betas` as diffusers' constructor builds them (before any zero-SNR rescaling).
    fn betas(&self, schedule: BetaSchedule) -> Vec<f64> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return b.clone();
        }
        let linspace = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
                .collect()
        };
        match schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        }
    }

    /// `alphas_cumprod` over the training timesteps.
    fn alphas_cumprod(&self, schedule: BetaSchedule) -> Vec<f64> {
        let mut betas = self.betas(schedule);
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut acc = 1.0;
        let mut out: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        if self.rescale_betas_zero_snr {
            // diffusers' floor, so the last sigma stays finite.
            if let Some(last) = out.last_mut() {
                *last = 2f64.powi(-24);
            }
        }
        out
    }
}

/// Zero terminal SNR (Lin et al. 2023, Algorithm 1).
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let sqrt_ac: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    let alpha_bar: Vec<f64> = sqrt_ac
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    let mut out = Vec::with_capacity(betas.len());
    out.push(1.0 - alpha_bar[0]);
    for w in alpha_bar.windows(2) {
        out.push(1.0 - w[1] / w[0]);
    }
    out
}

/// numpy's `np.arange(start, 0, -step)` for `start, step > 0`, element for element: numpy
/// sizes the array as `ceil(start / step)` and fills it as `start + i * delta` with
/// `delta = (start - step) - start`. For some step counts (61, 103, ... of 1000) the length
/// is one more than asked, so diffusers runs one extra step; turbine does the same.
fn numpy_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let second = start - step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// diffusers' `trailing` spacing: `np.arange(T, 0, -T / n).round() - 1` (round half to even),
/// in f32.
fn trailing_timesteps(train: usize, steps: usize) -> Vec<f64> {
    numpy_arange_down(train as f64, train as f64 / steps as f64)
        .into_iter()
        .map(|t| (t.round_ties_even() as f32 - 1.0) as f64)
        .collect()
}

/// diffusers' `linspace` spacing: `np.linspace(0, T - 1, n)` reversed, rounded to f32.
fn linspace_timesteps(train: usize, steps: usize) -> Vec<f64> {
    let stop = (train - 1) as f64;
    let mut out: Vec<f64> = if steps == 1 {
        vec![0.0]
    } else {
        let step = stop / (steps - 1) as f64;
        (0..steps)
            .map(|i| {
                if i == steps - 1 {
                    stop
                } else {
                    i as f64 * step
                }
            })
            .collect()
    };
    out.reverse();
    out.into_iter().map(|t| t as f32 as f64).collect()
}

/// diffusers' `leading` spacing: multiples of `T // n`, reversed, plus `steps_offset`.
fn leading_timesteps(train: usize, steps: usize, offset: i64) -> Vec<f64> {
    let ratio = (train / steps) as i64;
    (0..steps as i64)
        .rev()
        .map(|i| (i * ratio + offset) as f32 as f64)
        .collect()
}

/// numpy's `np.interp(x, arange(len(fp)), fp)`: clamped at both ends.
fn interp(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// The schedule for one number of inference steps.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    /// One per timestep, then 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    /// diffusers' `__init__` followed by `set_timesteps(num_inference_steps)`.
    pub fn new(cfg: &EulerAncestralConfig, num_inference_steps: usize) -> Result<Self> {
        let parsed = cfg.parse().map_err(|(field, value, why)| {
            candle_core::Error::Msg(format!(
                "scheduler config: unsupported `{field}` = {value} ({why})"
            ))
        })?;
        let train = cfg.num_train_timesteps;
        if num_inference_steps == 0 || num_inference_steps > train {
            return Err(candle_core::Error::Msg(format!(
                "num_inference_steps must be between 1 and num_train_timesteps ({train}), got \
                 {num_inference_steps}"
            )));
        }
        let timesteps = match parsed.spacing {
            TimestepSpacing::Linspace => linspace_timesteps(train, num_inference_steps),
            TimestepSpacing::Leading => {
                leading_timesteps(train, num_inference_steps, cfg.steps_offset)
            }
            TimestepSpacing::Trailing => trailing_timesteps(train, num_inference_steps),
        };
        let full: Vec<f64> = cfg
            .alphas_cumprod(parsed.beta_schedule)
            .into_iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &full)).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match parsed.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction: parsed.prediction,
        })
    }

    /// The UNet's timestep per step. Usually `num_inference_steps` values, but one more for
    /// the step counts where diffusers' trailing spacing yields one more (see
    /// `numpy_arange_down`): loop over these, not over the requested count.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// The noise level per step, followed by a final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The standard deviation of the initial latents.
    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn sigma(&self, step_index: usize) -> Result<f64> {
        if step_index >= self.timesteps.len() {
            return Err(candle_core::Error::Msg(format!(
                "step_index {step_index} is out of range: the schedule has {} steps",
                self.timesteps.len()
            )));
        }
        Ok(self.sigmas[step_index])
    }

    /// The UNet input at `step_index`: `sample / sqrt(sigma^2 + 1)`, in the sample's dtype.
    pub fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    /// Whether the step at `step_index` adds ancestral noise: every step but the last, which
    /// goes to sigma 0 (so SDXL-Turbo's one step never does, and its noise need not be drawn).
    pub fn adds_noise(&self, step_index: usize) -> Result<bool> {
        self.sigma(step_index)?;
        Ok(self.sigmas[step_index + 1] > 0.0)
    }

    /// The denoised estimate at `step_index` (diffusers' `pred_original_sample`): what the
    /// model predicts the finished latents to be, in f32. The step to sigma 0 (the last) returns
    /// it; earlier steps move towards it. Streamed partial images are this estimate, decoded.
    pub fn denoised(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        if model_output.dims() != sample.dims() {
            return Err(candle_core::Error::Msg(format!(
                "denoised: model_output has shape {:?} but the sample has {:?}",
                model_output.dims(),
                sample.dims()
            )));
        }
        let (a, b) = self.denoised_coefficients(sigma);
        let x = sample.to_dtype(DType::F32)?;
        let m = model_output.to_dtype(DType::F32)?;
        x.affine(b, 0.0)? + m.affine(a, 0.0)?
    }

    /// The denoised estimate is `a * model_output + b * sample` at `sigma`: `(a, b)`.
    fn denoised_coefficients(&self, sigma: f64) -> (f64, f64) {
        match self.prediction {
            PredictionType::Epsilon => (-sigma, 1.0),
            PredictionType::VPrediction => (
                -sigma / (sigma * sigma + 1.0).sqrt(),
                1.0 / (sigma * sigma + 1.0),
            ),
        }
    }

    /// One ancestral Euler step from `sample` at `step_index` to the next noise level, with
    /// `noise` (standard normal, the sample's shape) as the ancestral noise, which a step that
    /// [adds noise](Self::adds_noise) must be given (any other ignores it). Computed in f32;
    /// returned in `model_output`'s dtype, as diffusers does.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        let sigma_to = self.sigmas[step_index + 1];
        let inputs = [("model_output", Some(model_output)), ("noise", noise)];
        for (name, t) in inputs.iter().filter_map(|(n, t)| t.map(|t| (n, t))) {
            if t.dims() != sample.dims() {
                return Err(candle_core::Error::Msg(format!(
                    "scheduler step: {name} has shape {:?} but the sample has {:?}",
                    t.dims(),
                    sample.dims()
                )));
            }
        }
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        // diffusers takes sqrt(sigma_to^2 - sigma_up^2), which is sigma_to^2 / sigma; its f32
        // subtraction goes negative (NaN) when sigma >> sigma_to (the cosine schedule's
        // sigma_max of 20291 followed by 1.75), the closed form cannot.
        let sigma_down = sigma_to * sigma_to / sigma;
        let dt = sigma_down - sigma;
        // The denoised estimate is `a * model_output + b * sample`; the Euler step
        // `sample + (sample - denoised) / sigma * dt` is then linear in both inputs.
        let (a, b) = self.denoised_coefficients(sigma);
        let c_sample = 1.0 + dt * (1.0 - b) / sigma;
        let c_model = -dt * a / sigma;
        let x = sample.to_dtype(DType::F32)?;
        let m = model_output.to_dtype(DType::F32)?;
        let mut prev = (x.affine(c_sample, 0.0)? + m.affine(c_model, 0.0)?)?;
        if sigma_up > 0.0 {
            let Some(noise) = noise else {
                return Err(candle_core::Error::Msg(format!(
                    "scheduler step {step_index} adds noise (sigma_up {sigma_up}) and was given none"
                )));
            };
            prev = (prev + noise.to_dtype(DType::F32)?.affine(sigma_up, 0.0)?)?;
        }
        prev.to_dtype(model_output.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turbo() -> EulerAncestralConfig {
        serde_json::from_str(
            r#"{"_class_name": "EulerAncestralDiscreteScheduler", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false,
                "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
                "timestep_spacing": "trailing", "trained_betas": null}"#,
        )
        .unwrap()
    }

    #[test]
    fn numpy_arange_quirk_adds_a_step() {
        assert_eq!(
            trailing_timesteps(1000, 4),
            vec![999.0, 749.0, 499.0, 249.0]
        );
        assert_eq!(trailing_timesteps(1000, 61).len(), 62);
        assert_eq!(trailing_timesteps(1000, 60).len(), 60);
    }

    #[test]
    fn every_step_but_the_last_needs_its_noise() {
        let s = EulerAncestralScheduler::new(&turbo(), 4).unwrap();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
        for i in 0..4 {
            assert_eq!(s.adds_noise(i).unwrap(), i < 3, "step {i}");
        }
        let err = s.step(&eps, 0, &x, None).unwrap_err().to_string();
        assert!(err.contains("given none"), "{err}");
        assert!(s.adds_noise(4).is_err());
    }

    #[test]
    fn last_step_of_one_step_schedule_is_the_denoised_sample() {
        let s = EulerAncestralScheduler::new(&turbo(), 1).unwrap();
        assert_eq!(s.timesteps(), &[999.0]);
        assert_eq!(s.sigmas()[1], 0.0);
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
        let noise = Tensor::new(&[100.0f32, 100.0], &dev).unwrap();
        assert!(!s.adds_noise(0).unwrap());
        let out: Vec<f32> = s
            .step(&eps, 0, &x, Some(&noise))
            .unwrap()
            .to_vec1()
            .unwrap();
        // The noise is not read: none at all gives the same sample.
        let without: Vec<f32> = s.step(&eps, 0, &x, None).unwrap().to_vec1().unwrap();
        assert_eq!(out, without);
        let sigma = s.sigmas()[0];
        let want = [1.0 - sigma * 0.5, 2.0 + sigma * 0.5];
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() < 1e-4, "{o} vs {w}");
        }
    }

    /// The estimate a partial image shows: what the step to sigma 0 would give from that
    /// step, and the point an intermediate step moves towards (`x + (x - d) / sigma * dt`).
    #[test]
    fn denoised_is_where_the_step_heads() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[1.5f32, -2.0, 0.25], &dev).unwrap();
        let eps = Tensor::new(&[0.5f32, -0.75, 2.0], &dev).unwrap();
        for prediction in ["epsilon", "v_prediction"] {
            let mut cfg = turbo();
            cfg.prediction_type = prediction.to_string();
            let one = EulerAncestralScheduler::new(&cfg, 1).unwrap();
            let four = EulerAncestralScheduler::new(&cfg, 4).unwrap();
            // The first step of every trailing schedule is t = 999: the same estimate, which
            // one step to sigma 0 returns.
            let last = one
                .step(&eps, 0, &x, None)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d1 = one.denoised(&eps, 0, &x).unwrap().to_vec1::<f32>().unwrap();
            let d4 = four
                .denoised(&eps, 0, &x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for ((l, a), b) in last.iter().zip(&d1).zip(&d4) {
                assert!(
                    (l - a).abs() <= 1e-5 * l.abs().max(1.0),
                    "{prediction}: {l} vs {a}"
                );
                assert_eq!(a, b, "{prediction}");
            }
            // Step 1 of four without ancestral noise (sigma_up's part set to zero) lands on
            // the line from the sample to the estimate.
            let d = four
                .denoised(&eps, 1, &x)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let zero = Tensor::zeros(3, DType::F32, &dev).unwrap();
            let stepped = four.step(&eps, 1, &x, Some(&zero)).unwrap();
            let stepped = stepped.to_vec1::<f32>().unwrap();
            let (sigma, to) = (four.sigmas()[1], four.sigmas()[2]);
            let dt = to * to / sigma - sigma;
            let xs = x.to_vec1::<f32>().unwrap();
            for i in 0..3 {
                let want = xs[i] as f64 + (xs[i] as f64 - d[i] as f64) / sigma * dt;
                assert!((stepped[i] as f64 - want).abs() < 1e-4, "{prediction} {i}");
            }
        }
        let four = EulerAncestralScheduler::new(&turbo(), 4).unwrap();
        assert!(four.denoised(&eps, 4, &x).is_err());
        let short = Tensor::new(&[1.0f32], &dev).unwrap();
        assert!(four.denoised(&short, 0, &x).is_err());
    }

    #[test]
    fn rejections_name_the_field() {
        for (field, json) in [
            ("beta_schedule", r#"{"beta_schedule": "cosine"}"#),
            ("prediction_type", r#"{"prediction_type": "sample"}"#),
            ("timestep_spacing", r#"{"timestep_spacing": "karras"}"#),
            (
                "_class_name",
                r#"{"_class_name": "EulerDiscreteScheduler"}"#,
            ),
            ("trained_betas", r#"{"trained_betas": [0.1, 0.2]}"#),
        ] {
            let cfg: EulerAncestralConfig = serde_json::from_str(json).unwrap();
            let (f, _, _) = cfg.parse().err().unwrap();
            assert_eq!(f, field);
            let err = EulerAncestralScheduler::new(&cfg, 2)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, r#"{"timestep_spacing": "karras"}"#).unwrap();
        match EulerAncestralConfig::from_file(&path) {
            Err(LoadError::Unsupported { field, .. }) => assert_eq!(field, "timestep_spacing"),
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let err = EulerAncestralScheduler::new(&turbo(), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_inference_steps"), "{err}");
    }
}
