//! The OpenAI Images API's wire types, with field names exactly as OpenAI's API reference and
//! its official SDKs (`openai.types.ImagesResponse`, `Image`, `Model`) have them, plus the
//! documented extension `seed` on each image.
//!
//! Requests are not deserialised into a struct here: `validate` reads the JSON object field
//! by field so that each error names its `param` and bound.

use serde::{Deserialize, Serialize};

/// `response_format`: inline base64 or a URL to `GET /v1/images/files/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

impl ResponseFormat {
    pub const NAMES: &'static [&'static str] = &["b64_json", "url"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "b64_json" => Some(Self::B64Json),
            "url" => Some(Self::Url),
            _ => None,
        }
    }
}

/// `--default-response-format`: what a request that names no `response_format` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultResponseFormat {
    /// OpenAI's own default for the model the request names: `url` for the DALL·E models
    /// (`dall-e-2`, `dall-e-3`; and Azure deployments named after them, `dalle3` or `DALL-E-3`),
    /// whose clients read `data[].url`; `b64_json` for the GPT image models and for a request
    /// that names none.
    Auto,
    /// The same for every request.
    Fixed(ResponseFormat),
}

impl DefaultResponseFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            other => ResponseFormat::parse(other).map(Self::Fixed),
        }
    }

    /// The format for a request that named `model` (as sent, before alias matching) and no
    /// `response_format`.
    pub fn for_model(self, model: Option<&str>) -> ResponseFormat {
        match self {
            Self::Fixed(f) => f,
            Self::Auto if model.is_some_and(is_dall_e) => ResponseFormat::Url,
            Self::Auto => ResponseFormat::B64Json,
        }
    }
}

/// A DALL·E model's name, or an Azure deployment's named after one: `dall-e-3`, `dalle3`,
/// `DALL-E-2-prod`.
fn is_dall_e(model: &str) -> bool {
    let letters: String = model
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(5)
        .collect();
    letters.eq_ignore_ascii_case("dalle")
}

/// `output_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub const NAMES: &'static [&'static str] = &["png", "jpeg", "webp"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "png" => Some(Self::Png),
            "jpeg" => Some(Self::Jpeg),
            "webp" => Some(Self::Webp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Webp => "image/webp",
        }
    }
}

/// The body of a successful `POST /v1/images/generations`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
    pub background: String,
    pub output_format: String,
    pub quality: String,
    pub size: String,
    pub usage: Usage,
    /// The effective safety identifier: the request's non-empty `safety_identifier`, else its
    /// `user` (OpenAI's rule); absent when neither was given.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub safety_identifier: Option<String>,
}

/// One image: exactly one of `b64_json` / `url`, plus its seed (extension).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    /// Null when the prompt was read whole; when it is longer than CLIP reads (75 tokens), the
    /// part that was read, which made the image (the rest was cut off).
    pub revised_prompt: Option<String>,
    /// Generating the same prompt and settings with this seed (and `n = 1`) gives this image.
    pub seed: u64,
}

/// What every event of a streamed response (`stream: true`) says of its image: OpenAI's
/// fields, plus the `seed` extension (with `n` > 1, which image an event is about).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventImage {
    pub b64_json: String,
    pub created_at: u64,
    pub size: String,
    pub quality: &'static str,
    pub background: &'static str,
    pub output_format: &'static str,
    pub seed: u64,
}

/// OpenAI's `image_generation.completed` (`image_edit.completed`) event: one image, done.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StreamedImage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub image: EventImage,
    pub usage: Usage,
    /// As in [`ImagesResponse::safety_identifier`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safety_identifier: Option<String>,
}

/// OpenAI's `image_generation.partial_image` (`image_edit.partial_image`) event: a preview of
/// an image still being denoised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartialImage {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(flatten)]
    pub image: EventImage,
    pub partial_image_index: usize,
}

/// Token usage in OpenAI's shape. Text tokens are the prompt's CLIP tokens (both prompts when
/// a negative prompt is given) counted once per image, since every image encodes its prompt;
/// output image tokens are one per 8x8 pixel patch (a latent position), per image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InputTokensDetails {
    pub image_tokens: u64,
    pub text_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputTokensDetails {
    pub image_tokens: u64,
    pub text_tokens: u64,
}

impl Usage {
    pub fn new(text_tokens_per_image: u64, n: u32, width: u32, height: u32) -> Self {
        let n = u64::from(n);
        let input = text_tokens_per_image * n;
        let output = n * u64::from(width / 8) * u64::from(height / 8);
        Usage {
            input_tokens: input,
            input_tokens_details: InputTokensDetails {
                image_tokens: 0,
                text_tokens: input,
            },
            output_tokens: output,
            output_tokens_details: OutputTokensDetails {
                image_tokens: output,
                text_tokens: 0,
            },
            total_tokens: input + output,
        }
    }
}

/// `GET /v1/models/{id}` (OpenAI's `Model`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Model {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    /// An adapter's (`--lora-modules`): the model it adapts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<Model>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_data_carries_one_payload_field_revised_prompt_and_seed() {
        let d = ImageData {
            b64_json: None,
            url: Some("http://h/v1/images/files/x".into()),
            revised_prompt: None,
            seed: 7,
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"url": "http://h/v1/images/files/x", "revised_prompt": null, "seed": 7})
        );
    }

    #[test]
    fn usage_counts_text_and_latent_tokens() {
        let u = Usage::new(12, 2, 512, 256);
        assert_eq!(u.input_tokens, 24);
        assert_eq!(u.output_tokens, 2 * 64 * 32);
        assert_eq!(u.total_tokens, 24 + 4096);
        assert_eq!(u.output_tokens_details.image_tokens, 4096);
    }
}
