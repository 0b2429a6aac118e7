//! 2D convolution with one entry point for inference and training. At inference the forward
//! pass is candle's conv2d. In differentiable mode ([`crate::nn::differentiable`]) on CPU, a
//! stride-1 convolution is a one-frame [`super::conv3d::conv3d_trainable`] (shifted-GEMM
//! forward and gradients); a strided one is candle's forward with a custom backward pass built
//! from a forward convolution (input gradient) and per-tap matmuls (weight gradient), about 10×
//! faster than candle's conv2d backward, which runs a direct transposed convolution and a
//! convolution with image-sized kernels.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// `x`: `[N, C, H, W]`, `w`: `[O, C, kh, kw]`, symmetric zero `padding`, equal `stride` on
/// both axes. Returns `[N, O, H', W']`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let y = if stride == 1
        && padding < kh
        && padding < kw
        && super::fused::fast_grads(x)
        && w.dtype() == candle_core::DType::F32
    {
        // Training on CPU at stride 1: the shifted-GEMM convolution with its own backward
        // pass, as a one-frame 3D convolution.
        super::conv3d::conv3d_trainable(&x.unsqueeze(2)?, 0, &w.unsqueeze(2)?, padding, padding)?
            .squeeze(2)?
    } else if crate::nn::differentiable() && x.device().is_cpu() {
        let fast = x.detach().conv2d(&w.detach(), padding, stride, 1, 1)?;
        super::fused::attach(x, w, fast, "conv2d-fast-grad", move |x, w, g| {
            conv2d_grads(x, w, g, padding, stride)
        })?
    } else {
        x.conv2d(w, padding, stride, 1, 1)?
    };
    match bias {
        Some(b) => super::fused::add_channel_bias(&y, b),
        None => Ok(y),
    }
}

/// Gradients of `conv2d(x, w)` (no bias) for the input and the weight, given the output
/// gradient `g`.
fn conv2d_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    p: usize,
    s: usize,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let g = g.contiguous()?;
    let (n, c, h, wd) = x.dims4()?;
    let (o, _, kh, kw) = w.dims4()?;
    let (_, _, ho, wo) = g.dims4()?;
    let (hp, wp) = (h + 2 * p, wd + 2 * p);

    // Input gradient: full correlation of the (dilated) output gradient with the flipped,
    // transposed kernel, then the padding cropped away.
    let gd = dilate(&dilate(&g, 2, s)?, 3, s)?;
    let gd = gd
        .pad_with_zeros(2, 0, (hp - kh) % s)?
        .pad_with_zeros(3, 0, (wp - kw) % s)?;
    let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    let gx_pad = if kh == kw {
        gd.conv2d(&wf, kh - 1, 1, 1, 1)?
    } else {
        gd.pad_with_zeros(2, kh - 1, kh - 1)?
            .pad_with_zeros(3, kw - 1, kw - 1)?
            .conv2d(&wf, 0, 1, 1, 1)?
    };
    let gx = gx_pad.narrow(2, p, h)?.narrow(3, p, wd)?;

    // Weight gradient: one [O, N·H'·W'] × [N·H'·W', C] product per kernel tap.
    let gt = g.transpose(0, 1)?.contiguous()?.reshape((o, n * ho * wo))?;
    let xp = if p > 0 {
        x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?
    } else {
        x.clone()
    };
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let xs = strided(&strided(&xp, 2, i, ho, s)?, 3, j, wo, s)?;
            let xs = xs
                .transpose(0, 1)?
                .contiguous()?
                .reshape((c, n * ho * wo))?;
            taps.push(gt.matmul(&xs.t()?)?); // [O, C]
        }
    }
    let gw = Tensor::stack(&taps, 2)?.reshape((o, c, kh, kw))?;
    Ok((Some(gx), Some(gw)))
}

/// Inserts `s − 1` zeros between elements along `dim` (no-op for `s = 1`).
fn dilate(x: &Tensor, dim: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return Ok(x.clone());
    }
    let len = x.dim(dim)?;
    let zeros = x.zeros_like()?;
    let mut parts = vec![x.clone()];
    parts.extend(std::iter::repeat_n(zeros, s - 1));
    let st = Tensor::stack(&parts, dim + 1)?;
    let mut shape = x.dims().to_vec();
    shape[dim] = len * s;
    st.reshape(shape)?.narrow(dim, 0, (len - 1) * s + 1)
}

/// Elements `start, start+s, …` (`count` of them) along `dim`.
fn strided(x: &Tensor, dim: usize, start: usize, count: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return x.narrow(dim, start, count);
    }
    let need = count * s;
    let avail = x.dim(dim)? - start;
    let v = if avail >= need {
        x.narrow(dim, start, need)?
    } else {
        x.narrow(dim, start, avail)?
            .pad_with_zeros(dim, 0, need - avail)?
    };
    let mut shape = v.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, s);
    v.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// A 2D convolution layer (PyTorch `Conv2d` weights) that dispatches through [`conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
}

impl Conv2d {
    /// Loads `weight` `[cout, cin, k, k]` and `bias` `[cout]`.
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        k: usize,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: Some(vb.get(cout, "bias")?),
            padding,
            stride,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn padding(&self) -> usize {
        self.padding
    }

    /// `x`: `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.padding,
            self.stride,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Both training paths (stride 1: the shifted-GEMM kernels; strided: candle's forward with
    /// the custom backward) equal candle's own conv2d and its backward.
    #[test]
    fn fast_conv_gradients_match_candle() {
        let dev = Device::Cpu;
        for (k, p, s, h, w) in [
            (3, 1, 1, 9, 7),
            (3, 0, 2, 9, 9),
            (3, 0, 2, 65, 33),
            (1, 0, 1, 5, 6),
            (3, 1, 2, 7, 9),
        ] {
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap()).unwrap();
            let r = Tensor::randn(
                0f32,
                1.0,
                x.as_tensor()
                    .conv2d(wt.as_tensor(), p, s, 1, 1)
                    .unwrap()
                    .shape(),
                &dev,
            )
            .unwrap();
            let reference = (x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            let g_ref = reference.backward().unwrap();
            crate::nn::set_differentiable(true);
            let ours = (conv2d(x.as_tensor(), wt.as_tensor(), None, p, s).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap();
            crate::nn::set_differentiable(false);
            let (a, b) = (
                ours.to_scalar::<f32>().unwrap(),
                reference.to_scalar::<f32>().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "k{k} p{p} s{s} {h}x{w}: forward {a} against {b}"
            );
            let g = ours.backward().unwrap();
            for v in [&x, &wt] {
                let a = g.get(v.as_tensor()).unwrap();
                let b = g_ref.get(v.as_tensor()).unwrap();
                let err = (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(err < 1e-4, "k{k} p{p} s{s} {h}x{w}: gradient error {err}");
            }
        }
    }
}
