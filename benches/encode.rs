//! `cpu/encode/{png,jpeg,webp,jpeg-80,webp-80,png-no-metadata}`: the server's own image encoder
//! on one 512x512 image, with its default metadata but for the last; and
//! `cpu/decode/...`: an edit's upload made ready for the pipeline (`EditFiles::init_image`: the
//! decode, the EXIF turn, a markup's compositing, the resize to 512x512) from a 1024x1024 file.
//!
//! Both always run on the CPU (the server does them on tokio's blocking pool), so these names
//! carry the `cpu` prefix whatever TURBINE_BENCH_DEVICE says.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turbine::server::api::OutputFormat;
use turbine::server::encode::encode;
use turbine::server::provenance::{ImageFacts, ImageMetadata, Marks, SourceType};
use turbine::server::upload::EditFiles;

/// A deterministic photo-like 512x512 image. Compression cost depends on content (noise is the
/// worst case for PNG/WebP, a flat colour the best), so this mixes smooth gradients, hard edges,
/// fine texture and mild per-pixel noise, as generated images have.
fn test_image() -> image::RgbImage {
    image_of_side(512)
}

/// [`test_image`]'s pattern at `side` x `side`.
fn image_of_side(side: u32) -> image::RgbImage {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let s = side as f32;
    image::RgbImage::from_fn(side, side, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 9) as f32 - 4.0;
        let (fx, fy) = (x as f32 / s, y as f32 / s);
        let edge = if (x / 64 + y / 96) % 3 == 0 {
            40.0
        } else {
            0.0
        };
        let texture = 20.0 * ((x as f32 * 0.21).sin() * (y as f32 * 0.17).cos());
        let r = 200.0 * fx + 30.0 * fy + edge + texture + noise;
        let g = 120.0 + 80.0 * (fx * 6.0).sin() * fy + texture + noise;
        let b = 220.0 * (1.0 - fy) + edge * 0.5 + noise;
        image::Rgb([r, g, b].map(|v| v.clamp(0.0, 255.0) as u8))
    })
}

fn encoders(c: &mut Criterion) {
    let img = test_image();
    let mut g = c.benchmark_group("cpu/encode");
    g.throughput(Throughput::Elements(1));
    // The server's default metadata (`--image-metadata provenance`) in every file.
    let facts = ImageFacts {
        model: "sdxl-turbo",
        adapter: None,
        source: SourceType::TrainedAlgorithmicMedia,
        prompt: "a photo of a red fox in the snow",
        negative_prompt: "",
        seed: 42,
        steps: 1,
        guidance_scale: 0.0,
        width: 512,
        height: 512,
        strength: None,
    };
    let marks = Marks::new(ImageMetadata::Provenance, &facts);
    // At OpenAI's default output_compression (100): PNG, JPEG at quality 100, lossless WebP;
    // then lossy WebP and JPEG at 80, what a client asks for to save bytes; and PNG without
    // the metadata (`--image-metadata none`), what writing it costs.
    for (name, format, compression, marks) in [
        ("png", OutputFormat::Png, 100, marks.as_ref()),
        ("jpeg", OutputFormat::Jpeg, 100, marks.as_ref()),
        ("webp", OutputFormat::Webp, 100, marks.as_ref()),
        ("jpeg-80", OutputFormat::Jpeg, 80, marks.as_ref()),
        ("webp-80", OutputFormat::Webp, 80, marks.as_ref()),
        ("png-no-metadata", OutputFormat::Png, 100, None),
    ] {
        let bytes = encode(&img, format, compression, marks).expect("encoding the test image");
        eprintln!("{name}: {} KiB", bytes.len() / 1024);
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(encode(black_box(&img), format, compression, marks).expect("encode"))
            })
        });
    }
    g.finish();
}

/// `image` as `format` bytes, a JPEG with an EXIF orientation when `orientation` is given (an
/// APP1 segment after SOI, as cameras write it).
fn file(
    image: &image::DynamicImage,
    format: image::ImageFormat,
    orientation: Option<u16>,
) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, format)
        .expect("encoding the test image");
    let plain = out.into_inner();
    let Some(o) = orientation else {
        return plain;
    };
    let mut app1 = b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0".to_vec();
    app1.extend_from_slice(&u32::from(o).to_le_bytes());
    app1.extend_from_slice(&[0; 4]);
    let mut bytes = plain[..2].to_vec();
    bytes.extend_from_slice(&[0xff, 0xe1]);
    bytes.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    bytes.extend_from_slice(&app1);
    bytes.extend_from_slice(&plain[2..]);
    bytes
}

fn decoders(c: &mut Criterion) {
    let photo = image::DynamicImage::ImageRgb8(image_of_side(1024));
    let png = file(&photo, image::ImageFormat::Png, None);
    let jpeg = file(&photo, image::ImageFormat::Jpeg, None);
    let turned = file(&photo, image::ImageFormat::Jpeg, Some(6));
    // A markup: an opaque red bar across a transparent sheet.
    let sheet = image::RgbaImage::from_fn(1024, 1024, |x, _| {
        image::Rgba([255, 0, 0, if (400..600).contains(&x) { 255 } else { 0 }])
    });
    let markup = file(
        &image::DynamicImage::ImageRgba8(sheet),
        image::ImageFormat::Png,
        None,
    );
    let mut g = c.benchmark_group("cpu/decode");
    g.throughput(Throughput::Elements(1));
    let cases = [
        ("png_1024_to_512", png.as_slice(), None),
        ("jpeg_1024_to_512", jpeg.as_slice(), None),
        ("jpeg_exif_turned_1024_to_512", turned.as_slice(), None),
        (
            "png_markup_1024_to_512",
            png.as_slice(),
            Some(markup.as_slice()),
        ),
    ];
    for (name, image, markup) in cases {
        let files = EditFiles {
            image,
            mask: None,
            markup,
        };
        let dims = files.check().expect("a readable upload");
        g.bench_function(name, |b| {
            b.iter(|| black_box(files.init_image(dims, 512, 512).expect("decode")))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = encoders, decoders
}
criterion_main!(benches);
