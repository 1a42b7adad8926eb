//! Attention layers (diffusers `models/attention_processor.py` `Attention` with the default
//! `AttnProcessor2_0`, `models/attention.py` `BasicTransformerBlock` / `FeedForward`,
//! `models/activations.py` `GEGLU`, `models/transformers/transformer_2d.py`
//! `Transformer2DModel`), plus the VAE's single-head spatial self-attention.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use super::layers::{matmul, Conv2d, GroupNorm, Linear};

/// Upper bound on the elements of one attention score matrix `[B*heads, rows, keys]`.
///
/// 2^27 elements is 512 MiB in f32. Past it the queries are processed in row chunks, which
/// gives identical results (each row's softmax is independent) at bounded memory. Without it
/// the VAE decoder's single-head mid-block attention at 1024x1024 (16384 tokens) would need a
/// 1 GiB score matrix per image, plus its softmax copy.
const MAX_SCORE_ELEMENTS: usize = 1 << 27;

/// `softmax(q kᵀ) v` over `[B*heads, S, d]` tensors whose `q` already carries the
/// `1/sqrt(d)` scale. Half-precision scores are softmaxed in f32: candle's half softmax sums
/// in half precision, which loses the tail of a 4096-key row.
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    scaled_dot_product_chunked(q, k, v, MAX_SCORE_ELEMENTS)
}

fn scaled_dot_product_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    max_score_elements: usize,
) -> Result<Tensor> {
    let (bh, sq, _) = q.dims3()?;
    let sk = k.dim(1)?;
    let kt = k.t()?;
    let rows = (max_score_elements / (bh * sk).max(1)).max(1);
    if rows >= sq {
        return attend(q, &kt, v);
    }
    let mut outs = Vec::with_capacity(sq.div_ceil(rows));
    let mut start = 0;
    while start < sq {
        let len = rows.min(sq - start);
        outs.push(attend(&q.narrow(1, start, len)?, &kt, v)?);
        start += len;
    }
    Tensor::cat(&outs, 1)
}

fn attend(q: &Tensor, kt: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scores = matmul(q, kt)?;
    let dtype = scores.dtype();
    let probs = match dtype {
        DType::F16 | DType::BF16 => {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
        }
        _ => candle_nn::ops::softmax_last_dim(&scores)?,
    };
    matmul(&probs, v)
}

/// Multi-head attention with `to_q`, `to_k`, `to_v`, `to_out.0` projections on `[B, S, C]`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `to_q` with its weight (and bias) pre-multiplied by `1/sqrt(head_dim)`, so the scores
    /// need no separate scaling pass. With SDXL's head width of 64 the factor is 1/8, a power
    /// of two, so the folding is exact in every dtype.
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `context_dim` is the width of the keys/values source (`None`: self-attention).
    /// `qkv_bias` is false in the UNet's transformer blocks and true in the VAE.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        let scale = 1.0 / (head_dim as f64).sqrt();
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), query_dim, inner, qkv_bias)?.scaled(scale)?,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, qkv_bias)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, qkv_bias)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    /// `[B, S, H*d]` to contiguous `[B*H, S, d]`.
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        if self.heads == 1 {
            return xs.contiguous();
        }
        xs.reshape((b, s, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * self.heads, s, self.head_dim))
    }

    /// `xs` `[B, S, C]`; keys and values come from `context` `[B, S_ctx, C_ctx]` when given.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let ctx = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs)?)?;
        let k = self.split_heads(&self.to_k.forward(ctx)?)?;
        let v = self.split_heads(&self.to_v.forward(ctx)?)?;
        let out = scaled_dot_product(&q, &k, &v)?;
        let out = if self.heads == 1 {
            out
        } else {
            out.reshape((b, self.heads, s, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, s, self.heads * self.head_dim))?
        };
        self.to_out.forward(&out)
    }
}

/// Gated GELU (exact erf GELU, as torch's `F.gelu` default): `proj` makes both halves.
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
    inner: usize,
}

impl Module for GeGlu {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        let value = h.narrow(D::Minus1, 0, self.inner)?;
        let gate = h.narrow(D::Minus1, self.inner, self.inner)?;
        value.mul(&gate.gelu_erf()?)
    }
}

/// `net.0` (GEGLU to 4x width) then `net.2` (back to `dim`); `net.1` is dropout.
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: GeGlu,
    out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        // diffusers' FeedForward default: mult = 4.
        let inner = 4 * dim;
        let net = vb.pp("net");
        Ok(Self {
            geglu: GeGlu {
                proj: Linear::new(net.pp("0").pp("proj"), dim, 2 * inner, true)?,
                inner,
            },
            out: Linear::new(net.pp("2"), inner, dim, true)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.geglu.forward(xs)?)
    }
}

/// Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        // Transformer2DModel's default norm_eps for its LayerNorms.
        let ln = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, false)?,
            norm2: ln("norm2")?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                false,
            )?,
            norm3: ln("norm3")?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// `proj_in` / `proj_out`: a linear layer on `[B, HW, C]` (SDXL's `use_linear_projection`) or
/// a 1x1 convolution on `[B, C, H, W]` (SD 1.x).
#[derive(Debug, Clone)]
enum Projection {
    Linear(Linear),
    Conv(Conv2d),
}

impl Projection {
    fn new(vb: VarBuilder, cin: usize, cout: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Self::Linear(Linear::new(vb, cin, cout, true)?)
        } else {
            Self::Conv(Conv2d::new(vb, cin, cout, 1, 0, 1)?)
        })
    }
}

/// Spatial transformer: GroupNorm, `proj_in`, `transformer_blocks.*`, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

/// Shape of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(vb: VarBuilder, cfg: &Transformer2DConfig) -> Result<Self> {
        let c = cfg.channels;
        if cfg.heads == 0 || !c.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "{}: {c} channels cannot be split into {} attention heads",
                vb.prefix(),
                cfg.heads
            );
        }
        // inner_dim = heads * (channels / heads) = channels once divisibility holds.
        let head_dim = c / cfg.heads;
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    blocks.pp(i.to_string()),
                    c,
                    cfg.heads,
                    head_dim,
                    cfg.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let lin = cfg.use_linear_projection;
        Ok(Self {
            // Transformer2DModel hard-codes eps 1e-6 for this norm, unlike the resnets.
            norm: GroupNorm::new(vb.pp("norm"), cfg.norm_num_groups, c, 1e-6)?,
            proj_in: Projection::new(vb.pp("proj_in"), c, c, lin)?,
            transformer_blocks,
            proj_out: Projection::new(vb.pp("proj_out"), c, c, lin)?,
        })
    }

    /// `xs` `[B, C, H, W]`, `context` `[B, S, cross_attention_dim]`.
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let mut hs = match &self.proj_in {
            Projection::Linear(l) => l.forward(&to_tokens(&normed)?)?,
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            hs = block.forward(&hs, context)?;
        }
        // The permuted view goes straight into the residual add, whose output is contiguous,
        // so the NHWC → NCHW transpose costs no extra copy.
        let out = match &self.proj_out {
            Projection::Linear(l) => l
                .forward(&hs)?
                .reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?,
            Projection::Conv(conv) => conv.forward(
                &hs.reshape((b, h, w, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?,
            )?,
        };
        out + xs
    }
}

/// `[B, C, H, W]` to contiguous `[B, HW, C]`.
pub(crate) fn to_tokens(xs: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    xs.permute((0, 2, 3, 1))?
        .contiguous()?
        .reshape((b, h * w, c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_single_pass() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 37, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (3, 11, 8), &dev)?;
        let full = scaled_dot_product_chunked(&q, &k, &v, usize::MAX)?;
        // 3 * 11 * 5 elements per chunk: 5 query rows at a time, last chunk of 2.
        let chunked = scaled_dot_product_chunked(&q, &k, &v, 3 * 11 * 5)?;
        let diff: f32 = (full - chunked)?.abs()?.max_all()?.to_scalar()?;
        assert!(diff < 1e-6, "chunked attention differs by {diff}");
        Ok(())
    }
}
