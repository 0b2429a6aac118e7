//! `WanTransformer3DModel`: the Diffusion Transformer that predicts the flow velocity of a
//! noisy video latent, conditioned on the text and the timestep.
//!
//! latent `[B, C, F, H, W]` → patchify (1×2×2) → tokens `[B, N, D]` with 3D RoPE positions →
//! blocks (AdaLN-modulated self-attention, cross-attention to the text, FFN) → modulated
//! output head → unpatchify → velocity `[B, C_out, F, H, W]`.
//! Norms, modulation, RoPE tables and timestep embeddings run in f32 whatever the weight dtype.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::WanTransformerConfig;
use super::keys::{self, Layout};
use super::rope::{apply_rope, WanRope};
use crate::nn::attention;
use crate::nn::fused::{gelu_tanh, linear, Linear};
use crate::nn::kernels::{self, Epilogue};
use crate::nn::norm::{layer_norm, layer_norm_modulate, rms_norm};
use crate::weights::TensorStore;

/// Sinusoidal timestep embedding with cos before sin (`Timesteps(flip_sin_to_cos=True,
/// downscale_freq_shift=0)`): `t`: `[B]` → `[B, dim]` f32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let ln_max = -(10_000f32.ln());
    let exponent: Vec<f32> = (0..half)
        .map(|i| (ln_max * i as f32) / half as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), t.device())?.exp()?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// Self- or cross-attention with RMS norm of q and k across all heads.
#[derive(Debug, Clone)]
struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    heads: usize,
    eps: f64,
}

impl WanAttention {
    fn load(vb: VarBuilder, dim: usize, heads: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            to_q: linear(dim, dim, vb.pp("to_q"))?,
            to_k: linear(dim, dim, vb.pp("to_k"))?,
            to_v: linear(dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out.0"))?,
            norm_q: vb.get_with_hints_dtype(
                dim,
                "norm_q.weight",
                Default::default(),
                DType::F32,
            )?,
            norm_k: vb.get_with_hints_dtype(
                dim,
                "norm_k.weight",
                Default::default(),
                DType::F32,
            )?,
            heads,
            eps,
        })
    }

    /// `x`: `[B, N, D]`; `context`: `[B, L, D]` for cross-attention (None: self-attention),
    /// with `key_bias` `[B, L]` f32 added to the scores of its keys (see [`merge_repeated_keys`]);
    /// `rope`: `(cos, sin)` `[N, head_dim/2]` for self-attention; `out`: what is added to the
    /// output projection (see [`Out`]).
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        key_bias: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
        out: Out,
    ) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let kv_in = context.unwrap_or(x);
        let l = kv_in.dim(1)?;
        let hd = d / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        if kernels::usable(x) {
            if let Some(q) = self.project(&self.to_q, x, &self.norm_q, rope)? {
                if let Some(y) = self.attend(&q, kv_in, context.is_some(), key_bias, rope, out)? {
                    return Ok(y);
                }
            }
        }
        let q = rms_norm(&self.to_q.forward(x)?, &self.norm_q, self.eps)?;
        let k = rms_norm(&self.to_k.forward(kv_in)?, &self.norm_k, self.eps)?;
        let v = self.to_v.forward(kv_in)?;
        let o = if kernels::usable(x) {
            // Fused CPU path on the [B, N, H·Dh] layout: no head transposes or copies.
            let (q, k) = match rope {
                Some((cos, sin)) => (
                    kernels::rope_bnhd(&q, cos, sin, self.heads)?,
                    kernels::rope_bnhd(&k, cos, sin, self.heads)?,
                ),
                None => (q, k),
            };
            kernels::attention_bnhd(&q, &k, &v, self.heads, scale, key_bias)?
        } else {
            let split = |t: Tensor, len: usize| -> Result<Tensor> {
                t.reshape((b, len, self.heads, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (mut q, mut k, v) = (split(q, n)?, split(k, l)?, split(v, l)?);
            if let Some((cos, sin)) = rope {
                q = apply_rope(&q, cos, sin)?;
                k = apply_rope(&k, cos, sin)?;
            }
            let bias = match key_bias {
                Some(kb) => Some(kb.reshape((b, 1, 1, l))?),
                None => None,
            };
            let o = attention(&q, &k, &v, scale, bias.as_ref())?;
            o.transpose(1, 2)?.reshape((b, n, d))?
        };
        match out {
            Out::Residual(r) => self.to_out.forward_add(&o, r),
            Out::Gated(r, gate) => self.to_out.forward_gated(&o, r, gate),
        }
    }
}

impl WanAttention {
    /// CPU inference: `lin(x)` with its bias, the RMS norm across heads (`gamma`) and RoPE
    /// applied to each output row while it is in cache (the q and k of [`Self::forward`]);
    /// `None` where the kernels do not apply.
    fn project(
        &self,
        lin: &Linear,
        x: &Tensor,
        gamma: &Tensor,
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Option<Tensor>> {
        lin.forward_epilogue(
            x,
            Epilogue::RmsRope {
                gamma,
                eps: self.eps,
                rope: rope.map(|(c, s)| (c, s)),
                heads: self.heads,
                tokens: x.dim(1)?,
            },
        )
    }

    /// CPU inference: the rest of [`Self::forward`] from the projected queries `q` `[B, N, D]`:
    /// keys and values from `kv_in` (the context for cross-attention, else the input),
    /// attention, output projection and `out`. `None` where the kernels do not apply.
    fn attend(
        &self,
        q: &Tensor,
        kv_in: &Tensor,
        cross: bool,
        key_bias: Option<&Tensor>,
        rope: Option<&(Tensor, Tensor)>,
        out: Out,
    ) -> Result<Option<Tensor>> {
        let Some(k) = self.project(&self.to_k, kv_in, &self.norm_k, rope)? else {
            return Ok(None);
        };
        let (d, l) = (q.dim(2)?, kv_in.dim(1)?);
        let scale = 1.0 / ((d / self.heads) as f64).sqrt();
        let v = self.to_v.forward(kv_in)?;
        // Cross-attention to a short text: the output projection folded into the values (an
        // N·H·L·D product instead of N·D·D).
        if let (true, Out::Residual(r), Some(wt)) = (cross, out, self.to_out.transposed()) {
            if kernels::folding_pays(self.heads, l, d) {
                return kernels::attention_out_folded(
                    q,
                    &k,
                    &v,
                    self.heads,
                    scale,
                    key_bias,
                    wt,
                    self.to_out.bias(),
                    r,
                )
                .map(Some);
            }
        }
        let o = kernels::attention_bnhd(q, &k, &v, self.heads, scale, key_bias)?;
        match out {
            Out::Residual(r) => self.to_out.forward_add(&o, r),
            Out::Gated(r, gate) => self.to_out.forward_gated(&o, r, gate),
        }
        .map(Some)
    }
}

/// What follows an attention's output projection `a`.
#[derive(Clone, Copy)]
enum Out<'a> {
    /// `r + a`.
    Residual(&'a Tensor),
    /// `r + a·gate` in f32 (`gate` `[B, 1, D]` f32), returned in `a`'s dtype.
    Gated(&'a Tensor, &'a Tensor),
}

#[derive(Debug, Clone)]
struct WanBlock {
    attn1: WanAttention,
    attn2: WanAttention,
    /// Affine LayerNorm before cross-attention (`norm2` in diffusers, `norm3` in native files).
    norm2: Option<(Tensor, Tensor)>,
    ffn_in: Linear,
    ffn_out: Linear,
    /// `[1, 6, D]` f32: shift, scale, gate (self-attn) and c_shift, c_scale, c_gate (FFN).
    scale_shift_table: Tensor,
    eps: f64,
}

impl WanBlock {
    fn load(vb: VarBuilder, cfg: &WanTransformerConfig) -> Result<Self> {
        let d = cfg.inner_dim();
        let norm2 = if cfg.cross_attn_norm {
            Some((
                vb.get_with_hints_dtype(d, "norm2.weight", Default::default(), DType::F32)?,
                vb.get_with_hints_dtype(d, "norm2.bias", Default::default(), DType::F32)?,
            ))
        } else {
            None
        };
        Ok(Self {
            attn1: WanAttention::load(vb.pp("attn1"), d, cfg.num_attention_heads, cfg.eps)?,
            attn2: WanAttention::load(vb.pp("attn2"), d, cfg.num_attention_heads, cfg.eps)?,
            norm2,
            ffn_in: linear(d, cfg.ffn_dim, vb.pp("ffn.net.0.proj"))?,
            ffn_out: linear(cfg.ffn_dim, d, vb.pp("ffn.net.2"))?,
            scale_shift_table: vb.get_with_hints_dtype(
                (1, 6, d),
                "scale_shift_table",
                Default::default(),
                DType::F32,
            )?,
            eps: cfg.eps,
        })
    }

    /// `x`: `[B, N, D]`, `context`: `[B, L, D]` with its key bias (`[B, L]` f32, see
    /// [`merge_repeated_keys`]), `temb6`: `[B, 6, D]` f32.
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        key_bias: Option<&Tensor>,
        temb6: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let e = self.scale_shift_table.broadcast_add(temb6)?;
        let x = self.self_attention(x, &e, rope)?;
        self.cross_and_ffn(&x, context, key_bias, &e, None)
    }

    /// CPU inference: the cross-attention's projected queries for `x` (the input of
    /// [`Self::cross_and_ffn`]), for callers that share them between passes; `None` where the
    /// kernels do not apply.
    fn cross_query(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !kernels::usable(x) {
            return Ok(None);
        }
        let h = match &self.norm2 {
            Some((w, b)) => layer_norm(x, w, b, self.eps)?,
            None => x.clone(),
        };
        self.attn2
            .project(&self.attn2.to_q, &h, &self.attn2.norm_q, None)
    }

    /// The self-attention half: `x + gate·attn1(modulate(LN(x)))`. `e`: `[B, 6, D]` f32, the
    /// block's modulation (table + time embedding).
    fn self_attention(&self, x: &Tensor, e: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
        let dtype = x.dtype();
        let m = |i: usize| e.narrow(1, i, 1);
        let (shift, scale, gate) = (m(0)?, m(1)?, m(2)?);
        let xf = x.to_dtype(DType::F32)?;
        let h = layer_norm_modulate(&xf, &shift, &scale, self.eps)?.to_dtype(dtype)?;
        self.attn1
            .forward(&h, None, None, Some(rope), Out::Gated(&xf, &gate))?
            .to_dtype(dtype)
    }

    /// The rest of the block after [`Self::self_attention`]: cross-attention to the text and
    /// the modulated FFN. `q`: the cross-attention's queries for `x` if already projected
    /// ([`Self::cross_query`]).
    fn cross_and_ffn(
        &self,
        x: &Tensor,
        context: &Tensor,
        key_bias: Option<&Tensor>,
        e: &Tensor,
        q: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let m = |i: usize| e.narrow(1, i, 1);
        let (c_shift, c_scale, c_gate) = (m(3)?, m(4)?, m(5)?);
        let shared = match q {
            Some(q) => self
                .attn2
                .attend(q, context, true, key_bias, None, Out::Residual(x))?,
            None => None,
        };
        let x = match shared {
            Some(x) => x,
            None => {
                let h = match &self.norm2 {
                    Some((w, b)) => {
                        layer_norm(&x.to_dtype(DType::F32)?, w, b, self.eps)?.to_dtype(dtype)?
                    }
                    None => x.clone(),
                };
                self.attn2
                    .forward(&h, Some(context), key_bias, None, Out::Residual(x))?
            }
        };

        let xf = x.to_dtype(DType::F32)?;
        let h = layer_norm_modulate(&xf, &c_shift, &c_scale, self.eps)?.to_dtype(dtype)?;
        // CPU inference: bias + GELU and bias + gated residual in the GEMMs' row passes.
        let f = match self.ffn_in.forward_epilogue(&h, Epilogue::Gelu)? {
            Some(f) => f,
            None => gelu_tanh(&self.ffn_in.forward(&h)?)?,
        };
        self.ffn_out
            .forward_gated(&f, &xf, &c_gate)?
            .to_dtype(dtype)
    }
}

/// The Wan2.1 Diffusion Transformer.
#[derive(Debug, Clone)]
pub struct WanTransformer3DModel {
    cfg: WanTransformerConfig,
    /// Patch embedding as a linear map over flattened `(C, pt, ph, pw)` patches: `[D, C·pt·ph·pw]`.
    patch: Linear,
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
    blocks: Vec<WanBlock>,
    proj_out: Linear,
    /// `[1, 2, D]` f32: shift and scale of the output head.
    scale_shift_table: Tensor,
    rope: WanRope,
}

impl WanTransformer3DModel {
    /// Loads from a VarBuilder with diffusers names. Checks the checkpoint has exactly
    /// `num_layers` blocks when the backend can tell.
    pub fn load(vb: VarBuilder, cfg: &WanTransformerConfig) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let d = cfg.inner_dim();
        let [pt, ph, pw] = cfg.patch_size;
        let patch = cfg.in_channels * pt * ph * pw;
        if vb.contains_tensor(&format!("blocks.{}.attn1.to_q.weight", cfg.num_layers)) {
            candle_core::bail!(
                "the checkpoint has more than the {} transformer blocks its config declares (num_layers): the config.json does not match these weights",
                cfg.num_layers
            );
        }
        let patch_weight = vb
            .get((d, cfg.in_channels, pt, ph, pw), "patch_embedding.weight")?
            .reshape((d, patch))?;
        let ce = vb.pp("condition_embedder");
        let f32vb = vb.clone().set_dtype(DType::F32);
        let cef = f32vb.pp("condition_embedder");
        let blocks = (0..cfg.num_layers)
            .map(|i| WanBlock::load(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch: Linear::new(patch_weight, Some(vb.get(d, "patch_embedding.bias")?))?,
            time_linear_1: linear(cfg.freq_dim, d, cef.pp("time_embedder.linear_1"))?,
            time_linear_2: linear(d, d, cef.pp("time_embedder.linear_2"))?,
            time_proj: linear(d, 6 * d, ce.pp("time_proj"))?,
            text_linear_1: linear(cfg.text_dim, d, ce.pp("text_embedder.linear_1"))?,
            text_linear_2: linear(d, d, ce.pp("text_embedder.linear_2"))?,
            blocks,
            proj_out: linear(d, cfg.out_channels() * pt * ph * pw, vb.pp("proj_out"))?,
            scale_shift_table: f32vb.get((1, 2, d), "scale_shift_table")?,
            rope: WanRope::new(cfg.attention_head_dim),
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &WanTransformerConfig {
        &self.cfg
    }

    /// The post-patch token grid `(F/pt, H/ph, W/pw)` of a latent `[B, C, F, H, W]`.
    pub fn token_grid(&self, latent_dims: &[usize]) -> (usize, usize, usize) {
        let [pt, ph, pw] = self.cfg.patch_size;
        (
            latent_dims[2] / pt,
            latent_dims[3] / ph,
            latent_dims[4] / pw,
        )
    }

    /// Embeds the text: UMT5 hidden states `[B, L, text_dim]` → `[B, L, D]`. Independent of
    /// the timestep, so a sampler computes it once per prompt.
    pub fn embed_text(&self, context: &Tensor) -> Result<Tensor> {
        let dtype = self.patch.weight().dtype();
        let h = self.text_linear_1.forward(&context.to_dtype(dtype)?)?;
        let h = gelu_tanh(&h)?;
        self.text_linear_2.forward(&h)
    }

    /// The time embedding: `t` `[B]` (0..1000, float) → (`temb` `[B, D]`, `temb6` `[B, 6, D]`), f32.
    pub fn embed_time(&self, t: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.inner_dim();
        let sin = timestep_embedding(t, self.cfg.freq_dim)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&sin)?.silu()?)?;
        let dtype = self.patch.weight().dtype();
        let temb6 = self
            .time_proj
            .forward(&temb.silu()?.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?;
        let b = temb6.dim(0)?;
        Ok((temb, temb6.reshape((b, 6, d))?))
    }

    /// Flattens `[B, C, F, H, W]` into patch tokens `[B, N, C·pt·ph·pw]` in (t, y, x) order.
    pub fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, f, h, w) = x.dims5()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        if f % pt != 0 || h % ph != 0 || w % pw != 0 {
            candle_core::bail!(
                "latent {f}×{h}×{w} is not divisible by the patch size {pt}×{ph}×{pw}"
            );
        }
        let (gf, gh, gw) = (f / pt, h / ph, w / pw);
        x.reshape(vec![b, c, gf, pt, gh, ph, gw, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, gf * gh * gw, c * pt * ph * pw))
    }

    /// Inverse of the output head's token layout: `[B, N, pt·ph·pw·C]` → `[B, C, F, H, W]`.
    pub fn unpatchify(&self, tokens: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
        let (b, _, _) = tokens.dims3()?;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.out_channels();
        let (gf, gh, gw) = grid;
        tokens
            .reshape(vec![b, gf, gh, gw, pt, ph, pw, c])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, c, gf * pt, gh * ph, gw * pw))
    }

    /// Velocity for latent `x` `[B, C, F, H, W]` at timesteps `t` `[B]` given the raw text
    /// hidden states `context` `[B, L, text_dim]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor, context: &Tensor) -> Result<Tensor> {
        let ctx = self.embed_text(context)?;
        self.forward_embedded(x, t, &ctx, (0, 0, 0))
    }

    /// Classifier-free guidance's two passes at once: the velocity of latent `x` `[B, C, F, H,
    /// W]` at timesteps `t` `[B]` under each of the `G` embedded contexts in `ctx` `[G·B, L,
    /// D]` (context `g` of item `b` at row `g·B + b`), returned as `[G·B, C, F, H, W]` in the
    /// same order; the same as [`Self::forward_embedded`] on `x` and `t` repeated `G` times.
    ///
    /// The text enters a block only at its cross-attention, so every pass shares the first
    /// block's self-attention half (same latent, same timestep) and its cross-attention's
    /// queries: they run once, on `B` items, and only then does the batch fan out. Not an approximation: the same ops on the same
    /// numbers (equal up to float rounding where a GEMM blocks a smaller batch differently).
    /// At 4 layers that is an eighth of the self-attention work.
    pub fn forward_guided(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        offset: (usize, usize, usize),
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let gb = ctx.dim(0)?;
        if b == 0 {
            candle_core::bail!("forward_guided: no latents (batch of 0)");
        }
        if gb == 0 || gb % b != 0 {
            candle_core::bail!(
                "forward_guided: {gb} contexts for {b} latents (expected a multiple of {b})"
            );
        }
        if t.dims() != [b] {
            candle_core::bail!(
                "forward_guided: timesteps {:?} for {b} latents (expected [{b}]: one per latent, not per context)",
                t.shape()
            );
        }
        let g = gb / b;
        // Each item repeated for every context (nothing to copy with one context).
        let fan = |t: &Tensor| {
            if g == 1 {
                Ok(t.clone())
            } else {
                Tensor::cat(&vec![t; g], 0)
            }
        };
        let first_and_rest = self.blocks.split_first().filter(|_| g > 1);
        let Some((first, rest)) = first_and_rest else {
            return self.forward_embedded(&fan(x)?, &fan(t)?, ctx, offset);
        };
        let Inputs {
            h,
            temb,
            temb6,
            ctx,
            key_bias,
            rope,
            grid,
        } = self.inputs(x, t, ctx, offset)?;
        let e = first.scale_shift_table.broadcast_add(&temb6)?;
        let h = first.self_attention(&h, &e, &rope)?;
        // The cross-attention's queries come from this shared state too.
        let q = first.cross_query(&h)?.map(|q| fan(&q)).transpose()?;
        let mut h =
            first.cross_and_ffn(&fan(&h)?, &ctx, key_bias.as_ref(), &fan(&e)?, q.as_ref())?;
        let temb6 = fan(&temb6)?;
        for block in rest {
            h = block.forward(&h, &ctx, key_bias.as_ref(), &temb6, &rope)?;
        }
        self.head(&h, &fan(&temb)?, grid)
    }

    /// The output head: modulated LayerNorm, projection, unpatchify; f32.
    fn head(&self, h: &Tensor, temb: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
        let dtype = self.patch.weight().dtype();
        let e = self.scale_shift_table.broadcast_add(&temb.unsqueeze(1)?)?;
        let (shift, scale) = (e.narrow(1, 0, 1)?, e.narrow(1, 1, 1)?);
        let h = layer_norm_modulate(h, &shift, &scale, self.cfg.eps)?.to_dtype(dtype)?;
        let out = self.proj_out.forward(&h)?;
        self.unpatchify(&out, grid)?.to_dtype(DType::F32)
    }

    /// Like [`Self::forward`] with the text already embedded (`[B, L, D]`, from
    /// [`Self::embed_text`]) and RoPE positions starting at `offset` (for windows).
    pub fn forward_embedded(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        offset: (usize, usize, usize),
    ) -> Result<Tensor> {
        let Inputs {
            mut h,
            temb,
            temb6,
            ctx,
            key_bias,
            rope,
            grid,
        } = self.inputs(x, t, ctx, offset)?;
        for block in &self.blocks {
            h = block.forward(&h, &ctx, key_bias.as_ref(), &temb6, &rope)?;
        }
        self.head(&h, &temb, grid)
    }

    /// What the blocks take: patch tokens embedded, time embeddings, the context with its
    /// repeated padding keys merged (not while training), RoPE tables from `offset`.
    fn inputs(
        &self,
        x: &Tensor,
        t: &Tensor,
        ctx: &Tensor,
        offset: (usize, usize, usize),
    ) -> Result<Inputs> {
        let dtype = self.patch.weight().dtype();
        let grid = self.token_grid(x.dims());
        let rope = self.rope.tables(grid, offset, x.device())?;
        let tokens = self.patchify(&x.to_dtype(dtype)?)?;
        let h = self.patch.forward(&tokens)?;
        let (temb, temb6) = self.embed_time(t)?;
        let (ctx, key_bias) = if crate::nn::differentiable() {
            (ctx.clone(), None)
        } else {
            merge_repeated_keys(ctx)?
        };
        Ok(Inputs {
            h,
            temb,
            temb6,
            ctx,
            key_bias,
            rope,
            grid,
        })
    }
}

/// See [`WanTransformer3DModel::inputs`].
struct Inputs {
    /// Patch tokens `[B, N, D]`.
    h: Tensor,
    /// `[B, D]` and `[B, 6, D]` f32.
    temb: Tensor,
    temb6: Tensor,
    /// `[B, L', D]` and its `[B, L']` key bias (see [`merge_repeated_keys`]).
    ctx: Tensor,
    key_bias: Option<Tensor>,
    rope: (Tensor, Tensor),
    grid: (usize, usize, usize),
}

/// Merges the identical trailing rows of an embedded text context `[B, L, D]` into fewer keys.
///
/// Wan zero-pads the text to a fixed length (512) and the DiT attends to every padded row
/// unmasked; the pads embed to one identical vector, so after the key/value projections they
/// are identical keys. Softmax over `c` copies of a key equals softmax over one copy whose
/// score is raised by `ln c`, so the cross-attention can run over the distinct rows only:
/// returns the first `K` rows (`K` = the largest number of distinct rows over the batch) and
/// a `[B, K]` f32 key bias spreading each element's repeated row's multiplicity over its
/// copies among the `K`. Exact up to float rounding; `(ctx, None)` when nothing repeats.
pub fn merge_repeated_keys(ctx: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    let (b, l, d) = ctx.dims3()?;
    if l < 2 {
        return Ok((ctx.clone(), None));
    }
    let rows: Vec<f32> = ctx.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    // Per element: how many rows from the end equal its last row (bitwise).
    let repeats: Vec<usize> = (0..b)
        .map(|bi| {
            let row = |i: usize| &rows[(bi * l + i) * d..(bi * l + i + 1) * d];
            let last = row(l - 1);
            1 + (0..l - 1)
                .rev()
                .take_while(|&i| {
                    row(i)
                        .iter()
                        .zip(last)
                        .all(|(a, c)| a.to_bits() == c.to_bits())
                })
                .count()
        })
        .collect();
    let keep = repeats.iter().map(|r| l - r + 1).max().unwrap_or(l);
    if keep == l {
        return Ok((ctx.clone(), None));
    }
    let mut bias = vec![0f32; b * keep];
    for (bi, &r) in repeats.iter().enumerate() {
        // Rows l-r..l-1 are copies; those inside the first `keep` are l-r..keep-1.
        let first = l - r;
        let copies = keep - first;
        let lb = (r as f64 / copies as f64).ln() as f32;
        bias[bi * keep + first..(bi + 1) * keep].fill(lb);
    }
    Ok((
        ctx.narrow(1, 0, keep)?,
        Some(Tensor::from_vec(bias, (b, keep), ctx.device())?),
    ))
}

/// Opens a transformer checkpoint: a diffusers `transformer/` directory (config.json +
/// safetensors, sharded or not) or a native/Comfy single file. `cfg` overrides the config;
/// without it a directory's `config.json` is read, and a single file's config is inferred from
/// its tensor shapes (head dim 128, as in every published Wan2.1 model).
pub fn load_transformer(
    path: &Path,
    cfg: Option<WanTransformerConfig>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<(WanTransformer3DModel, WanTransformerConfig)> {
    let (store, dir_cfg) = if path.is_dir() {
        let cfg_path = path.join("config.json");
        let c = if cfg.is_none() {
            Some(crate::weights::read_config::<WanTransformerConfig>(
                &cfg_path,
            )?)
        } else {
            None
        };
        (TensorStore::open_dir(path)?, c)
    } else {
        (TensorStore::open_file(path)?, None)
    };
    let store = match keys::detect_layout(&store) {
        Some(Layout::Diffusers) => store,
        Some(Layout::Native) => store.remap(|k| Some(keys::native_to_diffusers(k)))?,
        None => anyhow::bail!(
            "{} is not a Wan transformer checkpoint: it has neither `blocks.0.attn1.to_q.weight` (diffusers) nor `blocks.0.self_attn.q.weight` (native/Comfy)",
            path.display()
        ),
    };
    let cfg = match cfg.or(dir_cfg) {
        Some(c) => c,
        None => infer_config(&store).with_context(|| {
            format!("cannot infer the transformer config of {}", path.display())
        })?,
    };
    let vb = store.into_var_builder(dtype, device);
    let model = WanTransformer3DModel::load(vb, &cfg)
        .with_context(|| format!("loading the Wan transformer from {}", path.display()))?;
    Ok((model, cfg))
}

/// Infers a config from tensor shapes (diffusers names), assuming head dim 128.
pub fn infer_config(store: &TensorStore) -> anyhow::Result<WanTransformerConfig> {
    let shape = |name: &str| {
        store
            .shape(name)
            .ok_or_else(|| anyhow::anyhow!("tensor `{name}` is missing"))
    };
    let pe = shape("patch_embedding.weight")?;
    let ffn = shape("blocks.0.ffn.net.0.proj.weight")?;
    let text = shape("condition_embedder.text_embedder.linear_1.weight")?;
    let time = shape("condition_embedder.time_embedder.linear_1.weight")?;
    let out = shape("proj_out.weight")?;
    let num_layers = (0..)
        .take_while(|i| store.contains(&format!("blocks.{i}.attn1.to_q.weight")))
        .count();
    let d = pe[0];
    let head_dim = 128;
    if d % head_dim != 0 {
        anyhow::bail!("inner dim {d} is not a multiple of 128: pass the model's config.json");
    }
    let patch = [pe[2], pe[3], pe[4]];
    Ok(WanTransformerConfig {
        patch_size: patch,
        num_attention_heads: d / head_dim,
        attention_head_dim: head_dim,
        in_channels: pe[1],
        out_channels: Some(out[0] / (patch[0] * patch[1] * patch[2])),
        text_dim: text[1],
        freq_dim: time[1],
        ffn_dim: ffn[0],
        num_layers,
        cross_attn_norm: store.contains("blocks.0.norm2.weight"),
        ..WanTransformerConfig::t2v_1_3b()
    })
}
