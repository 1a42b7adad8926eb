//! Attention layers (diffusers `models/attention_processor.py` `Attention` with the default
//! `AttnProcessor2_0`, `models/attention.py` `BasicTransformerBlock` / `FeedForward`,
//! `models/activations.py` `GEGLU`, `models/transformers/transformer_2d.py`
//! `Transformer2DModel`), plus the VAE's single-head spatial self-attention.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use super::layers::{Conv2d, GroupNorm, Linear};
use crate::model::profile::{layer_norm, span};
use crate::ops::{self, Kernels};

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
    /// The logits' scale still to apply (1 where it is folded into `to_q`).
    scale: f64,
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
        let to_q = Linear::new(vb.pp("to_q"), query_dim, inner, qkv_bias)?;
        // The scale is folded into `to_q` where that is exact, a power of two (the UNet's head
        // dim 64: 1/8). Otherwise (the VAE's one head of 512) the attention applies it to the
        // f32 logits, as diffusers' SDPA does, rather than rounding `to_q`'s half-precision
        // weights once more.
        let (to_q, scale) = if scale.log2().fract() == 0.0 {
            (to_q.scaled(scale)?, 1.0)
        } else {
            (to_q, scale)
        };
        Ok(Self {
            to_q,
            to_k: Linear::new(vb.pp("to_k"), kv_dim, inner, qkv_bias)?,
            to_v: Linear::new(vb.pp("to_v"), kv_dim, inner, qkv_bias)?,
            to_out: Linear::new(vb.pp("to_out").pp("0"), inner, query_dim, true)?,
            heads,
            scale,
        })
    }

    /// `softmax(q kᵀ) v` for `xs` `[B, S, C]`, keys and values from `context`
    /// `[B, S_ctx, C_ctx]` when given; `[B, S, H*d]`, before `to_out`.
    ///
    /// With [`Kernels::ATTENTION`], [`ops::multi_head_attention`]: on CUDA the fused op, which
    /// reads the heads where `to_q`/`to_k`/`to_v` wrote them. Otherwise candle's composition,
    /// which copies the heads apart and back.
    fn attend(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        span("attention", || {
            if ops::enabled(Kernels::ATTENTION) {
                ops::multi_head_attention(&q, &k, &v, self.heads, self.scale, false)
            } else {
                ops::multi_head_attention_composed(&q, &k, &v, self.heads, self.scale, false)
            }
        })
    }

    /// `xs` `[B, S, C]`; keys and values come from `context` `[B, S_ctx, C_ctx]` when given.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.to_out.forward(&self.attend(xs, context)?)
    }

    /// `forward(xs, context) + residual`, with `to_out`'s bias and the residual in one pass
    /// under [`Kernels::BIAS_RESIDUAL`].
    pub fn forward_residual(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.to_out
            .forward_residual(&self.attend(xs, context)?, residual)
    }
}

/// Gated GELU (exact erf GELU, as torch's `F.gelu` default): `proj` makes both halves.
#[derive(Debug, Clone)]
pub struct GeGlu {
    proj: Linear,
    inner: usize,
}

impl Module for GeGlu {
    /// With [`Kernels::GEGLU`], [`ops::geglu_bias`]: the projection's GEMM without its bias,
    /// then one pass that adds the bias and applies the GELU in f32, instead of candle's bias
    /// add, `gelu` and `mul` (three passes, rounding in between).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if ops::enabled(Kernels::GEGLU) {
            let (h, bias) = self.proj.forward_unbiased(xs)?;
            return span("geglu", || match bias {
                Some(b) => ops::geglu_bias(&h, b),
                None => ops::geglu(&h),
            });
        }
        let h = self.proj.forward(xs)?;
        span("geglu", || {
            let value = h.narrow(D::Minus1, 0, self.inner)?;
            let gate = h.narrow(D::Minus1, self.inner, self.inner)?;
            value.mul(&gate.gelu_erf()?)
        })
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

    /// `forward(xs) + residual`, with `net.2`'s bias and the residual in one pass under
    /// [`Kernels::BIAS_RESIDUAL`].
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out
            .forward_residual(&self.geglu.forward(xs)?, residual)
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
        let xs = self
            .attn1
            .forward_residual(&layer_norm(&self.norm1, xs)?, None, xs)?;
        let xs = self
            .attn2
            .forward_residual(&layer_norm(&self.norm2, &xs)?, Some(context), &xs)?;
        self.ff
            .forward_residual(&layer_norm(&self.norm3, &xs)?, &xs)
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
        match &self.proj_out {
            Projection::Linear(l) => l.forward_channels_first_residual(&hs, xs),
            Projection::Conv(conv) => {
                conv.forward(
                    &hs.reshape((b, h, w, c))?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?,
                )? + xs
            }
        }
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
    use candle_core::{DType, Device};

    /// The logits' scale is folded into `to_q` only where that is exact: head dim 64 (1/8), not
    /// the VAE's 512 (1/√512), whose scale the attention applies; both give softmax(q·kᵀ/√d)·v.
    #[test]
    fn scale_is_folded_only_where_exact() -> Result<()> {
        let dev = Device::Cpu;
        for (head_dim, folded) in [(64, true), (16, true), (512, false), (8, false)] {
            let vb = crate::model::loader::RandomWeights::new(3).into_var_builder(DType::F32, &dev);
            let a = Attention::new(vb.clone(), head_dim, None, 1, head_dim, true)?;
            let want = 1.0 / (head_dim as f64).sqrt();
            assert_eq!(a.scale, if folded { 1.0 } else { want }, "d {head_dim}");
            // The same layer's output either way: the unfolded reference from the same weights.
            let xs = Tensor::randn(0f32, 1.0, (1, 6, head_dim), &dev)?;
            let q = (Linear::new(vb.pp("to_q"), head_dim, head_dim, true)?.forward(&xs)? * want)?;
            let k = Linear::new(vb.pp("to_k"), head_dim, head_dim, true)?.forward(&xs)?;
            let v = Linear::new(vb.pp("to_v"), head_dim, head_dim, true)?.forward(&xs)?;
            let p = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            let want_out = p.matmul(&v)?;
            let got = a.attend(&xs, None)?;
            let diff: f32 = (got - want_out)?.abs()?.max_all()?.to_scalar()?;
            assert!(diff < 1e-4, "d {head_dim}: {diff}");
        }
        Ok(())
    }

    /// A spatial transformer (linear projections, as SDXL's) with every lever on equals the
    /// same with every lever off, on the CPU: the fused GEGLU, bias + residual (including the
    /// transposed `proj_out` GEMM) and GroupNorm paths against candle's compositions.
    #[test]
    fn transformer_levers_match_composition() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
            let vb = crate::model::loader::RandomWeights::new(7).into_var_builder(dtype, &dev);
            let cfg = Transformer2DConfig {
                channels: 32,
                heads: 4,
                num_layers: 2,
                cross_attention_dim: 24,
                norm_num_groups: 8,
                use_linear_projection: true,
            };
            let model = Transformer2DModel::new(vb, &cfg)?;
            let xs = Tensor::randn(0f32, 1.0, (2, 32, 5, 3), &dev)?.to_dtype(dtype)?;
            let ctx = Tensor::randn(0f32, 1.0, (2, 7, 24), &dev)?.to_dtype(dtype)?;
            let run = |k| ops::with_kernels(k, || model.forward(&xs, &ctx));
            let off = run(Kernels::NONE)?.to_dtype(DType::F32)?;
            let on = run(Kernels::ALL)?.to_dtype(DType::F32)?;
            assert_eq!(on.dims(), xs.dims());
            let scale: f32 = off.abs()?.max_all()?.to_scalar()?;
            let diff: f32 = (on - &off)?.abs()?.max_all()?.to_scalar()?;
            assert!(
                diff <= tol * scale,
                "{dtype:?}: levers on differ from off by {diff} (max |out| {scale})"
            );
        }
        Ok(())
    }
}
