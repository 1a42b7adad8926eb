//! The input image of `POST /v1/images/edits`: its size from the file's header (before the
//! request is validated), then the decoded pixels at the request's size.
//!
//! PNG, JPEG and WebP are read (the formats the server also writes); an alpha channel is
//! dropped, as diffusers' `convert("RGB")` does. A file is refused before it is decoded when
//! its header claims more than [`MAX_INPUT_SIDE`] pixels a side, and the decoder may allocate at
//! most [`MAX_INPUT_ALLOC`] bytes, so a small file that claims a huge image cannot exhaust
//! memory. An image of another size than the request's is resized (Lanczos, as diffusers'
//! `preprocess` resizes a PIL image), its aspect ratio not kept when the two differ.
//!
//! With a JSON body instead of a form, the images come as OpenAI's image references
//! (`{"image_url": "data:image/png;base64,..."}`): base64 data URLs only, since the server
//! fetches no URLs and keeps no files ([`image_reference`]).
//!
//! A mask is OpenAI's: an image of the input's size whose transparent areas (alpha below 128)
//! are repainted and whose opaque areas are kept. It becomes diffusers' `mask_image` (255 where
//! repainted, 0 where kept) at the request's size, resized without blending (nearest).

use std::io::Cursor;

use image::{imageops::FilterType, GrayImage, ImageFormat, ImageReader, Limits, RgbImage};

use super::error::ApiError;
use crate::model::pipeline::InitImage;

/// The largest input side in pixels.
pub const MAX_INPUT_SIDE: u32 = 8192;

/// The most the decoder may allocate for one input image (an 8192x8192 RGBA image fits).
pub const MAX_INPUT_ALLOC: u64 = 512 << 20;

/// Which upload an error is about: the `param` of the 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    Image,
    Mask,
}

impl Upload {
    fn param(self) -> &'static str {
        match self {
            Upload::Image => "image",
            Upload::Mask => "mask",
        }
    }
}

fn invalid_as(what: Upload, message: String) -> ApiError {
    ApiError::invalid(what.param(), "invalid_image", message)
}

fn reader_for(what: Upload, bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ApiError> {
    let invalid = |m: String| invalid_as(what, m);
    let name = what.param();
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(format!("could not read the {name}: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => Ok(reader),
        Some(other) => Err(invalid(format!(
            "{name} must be a PNG, JPEG or WebP file, got {}",
            other.extensions_str().first().unwrap_or(&"another format")
        ))),
        None => Err(invalid(format!(
            "{name} must be a PNG, JPEG or WebP file; this one is none of them"
        ))),
    }
}

/// The upload's (width, height) from its header alone.
fn header_size(what: Upload, bytes: &[u8]) -> Result<(u32, u32), ApiError> {
    reader_for(what, bytes)?
        .into_dimensions()
        .map_err(|e| invalid_as(what, format!("could not read the {}: {e}", what.param())))
}

/// The upload decoded, the decoder bounded by [`MAX_INPUT_SIDE`] and [`MAX_INPUT_ALLOC`].
fn decoded(what: Upload, bytes: &[u8]) -> Result<image::DynamicImage, ApiError> {
    let mut reader = reader_for(what, bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_ALLOC);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| invalid_as(what, format!("could not decode the {}: {e}", what.param())))
}

/// An edit's input image (and mask) as the pipeline takes them, at `width` x `height`
/// ([`decode`], [`decode_mask`]); `image_size` is the image's own, from [`dimensions`].
pub fn init_image(
    image: &[u8],
    mask: Option<&[u8]>,
    image_size: (u32, u32),
    width: u32,
    height: u32,
) -> Result<InitImage, ApiError> {
    let rgb = decode(image, width, height)?;
    Ok(match mask {
        Some(mask) => InitImage::with_mask(rgb, decode_mask(mask, image_size, width, height)?),
        None => InitImage::new(rgb),
    })
}

/// Checks from its header that a mask is one of the readable formats and the image's size.
pub fn check_mask_size(bytes: &[u8], image_size: (u32, u32)) -> Result<(), ApiError> {
    let size = header_size(Upload::Mask, bytes)?;
    if size != image_size {
        return Err(invalid_as(
            Upload::Mask,
            format!(
                "mask must be the size of the image, {}x{}; got {}x{}",
                image_size.0, image_size.1, size.0, size.1
            ),
        ));
    }
    Ok(())
}

/// An OpenAI mask for an input image of `image_size`, as diffusers' `mask_image` at `width` x
/// `height`: 255 where the mask is transparent (alpha below 128: repaint), 0 where it is
/// opaque (keep).
pub fn decode_mask(
    bytes: &[u8],
    image_size: (u32, u32),
    width: u32,
    height: u32,
) -> Result<GrayImage, ApiError> {
    let invalid = |m: String| invalid_as(Upload::Mask, m);
    check_mask_size(bytes, image_size)?;
    let decoded = decoded(Upload::Mask, bytes)?;
    if !decoded.color().has_alpha() {
        return Err(invalid(
            "mask must have an alpha channel: its transparent areas mark what to edit, its \
             opaque areas what to keep"
                .into(),
        ));
    }
    let rgba = decoded.into_rgba8();
    let mask = GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y).0[3] < 128 {
            255
        } else {
            0
        }])
    });
    Ok(if mask.dimensions() == (width, height) {
        mask
    } else {
        image::imageops::resize(&mask, width, height, FilterType::Nearest)
    })
}

/// The bytes of an OpenAI image reference (`{"image_url": URL}` or `{"file_id": ID}`), named
/// `param` in errors: a base64 `data:` URL's payload. Web URLs and file ids are refused with
/// what to send instead.
pub fn image_reference(param: &str, reference: &serde_json::Value) -> Result<Vec<u8>, ApiError> {
    let bad = |code: &'static str, m: String| ApiError::invalid(param, code, m);
    let obj = reference.as_object().ok_or_else(|| {
        bad(
            "invalid_type",
            format!("{param} must be an object with an image_url (a base64 data URL)"),
        )
    })?;
    if obj.contains_key("file_id") {
        return Err(bad(
            "unsupported_value",
            format!(
                "{param}: file ids are not supported (this server keeps no files); send the \
                 image as an image_url with a base64 data URL"
            ),
        ));
    }
    let url = obj
        .get("image_url")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            bad(
                "invalid_value",
                format!("{param} needs an image_url string"),
            )
        })?;
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(bad(
            "unsupported_value",
            format!(
                "{param}: this server fetches no URLs; send the image inline as a base64 data \
                 URL (data:image/png;base64,...)"
            ),
        ));
    };
    let (meta, payload) = rest.split_once(',').unwrap_or((rest, ""));
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(bad(
            "invalid_value",
            format!("{param}: the data URL must be base64 (data:image/png;base64,...)"),
        ));
    }
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| {
            bad(
                "invalid_value",
                format!("{param}: the data URL's base64 does not decode: {e}"),
            )
        })
}

/// The image's (width, height) from its header, checked against [`MAX_INPUT_SIDE`].
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ApiError> {
    let (w, h) = header_size(Upload::Image, bytes)?;
    if w == 0 || h == 0 || w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
        return Err(invalid_as(
            Upload::Image,
            format!("image must be between 1 and {MAX_INPUT_SIDE} pixels a side, got {w}x{h}"),
        ));
    }
    Ok((w, h))
}

/// The image as 8-bit RGB at `width` x `height`.
pub fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ApiError> {
    let rgb = decoded(Upload::Image, bytes)?.into_rgb8();
    Ok(if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, FilterType::Lanczos3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(image: &image::DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]))
    }

    #[test]
    fn png_jpeg_and_webp_are_read_at_their_size() {
        let rgb = image::DynamicImage::ImageRgb8(gradient(40, 24));
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            let bytes = encode(&rgb, format);
            assert_eq!(dimensions(&bytes).unwrap(), (40, 24), "{format:?}");
            let out = decode(&bytes, 40, 24).unwrap();
            assert_eq!(out.dimensions(), (40, 24));
            if format != ImageFormat::Jpeg {
                assert_eq!(out, gradient(40, 24), "{format:?} is lossless");
            }
        }
    }

    #[test]
    fn alpha_is_dropped_and_sizes_are_resized() {
        let rgba = image::RgbaImage::from_fn(16, 16, |x, _| image::Rgba([200, 10, x as u8, 0]));
        let bytes = encode(&image::DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let out = decode(&bytes, 16, 16).unwrap();
        assert_eq!(
            out.get_pixel(3, 5).0,
            [200, 10, 3],
            "colour kept, alpha dropped"
        );
        let resized = decode(&bytes, 32, 8).unwrap();
        assert_eq!(resized.dimensions(), (32, 8));
    }

    #[test]
    fn other_formats_and_garbage_are_refused() {
        let png = encode(
            &image::DynamicImage::ImageRgb8(gradient(4, 4)),
            ImageFormat::Png,
        );
        // Not an image at all.
        let e = dimensions(b"hello, world").unwrap_err();
        assert!(e.to_string().contains("PNG, JPEG or WebP"), "{e}");
        // A BMP's magic bytes: an image format, but not one of ours.
        let e = dimensions(b"BM\x00\x00\x00\x00\x00\x00").unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("PNG, JPEG or WebP") && e.contains("got bmp"),
            "{e}"
        );
        // A PNG cut short: the header reads, the pixels do not.
        let cut = &png[..png.len() - 20];
        assert_eq!(dimensions(cut).unwrap(), (4, 4));
        let e = decode(cut, 4, 4).unwrap_err();
        assert!(e.to_string().contains("could not decode"), "{e}");
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_decoding() {
        // A real 4x4 PNG whose header (IHDR, CRC fixed) claims 100000 x 100000 pixels.
        let mut png = encode(
            &image::DynamicImage::ImageRgb8(gradient(4, 4)),
            ImageFormat::Png,
        );
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = dimensions(&png).unwrap_err();
        assert!(e.to_string().contains("100000x100000"), "{e}");
        assert!(decode(&png, 512, 512).is_err());
    }

    #[test]
    fn image_references_are_base64_data_urls() {
        use serde_json::json;
        let png = encode(
            &image::DynamicImage::ImageRgb8(gradient(4, 4)),
            ImageFormat::Png,
        );
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let url = format!("data:image/png;base64,{b64}");
        assert_eq!(
            image_reference("images", &json!({"image_url": url})).unwrap(),
            png
        );
        let refused = |v: serde_json::Value, want: &str| {
            let e = image_reference("mask", &v).unwrap_err();
            assert_eq!(e.param(), Some("mask"));
            assert!(e.to_string().contains(want), "{v}: {e}");
        };
        refused(
            json!({"image_url": "https://example.com/a.png"}),
            "fetches no URLs",
        );
        refused(json!({"file_id": "file-123"}), "file ids are not supported");
        refused(
            json!({"image_url": "data:image/png,rawbytes"}),
            "must be base64",
        );
        refused(
            json!({"image_url": "data:image/png;base64,@@@"}),
            "does not decode",
        );
        refused(json!({"url": "x"}), "needs an image_url");
        refused(json!("data:image/png;base64,AAAA"), "must be an object");
    }

    #[test]
    fn masks_mark_their_transparent_areas_for_repainting() {
        // Left half transparent (repaint), right half opaque (keep), one half-transparent
        // column each side of 128.
        let rgba = image::RgbaImage::from_fn(16, 8, |x, _| {
            let a = match x {
                0..=6 => 0,
                7 => 127,
                8 => 128,
                _ => 255,
            };
            image::Rgba([9, 9, 9, a])
        });
        let png = encode(&image::DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let mask = decode_mask(&png, (16, 8), 16, 8).unwrap();
        let row: Vec<u8> = (0..16).map(|x| mask.get_pixel(x, 3).0[0]).collect();
        assert_eq!(row, [[255u8; 8], [0u8; 8]].concat());
        // Resized without blending: still only 0 and 255.
        let big = decode_mask(&png, (16, 8), 64, 40).unwrap();
        assert_eq!(big.dimensions(), (64, 40));
        assert!(big.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        assert_eq!(big.get_pixel(0, 0).0[0], 255);
        assert_eq!(big.get_pixel(63, 39).0[0], 0);

        let e = decode_mask(&png, (32, 8), 16, 8).unwrap_err();
        assert_eq!(e.param(), Some("mask"));
        assert!(
            e.to_string()
                .contains("the size of the image, 32x8; got 16x8"),
            "{e}"
        );
        let opaque = encode(
            &image::DynamicImage::ImageRgb8(gradient(16, 8)),
            ImageFormat::Png,
        );
        let e = decode_mask(&opaque, (16, 8), 16, 8).unwrap_err();
        assert!(e.to_string().contains("alpha channel"), "{e}");
        let e = decode_mask(b"not a mask", (16, 8), 16, 8).unwrap_err();
        assert_eq!(e.param(), Some("mask"));
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
