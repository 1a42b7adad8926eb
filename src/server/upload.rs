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
//! fetches no URLs; a `file_id` names a file of the Files API ([`image_reference`]).
//!
//! A mask is OpenAI's: an image of the input's size whose transparent areas (alpha below 128)
//! are repainted and whose opaque areas are kept. It becomes diffusers' `mask_image` (255 where
//! repainted, 0 where kept) at the request's size, resized without blending (nearest).
//!
//! A markup (OpenAI's `markup`) is a partly transparent image of the input's size laid over it
//! before the edit, to guide it: a sketch, an arrow, a colour patch. It is alpha-composited onto
//! the input at the input's own size, then the result is edited like any input.
//!
//! Every upload is read as it is shown: its EXIF orientation (a phone photo taken upright is
//! stored sideways with an orientation tag) is applied before anything else, so sizes, masks
//! and markups are all about the upright image, as OpenAI's API and PIL's `exif_transpose`
//! have it.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{
    imageops::FilterType, DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits,
    RgbImage, RgbaImage,
};

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
    Markup,
}

impl Upload {
    fn param(self) -> &'static str {
        match self {
            Upload::Image => "image",
            Upload::Mask => "mask",
            Upload::Markup => "markup",
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

/// Whether an orientation turns the stored image a quarter (width and height swap).
fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// The decoder's orientation; a malformed EXIF block is ignored, as PIL's `exif_transpose`
/// ignores it, rather than refusing an image that decodes.
fn orientation_of(decoder: &mut impl ImageDecoder) -> Orientation {
    decoder.orientation().unwrap_or(Orientation::NoTransforms)
}

/// The upload's (width, height) as shown, from its header alone: the stored size with its EXIF
/// orientation applied.
fn header_size(what: Upload, bytes: &[u8]) -> Result<(u32, u32), ApiError> {
    let unreadable = |e: image::ImageError| {
        invalid_as(what, format!("could not read the {}: {e}", what.param()))
    };
    let mut reader = reader_for(what, bytes)?;
    reader.no_limits();
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    let (w, h) = decoder.dimensions();
    Ok(if swaps_sides(orientation_of(&mut decoder)) {
        (h, w)
    } else {
        (w, h)
    })
}

/// The upload decoded and turned upright, the decoder bounded by [`MAX_INPUT_SIDE`] and
/// [`MAX_INPUT_ALLOC`].
fn decoded(what: Upload, bytes: &[u8]) -> Result<DynamicImage, ApiError> {
    let undecodable = |e: image::ImageError| {
        invalid_as(what, format!("could not decode the {}: {e}", what.param()))
    };
    let mut reader = reader_for(what, bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_ALLOC);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    if decoder.total_bytes() > MAX_INPUT_ALLOC {
        return Err(invalid_as(
            what,
            format!(
                "the {} would take {} MiB decoded, over the {} MiB an upload may",
                what.param(),
                decoder.total_bytes() >> 20,
                MAX_INPUT_ALLOC >> 20
            ),
        ));
    }
    let orientation = orientation_of(&mut decoder);
    let mut image = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// An edit's uploads: the image, and at most one of a mask and a markup.
#[derive(Debug, Clone, Copy)]
pub struct EditFiles<'a> {
    pub image: &'a [u8],
    pub mask: Option<&'a [u8]>,
    pub markup: Option<&'a [u8]>,
}

impl EditFiles<'_> {
    /// The image's size as shown ([`dimensions`]), with the mask's or markup's checked against
    /// it, from the headers alone (before the request is validated and its quota taken).
    pub fn check(&self) -> Result<(u32, u32), ApiError> {
        let size = dimensions(self.image)?;
        if self.mask.is_some() && self.markup.is_some() {
            return Err(ApiError::invalid(
                "markup",
                "invalid_value",
                "markup cannot be combined with mask: send a mask to repaint areas, or a markup \
                 to draw over the image",
            ));
        }
        if let Some(mask) = self.mask {
            check_same_size(Upload::Mask, mask, size)?;
        }
        if let Some(markup) = self.markup {
            check_same_size(Upload::Markup, markup, size)?;
        }
        Ok(size)
    }

    /// The input as the pipeline takes it, at `width` x `height`: the image ([`decode`]) with
    /// the markup laid over it ([`overlay`]), or with its mask ([`decode_mask`]); `image_size`
    /// is [`Self::check`]'s.
    pub fn init_image(
        &self,
        image_size: (u32, u32),
        width: u32,
        height: u32,
    ) -> Result<InitImage, ApiError> {
        let rgb = match self.markup {
            None => decode(self.image, width, height)?,
            Some(markup) => fit(overlay(self.image, markup, image_size)?, width, height),
        };
        Ok(match self.mask {
            Some(mask) => InitImage::with_mask(rgb, decode_mask(mask, image_size, width, height)?),
            None => InitImage::new(rgb),
        })
    }
}

/// Checks from its header that a mask or markup is one of the readable formats and the
/// image's size (both as shown).
fn check_same_size(what: Upload, bytes: &[u8], image_size: (u32, u32)) -> Result<(), ApiError> {
    let size = header_size(what, bytes)?;
    if size != image_size {
        return Err(invalid_as(
            what,
            format!(
                "{} must be the size of the image, {}x{}; got {}x{}",
                what.param(),
                image_size.0,
                image_size.1,
                size.0,
                size.1
            ),
        ));
    }
    Ok(())
}

/// The image (of `image_size`) with an OpenAI markup composited over it, at the image's own
/// size: each pixel `markup * a + image * (1 - a)` with the markup's alpha `a` (rounded to
/// 8 bits). The markup must have an alpha channel and some transparency (a fully opaque one
/// would replace the image).
pub fn overlay(image: &[u8], markup: &[u8], image_size: (u32, u32)) -> Result<RgbImage, ApiError> {
    check_same_size(Upload::Markup, markup, image_size)?;
    let over = decoded(Upload::Markup, markup)?;
    if !over.color().has_alpha() {
        return Err(invalid_as(
            Upload::Markup,
            "markup must have an alpha channel: it is laid over the image, which shows where \
             it is transparent"
                .into(),
        ));
    }
    let over: RgbaImage = over.into_rgba8();
    if over.pixels().all(|p| p.0[3] == 255) {
        return Err(invalid_as(
            Upload::Markup,
            "markup must have transparent pixels: it is laid over the image, and an opaque \
             one would hide all of it"
                .into(),
        ));
    }
    let mut base = decoded(Upload::Image, image)?.into_rgb8();
    for (b, o) in base.pixels_mut().zip(over.pixels()) {
        let a = u32::from(o.0[3]);
        for c in 0..3 {
            let mixed = u32::from(o.0[c]) * a + u32::from(b.0[c]) * (255 - a);
            b.0[c] = ((mixed + 127) / 255) as u8;
        }
    }
    Ok(base)
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
    check_same_size(Upload::Mask, bytes, image_size)?;
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

/// Where an OpenAI image reference's bytes are: inline, or in a file of the Files API.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    Inline(Vec<u8>),
    /// A `file_id`, read (for its owner) by the caller.
    File(String),
}

/// An OpenAI image reference (`{"image_url": URL}` or `{"file_id": ID}`), named `param` in
/// errors: a base64 `data:` URL's payload, or the id of an uploaded file. Web URLs are refused
/// with what to send instead.
pub fn image_reference(
    param: &str,
    reference: &serde_json::Value,
) -> Result<ImageSource, ApiError> {
    let bad = |code: &'static str, m: String| ApiError::invalid(param, code, m);
    let obj = reference.as_object().ok_or_else(|| {
        bad(
            "invalid_type",
            format!("{param} must be an object with an image_url (a base64 data URL) or a file_id"),
        )
    })?;
    if let Some(id) = obj.get("file_id") {
        return match id.as_str() {
            Some(id) if !id.is_empty() && obj.len() == 1 => Ok(ImageSource::File(id.to_string())),
            _ => Err(bad(
                "invalid_value",
                format!("{param}: file_id must be a file's id, alone (no image_url beside it)"),
            )),
        };
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
        .map(ImageSource::Inline)
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

/// The image as 8-bit RGB at `width` x `height`, upright.
pub fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ApiError> {
    Ok(fit(
        decoded(Upload::Image, bytes)?.into_rgb8(),
        width,
        height,
    ))
}

/// `rgb` at `width` x `height`: resized (Lanczos) unless it already is.
fn fit(rgb: RgbImage, width: u32, height: u32) -> RgbImage {
    if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, FilterType::Lanczos3)
    }
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
            ImageSource::Inline(png)
        );
        assert_eq!(
            image_reference("images", &json!({"file_id": "file-123"})).unwrap(),
            ImageSource::File("file-123".into())
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
        refused(json!({"file_id": ""}), "file_id must be");
        refused(json!({"file_id": 7}), "file_id must be");
        refused(
            json!({"file_id": "file-1", "image_url": "data:image/png;base64,AAAA"}),
            "alone",
        );
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

    /// A little-endian TIFF block with one IFD entry: the EXIF orientation `o`.
    fn exif_orientation(o: u16) -> Vec<u8> {
        let mut t = b"II*\0".to_vec();
        t.extend_from_slice(&8u32.to_le_bytes()); // the IFD's offset
        t.extend_from_slice(&1u16.to_le_bytes()); // one entry
        t.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
        t.extend_from_slice(&3u16.to_le_bytes()); // SHORT
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&u32::from(o).to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
        t
    }

    /// `image` encoded as `format` with an EXIF orientation: a JPEG as cameras write it (an
    /// APP1 `Exif` segment right after SOI), PNG and WebP by the encoders' own EXIF support.
    fn with_orientation(image: &image::DynamicImage, format: ImageFormat, o: u16) -> Vec<u8> {
        use image::ImageEncoder as _;
        let tiff = exif_orientation(o);
        let mut out = Vec::new();
        let (w, h) = (image.width(), image.height());
        let color = image.color().into();
        match format {
            ImageFormat::Jpeg => {
                let plain = encode(image, ImageFormat::Jpeg);
                let mut app1 = b"Exif\0\0".to_vec();
                app1.extend_from_slice(&tiff);
                out.extend_from_slice(&plain[..2]);
                out.extend_from_slice(&[0xff, 0xe1]);
                out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
                out.extend_from_slice(&app1);
                out.extend_from_slice(&plain[2..]);
            }
            ImageFormat::Png => {
                let mut e = image::codecs::png::PngEncoder::new(&mut out);
                e.set_exif_metadata(tiff).unwrap();
                e.write_image(image.as_bytes(), w, h, color).unwrap();
            }
            ImageFormat::WebP => {
                let mut e = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
                e.set_exif_metadata(tiff).unwrap();
                e.write_image(image.as_bytes(), w, h, color).unwrap();
            }
            other => panic!("{other:?}"),
        }
        out
    }

    #[test]
    fn uploads_are_turned_upright_by_their_exif_orientation() {
        use image::imageops::{flip_horizontal, rotate180, rotate270, rotate90};
        let stored = gradient(40, 24);
        let dynamic = image::DynamicImage::ImageRgb8(stored.clone());
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP] {
            // What the decoder gives before any orientation (JPEG is lossy: its own pixels).
            let raw = match format {
                ImageFormat::Jpeg => image::load_from_memory(&encode(&dynamic, format))
                    .unwrap()
                    .into_rgb8(),
                _ => stored.clone(),
            };
            let cases: [(u16, RgbImage); 5] = [
                (1, raw.clone()),
                (3, rotate180(&raw)),
                (6, rotate90(&raw)),
                (8, rotate270(&raw)),
                (2, flip_horizontal(&raw)),
            ];
            for (o, upright) in cases {
                let bytes = with_orientation(&dynamic, format, o);
                let shown = upright.dimensions();
                assert_eq!(
                    dimensions(&bytes).unwrap(),
                    shown,
                    "{format:?} orientation {o}"
                );
                let got = decode(&bytes, shown.0, shown.1).unwrap();
                assert!(got == upright, "{format:?} orientation {o}: not upright");
            }
        }
        // A mask stored sideways is checked and read upright too: its left (stored) column,
        // transparent, is the top row once turned.
        let rgba = image::RgbaImage::from_fn(8, 16, |x, _| {
            image::Rgba([0, 0, 0, if x == 0 { 0 } else { 255 }])
        });
        let mask = with_orientation(&image::DynamicImage::ImageRgba8(rgba), ImageFormat::Png, 6);
        let m = decode_mask(&mask, (16, 8), 16, 8).unwrap();
        assert!((0..16).all(|x| m.get_pixel(x, 0).0[0] == 255 && m.get_pixel(x, 1).0[0] == 0));
        let e = decode_mask(&mask, (8, 16), 8, 16).unwrap_err();
        assert!(e.to_string().contains("got 16x8"), "{e}");
    }

    #[test]
    fn a_markup_is_laid_over_the_image() {
        let base = gradient(16, 8);
        let image = encode(
            &image::DynamicImage::ImageRgb8(base.clone()),
            ImageFormat::Png,
        );
        // Transparent on the left, opaque red on the right, half-transparent blue in column 7.
        let markup = image::RgbaImage::from_fn(16, 8, |x, _| match x {
            0..=6 => image::Rgba([255, 255, 255, 0]),
            7 => image::Rgba([0, 0, 255, 128]),
            _ => image::Rgba([255, 0, 0, 255]),
        });
        let markup = encode(&image::DynamicImage::ImageRgba8(markup), ImageFormat::Png);
        let out = overlay(&image, &markup, (16, 8)).unwrap();
        for y in 0..8 {
            for x in 0..7 {
                assert_eq!(out.get_pixel(x, y), base.get_pixel(x, y));
            }
            for x in 8..16 {
                assert_eq!(out.get_pixel(x, y).0, [255, 0, 0]);
            }
            let b = base.get_pixel(7, y).0;
            let mix = |o: u32, i: u8| ((o * 128 + u32::from(i) * 127 + 127) / 255) as u8;
            assert_eq!(
                out.get_pixel(7, y).0,
                [mix(0, b[0]), mix(0, b[1]), mix(255, b[2])]
            );
        }
        // Through EditFiles, at another size: the overlaid image, resized.
        let files = EditFiles {
            image: &image,
            mask: None,
            markup: Some(&markup),
        };
        assert_eq!(files.check().unwrap(), (16, 8));
        let init = files.init_image((16, 8), 32, 16).unwrap();
        assert!(init.mask().is_none());
        assert_eq!(
            *init.image(),
            image::imageops::resize(&out, 32, 16, FilterType::Lanczos3)
        );

        let refused = |markup: &[u8], mask: Option<&[u8]>, want: &str| {
            let files = EditFiles {
                image: &image,
                mask,
                markup: Some(markup),
            };
            let e = files
                .check()
                .and_then(|size| files.init_image(size, 16, 8).map(|_| ()))
                .unwrap_err();
            assert_eq!(e.param(), Some("markup"), "{want}");
            assert!(e.to_string().contains(want), "{e}");
        };
        refused(&image, None, "alpha channel");
        let opaque = image::RgbaImage::from_pixel(16, 8, image::Rgba([1, 2, 3, 255]));
        let opaque = encode(&image::DynamicImage::ImageRgba8(opaque), ImageFormat::Png);
        refused(&opaque, None, "transparent pixels");
        let small = image::RgbaImage::from_pixel(8, 8, image::Rgba([1, 2, 3, 0]));
        let small = encode(&image::DynamicImage::ImageRgba8(small), ImageFormat::Png);
        refused(&small, None, "the size of the image, 16x8; got 8x8");
        refused(&markup, Some(&markup), "cannot be combined with mask");
        refused(b"scribbles", None, "PNG, JPEG or WebP");
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
