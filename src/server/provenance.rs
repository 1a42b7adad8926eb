//! What an image file says about where it came from (`--image-metadata`).
//!
//! Every image carries, by default, an XMP packet with IPTC's marks for AI-made media: its
//! digital source type (`trainedAlgorithmicMedia`, or `compositeWithTrainedAlgorithmicMedia`
//! for an inpainting edit, which keeps part of a supplied image), the model that made it
//! (`AISystemUsed`, IPTC Photo Metadata 2025.1) and the software (`xmp:CreatorTool`). These are
//! the machine-readable marks that image platforms read to label AI images, and what the EU AI
//! Act's article 50(2) asks of a system that generates images: that its outputs are "marked in a
//! machine-readable format and detectable as artificially generated". `parameters` adds what
//! the request asked for: its prompts as IPTC's `AIPromptInformation`, and in PNGs the
//! `parameters` text that Stable Diffusion tools (AUTOMATIC1111, Forge, ComfyUI,
//! Civitai) read back into a prompt, seed and settings. `none` leaves the encoder's bytes alone.
//!
//! The packet goes where each format keeps XMP: a PNG's `iTXt` chunk `XML:com.adobe.xmp`, a
//! JPEG's APP1 segment, a WebP's `XMP ` chunk (the file becomes the extended `VP8X` layout).
//! It holds no time and no random identifier, so an image's bytes stay a function of its
//! request: the same seed gives the same file.

use super::api::OutputFormat;
use crate::model::pipeline::InitImage;

/// `--image-metadata`: what each image file states about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ImageMetadata {
    /// That a generative model made the image, and which: IPTC's digital source type, the
    /// model's name and turbine's version, in XMP.
    #[default]
    Provenance,
    /// `provenance`, plus the request's prompts (IPTC's AI prompt information) and, in PNGs,
    /// the `parameters` text Stable Diffusion tools read (prompt, seed, steps, guidance, size).
    /// The prompts then travel with every copy of the file.
    Parameters,
    /// No metadata: the encoder's bytes.
    None,
}

/// IPTC's digital source type (<https://cv.iptc.org/newscodes/digitalsourcetype/>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceType {
    /// Made by a model trained on sampled content: a generation, or an edit that redraws the
    /// whole image.
    TrainedAlgorithmicMedia,
    /// A supplied image with parts made by such a model: an inpainting edit (a mask keeps the
    /// rest of the input).
    CompositeWithTrainedAlgorithmicMedia,
}

impl SourceType {
    /// An image made from `init` (an edit's input; `None`: a generation): a composite when a
    /// mask keeps part of the input.
    pub fn of(init: Option<&InitImage>) -> Self {
        match init {
            Some(init) if init.mask().is_some() => Self::CompositeWithTrainedAlgorithmicMedia,
            _ => Self::TrainedAlgorithmicMedia,
        }
    }

    pub fn uri(self) -> &'static str {
        match self {
            Self::TrainedAlgorithmicMedia => {
                "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
            }
            Self::CompositeWithTrainedAlgorithmicMedia => {
                "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
            }
        }
    }
}

/// What one image's metadata states.
#[derive(Debug, Clone)]
pub struct ImageFacts<'a> {
    /// The model as served (`--served-model-name`).
    pub model: &'a str,
    /// The LoRA adapter the request named, if any.
    pub adapter: Option<&'a str>,
    pub source: SourceType,
    pub prompt: &'a str,
    /// Empty: none.
    pub negative_prompt: &'a str,
    pub seed: u64,
    /// The schedule's steps (an edit's `steps / strength`, as Stable Diffusion tools count).
    pub steps: u32,
    pub guidance_scale: f64,
    pub width: u32,
    pub height: u32,
    /// An edit's `strength` (the tools' "denoising strength").
    pub strength: Option<f64>,
}

/// One image's metadata, ready to embed: built on the request's side, written into the file on
/// the encoder's.
#[derive(Debug, Clone, PartialEq)]
pub struct Marks {
    /// The XMP packet without the prompts.
    brief: String,
    /// With them (`parameters`); `None`: `brief` is the packet.
    full: Option<String>,
    /// The `parameters` text for PNGs (`parameters` only).
    parameters: Option<String>,
}

/// The XMP namespace a JPEG's APP1 segment starts with.
const JPEG_XMP_NAMESPACE: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// The largest XMP packet one JPEG segment holds: 65535 bytes less the length field and the
/// namespace. A longer packet (a prompt of many thousand characters) goes without the prompts.
const JPEG_MAX_XMP: usize = 65535 - 2 - JPEG_XMP_NAMESPACE.len();

impl Marks {
    /// `None` for [`ImageMetadata::None`].
    pub fn new(level: ImageMetadata, facts: &ImageFacts) -> Option<Marks> {
        match level {
            ImageMetadata::None => None,
            ImageMetadata::Provenance => Some(Marks {
                brief: xmp_packet(facts, false),
                full: None,
                parameters: None,
            }),
            ImageMetadata::Parameters => Some(Marks {
                brief: xmp_packet(facts, false),
                full: Some(xmp_packet(facts, true)),
                parameters: Some(sd_parameters(facts)),
            }),
        }
    }

    /// The packet for a format that holds at most `limit` bytes of it.
    fn xmp(&self, limit: usize) -> &str {
        match &self.full {
            Some(full) if full.len() <= limit => full,
            _ => &self.brief,
        }
    }
}

/// The model as IPTC's `AISystemUsed` names it: the served name, and the adapter.
fn system_used(facts: &ImageFacts) -> String {
    match facts.adapter {
        Some(adapter) => format!("{} with LoRA {adapter}", facts.model),
        None => facts.model.to_string(),
    }
}

fn creator_tool() -> String {
    format!("turbine {}", env!("CARGO_PKG_VERSION"))
}

/// The XMP packet: IPTC's digital source type and AI system, the creator tool, and with
/// `prompts` the prompt information.
fn xmp_packet(facts: &ImageFacts, prompts: bool) -> String {
    let mut props = vec![
        (
            "Iptc4xmpExt:DigitalSourceType",
            facts.source.uri().to_string(),
        ),
        ("Iptc4xmpExt:AISystemUsed", system_used(facts)),
        ("xmp:CreatorTool", creator_tool()),
    ];
    if prompts {
        let mut info = facts.prompt.to_string();
        if !facts.negative_prompt.is_empty() {
            info.push_str("\nNegative prompt: ");
            info.push_str(facts.negative_prompt);
        }
        props.push(("Iptc4xmpExt:AIPromptInformation", info));
    }
    let mut out = String::from(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n \
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n  \
         <rdf:Description rdf:about=\"\"\n    \
         xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n    \
         xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\">\n",
    );
    for (name, value) in props {
        out.push_str("   <");
        out.push_str(name);
        out.push('>');
        out.push_str(&xml_text(&value));
        out.push_str("</");
        out.push_str(name);
        out.push_str(">\n");
    }
    out.push_str("  </rdf:Description>\n </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"r\"?>");
    out
}

/// `text` as XML character data: markup characters escaped, a carriage return kept as a
/// reference (a parser would fold it into the newline), and what XML 1.0 cannot hold at all
/// (other control characters, U+FFFE and U+FFFF) left out.
fn xml_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\r' => out.push_str("&#13;"),
            '\t' | '\n' => out.push(c),
            c if c < ' ' || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// The `parameters` text AUTOMATIC1111's web UI writes into its PNGs, which the Stable
/// Diffusion tools read back: the prompt, the negative prompt, then `Key: value` settings.
fn sd_parameters(facts: &ImageFacts) -> String {
    let plain = |s: &str| -> String {
        s.chars()
            .filter(|&c| c == '\n' || c == '\t' || !c.is_control())
            .collect()
    };
    let mut out = plain(facts.prompt);
    if !facts.negative_prompt.is_empty() {
        out.push_str("\nNegative prompt: ");
        out.push_str(&plain(facts.negative_prompt));
    }
    let mut settings = vec![
        ("Steps", facts.steps.to_string()),
        ("Sampler", "Euler a".to_string()),
        ("CFG scale", facts.guidance_scale.to_string()),
        ("Seed", facts.seed.to_string()),
        ("Size", format!("{}x{}", facts.width, facts.height)),
        ("Model", facts.model.to_string()),
    ];
    if let Some(adapter) = facts.adapter {
        settings.push(("Lora", adapter.to_string()));
    }
    if let Some(strength) = facts.strength {
        settings.push(("Denoising strength", strength.to_string()));
    }
    settings.push(("Version", creator_tool()));
    out.push('\n');
    let settings: Vec<String> = settings
        .into_iter()
        .map(|(k, v)| format!("{k}: {}", quoted(&plain(&v))))
        .collect();
    out.push_str(&settings.join(", "));
    out
}

/// A setting's value as the tools' parser reads it back: as it is, unless a comma, colon,
/// quote or newline would split it, then as a JSON string.
fn quoted(v: &str) -> String {
    if v.contains([',', ':', '"', '\n']) {
        serde_json::Value::from(v).to_string()
    } else {
        v.to_string()
    }
}

/// Why the encoder's bytes could not take the metadata (they are not what the encoder writes:
/// a bug).
#[derive(Debug, thiserror::Error)]
#[error("cannot add metadata to this {format}: {why}")]
pub struct EmbedError {
    format: &'static str,
    why: &'static str,
}

/// `bytes`, a file the encoder wrote in `format` of a `width` x `height` image, with `marks`
/// in it.
pub fn embed(
    bytes: Vec<u8>,
    format: OutputFormat,
    width: u32,
    height: u32,
    marks: &Marks,
) -> Result<Vec<u8>, EmbedError> {
    let bad = |why| EmbedError {
        format: format.as_str(),
        why,
    };
    match format {
        OutputFormat::Png => embed_png(bytes, marks).ok_or_else(|| bad("no IHDR chunk first")),
        OutputFormat::Jpeg => embed_jpeg(bytes, marks).ok_or_else(|| bad("no SOI marker")),
        OutputFormat::Webp => {
            embed_webp(bytes, width, height, marks).ok_or_else(|| bad("not a RIFF WEBP file"))
        }
    }
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(data.len() + 12);
    chunk.extend_from_slice(&(data.len() as u32).to_be_bytes());
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    chunk.extend_from_slice(&crc.finalize().to_be_bytes());
    chunk
}

/// An uncompressed `iTXt` chunk: keyword, no language, no translated keyword.
fn png_itxt(keyword: &str, text: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(keyword.len() + text.len() + 5);
    data.extend_from_slice(keyword.as_bytes());
    data.extend_from_slice(&[0, 0, 0, 0, 0]);
    data.extend_from_slice(text.as_bytes());
    png_chunk(b"iTXt", &data)
}

/// The XMP (and the `parameters` text) right after the IHDR chunk, before the image data, where
/// readers that stop at the first IDAT still find them. `parameters` goes in a `tEXt` chunk
/// when it is ASCII (what AUTOMATIC1111 writes), else in an `iTXt` (UTF-8).
fn embed_png(bytes: Vec<u8>, marks: &Marks) -> Option<Vec<u8>> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    const IHDR_END: usize = 8 + 4 + 4 + 13 + 4;
    if !bytes.starts_with(SIGNATURE) || bytes.get(12..16)? != b"IHDR" || bytes.len() < IHDR_END {
        return None;
    }
    let mut chunks = png_itxt("XML:com.adobe.xmp", marks.xmp(usize::MAX));
    if let Some(text) = &marks.parameters {
        if text.is_ascii() {
            let mut data = b"parameters\0".to_vec();
            data.extend_from_slice(text.as_bytes());
            chunks.extend(png_chunk(b"tEXt", &data));
        } else {
            chunks.extend(png_itxt("parameters", text));
        }
    }
    let mut out = Vec::with_capacity(bytes.len() + chunks.len());
    out.extend_from_slice(&bytes[..IHDR_END]);
    out.extend(chunks);
    out.extend_from_slice(&bytes[IHDR_END..]);
    Some(out)
}

/// An APP1 XMP segment after SOI, and after the JFIF APP0 segment where there is one (JFIF
/// must come first).
fn embed_jpeg(bytes: Vec<u8>, marks: &Marks) -> Option<Vec<u8>> {
    if !bytes.starts_with(&[0xff, 0xd8]) {
        return None;
    }
    let mut at = 2;
    if bytes.get(2..4) == Some(&[0xff, 0xe0]) {
        let len = u16::from_be_bytes([*bytes.get(4)?, *bytes.get(5)?]) as usize;
        at = 4 + len;
        if at > bytes.len() {
            return None;
        }
    }
    let xmp = marks.xmp(JPEG_MAX_XMP).as_bytes();
    let len = 2 + JPEG_XMP_NAMESPACE.len() + xmp.len();
    let mut out = Vec::with_capacity(bytes.len() + len + 2);
    out.extend_from_slice(&bytes[..at]);
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(JPEG_XMP_NAMESPACE);
    out.extend_from_slice(xmp);
    out.extend_from_slice(&bytes[at..]);
    Some(out)
}

/// The XMP in an `XMP ` chunk at the end, which the extended layout needs: a `VP8X` chunk first
/// with the XMP flag and the canvas size (the alpha flag copied from a lossless image's header),
/// then the image's chunk as the encoder wrote it.
fn embed_webp(bytes: Vec<u8>, width: u32, height: u32, marks: &Marks) -> Option<Vec<u8>> {
    const XMP_FLAG: u8 = 0x04;
    const ALPHA_FLAG: u8 = 0x10;
    if bytes.len() < 20 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return None;
    }
    let riff_len = u32::from_le_bytes(bytes[4..8].try_into().ok()?) as usize;
    let body = bytes.get(12..8 + riff_len)?;
    let kind = body.get(..4)?;
    let xmp = marks.xmp(usize::MAX).as_bytes();
    let mut chunks = Vec::with_capacity(body.len() + xmp.len() + 32);
    match kind {
        b"VP8X" => {
            // Already extended (not what the encoders here write): set the flag, append.
            chunks.extend_from_slice(body);
            *chunks.get_mut(8)? |= XMP_FLAG;
        }
        b"VP8 " | b"VP8L" => {
            let mut flags = XMP_FLAG;
            if kind == b"VP8L" {
                let header = u32::from_le_bytes(body.get(9..13)?.try_into().ok()?);
                if header & (1 << 28) != 0 {
                    flags |= ALPHA_FLAG;
                }
            }
            let canvas = |side: u32| side.saturating_sub(1).to_le_bytes();
            chunks.extend_from_slice(b"VP8X");
            chunks.extend_from_slice(&10u32.to_le_bytes());
            chunks.extend_from_slice(&[flags, 0, 0, 0]);
            chunks.extend_from_slice(&canvas(width)[..3]);
            chunks.extend_from_slice(&canvas(height)[..3]);
            chunks.extend_from_slice(body);
        }
        _ => return None,
    }
    chunks.extend_from_slice(b"XMP ");
    chunks.extend_from_slice(&(xmp.len() as u32).to_le_bytes());
    chunks.extend_from_slice(xmp);
    if xmp.len() % 2 == 1 {
        chunks.push(0);
    }
    let mut out = Vec::with_capacity(chunks.len() + 12);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&((chunks.len() + 4) as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend(chunks);
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use image::codecs::jpeg::JpegDecoder;
    use image::codecs::png::PngDecoder;
    use image::codecs::webp::WebPDecoder;
    use image::{ImageDecoder, RgbImage};

    use super::*;
    use crate::server::encode::encode;

    /// A 48x32 picture with texture, so that lossy encoders have work to do.
    fn picture() -> RgbImage {
        RgbImage::from_fn(48, 32, |x, y| {
            let noise = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 17) as u8;
            image::Rgb([(x * 5) as u8 + noise, (y * 7) as u8, 128 + noise])
        })
    }

    fn facts<'a>(prompt: &'a str) -> ImageFacts<'a> {
        ImageFacts {
            model: "sdxl-turbo",
            adapter: None,
            source: SourceType::TrainedAlgorithmicMedia,
            prompt,
            negative_prompt: "blurry",
            seed: 42,
            steps: 1,
            guidance_scale: 0.0,
            width: 48,
            height: 32,
            strength: None,
        }
    }

    const FORMATS: [(OutputFormat, u8); 5] = [
        (OutputFormat::Png, 100),
        (OutputFormat::Jpeg, 100),
        (OutputFormat::Jpeg, 60),
        (OutputFormat::Webp, 100),
        (OutputFormat::Webp, 80),
    ];

    /// The XMP packet the `image` crate's own decoder for `format` finds in `bytes`.
    fn xmp_of(bytes: &[u8], format: OutputFormat) -> Option<Vec<u8>> {
        let cursor = Cursor::new(bytes);
        match format {
            OutputFormat::Png => PngDecoder::new(cursor).unwrap().xmp_metadata(),
            OutputFormat::Jpeg => JpegDecoder::new(cursor).unwrap().xmp_metadata(),
            OutputFormat::Webp => WebPDecoder::new(cursor).unwrap().xmp_metadata(),
        }
        .unwrap()
    }

    fn pixels(bytes: &[u8]) -> RgbImage {
        image::load_from_memory(bytes).unwrap().to_rgb8()
    }

    /// A PNG's text chunks as the png crate reads them: (keyword, text, was it a tEXt chunk).
    fn png_texts(bytes: &[u8]) -> Vec<(String, String, bool)> {
        let mut reader = png::Decoder::new(Cursor::new(bytes)).read_info().unwrap();
        let mut out = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut out).unwrap();
        let info = reader.info();
        let mut texts: Vec<_> = info
            .uncompressed_latin1_text
            .iter()
            .map(|t| (t.keyword.clone(), t.text.clone(), true))
            .collect();
        for t in &info.utf8_text {
            texts.push((t.keyword.clone(), t.get_text().unwrap(), false));
        }
        texts
    }

    #[test]
    fn every_format_carries_the_packet_and_keeps_its_pixels() {
        let img = picture();
        let marks = Marks::new(ImageMetadata::Provenance, &facts("a fox")).unwrap();
        for (format, compression) in FORMATS {
            let what = format!("{format:?} at {compression}");
            let bare = encode(&img, format, compression, None).unwrap();
            let marked = encode(&img, format, compression, Some(&marks)).unwrap();
            assert_eq!(xmp_of(&bare, format), None, "{what}");
            let xmp = String::from_utf8(xmp_of(&marked, format).expect(&what)).unwrap();
            assert_eq!(xmp, marks.brief, "{what}");
            // The same compressed image inside: decoded, the same pixels to the bit.
            assert_eq!(pixels(&marked), pixels(&bare), "{what}");
            assert_eq!(pixels(&marked).dimensions(), (48, 32), "{what}");
            // And the same file for the same request.
            assert_eq!(
                encode(&img, format, compression, Some(&marks)).unwrap(),
                marked,
                "{what}"
            );
        }
        let xmp = &marks.brief;
        for line in [
            "<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/\
             trainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType>",
            "<Iptc4xmpExt:AISystemUsed>sdxl-turbo</Iptc4xmpExt:AISystemUsed>",
            &format!(
                "<xmp:CreatorTool>turbine {}</xmp:CreatorTool>",
                env!("CARGO_PKG_VERSION")
            ),
        ] {
            assert!(xmp.contains(line), "{line} not in {xmp}");
        }
        assert!(
            !xmp.contains("a fox"),
            "provenance alone names no prompt: {xmp}"
        );
        assert!(Marks::new(ImageMetadata::None, &facts("a fox")).is_none());
    }

    #[test]
    fn a_lossless_webp_becomes_extended_with_the_xmp_flag_only() {
        let marks = Marks::new(ImageMetadata::Provenance, &facts("a fox")).unwrap();
        let marked = encode(&picture(), OutputFormat::Webp, 100, Some(&marks)).unwrap();
        assert_eq!(&marked[12..16], b"VP8X");
        assert_eq!(marked[20], 0x04, "flags: XMP, and no alpha in an RGB image");
        let side = |at: usize| u32::from_le_bytes([marked[at], marked[at + 1], marked[at + 2], 0]);
        assert_eq!((side(24) + 1, side(27) + 1), (48, 32));
        let riff = u32::from_le_bytes(marked[4..8].try_into().unwrap()) as usize;
        assert_eq!(riff + 8, marked.len());
        let decoder = WebPDecoder::new(Cursor::new(&marked)).unwrap();
        assert_eq!(decoder.dimensions(), (48, 32));
    }

    #[test]
    fn parameters_carry_the_prompts_escaped_and_the_settings_stable_diffusion_tools_read() {
        let prompt = "a red <fox> & \"friends\"\r\nat dusk\u{7}";
        let marks = Marks::new(ImageMetadata::Parameters, &facts(prompt)).unwrap();
        let png = encode(&picture(), OutputFormat::Png, 100, Some(&marks)).unwrap();
        let xmp = String::from_utf8(xmp_of(&png, OutputFormat::Png).unwrap()).unwrap();
        assert_eq!(Some(&xmp), marks.full.as_ref());
        assert!(
            xmp.contains(
                "<Iptc4xmpExt:AIPromptInformation>a red &lt;fox&gt; &amp; \"friends\"&#13;\n\
                 at dusk\nNegative prompt: blurry</Iptc4xmpExt:AIPromptInformation>"
            ),
            "{xmp}"
        );
        let texts = png_texts(&png);
        let expected = format!(
            "a red <fox> & \"friends\"\nat dusk\nNegative prompt: blurry\nSteps: 1, \
             Sampler: Euler a, CFG scale: 0, Seed: 42, Size: 48x32, Model: sdxl-turbo, \
             Version: turbine {}",
            env!("CARGO_PKG_VERSION")
        );
        assert!(
            texts.contains(&("parameters".into(), expected, true)),
            "{texts:?}"
        );
        // The other formats carry the prompts in their XMP.
        for format in [OutputFormat::Jpeg, OutputFormat::Webp] {
            let bytes = encode(&picture(), format, 100, Some(&marks)).unwrap();
            assert_eq!(xmp_of(&bytes, format), Some(xmp.clone().into_bytes()));
        }
    }

    #[test]
    fn an_inpainting_edit_is_a_composite_and_names_its_adapter_and_strength() {
        let facts = ImageFacts {
            model: "house, style",
            adapter: Some("sku-1234"),
            source: SourceType::CompositeWithTrainedAlgorithmicMedia,
            negative_prompt: "",
            steps: 2,
            guidance_scale: 1.5,
            strength: Some(0.5),
            ..facts("a chair, on a rug: studio light")
        };
        let marks = Marks::new(ImageMetadata::Parameters, &facts).unwrap();
        let png = encode(&picture(), OutputFormat::Png, 100, Some(&marks)).unwrap();
        let xmp = String::from_utf8(xmp_of(&png, OutputFormat::Png).unwrap()).unwrap();
        assert!(xmp.contains("digitalsourcetype/compositeWithTrainedAlgorithmicMedia<"));
        assert!(xmp.contains(
            "<Iptc4xmpExt:AISystemUsed>house, style with LoRA sku-1234</Iptc4xmpExt:AISystemUsed>"
        ));
        assert!(!xmp.contains("Negative prompt"), "{xmp}");
        let texts = png_texts(&png);
        let (_, text, _) = texts.iter().find(|t| t.0 == "parameters").unwrap();
        assert_eq!(
            text.lines().collect::<Vec<_>>(),
            [
                "a chair, on a rug: studio light",
                &format!(
                    "Steps: 2, Sampler: Euler a, CFG scale: 1.5, Seed: 42, Size: 48x32, \
                     Model: \"house, style\", Lora: sku-1234, Denoising strength: 0.5, \
                     Version: turbine {}",
                    env!("CARGO_PKG_VERSION")
                )
            ]
        );
    }

    #[test]
    fn a_prompt_outside_ascii_goes_in_an_itxt_chunk() {
        let marks = Marks::new(ImageMetadata::Parameters, &facts("un café, 猫")).unwrap();
        let png = encode(&picture(), OutputFormat::Png, 100, Some(&marks)).unwrap();
        let texts = png_texts(&png);
        let (_, text, latin1) = texts.iter().find(|t| t.0 == "parameters").unwrap();
        assert!(
            text.starts_with("un café, 猫\nNegative prompt: blurry\n"),
            "{text}"
        );
        assert!(!latin1);
    }

    #[test]
    fn a_jpeg_too_small_for_the_prompts_keeps_the_provenance() {
        let long = "a very long prompt ".repeat(4000);
        let marks = Marks::new(ImageMetadata::Parameters, &facts(&long)).unwrap();
        assert!(marks.full.as_ref().unwrap().len() > JPEG_MAX_XMP);
        let jpeg = encode(&picture(), OutputFormat::Jpeg, 90, Some(&marks)).unwrap();
        assert_eq!(
            xmp_of(&jpeg, OutputFormat::Jpeg),
            Some(marks.brief.clone().into_bytes())
        );
        assert_eq!(pixels(&jpeg).dimensions(), (48, 32));
        for format in [OutputFormat::Png, OutputFormat::Webp] {
            let bytes = encode(&picture(), format, 100, Some(&marks)).unwrap();
            assert_eq!(
                xmp_of(&bytes, format),
                Some(marks.full.clone().unwrap().into_bytes())
            );
        }
    }

    #[test]
    fn bytes_that_are_not_the_format_are_refused_without_a_panic() {
        let marks = Marks::new(ImageMetadata::Parameters, &facts("a fox")).unwrap();
        for (format, compression) in FORMATS {
            let file = encode(&picture(), format, compression, None).unwrap();
            // Every prefix, and the file with a wrong first byte: an error or a file, never a
            // panic.
            for cut in 0..file.len() {
                let _ = embed(file[..cut].to_vec(), format, 48, 32, &marks);
            }
            let mut wrong = file.clone();
            wrong[0] ^= 0xff;
            assert!(embed(wrong, format, 48, 32, &marks).is_err(), "{format:?}");
        }
        assert!(embed(
            b"RIFF\xff\xff\xff\xffWEBPVP8 ".to_vec(),
            OutputFormat::Webp,
            1,
            1,
            &marks
        )
        .is_err());
    }
}
