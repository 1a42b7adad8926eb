//! Turns a request's JSON object into a [`ValidRequest`], or into a 400/404 that names the
//! `param` at fault and the bound it broke ("n must be an integer between 1 and 10, got 11").
//! After this, the batcher and the model may assume valid input.
//!
//! JSON `null` means "not given" for every optional field, as in OpenAI's API (the SDKs send
//! `null` for fields set to `None`).
//!
//! `POST /v1/images/edits` sends the same fields as multipart form text; [`form_value`] reads
//! each back into the JSON type the field has, and [`validate_edit`] checks them with the
//! edit's own fields (`strength`, `input_fidelity`; no `style` or `moderation`...) and a `size`
//! that defaults to the input image's shape.
//!
//! `quality` maps to denoising steps (SDXL-Turbo is distilled for 1–4 steps; its model card
//! uses 1): `auto` and `low` → 1 step, `standard` and `medium` → 2, `high` and `hd` → 4. The
//! response reports the level used (`low`, `medium` or `high`). The `steps` extension
//! overrides the mapping.

use serde_json::{Map, Value};

use super::api::{OutputFormat, ResponseFormat};
use super::config::{AdapterLease, ModelIdentity, RequestLimits, MAX_N};
use super::error::ApiError;
use super::queue::{Guidance, ShapeKey};
use crate::model::pipeline::{edit_schedule, InitImage};

/// The largest seed: JSON numbers above 2^53 - 1 lose precision in JavaScript clients, which
/// could then not reproduce an image from the seed they were given.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// `quality` value → (level reported back, denoising steps; at most `--max-steps`).
/// SDXL-Turbo is distilled for 1–4 steps; OpenAI's `xhigh` and `max` (GPT Image 2.5) run more,
/// which mostly changes detail.
pub const QUALITY_STEPS: &[(&str, &str, u32)] = &[
    ("auto", "low", 1),
    ("low", "low", 1),
    ("standard", "medium", 2),
    ("medium", "medium", 2),
    ("high", "high", 4),
    ("hd", "high", 4),
    ("xhigh", "xhigh", 6),
    ("max", "max", 8),
];

/// The quality level a step count reaches: the highest whose steps it has (1 → `low`, 2 and 3
/// → `medium`, 4 and 5 → `high`, ...).
pub fn quality_of_steps(steps: u32) -> &'static str {
    QUALITY_STEPS
        .iter()
        .filter(|q| q.2 <= steps)
        .max_by_key(|q| q.2)
        .map_or("low", |q| q.1)
}

/// Fields both endpoints know; anything not known to the endpoint is refused (as OpenAI does)
/// rather than ignored, so a client never silently loses an option it believed was applied.
pub const COMMON_FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "quality",
    "response_format",
    "output_format",
    "output_compression",
    "background",
    "user",
    "safety_identifier",
    "stream",
    "partial_images",
    "seed",
    "steps",
    "guidance_scale",
    "negative_prompt",
];

/// What `POST /v1/images/generations` knows besides [`COMMON_FIELDS`].
pub const GENERATION_FIELDS: &[&str] = &[
    "moderation",
    "style",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
];

/// What `POST /v1/images/edits` knows besides [`COMMON_FIELDS`] (its files, `image`, `mask`
/// and `markup`, are read apart): the official SDK's edit parameters and `strength`.
pub const EDIT_FIELDS: &[&str] = &[
    "input_fidelity",
    "strength",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "svg",
];

/// Form fields read as JSON integers, numbers and booleans ([`form_value`]).
const INTEGER_FIELDS: &[&str] = &["n", "output_compression", "partial_images", "seed", "steps"];
const NUMBER_FIELDS: &[&str] = &["strength", "guidance_scale"];
const BOOLEAN_FIELDS: &[&str] = &["stream"];

/// An edit's default `strength`: SDXL-Turbo's documented edit (`num_inference_steps=2,
/// strength=0.5` in diffusers), half the noise of a generation.
pub const DEFAULT_STRENGTH: f64 = 0.5;

/// The longest schedule an edit may ask for (`steps / strength`): the model's training
/// timesteps (1000 for SDXL's scheduler).
const MAX_SCHEDULE_STEPS: usize = 1000;

/// What an edit adds to a request.
#[derive(Debug, Clone, PartialEq)]
pub struct EditSettings {
    pub strength: f64,
    /// diffusers' `num_inference_steps`: the schedule, of which the last `steps` run.
    pub schedule_steps: u32,
    /// The schedule step the edit starts from (diffusers' `t_start`).
    pub start_step: u32,
    /// The input image at the request's size; set by the handler once decoded.
    pub image: Option<InitImage>,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub prompt: String,
    /// Empty: none.
    pub negative_prompt: String,
    pub n: u32,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f64,
    /// `None`: the server draws one.
    pub seed: Option<u64>,
    /// The quality level reported back (`low|medium|high`).
    pub quality: &'static str,
    pub response_format: ResponseFormat,
    pub output_format: OutputFormat,
    /// JPEG quality 0–100 (100 = best); WebP lossless at 100, lossy at that quality below;
    /// PNG ignores it.
    pub output_compression: u8,
    /// The effective `safety_identifier` (or `user`): logged, and echoed in the response.
    pub user: Option<String>,
    /// `stream: true`: the images go back as server-sent events, one
    /// `image_generation.completed` (`image_edit.completed`) each as it is done (always base64).
    pub stream: bool,
    /// A stream's `partial_images` (0–3): previews per image, each an
    /// `image_generation.partial_image` (`image_edit.partial_image`) event before its image's
    /// completed event; as many as the image has steps before its last (none in one step).
    pub partial_images: u8,
    /// `POST /v1/images/edits`; `steps` is then the number of steps run.
    pub edit: Option<EditSettings>,
    /// The adapter `model` named (`--lora-modules`, or loaded while serving), held while the
    /// request lives; `None`: the model itself.
    pub adapter: Option<AdapterLease>,
}

impl ValidRequest {
    pub fn key(&self) -> ShapeKey {
        ShapeKey {
            width: self.width,
            height: self.height,
            steps: self.edit.as_ref().map_or(self.steps, |e| e.schedule_steps),
            guidance: Guidance::from_scale(self.guidance_scale),
            init_step: self.edit.as_ref().map(|e| e.start_step),
            adapter: self.adapter.as_ref().map(AdapterLease::slot),
        }
    }
}

/// Validates a parsed JSON body against the configured bounds and the served model.
pub fn validate(
    body: &Value,
    limits: &RequestLimits,
    model: &ModelIdentity,
) -> Result<ValidRequest, ApiError> {
    validate_fields(body, limits, model, None)
}

/// Validates an edit's form fields (read with [`form_value`]) for an input image of
/// `image_size` (width, height). Without a `size` (or with `auto`), the output keeps the
/// input's aspect ratio at about the area of `--default-size` ([`auto_edit_size`]).
pub fn validate_edit(
    fields: &Value,
    image_size: (u32, u32),
    limits: &RequestLimits,
    model: &ModelIdentity,
) -> Result<ValidRequest, ApiError> {
    validate_fields(fields, limits, model, Some(image_size))
}

/// A name the client sent, as an error echoes it: at most 64 characters (a body may be
/// megabytes, and a path kilobytes).
pub fn echoed(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_string(),
    }
}

/// A multipart text field's value as the JSON type its field has: integers, numbers and
/// booleans parsed (`"2"` → 2, `"true"` → true); anything that does not parse stays a string,
/// for the validator to refuse with the field's bound.
pub fn form_value(name: &str, text: &str) -> Value {
    let t = text.trim();
    if INTEGER_FIELDS.contains(&name) {
        if let Ok(v) = t.parse::<i64>() {
            return Value::from(v);
        }
        if let Ok(v) = t.parse::<u64>() {
            return Value::from(v);
        }
    } else if NUMBER_FIELDS.contains(&name) {
        if let Some(v) = t.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return Value::Number(v);
        }
    } else if BOOLEAN_FIELDS.contains(&name) {
        match t.to_ascii_lowercase().as_str() {
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
    }
    Value::String(text.to_string())
}

/// An edit's size when none is given: the input's aspect ratio at about the default size's
/// area, each side rounded to a multiple of 8 within the configured bounds.
pub fn auto_edit_size((w, h): (u32, u32), limits: &RequestLimits) -> (u32, u32) {
    let (dw, dh) = limits.default_size;
    let scale =
        ((f64::from(dw) * f64::from(dh)) / (f64::from(w.max(1)) * f64::from(h.max(1)))).sqrt();
    let side = |v: u32| {
        let r = ((f64::from(v) * scale / 8.0).round() as u32).saturating_mul(8);
        r.clamp(limits.min_side, limits.max_side)
    };
    let (mut w, mut h) = (side(w), side(h));
    // A side raised to the smallest allowed can leave the other's product over the pixel
    // bound (a very long, thin input): the longer side gives way.
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        let longest = |other: u32| {
            let fit = (limits.max_pixels / u64::from(other) / 8 * 8) as u32;
            fit.max(limits.min_side)
        };
        if w >= h {
            w = longest(h);
        } else {
            h = longest(w);
        }
    }
    (w, h)
}

fn validate_fields(
    body: &Value,
    limits: &RequestLimits,
    model: &ModelIdentity,
    edit_image: Option<(u32, u32)>,
) -> Result<ValidRequest, ApiError> {
    let obj = match body {
        Value::Object(obj) => obj,
        other => return Err(ApiError::NotAnObject(json_kind(other))),
    };
    let own = if edit_image.is_some() {
        EDIT_FIELDS
    } else {
        GENERATION_FIELDS
    };
    // A form sends the `svg` object as `svg[model]`, `svg[reasoning][effort]`: refused below.
    let known = |k: &str| COMMON_FIELDS.contains(&k) || own.contains(&k) || k.starts_with("svg[");
    if let Some(unknown) = obj.keys().find(|k| !known(k)) {
        let name = echoed(unknown);
        return Err(ApiError::invalid(
            &name,
            "unknown_parameter",
            format!("Unrecognized request argument supplied: {name}"),
        ));
    }
    let f = Fields(obj);

    let model_name = f.string("model")?;
    let adapter = match model_name {
        Some(name) => model
            .resolve(name)
            .ok_or_else(|| ApiError::ModelNotFound(name.to_string()))?,
        None => None,
    };

    let prompt = match f.get("prompt") {
        None => {
            return Err(ApiError::invalid(
                "prompt",
                "missing_required_parameter",
                "prompt is required",
            ))
        }
        Some(_) => f.string("prompt")?.unwrap_or_default(),
    };
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "invalid_value",
            "prompt must not be empty",
        ));
    }
    check_length("prompt", prompt, limits.max_prompt_chars)?;
    let negative_prompt = f.string("negative_prompt")?.unwrap_or_default();
    check_length("negative_prompt", negative_prompt, limits.max_prompt_chars)?;

    let n = f.integer("n", 1, i128::from(MAX_N))?.unwrap_or(1) as u32;
    let (width, height) = match (edit_image, f.string("size")?) {
        (Some(image), None | Some("auto")) => auto_edit_size(image, limits),
        (_, size) => parse_size(size, limits)?,
    };

    let quality_names: Vec<&str> = QUALITY_STEPS.iter().map(|q| q.0).collect();
    let quality = f.one_of("quality", &quality_names)?.unwrap_or("auto");
    let (reported_quality, quality_steps) = match quality {
        // No quality asked for: the server's default steps, reported as the level they reach.
        "auto" => (quality_of_steps(limits.default_steps), limits.default_steps),
        _ => QUALITY_STEPS
            .iter()
            .find(|q| q.0 == quality)
            .map(|q| (q.1, q.2))
            .unwrap_or(("low", 1)),
    };

    let stream = f.boolean("stream")? == Some(true);
    let response_format =
        match f.one_of("response_format", ResponseFormat::NAMES)? {
            Some("url") if stream => return Err(ApiError::invalid(
                "response_format",
                "unsupported_value",
                "streamed images are sent inline as b64_json: use response_format \"b64_json\" \
                 (or omit it) with stream, or \"url\" without stream",
            )),
            Some(s) => ResponseFormat::parse(s)
                .unwrap_or_else(|| limits.default_response_format.for_model(model_name)),
            // A stream carries its images inline whatever the server's default.
            None if stream => ResponseFormat::B64Json,
            None => limits.default_response_format.for_model(model_name),
        };

    let output_format = match f.get("output_format") {
        None => OutputFormat::Png,
        Some(v) => match v.as_str().and_then(OutputFormat::parse) {
            Some(fmt) => fmt,
            None if v.is_string() => {
                return Err(ApiError::invalid(
                    "output_format",
                    "unsupported_value",
                    format!(
                        "output_format {} is not supported; use one of png, jpeg, webp",
                        show(v)
                    ),
                ))
            }
            None => return Err(type_error("output_format", "one of png, jpeg, webp", v)),
        },
    };
    let output_compression = f.integer("output_compression", 0, 100)?.unwrap_or(100) as u8;

    if f.one_of("background", &["auto", "opaque", "transparent"])? == Some("transparent") {
        return Err(ApiError::invalid(
            "background",
            "unsupported_value",
            "background \"transparent\" is not supported: SDXL-Turbo generates opaque \
                 images; use \"auto\" or \"opaque\"",
        ));
    }
    f.one_of("moderation", &["auto", "low"])?;
    // Accepted for OpenAI's clients; `strength` says how much of the input an edit keeps.
    f.one_of("input_fidelity", &["low", "high"])?;
    f.one_of("style", &["vivid", "natural"])?;
    f.one_of("complexity", &["low", "medium", "high"])?;
    let user = f.string("user")?;
    let safety_identifier = f.string("safety_identifier")?;
    let user = safety_identifier
        .filter(|s| !s.is_empty())
        .or(user)
        .filter(|s| !s.is_empty())
        .map(str::to_string);

    // With stream, up to 3 partial images may be asked for: the denoised estimates of the
    // steps before the last. As OpenAI's API allows when an image is done before them, fewer
    // are sent when there are fewer such steps (none in SDXL-Turbo's default one step).
    let partial_images = f.integer("partial_images", 0, 3)?.unwrap_or(0) as u8;
    if partial_images > 0 && !stream {
        return Err(ApiError::invalid(
            "partial_images",
            "unsupported_value",
            "partial_images applies to streamed responses only: set stream to true, or \
             partial_images to 0",
        ));
    }
    for field in ["frame_count", "frame_duration_ms", "svg"] {
        let nested = format!("{field}[");
        if obj.keys().any(|k| k == field || k.starts_with(&nested)) {
            return Err(ApiError::invalid(
                field,
                "unsupported_value",
                format!(
                    "{field} applies only to gif/svg output, which this server does not produce"
                ),
            ));
        }
    }

    let steps = f
        .integer("steps", 1, i128::from(limits.max_steps))?
        .map_or(quality_steps.min(limits.max_steps), |s| s as u32);
    let guidance_scale = f
        .number("guidance_scale", 0.0, limits.max_guidance_scale)?
        .unwrap_or(limits.default_guidance_scale);
    // Image i gets seed + i, so the last image's seed must stay within bounds too.
    let max_seed = MAX_SEED - u64::from(n - 1);
    let seed = f
        .integer("seed", 0, i128::from(max_seed))?
        .map(|s| s as u64);
    let edit = match edit_image {
        None => None,
        Some(_) => {
            let strength = f.number("strength", 0.01, 1.0)?.unwrap_or(DEFAULT_STRENGTH);
            let (schedule, start) = edit_schedule(steps as usize, strength)
                .map_err(|e| ApiError::invalid("strength", "invalid_value", e.0))?;
            if schedule > MAX_SCHEDULE_STEPS {
                return Err(ApiError::invalid(
                    "strength",
                    "invalid_value",
                    format!(
                        "{steps} steps at strength {strength} need a schedule of {schedule} \
                         steps, over the model's {MAX_SCHEDULE_STEPS}: raise strength to at \
                         least {} or lower steps",
                        steps as f64 / MAX_SCHEDULE_STEPS as f64
                    ),
                ));
            }
            Some(EditSettings {
                strength,
                schedule_steps: schedule as u32,
                start_step: start as u32,
                image: None,
            })
        }
    };

    Ok(ValidRequest {
        prompt: prompt.to_string(),
        negative_prompt: negative_prompt.to_string(),
        n,
        width,
        height,
        steps,
        guidance_scale,
        seed,
        quality: reported_quality,
        response_format,
        output_format,
        output_compression,
        user,
        stream,
        partial_images,
        edit,
        adapter,
    })
}

/// Accessors that produce the error for a wrong type or bound.
pub(super) struct Fields<'a>(pub(super) &'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    pub(super) fn string(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(type_error(name, "a string", v)),
        }
    }

    /// A string that must be there.
    pub(super) fn required_string(&self, name: &str) -> Result<&'a str, ApiError> {
        self.string(name)?.ok_or_else(|| {
            ApiError::invalid(
                name,
                "missing_required_parameter",
                format!("Missing required parameter: '{name}'."),
            )
        })
    }

    pub(super) fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_error(name, "a boolean", v)),
        }
    }

    fn one_of(
        &self,
        name: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let expected = format!("one of {}", allowed.join(", "));
        match v.as_str() {
            Some(s) => allowed
                .iter()
                .find(|a| **a == s)
                .copied()
                .map(Some)
                .ok_or_else(|| {
                    ApiError::invalid(
                        name,
                        "invalid_value",
                        format!("{name} must be {expected}, got {}", show(v)),
                    )
                }),
            None => Err(type_error(name, &expected, v)),
        }
    }

    /// An integer in `lo..=hi`. JSON numbers with a fraction or exponent are not integers.
    fn integer(&self, name: &str, lo: i128, hi: i128) -> Result<Option<i128>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let expected = format!("an integer between {lo} and {hi}");
        let value = match v {
            Value::Number(num) => num
                .as_i64()
                .map(i128::from)
                .or_else(|| num.as_u64().map(i128::from)),
            _ => None,
        };
        if !v.is_number() {
            return Err(type_error(name, &expected, v));
        }
        let Some(value) = value else {
            // Integers beyond 64 bits arrive as floats: out of range, not a type error.
            let code = match v.as_f64() {
                Some(x) if x.fract() == 0.0 && x > 0.0 => "integer_above_max_value",
                Some(x) if x.fract() == 0.0 && x < 0.0 => "integer_below_min_value",
                _ => "invalid_type",
            };
            return Err(ApiError::invalid(
                name,
                code,
                format!("{name} must be {expected}, got {}", show(v)),
            ));
        };
        if value < lo || value > hi {
            let code = if value < lo {
                "integer_below_min_value"
            } else {
                "integer_above_max_value"
            };
            return Err(ApiError::invalid(
                name,
                code,
                format!("{name} must be {expected}, got {value}"),
            ));
        }
        Ok(Some(value))
    }

    fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        let expected = format!("a number between {lo} and {hi}");
        match v.as_f64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            Some(_) => Err(ApiError::invalid(
                name,
                "invalid_value",
                format!("{name} must be {expected}, got {}", show(v)),
            )),
            None => Err(type_error(name, &expected, v)),
        }
    }
}

fn check_length(name: &str, s: &str, max_chars: usize) -> Result<(), ApiError> {
    // Byte length bounds the char count from above: skip counting for short strings.
    if s.len() > max_chars {
        let chars = s.chars().count();
        if chars > max_chars {
            return Err(ApiError::invalid(
                name,
                "string_above_max_length",
                format!("{name} must be at most {max_chars} characters, got {chars}"),
            ));
        }
    }
    Ok(())
}

fn parse_size(size: Option<&str>, limits: &RequestLimits) -> Result<(u32, u32), ApiError> {
    let s = match size {
        None | Some("auto") => return Ok(limits.default_size),
        Some(s) => s,
    };
    let bad = || {
        ApiError::invalid(
            "size",
            "invalid_value",
            format!(
                "size must be \"auto\" or WIDTHxHEIGHT with both sides multiples of 8 between \
                 {} and {} and at most {} pixels in all, got {}",
                limits.min_side,
                limits.max_side,
                limits.max_pixels,
                show(&Value::String(s.to_string()))
            ),
        )
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    let side = |t: &str| -> Result<u32, ApiError> {
        if t.is_empty() || t.len() > 6 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let v: u32 = t.parse().map_err(|_| bad())?;
        if !v.is_multiple_of(8) || v < limits.min_side || v > limits.max_side {
            return Err(bad());
        }
        Ok(v)
    };
    let (w, h) = (side(w)?, side(h)?);
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(bad());
    }
    Ok((w, h))
}

fn type_error(name: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        name,
        "invalid_type",
        format!(
            "{name} must be {expected}, got {} {}",
            json_kind(got),
            show(got)
        ),
    )
}

pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value for an error message, cut short so a 1 MB field is never echoed back.
fn show(v: &Value) -> String {
    const MAX: usize = 40;
    let text = v.to_string();
    if text.chars().count() <= MAX {
        text
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::api::DefaultResponseFormat;
    use crate::server::config::ServerConfig;
    use serde_json::json;

    fn check(body: Value) -> Result<ValidRequest, ApiError> {
        let cfg = ServerConfig::default();
        validate(&body, &cfg.limits, &cfg.model)
    }

    fn err(body: Value) -> (u16, Option<String>, String) {
        let e = check(body).unwrap_err();
        (
            e.info().status.as_u16(),
            e.param().map(str::to_string),
            e.to_string(),
        )
    }

    /// An edit's form fields (as text, the way a multipart body carries them) for a 640x480
    /// input image.
    fn edit(fields: &[(&str, &str)]) -> Result<ValidRequest, ApiError> {
        let cfg = ServerConfig::default();
        let map: Map<String, Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), form_value(k, v)))
            .collect();
        validate_edit(&Value::Object(map), (640, 480), &cfg.limits, &cfg.model)
    }

    #[test]
    fn form_fields_are_read_as_their_json_types() {
        assert_eq!(form_value("n", "2"), json!(2));
        assert_eq!(
            form_value("seed", "9007199254740991"),
            json!(9007199254740991u64)
        );
        assert_eq!(form_value("strength", "0.25"), json!(0.25));
        assert_eq!(form_value("guidance_scale", " 3 "), json!(3.0));
        assert_eq!(form_value("stream", "true"), json!(true));
        assert_eq!(form_value("stream", "False"), json!(false));
        assert_eq!(form_value("prompt", "42"), json!("42"), "text stays text");
        // What does not parse stays a string, for the validator's message.
        assert_eq!(form_value("n", "two"), json!("two"));
        assert_eq!(form_value("strength", "NaN"), json!("NaN"));
    }

    #[test]
    fn a_long_unknown_name_is_cut_short_in_the_error() {
        let long = "k".repeat(10_000);
        let (status, param, msg) = err(json!({"prompt": "p", long.clone(): 1}));
        assert_eq!(status, 400);
        assert_eq!(param.as_deref(), Some(format!("{}…", &long[..64]).as_str()));
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn an_edit_gets_its_own_defaults() {
        let v = edit(&[("prompt", "make it snowy")]).unwrap();
        // 640x480 at about 512x512's area: 592x440 (multiples of 8).
        assert_eq!((v.width, v.height), (592, 440));
        assert_eq!(v.steps, 1);
        assert_eq!(
            v.edit,
            Some(EditSettings {
                strength: 0.5,
                schedule_steps: 2,
                start_step: 1,
                image: None,
            })
        );
        let key = v.key();
        assert_eq!((key.steps, key.init_step), (2, Some(1)));
        // A generation's key has no start step, so the two never share a batch.
        assert_eq!(check(json!({"prompt": "a"})).unwrap().key().init_step, None);

        let v = edit(&[
            ("prompt", "x"),
            ("size", "512x512"),
            ("n", "3"),
            ("quality", "medium"),
            ("strength", "0.7"),
            ("seed", "5"),
            ("stream", "true"),
            ("input_fidelity", "high"),
        ])
        .unwrap();
        assert_eq!(
            (v.width, v.height, v.n, v.seed, v.stream),
            (512, 512, 3, Some(5), true)
        );
        // 2 steps at 0.7: int(3 * 0.7) = 2 of a 3-step schedule.
        let e = v.edit.unwrap();
        assert_eq!((e.schedule_steps, e.start_step), (3, 1));
    }

    #[test]
    fn edit_errors_name_the_field() {
        let param = |fields: &[(&str, &str)]| {
            let e = edit(fields).unwrap_err();
            (
                e.info().status.as_u16(),
                e.param().map(str::to_string),
                e.to_string(),
            )
        };
        let (status, p, msg) = param(&[("prompt", "x"), ("strength", "0")]);
        assert_eq!((status, p.as_deref()), (400, Some("strength")));
        assert!(msg.contains("between 0.01 and 1"), "{msg}");
        let (_, p, msg) = param(&[("prompt", "x"), ("strength", "strong")]);
        assert_eq!(p.as_deref(), Some("strength"));
        assert!(msg.contains("a string \"strong\""), "{msg}");
        let (_, p, msg) = param(&[("prompt", "x"), ("steps", "50"), ("strength", "0.01")]);
        assert_eq!(p.as_deref(), Some("strength"));
        assert!(
            msg.contains("5000") && msg.contains("at least 0.05"),
            "{msg}"
        );
        let (_, p, msg) = param(&[("prompt", "x"), ("n", "two")]);
        assert_eq!(p.as_deref(), Some("n"));
        assert!(msg.contains("an integer between 1 and 10"), "{msg}");
        // Generation-only fields are unknown to an edit, and strength to a generation.
        let (_, p, _) = param(&[("prompt", "x"), ("style", "vivid")]);
        assert_eq!(p.as_deref(), Some("style"));
        assert_eq!(
            err(json!({"prompt": "x", "strength": 0.5})).1.as_deref(),
            Some("strength")
        );
        let (_, p, _) = param(&[("size", "512x512")]);
        assert_eq!(p.as_deref(), Some("prompt"));
        let (_, p, _) = param(&[("prompt", "x"), ("size", "500x500")]);
        assert_eq!(p.as_deref(), Some("size"));
        // The SDK's other edit parameters: complexity is accepted; GIF and SVG output, also
        // as the form's nested svg[...] fields, are refused by name.
        assert!(edit(&[("prompt", "x"), ("complexity", "high")]).is_ok());
        for field in [
            "frame_count",
            "frame_duration_ms",
            "svg[model]",
            "svg[reasoning][effort]",
        ] {
            let (status, p, msg) = param(&[("prompt", "x"), (field, "4")]);
            let name = field.split('[').next().unwrap();
            assert_eq!((status, p.as_deref()), (400, Some(name)), "{field}");
            assert!(msg.contains("gif/svg output"), "{msg}");
        }
    }

    #[test]
    fn auto_edit_sizes_keep_the_aspect_ratio_within_bounds() {
        let limits = ServerConfig::default().limits;
        assert_eq!(auto_edit_size((512, 512), &limits), (512, 512));
        assert_eq!(auto_edit_size((1024, 1024), &limits), (512, 512));
        assert_eq!(auto_edit_size((4000, 3000), &limits), (592, 440));
        assert_eq!(auto_edit_size((1920, 1080), &limits), (680, 384));
        // A very wide image: the short side stops at --min-image-side.
        assert_eq!(auto_edit_size((8000, 100), &limits), (1792, 256));
        assert_eq!(auto_edit_size((100, 8000), &limits), (256, 1792));
        assert_eq!(auto_edit_size((1, 1), &limits), (512, 512));
        // Where that would leave more pixels than allowed, the long side gives way.
        let tight = RequestLimits {
            min_side: 512,
            max_pixels: 512 * 1000,
            ..limits
        };
        assert_eq!(auto_edit_size((8000, 100), &tight), (1000, 512));
        assert_eq!(auto_edit_size((100, 8000), &tight), (512, 1000));
    }

    #[test]
    fn every_size_of_openais_image_models_is_accepted_and_the_pixels_are_bounded() {
        // DALL·E 2, DALL·E 3 and the GPT image models' sizes.
        for size in [
            "256x256",
            "512x512",
            "1024x1024",
            "1792x1024",
            "1024x1792",
            "1536x1024",
            "1024x1536",
        ] {
            let v = check(json!({"prompt": "p", "size": size})).unwrap();
            assert_eq!(format!("{}x{}", v.width, v.height), size);
        }
        check(json!({"prompt": "p", "size": "1536x1536"})).unwrap();
        for size in ["1792x1792", "1792x1328", "1800x1024"] {
            let (status, param, msg) = err(json!({"prompt": "p", "size": size}));
            assert_eq!((status, param.as_deref()), (400, Some("size")), "{size}");
            assert!(
                msg.contains("between 256 and 1792 and at most 2359296 pixels"),
                "{msg}"
            );
        }
    }

    #[test]
    fn dall_e_requests_get_urls_unless_they_ask_otherwise() {
        // OpenAI's default for the DALL·E models is `url`, and their clients read it.
        for model in ["dall-e-2", "dall-e-3"] {
            let v = check(json!({"prompt": "p", "model": model})).unwrap();
            assert_eq!(v.response_format, ResponseFormat::Url, "{model}");
            let body = json!({"prompt": "p", "model": model, "response_format": "b64_json"});
            assert_eq!(
                check(body).unwrap().response_format,
                ResponseFormat::B64Json
            );
            let body = json!({"prompt": "p", "model": model, "stream": true});
            assert_eq!(
                check(body).unwrap().response_format,
                ResponseFormat::B64Json
            );
        }
        // DALL·E 2's edits too.
        let v = edit(&[("prompt", "p"), ("model", "dall-e-2")]).unwrap();
        assert_eq!(v.response_format, ResponseFormat::Url);
        let v = edit(&[("prompt", "p"), ("model", "gpt-image-1")]).unwrap();
        assert_eq!(v.response_format, ResponseFormat::B64Json);
        // The GPT image models, the served name and no name: base64.
        for body in [
            json!({"prompt": "p", "model": "gpt-image-1"}),
            json!({"prompt": "p", "model": "sdxl-turbo"}),
            json!({"prompt": "p"}),
        ] {
            assert_eq!(
                check(body).unwrap().response_format,
                ResponseFormat::B64Json
            );
        }
        // Azure deployments named after DALL·E (the deployment is the model there).
        for name in ["dalle3", "DALL-E-3", "dall_e_2_prod", "Dalle-3"] {
            let mut cfg = ServerConfig::default();
            cfg.model.aliases.push(name.into());
            let v = validate(
                &json!({"prompt": "p", "model": name}),
                &cfg.limits,
                &cfg.model,
            );
            assert_eq!(v.unwrap().response_format, ResponseFormat::Url, "{name}");
        }
        let mut cfg = ServerConfig::default();
        cfg.model.aliases.push("*".into());
        for name in ["dall", "images-dalle", "gpt-image-1-dalle"] {
            let v = validate(
                &json!({"prompt": "p", "model": name}),
                &cfg.limits,
                &cfg.model,
            );
            assert_eq!(
                v.unwrap().response_format,
                ResponseFormat::B64Json,
                "{name}"
            );
        }
        // A fixed default applies to every model.
        let mut cfg = ServerConfig::default();
        for (fixed, want) in [
            ("b64_json", ResponseFormat::B64Json),
            ("url", ResponseFormat::Url),
        ] {
            cfg.limits.default_response_format = DefaultResponseFormat::parse(fixed).unwrap();
            for model in ["dall-e-3", "gpt-image-1"] {
                let body = json!({"prompt": "p", "model": model});
                let v = validate(&body, &cfg.limits, &cfg.model).unwrap();
                assert_eq!(v.response_format, want, "{fixed} {model}");
            }
        }
        assert_eq!(DefaultResponseFormat::parse("png"), None);
    }

    #[test]
    fn minimal_request_gets_the_defaults() {
        let v = check(json!({"prompt": "a cat"})).unwrap();
        assert_eq!(
            v,
            ValidRequest {
                prompt: "a cat".into(),
                negative_prompt: String::new(),
                n: 1,
                width: 512,
                height: 512,
                steps: 1,
                guidance_scale: 0.0,
                seed: None,
                quality: "low",
                response_format: ResponseFormat::B64Json,
                output_format: OutputFormat::Png,
                output_compression: 100,
                user: None,
                stream: false,
                partial_images: 0,
                edit: None,
                adapter: None,
            }
        );
    }

    #[test]
    fn a_stream_is_inline_and_may_ask_for_partial_images() {
        let v = check(json!({"prompt": "a cat", "stream": true, "partial_images": 3})).unwrap();
        assert!(v.stream);
        assert_eq!(v.partial_images, 3);
        assert_eq!(v.response_format, ResponseFormat::B64Json);
        // Whatever the server's default for responses that are not streamed.
        let mut cfg = ServerConfig::default();
        cfg.limits.default_response_format = DefaultResponseFormat::Fixed(ResponseFormat::Url);
        let body = json!({"prompt": "a cat", "stream": true});
        let v = validate(&body, &cfg.limits, &cfg.model).unwrap();
        assert_eq!(
            (v.stream, v.response_format),
            (true, ResponseFormat::B64Json)
        );
        let body = json!({"prompt": "a cat", "stream": false});
        let v = validate(&body, &cfg.limits, &cfg.model).unwrap();
        assert_eq!((v.stream, v.response_format), (false, ResponseFormat::Url));
    }

    #[test]
    fn full_request_is_read_field_by_field() {
        let v = check(json!({
            "prompt": "a cat", "model": "dall-e-3", "n": 3, "size": "768x256",
            "quality": "hd", "response_format": "url", "output_format": "webp",
            "output_compression": 50, "background": "opaque", "moderation": "low",
            "style": "vivid", "user": "u1", "seed": 42, "steps": 3,
            "guidance_scale": 2.5, "negative_prompt": "blurry", "stream": false,
            "partial_images": 0, "complexity": "low"
        }))
        .unwrap();
        assert_eq!((v.n, v.width, v.height, v.steps), (3, 768, 256, 3));
        assert_eq!(v.quality, "high");
        assert_eq!(v.response_format, ResponseFormat::Url);
        assert_eq!(v.output_format, OutputFormat::Webp);
        assert_eq!((v.output_compression, v.seed), (50, Some(42)));
        assert_eq!(v.negative_prompt, "blurry");
        assert_eq!(v.user.as_deref(), Some("u1"));
        assert_eq!(v.key().guidance, Guidance::from_scale(2.5));
    }

    #[test]
    fn the_server_defaults_apply_to_requests_that_ask_for_nothing() {
        let limits = RequestLimits {
            default_steps: 6,
            default_guidance_scale: 2.0,
            ..ServerConfig::default().limits
        };
        let model = ServerConfig::default().model;
        let v = |body: Value| validate(&body, &limits, &model).unwrap();
        let plain = v(json!({"prompt": "p"}));
        assert_eq!(
            (plain.steps, plain.quality, plain.guidance_scale),
            (6, "xhigh", 2.0)
        );
        assert_eq!(plain.key().guidance, Guidance::from_scale(2.0));
        assert_eq!(v(json!({"prompt": "p", "quality": "auto"})).steps, 6);
        // What a request names still wins: a quality, steps, a guidance scale (0 included).
        let low = v(json!({"prompt": "p", "quality": "low"}));
        assert_eq!((low.steps, low.quality), (1, "low"));
        assert_eq!(v(json!({"prompt": "p", "steps": 3})).steps, 3);
        let off = v(json!({"prompt": "p", "guidance_scale": 0}));
        assert_eq!(off.key().guidance, Guidance::Off);
        // The defaults unchanged: SDXL-Turbo's one step without guidance, reported as low.
        let turbo = check(json!({"prompt": "p"})).unwrap();
        assert_eq!(
            (turbo.steps, turbo.quality, turbo.guidance_scale),
            (1, "low", 0.0)
        );
        let levels: Vec<_> = (1..=9).map(quality_of_steps).collect();
        assert_eq!(
            levels,
            ["low", "medium", "medium", "high", "high", "xhigh", "xhigh", "max", "max"]
        );
    }

    #[test]
    fn quality_levels_map_to_steps() {
        for (quality, reported, steps) in QUALITY_STEPS {
            let v = check(json!({"prompt": "p", "quality": quality})).unwrap();
            assert_eq!((v.quality, v.steps), (*reported, *steps));
        }
        // A quality's steps stay within --max-steps; `steps` itself is refused past it.
        let mut limits = RequestLimits {
            max_steps: 4,
            ..ServerConfig::default().limits
        };
        let model = ServerConfig::default().model;
        let max = validate(&json!({"prompt": "p", "quality": "max"}), &limits, &model).unwrap();
        assert_eq!((max.quality, max.steps), ("max", 4));
        assert!(validate(&json!({"prompt": "p", "steps": 5}), &limits, &model).is_err());
        limits.max_steps = 1;
        let high = validate(&json!({"prompt": "p", "quality": "high"}), &limits, &model).unwrap();
        assert_eq!(high.steps, 1);
    }

    #[test]
    fn nulls_mean_not_given() {
        let v = check(json!({"prompt": "p", "n": null, "size": null, "seed": null})).unwrap();
        assert_eq!((v.n, v.width, v.seed), (1, 512, None));
    }

    #[test]
    fn errors_name_the_param_and_the_bound() {
        let cases: Vec<(Value, u16, Option<&str>, &str)> = vec![
            (json!({}), 400, Some("prompt"), "prompt is required"),
            (
                json!({"prompt": "  "}),
                400,
                Some("prompt"),
                "must not be empty",
            ),
            (
                json!({"prompt": 5}),
                400,
                Some("prompt"),
                "must be a string",
            ),
            (
                json!({"prompt": "p", "n": 11}),
                400,
                Some("n"),
                "between 1 and 10, got 11",
            ),
            (
                json!({"prompt": "p", "n": 0}),
                400,
                Some("n"),
                "between 1 and 10, got 0",
            ),
            (json!({"prompt": "p", "n": 1.5}), 400, Some("n"), "got 1.5"),
            (
                json!({"prompt": "p", "n": "2"}),
                400,
                Some("n"),
                "got a string \"2\"",
            ),
            (
                json!({"prompt": "p", "size": "513x512"}),
                400,
                Some("size"),
                "multiples of 8 between 256 and 1792",
            ),
            (
                json!({"prompt": "p", "size": "0x0"}),
                400,
                Some("size"),
                "got \"0x0\"",
            ),
            (
                json!({"prompt": "p", "size": "512X512"}),
                400,
                Some("size"),
                "WIDTHxHEIGHT",
            ),
            (
                json!({"prompt": "p", "size": "99999999999x512"}),
                400,
                Some("size"),
                "WIDTHxHEIGHT",
            ),
            (
                json!({"prompt": "p", "seed": -1}),
                400,
                Some("seed"),
                "between 0 and 9007199254740991, got -1",
            ),
            (
                json!({"prompt": "p", "n": 2, "seed": MAX_SEED}),
                400,
                Some("seed"),
                "between 0 and 9007199254740990",
            ),
            (
                json!({"prompt": "p", "seed": 1e30}),
                400,
                Some("seed"),
                "got 1e+30",
            ),
            (
                json!({"prompt": "p", "model": "gpt-5"}),
                404,
                Some("model"),
                "`gpt-5` does not exist",
            ),
            (
                json!({"prompt": "p", "background": "transparent"}),
                400,
                Some("background"),
                "not supported",
            ),
            (
                json!({"prompt": "p", "output_format": "gif"}),
                400,
                Some("output_format"),
                "not supported",
            ),
            (
                json!({"prompt": "p", "output_compression": 101}),
                400,
                Some("output_compression"),
                "between 0 and 100",
            ),
            (
                json!({"prompt": "p", "steps": 0}),
                400,
                Some("steps"),
                "between 1 and 50",
            ),
            (
                json!({"prompt": "p", "guidance_scale": -1}),
                400,
                Some("guidance_scale"),
                "between 0 and 30",
            ),
            (
                json!({"prompt": "p", "stream": true, "response_format": "url"}),
                400,
                Some("response_format"),
                "streamed images are sent inline as b64_json",
            ),
            (
                json!({"prompt": "p", "partial_images": 2}),
                400,
                Some("partial_images"),
                "streamed responses only",
            ),
            (
                json!({"prompt": "p", "stream": true, "partial_images": 4}),
                400,
                Some("partial_images"),
                "between 0 and 3",
            ),
            (
                json!({"prompt": "p", "stream": "yes"}),
                400,
                Some("stream"),
                "boolean",
            ),
            (
                json!({"prompt": "p", "foo": 1}),
                400,
                Some("foo"),
                "Unrecognized request argument supplied: foo",
            ),
            (
                json!({"prompt": "p", "quality": "ultra"}),
                400,
                Some("quality"),
                "one of auto, low",
            ),
            (
                json!(["prompt"]),
                422,
                None,
                "must be a JSON object, got an array",
            ),
        ];
        for (body, status, param, fragment) in cases {
            let (s, p, msg) = err(body.clone());
            assert_eq!(s, status, "{body}: {msg}");
            assert_eq!(p.as_deref(), param, "{body}: {msg}");
            assert!(msg.contains(fragment), "{body}: {msg:?} lacks {fragment:?}");
        }
    }

    #[test]
    fn long_prompts_are_measured_in_characters_and_not_echoed() {
        let at_limit = "é".repeat(32_000);
        assert!(check(json!({"prompt": at_limit})).is_ok());
        let (status, param, msg) = err(json!({"prompt": "a".repeat(40_000)}));
        assert_eq!((status, param.as_deref()), (400, Some("prompt")));
        assert!(msg.contains("at most 32000 characters, got 40000"), "{msg}");
        let (_, _, msg) = err(json!({"prompt": "p", "style": "x".repeat(10_000)}));
        assert!(msg.len() < 200, "{msg}");
        // An unknown model's name (900 KB of it came back whole before).
        let (status, _, msg) = err(json!({"prompt": "p", "model": "é".repeat(900_000)}));
        assert_eq!(status, 404);
        assert!(msg.contains(&format!("`{}…`", "é".repeat(64))), "{msg}");
        assert!(msg.len() < 250, "{}", msg.len());
    }

    #[test]
    fn size_bounds_come_from_the_config() {
        let mut cfg = ServerConfig::default();
        cfg.limits.min_side = 64;
        let v = validate(
            &json!({"prompt": "p", "size": "64x128"}),
            &cfg.limits,
            &cfg.model,
        )
        .unwrap();
        assert_eq!((v.width, v.height), (64, 128));
        assert!(check(json!({"prompt": "p", "size": "64x128"})).is_err());
    }
}
