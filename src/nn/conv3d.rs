//! Causal 3D convolution, as `WanCausalConv3d` in diffusers: zero (or cached) padding of
//! `2 * pad_t` frames in front, none behind, symmetric spatial zero padding.
//!
//! candle has no conv3d. On CPU in f32 the convolution is the shifted-GEMM kernel
//! ([`kernels::conv3d_shifted_gemm`]) at inference and, at stride 1, in training too
//! ([`conv3d_trainable`], with its own backward pass). Elsewhere (GPU, other dtypes, strided
//! training) a 3D convolution with `kt` temporal taps is one 2D convolution over `kt * C_in`
//! channels, where the input for output frame `j` is the channel-wise stack of the `kt` input
//! frames it covers: one large GEMM per chunk of frames instead of `kt` small ones.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::kernels;

/// Upper bound on the elements of one conv2d im2col buffer before frames are processed in chunks.
const IM2COL_BUDGET: usize = 1 << 26;

#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// `[C_out, kt * C_in, kh, kw]`, the temporal taps folded into input channels (tap-major);
    /// not kept when the shifted-GEMM kernel's weight is (one copy fewer at inference).
    weight: Option<Tensor>,
    /// The PyTorch-layout weight `[C_out, C_in, kt, kh, kw]`. Training folds it on every call,
    /// so optimizer updates of this variable reach the convolution and gradients flow back.
    raw_weight: Tensor,
    /// `[kh, kw, C_out, kt·C_in]` for the shifted-GEMM CPU kernel (inference only).
    gemm_weight: Option<Tensor>,
    bias: Option<Tensor>,
    in_channels: usize,
    out_channels: usize,
    kernel: (usize, usize, usize),
    stride: (usize, usize, usize),
    padding: (usize, usize, usize),
}

impl CausalConv3d {
    /// Builds from a PyTorch `Conv3d` weight `[C_out, C_in, kt, kh, kw]` and optional bias `[C_out]`.
    pub fn from_weights(
        weight: &Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Result<Self> {
        let (c_out, c_in, kt, kh, kw) = weight.dims5()?;
        let gemm_weight = if !crate::nn::differentiable()
            && weight.device().is_cpu()
            && weight.dtype() == candle_core::DType::F32
        {
            Some(crate::nn::kernels::conv3d_gemm_weight(weight)?)
        } else {
            None
        };
        let folded = match gemm_weight {
            Some(_) => None,
            None => Some(fold(weight)?),
        };
        Ok(Self {
            weight: folded,
            raw_weight: weight.clone(),
            gemm_weight,
            bias,
            in_channels: c_in,
            out_channels: c_out,
            kernel: (kt, kh, kw),
            stride,
            padding,
        })
    }

    /// Loads `weight` and `bias` from `vb`.
    pub fn load(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: (usize, usize, usize),
        stride: (usize, usize, usize),
        padding: (usize, usize, usize),
    ) -> Result<Self> {
        let (kt, kh, kw) = kernel;
        let w = vb.get((out_channels, in_channels, kt, kh, kw), "weight")?;
        let b = vb.get(out_channels, "bias")?;
        Self::from_weights(&w, Some(b), stride, padding)
    }

    pub fn in_channels(&self) -> usize {
        self.in_channels
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Frames of causal padding in front (`2 * pad_t`).
    pub fn causal_padding(&self) -> usize {
        2 * self.padding.0
    }

    /// `x`: `[B, C_in, T, H, W]`; `cache`: the last frames of the previous chunk's input
    /// `[B, C_in, Tc, H, W]`, used in place of that many zero frames of front padding.
    /// Returns `[B, C_out, T', H', W']`.
    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        if let Some(gw) = &self.gemm_weight {
            if self.stride.1 == 1 && self.stride.2 == 1 && crate::nn::kernels::usable(x) {
                // Shifted-GEMM kernel: the cache and zero frames are placed straight into its
                // padded input planes (no concatenated copy).
                let pad = self.causal_padding();
                let mut parts = Vec::with_capacity(2);
                let mut zero_front = pad;
                if let (Some(c), true) = (cache, pad > 0) {
                    parts.push(c.clone());
                    zero_front = pad.saturating_sub(c.dim(2)?);
                }
                parts.push(x.clone());
                let refs: Vec<&Tensor> = parts.iter().collect();
                let (kt, _, _) = self.kernel;
                return crate::nn::kernels::conv3d_shifted_gemm(
                    &refs,
                    zero_front,
                    gw,
                    self.bias.as_ref(),
                    kt,
                    self.stride.0,
                    self.padding.1,
                    self.padding.2,
                );
            }
        }
        let (kt, kh, kw) = self.kernel;
        let (_, ph, pw) = self.padding;
        if self.stride == (1, 1, 1)
            && crate::nn::fused::fast_grads(x)
            && self.raw_weight.dtype() == candle_core::DType::F32
            && ph < kh
            && pw < kw
        {
            // Training on CPU: the shifted-GEMM kernel forward, its own backward pass.
            let (x, zero_front) = match cache {
                Some(c) if self.causal_padding() > 0 => (
                    Tensor::cat(&[c, x], 2)?,
                    self.causal_padding().saturating_sub(c.dim(2)?),
                ),
                _ => (x.clone(), self.causal_padding()),
            };
            if zero_front < kt {
                let y = conv3d_trainable(&x, zero_front, &self.raw_weight, ph, pw)?;
                return match &self.bias {
                    Some(b) => crate::nn::fused::add_channel_bias(&y, b),
                    None => Ok(y),
                };
            }
        }
        let mut front = self.causal_padding();
        let mut x = x.clone();
        if let Some(c) = cache {
            if front > 0 {
                x = Tensor::cat(&[c, &x], 2)?;
                front = front.saturating_sub(c.dim(2)?);
            }
        }
        if front > 0 {
            x = x.pad_with_zeros(2, front, 0)?;
        }
        let (b, c, t, h, w) = x.dims5()?;
        let (st, sh, sw) = self.stride;
        if sh != sw {
            candle_core::bail!(
                "causal conv3d: unequal spatial strides ({sh}, {sw}) are not supported"
            );
        }
        if t < kt {
            candle_core::bail!(
                "causal conv3d: {t} frames (after padding) but the kernel spans {kt}"
            );
        }
        let t_out = (t - kt) / st + 1;
        // Spatial padding: candle's conv2d takes one symmetric padding for both axes.
        let (x, pad2d) = if ph == pw {
            (x, ph)
        } else {
            (x.pad_with_zeros(3, ph, ph)?.pad_with_zeros(4, pw, pw)?, 0)
        };
        let (hp, wp) = (h + 2 * ph, w + 2 * pw);
        let h_out = (hp - kh) / sh + 1;
        let w_out = (wp - kw) / sw + 1;
        let weight = if crate::nn::differentiable() {
            self.raw_weight.permute((0, 2, 1, 3, 4))?.reshape((
                self.out_channels,
                kt * c,
                kh,
                kw,
            ))?
        } else {
            match &self.weight {
                Some(w) => w.clone(),
                None => fold(&self.raw_weight)?,
            }
        };
        let per_frame = b * h_out * w_out * kt * c * kh * kw;
        let chunk = (IM2COL_BUDGET / per_frame.max(1)).clamp(1, t_out);
        let mut outs = Vec::with_capacity(t_out.div_ceil(chunk));
        let mut j0 = 0;
        while j0 < t_out {
            let n = chunk.min(t_out - j0);
            // Stack the kt taps along channels: [B, kt*C, n, H, W].
            let mut taps = Vec::with_capacity(kt);
            for i in 0..kt {
                let start = j0 * st + i;
                let frames = if st == 1 {
                    x.narrow(2, start, n)?
                } else {
                    let idx: Vec<u32> = (0..n).map(|j| (start + j * st) as u32).collect();
                    let idx = Tensor::new(idx.as_slice(), x.device())?;
                    x.index_select(&idx, 2)?
                };
                taps.push(frames);
            }
            let stacked = if kt == 1 {
                taps.pop().expect("one tap")
            } else {
                Tensor::cat(&taps, 1)?
            };
            let img =
                stacked
                    .permute((0, 2, 1, 3, 4))?
                    .reshape((b * n, kt * c, x.dim(3)?, x.dim(4)?))?;
            let y = crate::nn::conv2d::conv2d(&img, &weight, self.bias.as_ref(), pad2d, sh)?;
            let y = y
                .reshape((b, n, self.out_channels, h_out, w_out))?
                .permute((0, 2, 1, 3, 4))?;
            outs.push(y);
            j0 += n;
        }
        if outs.len() == 1 {
            outs.pop().expect("one chunk").contiguous()
        } else {
            Tensor::cat(&outs, 2)
        }
    }
}

/// A stride-1 3D convolution of `x` `[B, C, T, H, W]` after `zero_front` zero frames (`< kt`),
/// with symmetric spatial zero padding `(ph, pw)` (each under the kernel size) and no bias, as a
/// node of the autograd graph over `x` and the PyTorch-layout weight `w` `[O, C, kt, kh, kw]`.
/// The forward pass and both gradients are shifted-GEMM kernels
/// ([`kernels::conv3d_shifted_gemm`], [`kernels::conv3d_weight_grad`]): the input gradient is
/// the convolution of the output gradient, followed by `kt − 1` zero frames, with the
/// transposed, flipped kernel (padding `k − 1 − p`). Measured against the folded conv2d path on
/// candle's tiled-im2col convolution (its scalar im2col took 40% of a step): the recipe's
/// decoder-on-DiT step 3.18 → 0.95 s, the VAE step 1.21 → 0.45 s (remeasured 1.01 and 0.49 s
/// beside the next change; 0.75 and 0.35 s with the fused channel-norm and bias gradients).
pub fn conv3d_trainable(
    x: &Tensor,
    zero_front: usize,
    w: &Tensor,
    ph: usize,
    pw: usize,
) -> Result<Tensor> {
    let (_, _, kt, kh, kw) = w.dims5()?;
    if zero_front >= kt || ph >= kh || pw >= kw {
        candle_core::bail!(
            "conv3d_trainable: {zero_front} zero frames and padding ({ph}, {pw}) for a \
             {kt}×{kh}×{kw} kernel (each must be under the kernel size)"
        );
    }
    // Gradients only for what records them (not, say, the pixels entering the encoder).
    let (need_x, need_w) = (x.track_op(), w.track_op());
    let (xd, wd) = (x.detach(), w.detach());
    let fast = kernels::conv3d_shifted_gemm(
        &[&xd],
        zero_front,
        &kernels::conv3d_gemm_weight(&wd)?,
        None,
        kt,
        1,
        ph,
        pw,
    )?;
    crate::nn::fused::attach(x, w, fast, "conv3d-fast-grad", move |x, w, g| {
        let g = g.contiguous()?;
        let (b, o, _, ho, wo) = g.dims5()?;
        let gx = if need_x {
            let flipped = w.transpose(0, 1)?.contiguous()?.flip(&[2, 3, 4])?;
            let zeros;
            let mut parts = vec![&g];
            if kt > 1 {
                zeros = Tensor::zeros((b, o, kt - 1, ho, wo), g.dtype(), g.device())?;
                parts.push(&zeros);
            }
            Some(kernels::conv3d_shifted_gemm(
                &parts,
                kt - 1 - zero_front,
                &kernels::conv3d_gemm_weight(&flipped)?,
                None,
                kt,
                1,
                kh - 1 - ph,
                kw - 1 - pw,
            )?)
        } else {
            None
        };
        let gw = if need_w {
            Some(kernels::conv3d_weight_grad(
                &[x],
                zero_front,
                &g,
                kt,
                kh,
                kw,
                ph,
                pw,
            )?)
        } else {
            None
        };
        Ok((gx, gw))
    })
}

/// `[C_out, C_in, kt, kh, kw]` → `[C_out, kt·C_in, kh, kw]` (temporal taps folded, tap-major).
fn fold(weight: &Tensor) -> Result<Tensor> {
    let (c_out, c_in, kt, kh, kw) = weight.dims5()?;
    weight
        .permute((0, 2, 1, 3, 4))?
        .reshape((c_out, kt * c_in, kh, kw))?
        .contiguous()
}

/// A plain 1×1 or k×k `Conv2d` applied frame by frame to `[B, C, T, H, W]`.
pub fn conv2d_per_frame(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    let (b, c, t, h, w) = x.dims5()?;
    let y = x
        .permute((0, 2, 1, 3, 4))?
        .reshape((b * t, c, h, w))?
        .apply(conv)?;
    let (_, c2, h2, w2) = y.dims4()?;
    y.reshape((b, t, c2, h2, w2))?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()
}

/// SiLU, the activation of every Wan VAE block.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::silu(x)
}
