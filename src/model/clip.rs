//! The CLIP text encoders of SDXL: `text_encoder` (`CLIPTextModel`) and `text_encoder_2`
//! (`CLIPTextModelWithProjection`), after transformers' `models/clip/modeling_clip.py`.
//!
//! SDXL reads two things from each: the hidden states after the penultimate encoder layer
//! (`hidden_states[-2]`, before the final layer norm) as the UNet's cross-attention context,
//! and, from the second encoder, the projected EOS embedding as the pooled text embedding.
//!
//! Tensor names follow the checkpoint: `text_model.embeddings.token_embedding`,
//! `text_model.encoder.layers.N.self_attn.q_proj`, ..., `text_projection`. Checkpoints written
//! by transformers v5's `CLIPTextModel.save_pretrained` drop the `text_model.` prefix; both
//! layouts load.

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::loader::{read_json, LoadError, LoadResult};
use crate::model::profile::{layer_norm, span};
use crate::ops::{self, Kernels};

/// A candle `Linear` as a profile span.
fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    span("linear", || l.forward(x))
}

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`, OpenAI CLIP ViT-L (SDXL's first encoder).
    QuickGelu,
    /// Exact (erf) GELU, OpenCLIP ViT-bigG (SDXL's second encoder).
    Gelu,
    /// Anything else; refused when the model is built.
    Other(String),
}

impl From<String> for ClipActivation {
    fn from(s: String) -> Self {
        match s.as_str() {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            _ => Self::Other(s),
        }
    }
}

/// `config.json` of a CLIP text encoder
/// (<https://huggingface.co/stabilityai/sdxl-turbo/blob/main/text_encoder_2/config.json>);
/// defaults are `CLIPTextConfig`'s.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Decides where the pooled embedding is read: see [`PoolingRule`].
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: Value,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_eos_token_id() -> Value {
    Value::from(49407)
}

/// Which position of each row the pooled embedding is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolingRule {
    /// Configs from before transformers PR #24773 say `eos_token_id: 2` (SD and SDXL
    /// checkpoints among them); transformers then takes the position of the largest id,
    /// which is the EOS for CLIP's vocabulary.
    ArgmaxId,
    /// The first position holding this id (position 0 if none does, as torch's argmax of
    /// an all-false row).
    FirstEos(u32),
}

/// A reason the config cannot be used: (field, value, why).
type Rejection = (&'static str, String, String);

impl ClipTextConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> LoadResult<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .map_err(|(field, value, why)| LoadError::Unsupported {
                path: path.to_path_buf(),
                field: field.into(),
                value,
                why,
            })?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), Rejection> {
        if let ClipActivation::Other(name) = &self.hidden_act {
            return Err((
                "hidden_act",
                name.clone(),
                "turbine implements quick_gelu and gelu".into(),
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err((
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                format!("must divide hidden_size ({})", self.hidden_size),
            ));
        }
        self.pooling_rule()?;
        Ok(())
    }

    pub fn pooling_rule(&self) -> std::result::Result<PoolingRule, Rejection> {
        match self.eos_token_id.as_u64() {
            Some(2) => Ok(PoolingRule::ArgmaxId),
            Some(id) if id < self.vocab_size as u64 => Ok(PoolingRule::FirstEos(id as u32)),
            _ => Err((
                "eos_token_id",
                self.eos_token_id.to_string(),
                format!(
                    "expected one token id below vocab_size ({})",
                    self.vocab_size
                ),
            )),
        }
    }
}

/// What SDXL reads from a text encoder.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `hidden_states[-2]`: `[batch, seq, hidden]`.
    pub penultimate: Tensor,
    /// The final-layer-normed state at the pooling position, `[batch, hidden]`, projected to
    /// `[batch, projection_dim]` for a model built with projection.
    pub pooled: Tensor,
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// Causal self-attention. With [`Kernels::ATTENTION`], [`ops::multi_head_attention`] (on
    /// CUDA the fused op, on the heads where the projections wrote them); otherwise candle's
    /// composition. Either way the softmax is f32 whatever the run dtype, as transformers does:
    /// half-precision exponentials of unscaled logits lose the small attention weights. (The
    /// fused op also keeps the logits f32 from the GEMM on; the composition rounds them to the
    /// run dtype once on CUDA, see [`ops::attention_composed`].)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = linear(&self.q_proj, x)?;
        let k = linear(&self.k_proj, x)?;
        let v = linear(&self.v_proj, x)?;
        let out = span("attention", || {
            if ops::enabled(Kernels::ATTENTION) {
                ops::multi_head_attention(&q, &k, &v, self.num_heads, scale, true)
            } else {
                ops::multi_head_attention_composed(&q, &k, &v, self.num_heads, scale, true)
            }
        })?;
        linear(&self.out_proj, &out)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.hidden_act.clone(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = linear(&self.fc1, x)?;
        let x = match &self.activation {
            ClipActivation::QuickGelu => (&x * candle_nn::ops::sigmoid(&x.affine(1.702, 0.0)?)?)?,
            ClipActivation::Gelu => x.gelu_erf()?,
            ClipActivation::Other(name) => {
                return Err(candle_core::Error::Msg(format!(
                    "unsupported hidden_act {name:?}"
                )))
            }
        };
        linear(&self.fc2, &x)
    }
}

#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&layer_norm(&self.layer_norm1, x)?)?)?;
        &x + self.mlp.forward(&layer_norm(&self.layer_norm2, &x)?)?
    }
}

/// A CLIP text transformer, optionally with its text projection.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    pooling: PoolingRule,
    max_positions: usize,
}

impl ClipTextModel {
    /// `vb` is the checkpoint root (holding `text_model.*` and `text_projection.*`).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        let reject = |(field, value, why): Rejection| {
            candle_core::Error::Msg(format!(
                "CLIP text config: unsupported `{field}` = {value} ({why})"
            ))
        };
        cfg.validate().map_err(reject)?;
        let pooling = cfg.pooling_rule().map_err(reject)?;
        let h = cfg.hidden_size;
        let tm = if !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = emb
            .pp("position_embedding")
            .get((cfg.max_position_embeddings, h), "weight")?;
        let enc = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(enc.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?;
        let text_projection = if with_projection {
            let dim = cfg.projection_dim.ok_or_else(|| {
                candle_core::Error::Msg(
                    "CLIP text config: `projection_dim` is missing but the model has a text \
                     projection"
                        .into(),
                )
            })?;
            Some(candle_nn::linear_no_bias(h, dim, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            pooling,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// `input_ids`: `[batch, seq]` token ids (any integer dtype), `seq <=
    /// max_position_embeddings`. The pooling positions are found on the host, so on CUDA this
    /// reads the ids back (a wait for everything queued before); [`Self::forward_ids`] takes
    /// the ids from the host instead and waits for nothing.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let (_, s) = input_ids.dims2()?;
        self.check_seq(s)?;
        let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
        let positions = self.pooling_positions(&rows);
        self.run(&input_ids, &positions)
    }

    /// [`Self::forward`] on `batch` rows of token ids held on the host (what the tokenizer
    /// makes), uploaded to `device` here. Nothing is read back from the device, so the host
    /// can queue a batch's text encoders while the GPU still runs the previous batch (the
    /// `overlap` lever depends on it).
    pub fn forward_ids(
        &self,
        ids: &[u32],
        batch: usize,
        device: &Device,
    ) -> Result<ClipTextOutput> {
        let s = self.row_len(ids, batch)?;
        let rows: Vec<&[u32]> = ids.chunks(s).collect();
        let positions = self.pooling_positions(&rows);
        let input_ids = Tensor::from_slice(ids, (batch, s), device)?;
        self.run(&input_ids, &positions)
    }

    /// Only the penultimate layer's hidden states of [`Self::forward_ids`], which is all SDXL
    /// reads from its first text encoder (its pooled output is unused): the last layer, the
    /// final layer norm and the pooling are not run.
    pub fn penultimate_ids(&self, ids: &[u32], batch: usize, device: &Device) -> Result<Tensor> {
        let s = self.row_len(ids, batch)?;
        let input_ids = Tensor::from_slice(ids, (batch, s), device)?;
        let mut x = self.embed(&input_ids)?;
        let run = self.layers.len().saturating_sub(1);
        for layer in &self.layers[..run] {
            x = layer.forward(&x)?;
        }
        Ok(x)
    }

    /// The row length of `batch` rows of token ids, flat, checked.
    fn row_len(&self, ids: &[u32], batch: usize) -> Result<usize> {
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(candle_core::Error::Msg(format!(
                "CLIP text encoder: {} token ids do not split into {batch} rows",
                ids.len()
            )));
        }
        let s = ids.len() / batch;
        self.check_seq(s)?;
        Ok(s)
    }

    /// Token plus position embeddings of `input_ids` `[batch, seq]`.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, s) = input_ids.dims2()?;
        self.token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.narrow(0, 0, s)?)
    }

    fn check_seq(&self, s: usize) -> Result<()> {
        if s == 0 || s > self.max_positions {
            return Err(candle_core::Error::Msg(format!(
                "CLIP text encoder: sequence length {s} must be between 1 and \
                 max_position_embeddings ({})",
                self.max_positions
            )));
        }
        Ok(())
    }

    /// The encoder on `input_ids` `[batch, seq]` (u32), pooling each row at `positions`.
    fn run(&self, input_ids: &Tensor, positions: &[usize]) -> Result<ClipTextOutput> {
        let (b, s) = input_ids.dims2()?;
        let device = input_ids.device();
        let mut x = self.embed(input_ids)?;
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x;
            x = layer.forward(&penultimate)?;
        }
        let last = layer_norm(&self.final_layer_norm, &x)?;
        let h = last.dim(D::Minus1)?;
        let index: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * s + p) as u32)
            .collect();
        let index = Tensor::from_vec(index, b, device)?;
        let pooled = last.reshape((b * s, h))?.index_select(&index, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipTextOutput {
            penultimate,
            pooled,
        })
    }

    fn pooling_positions<R: AsRef<[u32]>>(&self, rows: &[R]) -> Vec<usize> {
        rows.iter()
            .map(|row| row.as_ref())
            .map(|row| match self.pooling {
                // torch.argmax returns the first of equal maxima.
                PoolingRule::ArgmaxId => {
                    row.iter()
                        .enumerate()
                        .fold((0, 0u32), |best, (i, &id)| {
                            if i == 0 || id > best.1 {
                                (i, id)
                            } else {
                                best
                            }
                        })
                        .0
                }
                PoolingRule::FirstEos(eos) => row.iter().position(|&id| id == eos).unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(json: &str) -> ClipTextConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn pooling_rule_follows_eos_token_id() {
        assert_eq!(
            cfg(r#"{"eos_token_id": 2}"#).pooling_rule().unwrap(),
            PoolingRule::ArgmaxId
        );
        assert_eq!(
            cfg(r#"{"eos_token_id": 49407}"#).pooling_rule().unwrap(),
            PoolingRule::FirstEos(49407)
        );
        assert_eq!(
            cfg("{}").pooling_rule().unwrap(),
            PoolingRule::FirstEos(49407)
        );
        let (field, _, _) = cfg(r#"{"eos_token_id": [2, 3]}"#)
            .pooling_rule()
            .unwrap_err();
        assert_eq!(field, "eos_token_id");
    }

    #[test]
    fn unknown_activation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_act": "gelu_new"}"#).unwrap();
        match ClipTextConfig::from_file(&path) {
            Err(LoadError::Unsupported { field, value, .. }) => {
                assert_eq!((field.as_str(), value.as_str()), ("hidden_act", "gelu_new"))
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let vb =
            crate::model::loader::RandomWeights::new(0).into_var_builder(DType::F32, &Device::Cpu);
        let err = ClipTextModel::new(vb, &cfg(r#"{"hidden_act": "relu"}"#), false).unwrap_err();
        assert!(err.to_string().contains("hidden_act"), "{err}");
    }

    #[test]
    fn first_of_equal_maxima_pools() -> Result<()> {
        let c = cfg(
            r#"{"vocab_size": 10, "hidden_size": 4, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 6, "eos_token_id": 2}"#,
        );
        let vb =
            crate::model::loader::RandomWeights::new(0).into_var_builder(DType::F32, &Device::Cpu);
        let m = ClipTextModel::new(vb, &c, false)?;
        let rows = [[0u32, 3, 9, 9, 9], [5, 1, 1, 1, 1]];
        let ids = Tensor::new(&rows, &Device::Cpu)?;
        assert_eq!(m.pooling_positions(&rows), vec![2, 0]);
        let out = m.forward(&ids)?;
        assert_eq!(out.penultimate.dims(), &[2, 5, 4]);
        assert_eq!(out.pooled.dims(), &[2, 4]);
        Ok(())
    }
}
