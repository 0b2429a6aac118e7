//! Float32 norms of the Wan family and T5. Each upcasts to f32, normalises, and returns the
//! input dtype, as the reference does with `FP32LayerNorm` and `.float()` calls. On CPU at
//! inference, the affine and modulated forms run as one fused kernel pass
//! ([`super::kernels::norm_affine`]); otherwise (training, other devices) as candle ops.

use candle_core::{DType, Result, Tensor, D};

/// LayerNorm over the last dim without affine parameters (`FP32LayerNorm(elementwise_affine=False)`).
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    super::fused::normalize(&x, eps, true, |x| {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)
    })?
    .to_dtype(dtype)
}

/// LayerNorm over the last dim with weight and bias, computed in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if super::kernels::usable(x) {
        return super::kernels::norm_affine(x, weight, Some(bias), eps, true);
    }
    let dtype = x.dtype();
    let y = layer_norm_no_affine(&x.to_dtype(DType::F32)?, eps)?;
    let y = super::fused::mul_rows(&y, &weight.to_dtype(DType::F32)?)?;
    super::fused::add_rows(&y, &bias.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// RMSNorm over the last dim (`torch.nn.RMSNorm`, T5's `T5LayerNorm`): `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if super::kernels::usable(x) {
        return super::kernels::norm_affine(x, weight, None, eps, false);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let y = super::fused::normalize(&x, eps, false, |x| {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)
    })?;
    super::fused::mul_rows(&y, &weight.to_dtype(DType::F32)?)?.to_dtype(dtype)
}

/// LayerNorm without affine terms, then adaLN modulation `·(1 + scale) + shift` with `[B, 1, D]`
/// `shift`/`scale` (the Wan DiT's blocks and output head). Returns f32.
pub fn layer_norm_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mul = (scale + 1.0)?;
    if super::kernels::usable(&x) {
        return super::kernels::norm_affine(&x, &mul, Some(shift), eps, true);
    }
    let y = layer_norm_no_affine(&x, eps)?;
    super::fused::add_rows(&super::fused::mul_rows(&y, &mul)?, shift)
}

/// Wan VAE's `WanRMS_norm` on channel-first tensors: L2-normalise over dim 1
/// (`F.normalize`, eps 1e-12), times `sqrt(C)` and `gamma` (shape `[C, 1, 1(, 1)]`).
pub fn channel_rms_norm(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    if super::fused::fast_grads(x) && x.rank() == 5 && gamma.dtype() == DType::F32 {
        // Training on CPU: the fused forward kernel and its one-pass backward (candle's
        // composed graph reduces over the strided channel dim three times in its backward).
        let fast = super::kernels::channel_rms_silu(&x.detach(), &gamma.detach(), false)?;
        return super::fused::attach(x, gamma, fast, "channel_rms_norm", |x, gm, g| {
            let (gx, gg) = super::kernels::channel_rms_grad(x, gm, g)?;
            Ok((Some(gx), Some(gg.reshape(gm.shape())?)))
        });
    }
    let dtype = x.dtype();
    let c = x.dim(1)?;
    let xf = x.to_dtype(DType::F32)?;
    let norm = xf.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?;
    (xf.broadcast_div(&norm)? * (c as f64).sqrt())?
        .broadcast_mul(&gamma.to_dtype(DType::F32)?)?
        .to_dtype(dtype)
}

/// [`channel_rms_norm`] followed by SiLU, as every Wan VAE block applies them; one fused pass
/// on CPU at inference.
pub fn channel_rms_norm_silu(x: &Tensor, gamma: &Tensor) -> Result<Tensor> {
    if super::kernels::usable(x) {
        return super::kernels::channel_rms_silu(x, gamma, true);
    }
    candle_nn::ops::silu(&channel_rms_norm(x, gamma)?)
}
