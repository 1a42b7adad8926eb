//! The input image of `POST /v1/images/edits`: its size from the file's header (before the
//! request is validated), then the decoded pixels at the request's size.
//!
//! PNG, JPEG and WebP are read (the formats the server also writes); an alpha channel is
//! dropped, as diffusers' `convert("RGB")` does. A file is refused before it is decoded when
//! its header claims more than [`MAX_INPUT_SIDE`] pixels a side, and the decoder may allocate at
//! most [`MAX_INPUT_ALLOC`] bytes, so a small file that claims a huge image cannot exhaust
//! memory. An image of another size than the request's is resized (Lanczos, as diffusers'
//! `preprocess` resizes a PIL image), its aspect ratio not kept when the two differ.

use std::io::Cursor;

use image::{imageops::FilterType, ImageFormat, ImageReader, Limits, RgbImage};

use super::error::ApiError;

/// The largest input side in pixels.
pub const MAX_INPUT_SIDE: u32 = 8192;

/// The most the decoder may allocate for one input image (an 8192x8192 RGBA image fits).
pub const MAX_INPUT_ALLOC: u64 = 512 << 20;

fn invalid(message: String) -> ApiError {
    ApiError::invalid("image", "invalid_image", message)
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ApiError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| invalid(format!("could not read the image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP) => Ok(reader),
        Some(other) => Err(invalid(format!(
            "image must be a PNG, JPEG or WebP file, got {}",
            other.extensions_str().first().unwrap_or(&"another format")
        ))),
        None => Err(invalid(
            "image must be a PNG, JPEG or WebP file; this one is none of them".into(),
        )),
    }
}

/// The image's (width, height) from its header, checked against [`MAX_INPUT_SIDE`].
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), ApiError> {
    let (w, h) = reader(bytes)?
        .into_dimensions()
        .map_err(|e| invalid(format!("could not read the image: {e}")))?;
    if w == 0 || h == 0 || w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
        return Err(invalid(format!(
            "image must be between 1 and {MAX_INPUT_SIDE} pixels a side, got {w}x{h}"
        )));
    }
    Ok((w, h))
}

/// The image as 8-bit RGB at `width` x `height`.
pub fn decode(bytes: &[u8], width: u32, height: u32) -> Result<RgbImage, ApiError> {
    let mut reader = reader(bytes)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_INPUT_ALLOC);
    reader.limits(limits);
    let rgb = reader
        .decode()
        .map_err(|e| invalid(format!("could not decode the image: {e}")))?
        .into_rgb8();
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
