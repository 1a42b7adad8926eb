//! Single-file checkpoints: one `.safetensors` holding the whole SDXL pipeline in its original
//! (Stability AI "SGM", a.k.a. LDM) layout, the way `sd_xl_turbo_1.0_fp16.safetensors` ships and
//! the way A1111, ComfyUI and Civitai share fine-tuned SDXL models.
//!
//! ```text
//! model.diffusion_model.*                UNet: input_blocks.N.M / middle_block.N / output_blocks.N.M
//! first_stage_model.* (or vae.*)         VAE: encoder.down.N.block.M, mid.attn_1 (1x1 convs),
//!                                        decoder.up.N numbered from the bottom
//! conditioner.embedders.0.transformer.*  CLIP ViT-L, under its transformers names
//! conditioner.embedders.1.model.*        OpenCLIP ViT-bigG: fused attn.in_proj (q, k, v rows),
//!                                        ln_1 / mlp.c_fc / ..., text_projection as [width, dim]
//! ```
//!
//! Nothing is converted on disk: each component's `VarBuilder` asks for its diffusers names, and
//! [`ComponentBackend`] reads the tensor each name comes from, slicing, transposing or
//! reshaping it on the way (diffusers' `from_single_file` does the same conversion on a state
//! dict). The configs and tokenizers, which a single file lacks, come from a diffusers-layout
//! directory (the model's). Every tensor read is recorded, so after loading
//! [`Checkpoint::ensure_used`] can refuse a file whose components the model did not all read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::loader::{map_safetensors, LoadError, LoadResult, Requested};
use super::unet::UNet2DConditionConfig;
use super::vae::AutoencoderKLConfig;

/// Where each component lives in the file.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// diffusers also reads a VAE under `vae.`; SGM's own checkpoints use `first_stage_model.`.
pub const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
pub const CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// Tensors single-file checkpoints carry that no part of the pipeline reads: OpenCLIP's
/// contrastive temperature and the position ids older transformers saved.
fn ignorable(name: &str) -> bool {
    name == "conditioner.embedders.1.model.logit_scale" || name.ends_with(".position_ids")
}

/// One part of the pipeline in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    TextEncoder,
    TextEncoder2,
    Unet,
    Vae,
}

/// What the name mapping needs from the configs: the facts that decide the original numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The UNet's resnets per down block (`layers_per_block`, the same for every block).
    pub unet_layers_per_block: usize,
    /// Whether each UNet up block has attentions (its upsampler's index depends on it).
    pub unet_up_attention: Vec<bool>,
    /// The VAE decoder's number of up blocks (the original numbers them from the bottom).
    pub vae_up_blocks: usize,
}

impl Layout {
    /// The layout of the models these configs describe; refuses a UNet whose blocks have
    /// different `layers_per_block`, which the original numbering cannot express.
    pub fn from_configs(
        unet: &UNet2DConditionConfig,
        vae: &AutoencoderKLConfig,
    ) -> Result<Self, String> {
        let blocks = unet.down_block_types.len();
        let per_block: Vec<usize> = (0..blocks).map(|i| unet.layers_per_block(i)).collect();
        if per_block.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "the UNet config has a different layers_per_block per block ({per_block:?}); \
                 single-file checkpoints are read for UNets with one count for every block"
            ));
        }
        Ok(Self {
            unet_layers_per_block: per_block.first().copied().unwrap_or(0),
            unet_up_attention: unet
                .up_block_types
                .iter()
                .map(|t| t.contains("CrossAttn"))
                .collect(),
            vae_up_blocks: vae.up_block_types.len(),
        })
    }
}

/// How a diffusers tensor is read from the original one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// As stored.
    Same(String),
    /// Rows `[i*n, (i+1)*n)` of a fused `[3n, ...]` q/k/v projection (OpenCLIP's `in_proj`).
    Third(String, usize),
    /// Transposed (OpenCLIP's `text_projection` is `x @ P`, a linear layer's weight is `P^T`).
    Transposed(String),
    /// A 1x1 convolution's `[o, i, 1, 1]` weight read as a linear layer's `[o, i]` (the original
    /// VAE's attention).
    Squeezed(String),
}

impl Read {
    pub fn source(&self) -> &str {
        match self {
            Read::Same(s) | Read::Third(s, _) | Read::Transposed(s) | Read::Squeezed(s) => s,
        }
    }

    /// The shape this read gives from a stored tensor of shape `stored`.
    pub fn shape(&self, stored: &[usize]) -> Option<Vec<usize>> {
        match self {
            Read::Same(_) => Some(stored.to_vec()),
            Read::Third(..) => match stored {
                [rows, rest @ ..] if rows % 3 == 0 => Some(
                    std::iter::once(rows / 3)
                        .chain(rest.iter().copied())
                        .collect(),
                ),
                _ => None,
            },
            Read::Transposed(_) => match stored {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
            Read::Squeezed(_) => match stored {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                [o, i] => Some(vec![*o, *i]),
                _ => None,
            },
        }
    }
}

/// The original name (and how to read it) of the diffusers tensor `name` of `part`, with the
/// file's VAE prefix `vae_prefix`; `None` for a name this layout has no place for.
pub fn original(part: Part, name: &str, layout: &Layout, vae_prefix: &str) -> Option<Read> {
    match part {
        Part::TextEncoder => Some(Read::Same(format!("{CLIP_L_PREFIX}{name}"))),
        Part::TextEncoder2 => open_clip(name),
        Part::Unet => unet(name, layout).map(|n| Read::Same(format!("{UNET_PREFIX}{n}"))),
        Part::Vae => vae(name, layout.vae_up_blocks).map(|(n, squeeze)| {
            let n = format!("{vae_prefix}{n}");
            if squeeze {
                Read::Squeezed(n)
            } else {
                Read::Same(n)
            }
        }),
    }
}

/// `name` split at its first `k` dots: the `k` leading segments and the rest.
fn split(name: &str, k: usize) -> Option<(Vec<&str>, &str)> {
    let mut head = Vec::with_capacity(k);
    let mut rest = name;
    for _ in 0..k {
        let (a, b) = rest.split_once('.')?;
        head.push(a);
        rest = b;
    }
    Some((head, rest))
}

fn index(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// A UNet resnet's tensor, by its original name.
fn unet_resnet(rest: &str) -> Option<String> {
    const NAMES: [(&str, &str); 6] = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ];
    NAMES
        .iter()
        .find_map(|(new, old)| rest.strip_prefix(new).map(|leaf| format!("{old}{leaf}")))
}

fn unet(name: &str, layout: &Layout) -> Option<String> {
    const FIXED: [(&str, &str); 7] = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    if let Some(n) = FIXED
        .iter()
        .find_map(|(new, old)| name.strip_prefix(new).map(|leaf| format!("{old}{leaf}")))
    {
        return Some(n);
    }
    // Each down block is `layers_per_block` resnet (+ attention) entries and a downsampler
    // entry; each up block one entry more, its upsampler inside the last.
    let per = layout.unet_layers_per_block + 1;
    if let Some(rest) = name.strip_prefix("mid_block.") {
        let (head, rest) = split(rest, 2)?;
        return match head.as_slice() {
            ["resnets", j] => Some(format!(
                "middle_block.{}.{}",
                2 * index(j)?,
                unet_resnet(rest)?
            )),
            ["attentions", "0"] => Some(format!("middle_block.1.{rest}")),
            _ => None,
        };
    }
    let (head, rest) = split(name, 4)?;
    match head.as_slice() {
        ["down_blocks", b, "resnets", j] => {
            let i = 1 + index(b)? * per + index(j)?;
            Some(format!("input_blocks.{i}.0.{}", unet_resnet(rest)?))
        }
        ["down_blocks", b, "attentions", j] => {
            let i = 1 + index(b)? * per + index(j)?;
            Some(format!("input_blocks.{i}.1.{rest}"))
        }
        ["down_blocks", b, "downsamplers", "0"] => {
            let leaf = rest.strip_prefix("conv.")?;
            Some(format!(
                "input_blocks.{}.0.op.{leaf}",
                index(b)? * per + per
            ))
        }
        ["up_blocks", b, "resnets", j] => {
            let i = index(b)? * per + index(j)?;
            Some(format!("output_blocks.{i}.0.{}", unet_resnet(rest)?))
        }
        ["up_blocks", b, "attentions", j] => {
            let i = index(b)? * per + index(j)?;
            Some(format!("output_blocks.{i}.1.{rest}"))
        }
        ["up_blocks", b, "upsamplers", "0"] => {
            let b = index(b)?;
            let leaf = rest.strip_prefix("conv.")?;
            let slot = if *layout.unet_up_attention.get(b)? {
                2
            } else {
                1
            };
            Some(format!(
                "output_blocks.{}.{slot}.conv.{leaf}",
                b * per + per - 1
            ))
        }
        _ => None,
    }
}

/// A VAE tensor's original name, and whether it is stored as a 1x1 convolution.
fn vae(name: &str, up_blocks: usize) -> Option<(String, bool)> {
    let resnet = |rest: &str| rest.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let (coder, rest) = name.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        // quant_conv, post_quant_conv
        return Some((name.to_string(), false));
    }
    if let Some(leaf) = rest.strip_prefix("conv_norm_out.") {
        return Some((format!("{coder}.norm_out.{leaf}"), false));
    }
    if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        return Some((name.to_string(), false));
    }
    if let Some(attn) = rest.strip_prefix("mid_block.attentions.0.") {
        let (part, leaf) = attn.split_once('.')?;
        let (part, leaf) = match part {
            "to_out" => ("proj_out", leaf.strip_prefix("0.")?),
            "group_norm" => ("norm", leaf),
            "to_q" => ("q", leaf),
            "to_k" => ("k", leaf),
            "to_v" => ("v", leaf),
            _ => return None,
        };
        let squeeze = part != "norm" && leaf == "weight";
        return Some((format!("{coder}.mid.attn_1.{part}.{leaf}"), squeeze));
    }
    if let Some((["mid_block", "resnets", j], tail)) =
        split(rest, 3).as_ref().map(|(h, t)| (h.as_slice(), *t))
    {
        let n = format!("{coder}.mid.block_{}.{}", index(j)? + 1, resnet(tail));
        return Some((n, false));
    }
    let (head, tail) = split(rest, 4)?;
    let n = match (coder, head.as_slice()) {
        ("encoder", ["down_blocks", i, "resnets", j]) => {
            format!(
                "encoder.down.{}.block.{}.{}",
                index(i)?,
                index(j)?,
                resnet(tail)
            )
        }
        ("encoder", ["down_blocks", i, "downsamplers", "0"]) => {
            format!("encoder.down.{}.downsample.{tail}", index(i)?)
        }
        ("decoder", ["up_blocks", i, "resnets", j]) => {
            let i = up_blocks.checked_sub(index(i)? + 1)?;
            format!("decoder.up.{i}.block.{}.{}", index(j)?, resnet(tail))
        }
        ("decoder", ["up_blocks", i, "upsamplers", "0"]) => {
            let i = up_blocks.checked_sub(index(i)? + 1)?;
            format!("decoder.up.{i}.upsample.{tail}")
        }
        _ => return None,
    };
    Some((n, false))
}

/// CLIPTextModelWithProjection's tensor in OpenCLIP's layout.
fn open_clip(name: &str) -> Option<Read> {
    let p = CLIP_G_PREFIX;
    let same = |n: &str| Some(Read::Same(format!("{p}{n}")));
    match name {
        "text_model.embeddings.token_embedding.weight" => return same("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight" => return same("positional_embedding"),
        "text_projection.weight" => {
            return Some(Read::Transposed(format!("{p}text_projection")));
        }
        _ => {}
    }
    if let Some(leaf) = name.strip_prefix("text_model.final_layer_norm.") {
        return same(&format!("ln_final.{leaf}"));
    }
    let (head, rest) = split(name, 4)?;
    let ["text_model", "encoder", "layers", i] = head.as_slice() else {
        return None;
    };
    let block = format!("{p}transformer.resblocks.{}.", index(i)?);
    const NAMES: [(&str, &str); 5] = [
        ("layer_norm1.", "ln_1."),
        ("layer_norm2.", "ln_2."),
        ("mlp.fc1.", "mlp.c_fc."),
        ("mlp.fc2.", "mlp.c_proj."),
        ("self_attn.out_proj.", "attn.out_proj."),
    ];
    if let Some(n) = NAMES
        .iter()
        .find_map(|(new, old)| rest.strip_prefix(new).map(|leaf| format!("{old}{leaf}")))
    {
        return Some(Read::Same(format!("{block}{n}")));
    }
    let (proj, leaf) = rest.strip_prefix("self_attn.")?.split_once('.')?;
    let third = ["q_proj", "k_proj", "v_proj"]
        .iter()
        .position(|p| *p == proj)?;
    (leaf == "weight" || leaf == "bias")
        .then(|| Read::Third(format!("{block}attn.in_proj_{leaf}"), third))
}

/// Maps a single-file checkpoint read-only.
fn map(path: &Path) -> LoadResult<candle_core::safetensors::MmapedSafetensors> {
    map_safetensors(
        path,
        " (single-file checkpoints are read in the safetensors format only; a .ckpt or .pt \
         pickle is not loaded)",
    )
}

/// A single-file checkpoint: its tensors' names and shapes, and what the model read.
pub struct Checkpoint {
    path: PathBuf,
    shapes: Arc<BTreeMap<String, Vec<usize>>>,
    vae_prefix: &'static str,
    requested: Requested,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.shapes.len())
            .finish()
    }
}

impl Checkpoint {
    /// Maps `path` and checks that it is an SDXL checkpoint in the original layout, saying what
    /// it is instead when it is not.
    pub fn open(path: &Path) -> LoadResult<Self> {
        if !path.is_file() {
            return Err(LoadError::MissingFile {
                path: path.to_path_buf(),
                what: "checkpoint file not found".into(),
            });
        }
        let inner = map(path)?;
        let shapes: BTreeMap<String, Vec<usize>> = inner
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec()))
            .collect();
        let vae_prefix = VAE_PREFIXES
            .into_iter()
            .find(|p| shapes.keys().any(|n| n.starts_with(p)))
            .unwrap_or(VAE_PREFIXES[0]);
        let checkpoint = Self {
            path: path.to_path_buf(),
            shapes: Arc::new(shapes),
            vae_prefix,
            requested: Requested::default(),
        };
        checkpoint.check_kind()?;
        Ok(checkpoint)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(n, _)| n.starts_with(prefix))
    }

    /// Whether the file holds a VAE (some shared checkpoints leave it out).
    pub fn has_vae(&self) -> bool {
        self.has_prefix(self.vae_prefix)
    }

    /// Refuses files that are not an SDXL pipeline in the original layout, naming what they
    /// look like.
    fn check_kind(&self) -> LoadResult<()> {
        let refuse = |why: String| {
            Err(LoadError::Weights {
                path: self.path.clone(),
                message: why,
            })
        };
        if self.has_prefix(UNET_PREFIX)
            && self.has_prefix(CLIP_L_PREFIX)
            && self.has_prefix(CLIP_G_PREFIX)
        {
            return Ok(());
        }
        if self.has_prefix("cond_stage_model.") {
            return refuse(
                "a Stable Diffusion 1.x/2.x checkpoint (one text encoder, under \
                 cond_stage_model.), not SDXL: turbine runs SDXL models"
                    .into(),
            );
        }
        if self.has_prefix(UNET_PREFIX) && self.has_prefix("conditioner.embedders.0.model.") {
            return refuse(
                "an SDXL refiner checkpoint (OpenCLIP only): turbine runs SDXL base-architecture \
                 models such as SDXL-Turbo"
                    .into(),
            );
        }
        let names: Vec<&str> = self.shapes.keys().map(String::as_str).collect();
        let diffusers = ["down_blocks.", "text_model.", "encoder.down_blocks."];
        if names
            .iter()
            .any(|n| diffusers.iter().any(|d| n.starts_with(d)))
        {
            return refuse(
                "one component's weights in the diffusers layout, not a single-file checkpoint: \
                 point --model-dir at the diffusers folder that holds it instead"
                    .into(),
            );
        }
        let shown: Vec<&str> = names.iter().take(4).copied().collect();
        refuse(format!(
            "not an SDXL single-file checkpoint: expected tensors under {UNET_PREFIX}, \
             {CLIP_L_PREFIX} and {CLIP_G_PREFIX}; the file's {} tensor(s) begin {}",
            names.len(),
            if shown.is_empty() {
                "(none)".to_string()
            } else {
                shown.join(", ")
            }
        ))
    }

    /// `part`'s view of the file. Each maps the file anew, and the mapping goes with the
    /// component's builder: the pages one component read leave the process's memory once it is
    /// built, as they do with a directory's one file per component (one mapping for the whole
    /// load held every page read until the end: 1.85 GiB more peak RSS for SDXL in bf16).
    pub fn backend(&self, part: Part, layout: &Layout) -> LoadResult<ComponentBackend> {
        Ok(ComponentBackend {
            path: self.path.clone(),
            inner: Arc::new(map(&self.path)?),
            shapes: self.shapes.clone(),
            part,
            layout: layout.clone(),
            vae_prefix: self.vae_prefix,
            requested: self.requested.clone(),
        })
    }

    /// Fails, naming the tensors, when a component's tensors went unread (the file and the
    /// configs disagree); `skip` lists parts loaded from elsewhere (`--vae`), whose tensors in
    /// the file are left alone. Tensors outside the four components (EMA copies, training
    /// state) are returned, for the caller to mention.
    pub fn ensure_used(&self, skip: &[Part]) -> LoadResult<Vec<String>> {
        let asked = self.requested.snapshot();
        let mut prefixes: Vec<(&str, Part)> = vec![
            (UNET_PREFIX, Part::Unet),
            (CLIP_L_PREFIX, Part::TextEncoder),
            (CLIP_G_PREFIX, Part::TextEncoder2),
        ];
        prefixes.extend(VAE_PREFIXES.iter().map(|p| (*p, Part::Vae)));
        let mut unused = Vec::new();
        let mut other = Vec::new();
        for name in self.shapes.keys() {
            if asked.contains_key(name) || ignorable(name) {
                continue;
            }
            match prefixes.iter().find(|(p, _)| name.starts_with(p)) {
                Some((_, part)) if skip.contains(part) => {}
                Some(_) => unused.push(name.clone()),
                None => other.push(name.clone()),
            }
        }
        if unused.is_empty() {
            return Ok(other);
        }
        let shown: Vec<_> = unused.iter().take(8).cloned().collect();
        Err(LoadError::Weights {
            path: self.path.clone(),
            message: format!(
                "{} tensor(s) were not used by the model built from the configs (the configs \
                 and the checkpoint disagree): {}{}",
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ),
        })
    }
}

/// One component's view of a [`Checkpoint`]: diffusers names in, original tensors out.
pub struct ComponentBackend {
    path: PathBuf,
    inner: Arc<candle_core::safetensors::MmapedSafetensors>,
    shapes: Arc<BTreeMap<String, Vec<usize>>>,
    part: Part,
    layout: Layout,
    vae_prefix: &'static str,
    requested: Requested,
}

impl ComponentBackend {
    /// How `name` is read, and the shape it then has; errors name both names.
    fn locate(&self, name: &str) -> candle_core::Result<(Read, Vec<usize>)> {
        let read = original(self.part, name, &self.layout, self.vae_prefix).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` of the {:?} has no place in a single-file checkpoint",
                self.part
            ))
        })?;
        let stored = self.shapes.get(read.source()).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{}` (the {:?}'s `{name}`) is missing from {}",
                read.source(),
                self.part,
                self.path.display()
            ))
        })?;
        let shape = read.shape(stored).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{}` in {} has shape {stored:?}, which cannot hold the {:?}'s `{name}`",
                read.source(),
                self.path.display(),
                self.part
            ))
        })?;
        Ok((read, shape))
    }

    /// Notes that the model read `read`'s stored tensor (found by [`Self::locate`]).
    fn record(&self, read: &Read) {
        if let Some(stored) = self.shapes.get(read.source()) {
            self.requested
                .record(read.source(), &Shape::from(stored.as_slice()));
        }
    }

    fn read(&self, read: &Read, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.load(read.source(), dev)?;
        Ok(match read {
            Read::Same(_) => t,
            Read::Third(_, i) => {
                let n = t.dim(0)? / 3;
                t.narrow(0, i * n, n)?.contiguous()?
            }
            Read::Transposed(_) => t.t()?.contiguous()?,
            Read::Squeezed(_) => {
                let (o, i) = (t.dim(0)?, t.dim(1)?);
                t.reshape((o, i))?
            }
        })
    }
}

impl SimpleBackend for ComponentBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let (read, shape) = self.locate(name)?;
        self.record(&read);
        if shape != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{}` in {} gives the {:?}'s `{name}` shape {shape:?}, but the config \
                 implies {:?}",
                read.source(),
                self.path.display(),
                self.part,
                s.dims()
            )));
        }
        self.read(&read, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (read, _) = self.locate(name)?;
        self.record(&read);
        self.read(&read, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.locate(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdxl() -> Layout {
        Layout {
            unet_layers_per_block: 2,
            unet_up_attention: vec![true, true, false],
            vae_up_blocks: 4,
        }
    }

    fn name(part: Part, n: &str) -> Option<Read> {
        original(part, n, &sdxl(), "first_stage_model.")
    }

    #[test]
    fn unet_blocks_are_numbered_as_the_original_does() {
        let unet = |n: &str| name(Part::Unet, n).map(|r| r.source().to_string());
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.0.downsamplers.0.conv.bias",
                "input_blocks.3.0.op.bias",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.resnets.0.conv_shortcut.weight",
                "input_blocks.7.0.skip_connection.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.bias",
                "middle_block.2.emb_layers.1.bias",
            ),
            (
                "mid_block.attentions.0.norm.weight",
                "middle_block.1.norm.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv2.weight",
                "output_blocks.2.0.out_layers.3.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.2.conv.weight",
            ),
            (
                "up_blocks.2.attentions.0.proj_out.bias",
                "output_blocks.6.1.proj_out.bias",
            ),
            ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
            ("conv_norm_out.bias", "out.0.bias"),
        ];
        for (diffusers, sgm) in cases {
            assert_eq!(
                unet(diffusers),
                Some(format!("{UNET_PREFIX}{sgm}")),
                "{diffusers}"
            );
        }
        // Without attentions in the block, the upsampler is the entry after the resnet.
        let plain = Layout {
            unet_up_attention: vec![false, true, false],
            ..sdxl()
        };
        let r = original(
            Part::Unet,
            "up_blocks.0.upsamplers.0.conv.weight",
            &plain,
            "",
        );
        assert_eq!(
            r.map(|r| r.source().to_string()),
            Some(format!("{UNET_PREFIX}output_blocks.2.1.conv.weight"))
        );
        assert_eq!(unet("down_blocks.0.resnets.0.unknown.weight"), None);
        assert_eq!(unet("mid_block.attentions.1.norm.weight"), None);
    }

    #[test]
    fn vae_and_open_clip_tensors_are_read_with_their_reshapes() {
        assert_eq!(
            name(
                Part::Vae,
                "decoder.up_blocks.0.resnets.1.conv_shortcut.weight"
            ),
            Some(Read::Same(
                "first_stage_model.decoder.up.3.block.1.nin_shortcut.weight".into()
            ))
        );
        assert_eq!(
            name(Part::Vae, "encoder.mid_block.attentions.0.to_out.0.weight"),
            Some(Read::Squeezed(
                "first_stage_model.encoder.mid.attn_1.proj_out.weight".into()
            ))
        );
        assert_eq!(
            name(Part::Vae, "decoder.mid_block.attentions.0.to_q.bias"),
            Some(Read::Same(
                "first_stage_model.decoder.mid.attn_1.q.bias".into()
            ))
        );
        assert_eq!(
            name(Part::Vae, "decoder.conv_norm_out.weight"),
            Some(Read::Same(
                "first_stage_model.decoder.norm_out.weight".into()
            ))
        );
        assert_eq!(
            name(
                Part::TextEncoder2,
                "text_model.encoder.layers.3.self_attn.v_proj.bias"
            ),
            Some(Read::Third(
                format!("{CLIP_G_PREFIX}transformer.resblocks.3.attn.in_proj_bias"),
                2
            ))
        );
        assert_eq!(
            name(Part::TextEncoder2, "text_projection.weight"),
            Some(Read::Transposed(format!("{CLIP_G_PREFIX}text_projection")))
        );
        assert_eq!(name(Part::TextEncoder2, "text_model.pooler.weight"), None);

        let third = Read::Third(String::new(), 1);
        assert_eq!(third.shape(&[3840, 1280]), Some(vec![1280, 1280]));
        assert_eq!(third.shape(&[3840]), Some(vec![1280]));
        assert_eq!(third.shape(&[100, 4]), None, "not three equal parts");
        let t = Read::Transposed(String::new());
        assert_eq!(t.shape(&[1280, 1024]), Some(vec![1024, 1280]));
        assert_eq!(t.shape(&[1280]), None);
        let sq = Read::Squeezed(String::new());
        assert_eq!(sq.shape(&[512, 512, 1, 1]), Some(vec![512, 512]));
        assert_eq!(sq.shape(&[512, 512, 3, 3]), None);
    }
}
