//! `cpu/encode/{png,jpeg,webp}`: the server's own image encoder on one 512x512 image.
//!
//! Encoding always runs on the CPU (the server does it on tokio's blocking pool), so these names
//! carry the `cpu` prefix whatever TURBINE_BENCH_DEVICE says.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turbine::server::api::OutputFormat;
use turbine::server::encode::encode;

/// A deterministic photo-like 512x512 image. Compression cost depends on content (noise is the
/// worst case for PNG/WebP, a flat colour the best), so this mixes smooth gradients, hard edges,
/// fine texture and mild per-pixel noise, as generated images have.
fn test_image() -> image::RgbImage {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    image::RgbImage::from_fn(512, 512, |x, y| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let noise = (state % 9) as f32 - 4.0;
        let (fx, fy) = (x as f32 / 512.0, y as f32 / 512.0);
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
    // JPEG at OpenAI's default output_compression (100) is the server's default.
    for (name, format) in [
        ("png", OutputFormat::Png),
        ("jpeg", OutputFormat::Jpeg),
        ("webp", OutputFormat::Webp),
    ] {
        let bytes = encode(&img, format, 100).expect("encoding the test image");
        eprintln!("{name}: {} KiB", bytes.len() / 1024);
        g.bench_function(name, |b| {
            b.iter(|| black_box(encode(black_box(&img), format, 100).expect("encode")))
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
    targets = encoders
}
criterion_main!(benches);
