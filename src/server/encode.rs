//! PNG/JPEG/WebP encoding. CPU-heavy (tens of milliseconds for a 1024² PNG), so the server
//! runs it on tokio's blocking pool, never on a device thread (which would idle the GPU) nor on
//! an async worker (which would stall other connections).

use std::io::Cursor;
use std::time::{Duration, Instant};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

use super::api::OutputFormat;
use super::error::InferError;
use super::provenance::{self, Marks};

/// Encodes one image, with `marks` in the file (`--image-metadata`). `compression` is OpenAI's
/// `output_compression` (0–100, higher keeps more quality): the JPEG quality (0 is clamped to
/// 1, the encoder's floor), and for WebP lossless at 100 (the default) or libwebp's lossy
/// quality below it. PNG ignores it.
pub fn encode(
    image: &RgbImage,
    format: OutputFormat,
    compression: u8,
    marks: Option<&Marks>,
) -> Result<Vec<u8>, InferError> {
    let bytes = encode_pixels(image, format, compression)?;
    let Some(marks) = marks else {
        return Ok(bytes);
    };
    let (w, h) = image.dimensions();
    provenance::embed(bytes, format, w, h, marks).map_err(|e| InferError::Encode {
        format: format.as_str(),
        message: e.to_string(),
    })
}

fn encode_pixels(
    image: &RgbImage,
    format: OutputFormat,
    compression: u8,
) -> Result<Vec<u8>, InferError> {
    let mut out = Cursor::new(Vec::new());
    let (w, h) = image.dimensions();
    let raw = image.as_raw();
    let result = match format {
        // Fast deflate with adaptive filters: about 3x faster than the default level for
        // ~10% larger files, the better trade for a latency-bound server.
        OutputFormat::Png => {
            PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
                .write_image(raw, w, h, ExtendedColorType::Rgb8)
        }
        OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, compression.clamp(1, 100))
            .write_image(raw, w, h, ExtendedColorType::Rgb8),
        // 100, the default, keeps every pixel; below it OpenAI's lossy WebP at that quality.
        OutputFormat::Webp if compression >= 100 => {
            WebPEncoder::new_lossless(&mut out).write_image(raw, w, h, ExtendedColorType::Rgb8)
        }
        OutputFormat::Webp => {
            return webp::Encoder::from_rgb(raw, w, h)
                .encode_simple(false, f32::from(compression))
                .map(|bytes| bytes.to_vec())
                .map_err(|e| InferError::Encode {
                    format: format.as_str(),
                    message: format!("{e:?}"),
                });
        }
    };
    result.map_err(|e| InferError::Encode {
        format: format.as_str(),
        message: e.to_string(),
    })?;
    Ok(out.into_inner())
}

/// An image encoded for the response: raw bytes (for the URL store) or base64 text.
#[derive(Debug)]
pub enum Encoded {
    Bytes(Vec<u8>),
    Base64(String),
}

/// [`encode`] (and the base64 step for `b64_json`, a few ms for a large image) started on the
/// blocking pool; `await` the task for the result and how long the work took.
pub fn spawn_encode(
    image: RgbImage,
    format: OutputFormat,
    compression: u8,
    marks: Option<Marks>,
    base64: bool,
) -> EncodeTask {
    EncodeTask {
        format,
        handle: tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let bytes = encode(&image, format, compression, marks.as_ref())?;
            let out = if base64 {
                use base64::Engine as _;
                Encoded::Base64(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                Encoded::Bytes(bytes)
            };
            Ok((out, start.elapsed()))
        }),
    }
}

/// A running [`spawn_encode`].
pub struct EncodeTask {
    format: OutputFormat,
    handle: tokio::task::JoinHandle<Result<(Encoded, Duration), InferError>>,
}

impl EncodeTask {
    pub async fn finish(self) -> Result<(Encoded, Duration), InferError> {
        self.handle.await.map_err(|e| InferError::Encode {
            format: self.format.as_str(),
            message: format!("encoder task failed: {e}"),
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient() -> RgbImage {
        RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn png_and_webp_round_trip_exactly() {
        let img = gradient();
        for (format, fmt) in [
            (OutputFormat::Png, image::ImageFormat::Png),
            (OutputFormat::Webp, image::ImageFormat::WebP),
        ] {
            let bytes = encode(&img, format, 100, None).unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), fmt);
            let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
            assert_eq!(back, img, "{format:?}");
        }
    }

    /// A photo-like image: smooth shading with fine texture, where lossy WebP pays off.
    fn textured(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let noise = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 17) as u8;
            image::Rgb([
                (x * 255 / w) as u8 / 2 + noise,
                (y * 255 / h) as u8 / 2 + noise,
                128 + noise,
            ])
        })
    }

    #[test]
    fn webp_is_lossy_below_100_and_smaller_as_compression_drops() {
        let img = textured(128, 96);
        let lossless = encode(&img, OutputFormat::Webp, 100, None).unwrap();
        let high = encode(&img, OutputFormat::Webp, 90, None).unwrap();
        let low = encode(&img, OutputFormat::Webp, 20, None).unwrap();
        for bytes in [&lossless, &high, &low] {
            assert_eq!(
                image::guess_format(bytes).unwrap(),
                image::ImageFormat::WebP
            );
        }
        assert!(
            low.len() < high.len() && high.len() < lossless.len(),
            "sizes: {} (20) {} (90) {} (lossless)",
            low.len(),
            high.len(),
            lossless.len()
        );
        // Lossy, yet the same picture: every channel within a small distance on average.
        let back = image::load_from_memory(&high).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), img.dimensions());
        assert_ne!(back, img);
        let mean = back
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / img.as_raw().len() as f64;
        assert!(mean < 6.0, "mean error {mean}");
    }

    #[test]
    fn jpeg_quality_follows_output_compression() {
        let img = gradient();
        let best = encode(&img, OutputFormat::Jpeg, 100, None).unwrap();
        let small = encode(&img, OutputFormat::Jpeg, 0, None).unwrap();
        assert_eq!(
            image::guess_format(&best).unwrap(),
            image::ImageFormat::Jpeg
        );
        assert!(
            small.len() < best.len(),
            "{} vs {}",
            small.len(),
            best.len()
        );
        let back = image::load_from_memory(&best).unwrap().to_rgb8();
        assert_eq!(back.dimensions(), img.dimensions());
    }

    #[tokio::test]
    async fn encodes_on_the_blocking_pool_as_bytes_or_base64() {
        use base64::Engine as _;
        let (out, _took) = spawn_encode(gradient(), OutputFormat::Png, 100, None, false)
            .finish()
            .await
            .unwrap();
        let Encoded::Bytes(bytes) = out else {
            panic!("expected bytes")
        };
        assert_eq!(
            image::load_from_memory(&bytes).unwrap().to_rgb8(),
            gradient()
        );
        let (out, _took) = spawn_encode(gradient(), OutputFormat::Png, 100, None, true)
            .finish()
            .await
            .unwrap();
        let Encoded::Base64(text) = out else {
            panic!("expected base64")
        };
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .unwrap(),
            bytes
        );
    }
}
