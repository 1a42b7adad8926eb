//! SDXL's denoising UNet, mirroring diffusers 0.42.1 `UNet2DConditionModel`
//! (`models/unets/unet_2d_condition.py`) for the configurations SDXL uses.
//!
//! Module layout follows diffusers: [`embeddings`] (timestep and `text_time` embeddings),
//! [`resnet`] (residual block, resamplers), [`attention`] (attention, transformer blocks),
//! [`blocks`] (down/mid/up blocks). Struct fields are named like the checkpoint's tensors.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod layers;
pub mod resnet;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::model::chunks::{map_runs, MAX_TENSOR_ELEMENTS};
use crate::model::loader::{self, LoadError, LoadResult, ModelDir};
use blocks::{AttnSpec, BlockConfig, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D};
use embeddings::{TextTimeEmbedding, TimestepEmbedding, Timesteps};
use layers::{Conv2d, GroupNorm};

/// An option given either once for all blocks or once per down block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<T: Copy + Default> PerBlock<T> {
    /// The value for block `i`. `validate` checks list lengths; on an unvalidated config an
    /// out-of-range index reads the last entry (or the default of an empty list) instead of
    /// panicking.
    fn get(&self, i: usize) -> T {
        match self {
            Self::All(v) => *v,
            Self::Each(v) => v.get(i).or(v.last()).copied().unwrap_or_default(),
        }
    }

    fn len(&self) -> Option<usize> {
        match self {
            Self::All(_) => None,
            Self::Each(v) => Some(v.len()),
        }
    }
}

/// `transformer_layers_per_block`: like [`PerBlock`], but diffusers also accepts a list of
/// lists (one count per resnet, for asymmetric UNets), which we reject with a clear message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TransformerLayers {
    All(usize),
    Each(Vec<usize>),
    PerLayer(Vec<Vec<usize>>),
}

/// The `unet/config.json` of a diffusers checkpoint; field names and defaults are those of
/// [`UNet2DConditionModel.__init__`](https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/models/unets/unet_2d_condition.py)
/// (SDXL-Turbo's file: <https://huggingface.co/stabilityai/sdxl-turbo/blob/main/unet/config.json>).
///
/// Options that only affect block kinds we do not build (`resnet_skip_time_act`,
/// `resnet_out_scale_factor`, `cross_attention_norm`, `mid_block_only_cross_attention`,
/// `addition_embed_type_num_heads`) are ignored, as diffusers ignores them for these blocks.
/// `upcast_attention` is ignored too: diffusers' default attention processor never reads it,
/// and we always take the softmax in f32.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: TransformerLayers,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    /// For SDXL this is the number of heads, not their width (a historical misnomer that
    /// diffusers keeps: `num_attention_heads` defaults to it).
    pub attention_head_dim: PerBlock<usize>,
    /// diffusers refuses any value here; so do we.
    pub num_attention_heads: Option<serde_json::Value>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub num_class_embeds: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub attention_type: String,
    pub class_embeddings_concat: bool,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("DownBlock2D"),
            ],
            mid_block_type: Some(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![
                s("UpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
            ],
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(1280),
            transformer_layers_per_block: TransformerLayers::All(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            resnet_time_scale_shift: s("default"),
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: s("default"),
            class_embeddings_concat: false,
        }
    }
}

const DOWN_BLOCK: &str = "DownBlock2D";
const CROSS_DOWN_BLOCK: &str = "CrossAttnDownBlock2D";
const UP_BLOCK: &str = "UpBlock2D";
const CROSS_UP_BLOCK: &str = "CrossAttnUpBlock2D";
const MID_BLOCK: &str = "UNetMidBlock2DCrossAttn";

impl UNet2DConditionConfig {
    /// Reads and validates `unet/config.json`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let cfg: Self = loader::read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn num_blocks(&self) -> usize {
        self.down_block_types.len()
    }

    /// Attention heads of down block `i` (`num_attention_heads` defaults to
    /// `attention_head_dim` in diffusers).
    pub fn heads(&self, i: usize) -> usize {
        self.attention_head_dim.get(i)
    }

    pub fn layers_per_block(&self, i: usize) -> usize {
        self.layers_per_block.get(i)
    }

    pub fn cross_attention_dim(&self, i: usize) -> usize {
        self.cross_attention_dim.get(i)
    }

    pub fn transformer_layers(&self, i: usize) -> usize {
        match &self.transformer_layers_per_block {
            TransformerLayers::All(n) => *n,
            TransformerLayers::Each(v) => v.get(i).or(v.last()).copied().unwrap_or_default(),
            // Rejected by `validate`.
            TransformerLayers::PerLayer(_) => 0,
        }
    }

    /// Width of the time embedding fed to every resnet: `time_embedding_dim`, else diffusers'
    /// 4 x `block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(4 * self.block_out_channels.first().copied().unwrap_or(0))
    }

    /// The number of 2x upsamplers, i.e. `log2` of the factor latent sizes "should" divide by.
    pub fn num_upsamplers(&self) -> usize {
        self.num_blocks().saturating_sub(1)
    }

    /// An upper bound on the elements of the UNet's largest activation for one row of the
    /// batch at an `h x w` latent (attention scores aside: the attention ops chunk those). Level
    /// `l`'s maps have `ceil(h / 2^l) x ceil(w / 2^l)` positions, and at most 3x the widest of
    /// its own and its neighbours' channels (an up block's resnet takes the skip connection
    /// concatenated to its input), or, at a level with transformers, 8x its own channels
    /// (GEGLU's projection to 2 x 4C).
    pub fn elements_per_row(&self, h: usize, w: usize) -> usize {
        let ch = &self.block_out_channels;
        let n = ch.len();
        let up_types: Vec<&String> = self.up_block_types.iter().rev().collect();
        (0..n)
            .map(|l| {
                let neighbours = ch[l.saturating_sub(1)..(l + 2).min(n)].iter().max();
                let mut width = 3 * neighbours.copied().unwrap_or(0);
                let transformers = self.down_block_types[l] == CROSS_DOWN_BLOCK
                    || up_types.get(l).is_some_and(|t| *t == CROSS_UP_BLOCK)
                    || (l + 1 == n && self.mid_block_type.is_some());
                if transformers {
                    width = width.max(8 * ch[l]);
                }
                width * h.div_ceil(1 << l) * w.div_ceil(1 << l)
            })
            .max()
            .unwrap_or(0)
            .max(self.in_channels.max(self.out_channels) * h * w)
    }

    /// Rejects configurations this implementation does not build, naming the field.
    pub fn validate(&self, path: &Path) -> LoadResult<()> {
        let unsupported = |field: &str, value: String, why: &str| LoadError::Unsupported {
            path: path.to_path_buf(),
            field: field.to_string(),
            value,
            why: why.to_string(),
        };
        let invalid = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        let n = self.num_blocks();
        if n == 0 {
            return Err(invalid("`down_block_types` is empty".into()));
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != DOWN_BLOCK && t != CROSS_DOWN_BLOCK {
                return Err(unsupported(
                    &format!("down_block_types[{i}]"),
                    format!("{t:?}"),
                    "only DownBlock2D and CrossAttnDownBlock2D are implemented",
                ));
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != UP_BLOCK && t != CROSS_UP_BLOCK {
                return Err(unsupported(
                    &format!("up_block_types[{i}]"),
                    format!("{t:?}"),
                    "only UpBlock2D and CrossAttnUpBlock2D are implemented",
                ));
            }
        }
        if let Some(t) = &self.mid_block_type {
            if t != MID_BLOCK {
                return Err(unsupported(
                    "mid_block_type",
                    format!("{t:?}"),
                    "only UNetMidBlock2DCrossAttn (or null) is implemented",
                ));
            }
        }
        let lengths = [
            ("up_block_types", Some(self.up_block_types.len())),
            ("block_out_channels", Some(self.block_out_channels.len())),
            ("layers_per_block", self.layers_per_block.len()),
            ("attention_head_dim", self.attention_head_dim.len()),
            ("cross_attention_dim", self.cross_attention_dim.len()),
            ("only_cross_attention", self.only_cross_attention.len()),
            (
                "transformer_layers_per_block",
                match &self.transformer_layers_per_block {
                    TransformerLayers::Each(v) => Some(v.len()),
                    _ => None,
                },
            ),
        ];
        for (field, len) in lengths {
            if let Some(len) = len {
                if len != n {
                    return Err(invalid(format!(
                        "`{field}` has {len} entries but `down_block_types` has {n}"
                    )));
                }
            }
        }
        if let TransformerLayers::PerLayer(v) = &self.transformer_layers_per_block {
            return Err(unsupported(
                "transformer_layers_per_block",
                format!("{v:?}"),
                "per-layer transformer depths (asymmetric UNets) are not implemented",
            ));
        }
        if let Some(v) = &self.reverse_transformer_layers_per_block {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                v.to_string(),
                "asymmetric UNets are not implemented",
            ));
        }
        if let Some(v) = &self.num_attention_heads {
            return Err(unsupported(
                "num_attention_heads",
                v.to_string(),
                "diffusers rejects it too; the head count comes from `attention_head_dim`",
            ));
        }
        for i in 0..n {
            if self.only_cross_attention.get(i) {
                return Err(unsupported(
                    "only_cross_attention",
                    "true".into(),
                    "cross-attention-only transformer blocks are not implemented",
                ));
            }
        }
        let null_or = |v: &Option<String>| v.as_ref().map(|s| format!("{s:?}"));
        let must_be_null = [
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.map(|v| v.to_string()),
            ),
            ("encoder_hid_dim_type", null_or(&self.encoder_hid_dim_type)),
            ("class_embed_type", null_or(&self.class_embed_type)),
            (
                "num_class_embeds",
                self.num_class_embeds.map(|v| v.to_string()),
            ),
            (
                "time_embedding_act_fn",
                null_or(&self.time_embedding_act_fn),
            ),
            ("timestep_post_act", null_or(&self.timestep_post_act)),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.map(|v| v.to_string()),
            ),
        ];
        for (field, value) in must_be_null {
            if let Some(value) = value {
                return Err(unsupported(field, value, "only null is implemented"));
            }
        }
        let must_equal = [
            ("act_fn", self.act_fn.as_str(), &["silu", "swish"][..]),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.as_str(),
                &["default"][..],
            ),
            (
                "time_embedding_type",
                self.time_embedding_type.as_str(),
                &["positional"][..],
            ),
            (
                "attention_type",
                self.attention_type.as_str(),
                &["default"][..],
            ),
        ];
        for (field, value, allowed) in must_equal {
            if !allowed.contains(&value) {
                return Err(unsupported(
                    field,
                    format!("{value:?}"),
                    &format!("only {allowed:?} is implemented"),
                ));
            }
        }
        if self.dual_cross_attention {
            return Err(unsupported(
                "dual_cross_attention",
                "true".into(),
                "not implemented",
            ));
        }
        if self.class_embeddings_concat {
            return Err(unsupported(
                "class_embeddings_concat",
                "true".into(),
                "class embeddings are not implemented",
            ));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                if self.addition_time_embed_dim.is_none() {
                    return Err(invalid(
                        "`addition_embed_type` \"text_time\" needs `addition_time_embed_dim`"
                            .into(),
                    ));
                }
                if self.projection_class_embeddings_input_dim.is_none() {
                    return Err(invalid(
                        "`addition_embed_type` \"text_time\" needs \
                         `projection_class_embeddings_input_dim`"
                            .into(),
                    ));
                }
            }
            Some(other) => {
                return Err(unsupported(
                    "addition_embed_type",
                    format!("{other:?}"),
                    "only \"text_time\" (SDXL) or null is implemented",
                ))
            }
        }
        let Some(groups) = self.norm_num_groups else {
            return Err(unsupported(
                "norm_num_groups",
                "null".into(),
                "UNets without GroupNorm are not implemented",
            ));
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if groups == 0 || !c.is_multiple_of(groups) {
                return Err(invalid(format!(
                    "`block_out_channels[{i}]` = {c} is not divisible by `norm_num_groups` = \
                     {groups}"
                )));
            }
            let heads = self.heads(i);
            if heads == 0 || !c.is_multiple_of(heads) {
                return Err(invalid(format!(
                    "`block_out_channels[{i}]` = {c} is not divisible by the {heads} attention \
                     heads of `attention_head_dim[{i}]`"
                )));
            }
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) {
                return Err(unsupported(
                    field,
                    k.to_string(),
                    "even kernels change the spatial size",
                ));
            }
        }
        Ok(())
    }
}

/// SDXL's UNet: `conv_in`, time and `text_time` embeddings, `down_blocks.*`, `mid_block`,
/// `up_blocks.*`, `conv_norm_out`, `conv_out`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock2D>,
    mid_block: Option<UNetMidBlock2DCrossAttn>,
    up_blocks: Vec<UpBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
    num_upsamplers: usize,
    /// The config, for [`UNet2DConditionConfig::elements_per_row`].
    config: UNet2DConditionConfig,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Builds the model from a validated config; tensors are read from `vb` (in its dtype and
    /// on its device) under the checkpoint's names.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        // `from_file` has validated already; a config built in code gets the same checks.
        cfg.validate(Path::new("unet/config.json"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let n = cfg.block_out_channels.len();
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let eps = cfg.norm_eps;
        let time_embed_dim = cfg.time_embed_dim();

        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            cfg.in_channels,
            ch[0],
            cfg.conv_in_kernel,
            cfg.conv_in_kernel / 2,
            1,
        )?;
        let time_proj = Timesteps::new(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift, vb.device())?;
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], time_embed_dim)?;
        let add_embedding = match (
            cfg.addition_embed_type.as_deref(),
            cfg.addition_time_embed_dim,
            cfg.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(time_dim), Some(proj_dim)) => Some(TextTimeEmbedding::new(
                &vb,
                time_dim,
                proj_dim,
                time_embed_dim,
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
            )?),
            (None, _, _) => None,
            (other, _, _) => candle_core::bail!(
                "UNet config: addition_embed_type {other:?} without its dimensions (validate \
                 the config first)"
            ),
        };

        let attn_spec = |kind: &str, i: usize| {
            (kind == CROSS_DOWN_BLOCK || kind == CROSS_UP_BLOCK).then(|| AttnSpec {
                heads: cfg.heads(i),
                transformer_layers: cfg.transformer_layers(i),
                cross_attention_dim: cfg.cross_attention_dim(i),
                use_linear_projection: cfg.use_linear_projection,
            })
        };

        let dvb = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let bc = BlockConfig {
                in_channels: if i == 0 { ch[0] } else { ch[i - 1] },
                out_channels: ch[i],
                temb_channels: time_embed_dim,
                num_layers: cfg.layers_per_block(i),
                groups,
                eps,
                attn: attn_spec(kind, i),
            };
            down_blocks.push(DownBlock2D::new(
                dvb.pp(i.to_string()),
                &bc,
                i + 1 < n,
                cfg.downsample_padding,
            )?);
        }

        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let last = n - 1;
                let bc = BlockConfig {
                    in_channels: ch[last],
                    out_channels: ch[last],
                    temb_channels: time_embed_dim,
                    num_layers: 1,
                    groups,
                    eps,
                    // The mid block's depth is the last down block's transformer depth.
                    attn: Some(AttnSpec {
                        heads: cfg.heads(last),
                        transformer_layers: cfg.transformer_layers(last),
                        cross_attention_dim: cfg.cross_attention_dim(last),
                        use_linear_projection: cfg.use_linear_projection,
                    }),
                };
                Some(UNetMidBlock2DCrossAttn::new(
                    vb.pp("mid_block"),
                    &bc,
                    cfg.mid_block_scale_factor,
                )?)
            }
            None => None,
        };

        // Up block i mirrors down block n-1-i: every per-block option is read reversed.
        let uvb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut output_channel = ch[n - 1];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let mirror = n - 1 - i;
            let prev_output_channel = output_channel;
            output_channel = ch[mirror];
            let bc = BlockConfig {
                in_channels: ch[mirror.saturating_sub(1)],
                out_channels: output_channel,
                temb_channels: time_embed_dim,
                num_layers: cfg.layers_per_block(mirror) + 1,
                groups,
                eps,
                attn: attn_spec(kind, mirror),
            };
            up_blocks.push(UpBlock2D::new(
                uvb.pp(i.to_string()),
                &bc,
                prev_output_channel,
                i + 1 < n,
            )?);
        }

        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(vb.pp("conv_norm_out"), groups, ch[0], eps)?,
            conv_out: Conv2d::new(
                vb.pp("conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
                cfg.conv_out_kernel / 2,
                1,
            )?,
            center_input_sample: cfg.center_input_sample,
            num_upsamplers: cfg.num_upsamplers(),
            config: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Reads `unet/config.json` and `unet/diffusion_pytorch_model[.fp16].safetensors` from a
    /// model directory, and checks that every tensor of the file was used.
    pub fn load(dir: &ModelDir, dtype: DType, device: &Device) -> LoadResult<Self> {
        let config_path: PathBuf = dir.component("unet")?.join("config.json");
        let cfg = UNet2DConditionConfig::from_file(&config_path)?;
        loader::build_checked(
            &dir.weights("unet", "diffusion_pytorch_model")?,
            dtype,
            device,
            |vb| Self::new(vb, &cfg),
        )
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// [`UNet2DConditionConfig::elements_per_row`] of this model's config.
    pub fn elements_per_row(&self, h: usize, w: usize) -> usize {
        self.config.elements_per_row(h, w)
    }

    /// Predicts the noise (epsilon) for `sample` `[B, C, h, w]` at `timestep`, conditioned on
    /// `encoder_hidden_states` `[B, S, cross_attention_dim]` and, for SDXL's `text_time`
    /// addition embedding, the pooled `text_embeds` `[B, proj]` and `time_ids` `[B, 6]`
    /// (original size, crop top-left, target size; in pixels), which are ignored when the
    /// config has no `addition_embed_type`. Inputs are cast to the model's dtype; the output
    /// is `[B, out_channels, h, w]` in that dtype. Any latent size works: sides that do not
    /// divide by 2^num_upsamplers are handled like diffusers' `upsample_size`. A batch whose
    /// largest activation would outgrow [`MAX_TENSOR_ELEMENTS`] runs in runs of rows
    /// ([`Self::forward_within`]).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        self.forward_within(
            sample,
            timestep,
            encoder_hidden_states,
            text_embeds,
            time_ids,
            MAX_TENSOR_ELEMENTS,
        )
    }

    /// [`Self::forward`] with no activation over `max_elements`: the batch runs in the fewest
    /// even runs of rows that keep within it ([`UNet2DConditionConfig::elements_per_row`]),
    /// each row with its own conditioning (a conditioning tensor of one row is shared). Every
    /// row is independent of the others, so the result is that of one call.
    pub fn forward_within(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        max_elements: usize,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let per_row = self.config.elements_per_row(h, w);
        let what = format!("a {w}x{h} latent in the UNet");
        map_runs(
            sample,
            per_row,
            max_elements,
            &what,
            |sample, start, len| {
                let rows = |t: &Tensor| -> Result<Tensor> {
                    if len == b || t.dim(0)? != b {
                        Ok(t.clone())
                    } else {
                        t.narrow(0, start, len)
                    }
                };
                self.forward_run(
                    sample,
                    timestep,
                    &rows(encoder_hidden_states)?,
                    &rows(text_embeds)?,
                    &rows(time_ids)?,
                )
            },
        )
    }

    fn forward_run(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        text_embeds: &Tensor,
        time_ids: &Tensor,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        let dtype = self.dtype;
        let mut sample = sample.to_dtype(dtype)?;
        let context = encoder_hidden_states.to_dtype(dtype)?;

        // diffusers forwards explicit upsample sizes as soon as one side is not a multiple of
        // 2^num_upsamplers; otherwise every upsampler doubles.
        let factor = 1usize << self.num_upsamplers;
        let forward_upsample_size = !h.is_multiple_of(factor) || !w.is_multiple_of(factor);

        if self.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // 1. time: the sinusoid is taken in f32 and cast to the model dtype, like diffusers.
        let t = Tensor::full(timestep as f32, b, sample.device())?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            emb = (emb + add.forward(text_embeds, time_ids, dtype)?)?;
        }
        // Every resnet applies SiLU to the same embedding before its projection: do it once.
        let temb_act = layers::silu(&emb)?;

        // 2. pre-process
        let mut xs = self.conv_in.forward(&sample)?;

        // 3. down
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb_act, &context, &mut skips)?;
        }

        // 4. mid
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, &temb_act, &context)?;
        }

        // 5. up
        let mut upsample_size = None;
        let last = self.up_blocks.len().saturating_sub(1);
        for (i, block) in self.up_blocks.iter().enumerate() {
            if i < last && forward_upsample_size {
                // The size of the skip that the next block will consume last.
                let remaining = skips.len().saturating_sub(block.num_skips());
                if let Some(next_skip) = remaining.checked_sub(1).and_then(|j| skips.get(j)) {
                    let (_, _, sh, sw) = next_skip.dims4()?;
                    upsample_size = Some((sh, sw));
                }
            }
            xs = block.forward(&xs, &mut skips, &temb_act, &context, upsample_size)?;
        }

        // 6. post-process
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SDXL-Turbo's UNet (models/sdxl-turbo/unet/config.json) at a 64x64 latent: level 0 (no
    /// transformers) bounds at 3 x 640 channels over 4096 positions, above level 1's GEGLU
    /// projection (8 x 640 over 1024). The true largest is level 0's up-block input, 960
    /// channels: the bound is within 2x of it, and a call holds 273 rows.
    #[test]
    fn sdxl_unet_row_bound() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/sdxl-turbo/unet/config.json");
        let cfg = UNet2DConditionConfig::from_file(&path).unwrap();
        assert_eq!(cfg.elements_per_row(64, 64), 3 * 640 * 4096);
        assert!(cfg.elements_per_row(64, 64) >= 960 * 4096);
        assert_eq!(MAX_TENSOR_ELEMENTS / cfg.elements_per_row(64, 64), 273);
        // Odd sides round up at each level, as the downsamplers do: at 3x3, level 1's 2x2
        // positions of 8 x 640 (20480) are the largest, over level 0's 9 of 3 x 640 (17280).
        assert_eq!(cfg.elements_per_row(3, 3), 8 * 640 * 2 * 2);
    }

    fn parse(json: &str) -> LoadResult<UNet2DConditionConfig> {
        let cfg: UNet2DConditionConfig =
            serde_json::from_str(json).map_err(|e| LoadError::Config {
                path: "config.json".into(),
                message: e.to_string(),
            })?;
        cfg.validate(Path::new("config.json"))?;
        Ok(cfg)
    }

    #[test]
    fn empty_config_takes_diffusers_defaults() {
        let cfg = parse("{}").unwrap();
        assert_eq!(cfg, UNet2DConditionConfig::default());
        assert_eq!(cfg.block_out_channels, [320, 640, 1280, 1280]);
        assert_eq!(cfg.heads(3), 8);
        assert_eq!(cfg.time_embed_dim(), 1280);
        assert_eq!(cfg.num_upsamplers(), 3);
    }

    #[test]
    fn sdxl_style_lists_are_read_per_block() {
        let cfg = parse(
            r#"{"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816, "upcast_attention": null,
                "mid_block_scale_factor": 1, "use_linear_projection": true}"#,
        )
        .unwrap();
        assert_eq!((cfg.heads(0), cfg.heads(2)), (5, 20));
        assert_eq!(cfg.transformer_layers(2), 10);
        assert_eq!(cfg.cross_attention_dim(1), 2048);
    }

    fn unsupported_field(json: &str) -> String {
        match parse(json) {
            Err(LoadError::Unsupported { field, .. }) => field,
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_options_name_the_field() {
        assert_eq!(
            unsupported_field(r#"{"addition_embed_type": "text"}"#),
            "addition_embed_type"
        );
        assert_eq!(
            unsupported_field(r#"{"class_embed_type": "timestep"}"#),
            "class_embed_type"
        );
        assert_eq!(
            unsupported_field(r#"{"attention_type": "gated"}"#),
            "attention_type"
        );
        assert_eq!(
            unsupported_field(r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#),
            "mid_block_type"
        );
        assert_eq!(
            unsupported_field(
                r#"{"down_block_types": ["AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]}"#
            ),
            "down_block_types[0]"
        );
        assert_eq!(
            unsupported_field(r#"{"transformer_layers_per_block": [[1], [2], [3], [4]]}"#),
            "transformer_layers_per_block"
        );
        assert_eq!(
            unsupported_field(r#"{"num_attention_heads": 8}"#),
            "num_attention_heads"
        );
    }

    #[test]
    fn mismatched_list_lengths_are_config_errors() {
        let err = parse(r#"{"attention_head_dim": [5, 10]}"#).unwrap_err();
        assert!(
            err.to_string().contains("attention_head_dim"),
            "unexpected error: {err}"
        );
    }
}
