//! Layers whose forward pass is candle's, with CPU backward passes that avoid candle's slow
//! paths. Profiling `sora train dit` showed most of a step in the backward pass, a large part
//! of it in candle's reduction over non-last dimensions (the gradient of every broadcast
//! multiply/add: Linear bias and 3-D weight broadcast, modulation, gates, norm weights) and in
//! the composed GELU-tanh derivative (about ten elementwise ops). Here those gradients are
//! computed with batched matmuls against a ones vector and one fused elementwise pass.
//!
//! Inference (and any non-CPU device) takes exactly candle's forward ops, so numbers and
//! parity are unchanged; only in differentiable mode ([`super::differentiable`]) is the result
//! wrapped in an identity op carrying the faster backward pass.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

type GradFn =
    dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> + Send + Sync;

/// Identity on a precomputed result (third argument) whose backward pass is `grad(a, b, g)`.
struct WithGrad {
    name: &'static str,
    grad: Box<GradFn>,
}

impl CustomOp3 for WithGrad {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if !ly.is_contiguous() || ly.start_offset() != 0 {
            candle_core::bail!("{}: the precomputed result must be contiguous", self.name);
        }
        Ok((y.clone(), ly.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.grad)(&a.detach(), &b.detach(), &g.detach())?;
        Ok((ga, gb, None))
    }
}

/// Returns `fast` as a node of the graph over `a` and `b` whose backward pass is `grad(a, b, g)`
/// (all three detached). `fast` must be computed from detached inputs: it is the result, not a
/// node of the graph.
pub(crate) fn attach(
    a: &Tensor,
    b: &Tensor,
    fast: Tensor,
    name: &'static str,
    grad: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let fast = fast.contiguous()?;
    a.apply_op3_arc(
        b,
        &fast,
        Arc::new(Box::new(WithGrad {
            name,
            grad: Box::new(grad),
        })),
    )
}

pub(crate) fn fast_grads(x: &Tensor) -> bool {
    super::differentiable() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// `y + bias` for `y` `[B, C, …]` and a per-channel `bias` `[C]` (a convolution's bias). In
/// differentiable mode on CPU the bias gradient is two contiguous sums (over positions, then
/// the batch) instead of candle's broadcast backward, a strided reduction over every dim but
/// the channel's.
pub fn add_channel_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; y.rank()];
    if shape.len() < 2 {
        candle_core::bail!("add_channel_bias: input {:?} has no channel dim", y.shape());
    }
    shape[1] = bias.dim(0)?;
    let composed = |y: &Tensor, b: &Tensor| y.broadcast_add(&b.reshape(shape.as_slice())?);
    if !fast_grads(y) || bias.dtype() != DType::F32 {
        return composed(y, bias);
    }
    let fast = composed(&y.detach(), &bias.detach())?;
    attach(y, bias, fast, "add_channel_bias", |_, bias, g| {
        let (b, c) = (g.dim(0)?, g.dim(1)?);
        let gb = g
            .contiguous()?
            .reshape((b, c, ()))?
            .sum(2)?
            .sum(0)?
            .reshape(bias.shape())?;
        Ok((Some(g.clone()), Some(gb)))
    })
}

/// Sums `t` `[G, R, D]` over its rows: `[G, 1, D]`, as one batched matmul with a ones row.
fn sum_rows(t: &Tensor) -> Result<Tensor> {
    let (g, r, _) = t.dims3()?;
    let ones = Tensor::ones((g, 1, r), t.dtype(), t.device())?;
    ones.matmul(&t.contiguous()?)
}

/// Views `x` `[..., D]` as `[G, R, D]` for a per-group operand of `g` groups.
fn grouped(x: &Tensor, g: usize) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d;
    if g == 0 || !rows.is_multiple_of(g) {
        candle_core::bail!(
            "per-group operand: {rows} rows do not split into {g} groups ({:?})",
            x.shape()
        );
    }
    x.reshape((g, rows / g, d))
}

/// `x · s` where `x` is `[..., D]` and `s` is `[D]` (a weight) or `[B, 1, D]` with `x` `[B, N, D]`
/// (modulation, gates). Other shapes take candle's broadcast op (same result, slower backward).
pub fn mul_rows(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    if !fast_grads(x) || super::kernels::group_count(x, s, "mul_rows").is_err() {
        return x.broadcast_mul(s);
    }
    let fast = x.detach().broadcast_mul(&s.detach())?;
    attach(x, s, fast, "mul-rows", |x, s, g| {
        let gx = g.broadcast_mul(s)?;
        let n = super::kernels::group_count(x, s, "mul_rows")?;
        let gs = sum_rows(&grouped(&(g * x)?, n)?)?.reshape(s.shape())?;
        Ok((Some(gx), Some(gs)))
    })
}

/// `x + s` with the shapes of [`mul_rows`].
pub fn add_rows(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    if !fast_grads(x) || super::kernels::group_count(x, s, "add_rows").is_err() {
        return x.broadcast_add(s);
    }
    let fast = x.detach().broadcast_add(&s.detach())?;
    attach(x, s, fast, "add-rows", |x, s, g| {
        let n = super::kernels::group_count(x, s, "add_rows")?;
        let gs = sum_rows(&grouped(g, n)?)?.reshape(s.shape())?;
        Ok((Some(g.clone()), Some(gs)))
    })
}

/// The gated residual `x + a·gate` (`gate` `[B, 1, D]` with `x`, `a` `[B, N, D]`, or `[D]`): one
/// fused pass on CPU at inference, else [`mul_rows`] and an add.
pub fn gated_residual(x: &Tensor, a: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if super::kernels::usable(x) {
        return super::kernels::gated_residual(x, a, gate);
    }
    x + mul_rows(a, gate)?
}

/// GELU with the tanh approximation (`gelu_new`, `approximate="tanh"`): on CPU f32 the
/// vectorised kernel forward, and in differentiable mode one fused pass for the derivative.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if super::kernels::usable(x) {
        return super::kernels::gelu_tanh(x);
    }
    if !fast_grads(x) {
        return x.gelu();
    }
    let fast = super::kernels::gelu_tanh(&x.detach())?;
    attach(x, x, fast, "gelu-tanh", |x, _, g| {
        Ok((Some(super::kernels::gelu_tanh_grad(x, g)?), None))
    })
}

/// A linear layer `y = x·Wᵀ + b` over the last dim. The input is flattened to 2-D so the weight
/// is never broadcast over a batch dim; at inference the transposed weight is made contiguous
/// once at load.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    /// `Wᵀ` `[in, out]`, contiguous (inference) or a view of `weight` (training, so optimiser
    /// updates of the variable are seen).
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (weight, weight_t) = if super::differentiable() {
            let t = weight.t()?;
            (weight, t)
        } else {
            // Keep one copy: the [out, in] weight becomes a view of the transposed buffer.
            let t = weight.t()?.contiguous()?;
            (t.t()?, t)
        };
        Ok(Self {
            weight,
            weight_t,
            bias,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `Wᵀ` `[in, out]` where the CPU inference kernels can take it (contiguous, not
    /// training): for kernels that fold the layer into another product.
    pub fn transposed(&self) -> Option<&Tensor> {
        (self.weight_t.is_contiguous() && !super::differentiable()).then_some(&self.weight_t)
    }
}

impl Linear {
    /// `forward(x) + residual`; on CPU at inference the residual is added inside the GEMM.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.kernel_usable(x) {
            return self.kernel_forward(x, Some(residual));
        }
        self.forward(x)? + residual
    }

    fn kernel_usable(&self, x: &Tensor) -> bool {
        super::kernels::usable(x) && self.weight_t.is_contiguous()
    }

    /// `epilogue(forward(x))` as one GEMM and one in-cache pass over each output row
    /// ([`super::kernels::linear_epilogue`]) where the CPU kernels apply; `None` elsewhere
    /// (training, other devices, other dtypes), where the caller composes the ops.
    pub fn forward_epilogue(
        &self,
        x: &Tensor,
        epilogue: super::kernels::Epilogue,
    ) -> Result<Option<Tensor>> {
        if !self.kernel_usable(x) {
            return Ok(None);
        }
        self.rows2d(x, |x2, _| {
            super::kernels::linear_epilogue(x2, &self.weight_t, self.bias.as_ref(), epilogue)
        })
        .map(Some)
    }

    /// The gated residual `r + forward(x)·gate` in f32 (`r` shaped like the output, `gate`
    /// `[B, 1, out]` f32), returned in the output's dtype: on CPU at inference as one GEMM with
    /// the residual applied in its row pass, else composed with [`gated_residual`].
    pub fn forward_gated(&self, x: &Tensor, r: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let gated = super::kernels::Epilogue::Gated { x: r, gate };
        if let Some(y) = self.forward_epilogue(x, gated)? {
            return Ok(y);
        }
        let a = self.forward(x)?;
        gated_residual(&r.to_dtype(DType::F32)?, &a.to_dtype(DType::F32)?, gate)?
            .to_dtype(a.dtype())
    }

    /// `x` flattened to 2-D and back around `op`, which maps `[M, K]` to `[M, out]`.
    fn rows2d(
        &self,
        x: &Tensor,
        op: impl FnOnce(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let k = *dims.last().expect("linear input has a last dim");
        let m = x.elem_count() / k.max(1);
        let y = op(&x.reshape((m, k))?, m)?;
        *dims.last_mut().expect("non-empty") = self.weight.dim(0)?;
        y.reshape(dims)
    }

    /// One GEMM with bias (and `residual`, shaped like the output) pre-filled into the output.
    fn kernel_forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        self.rows2d(x, |x2, m| {
            let r2 = residual
                .map(|r| r.reshape((m, self.weight.dim(0)?)))
                .transpose()?;
            super::kernels::linear(x2, &self.weight_t, self.bias.as_ref(), r2.as_ref())
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernel_usable(x) {
            return self.kernel_forward(x, None);
        }
        self.rows2d(x, |x2, _| {
            let y = x2.matmul(&self.weight_t)?;
            match &self.bias {
                Some(b) => add_rows(&y, b),
                None => Ok(y),
            }
        })
    }
}

/// `candle_nn::linear` with [`Linear`]: weight `[out, in]` and bias `[out]` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Linear::new(w, Some(b))
}

/// A linear layer without bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((out_dim, in_dim), "weight")?, None)
}

/// Applies `f(row_a, row_b, out_row)` to matching rows of two same-shape f32 tensors, in
/// parallel over rows.
fn rows_map2(
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Send + Sync,
) -> Result<Tensor> {
    let d = a.dim(candle_core::D::Minus1)?;
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let mut out = vec![0f32; a.elem_count()];
    let rows_per_task = super::kernels::rows_per_task(d) * d;
    super::kernels::with_data(&a, |av| {
        super::kernels::with_data(&b, |bv| {
            out.par_chunks_mut(rows_per_task)
                .zip(
                    av.par_chunks(rows_per_task)
                        .zip(bv.par_chunks(rows_per_task)),
                )
                .for_each(|(o, (ac, bc))| {
                    for ((o, ar), br) in o.chunks_mut(d).zip(ac.chunks(d)).zip(bc.chunks(d)) {
                        f(ar, br, o);
                    }
                });
            Ok(())
        })
    })?;
    Tensor::from_vec(out, a.shape(), a.device())
}

/// Mean and reciprocal standard deviation of a row (`centre`: LayerNorm; else RMSNorm).
fn row_stats(x: &[f32], eps: f32, centre: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if centre {
        x.iter().sum::<f32>() / n
    } else {
        0.0
    };
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Gradient of `x̂ = (x − μ)·rstd` (or `x·rstd` without centring) for one row.
fn norm_row_grad(x: &[f32], g: &[f32], out: &mut [f32], eps: f32, centre: bool) {
    let n = x.len() as f32;
    let (mean, rstd) = row_stats(x, eps, centre);
    let mut sg = 0f32;
    let mut sgx = 0f32;
    for (&xv, &gv) in x.iter().zip(g) {
        sg += gv;
        sgx += gv * (xv - mean) * rstd;
    }
    let mg = if centre { sg / n } else { 0.0 };
    let mgx = sgx / n;
    for ((o, &xv), &gv) in out.iter_mut().zip(x).zip(g) {
        let xh = (xv - mean) * rstd;
        *o = rstd * (gv - mg - xh * mgx);
    }
}

/// Normalises the last dim of an f32 tensor without affine terms: LayerNorm (`centre`) or the
/// RMS part of RMSNorm. `composed` is the forward pass used outside differentiable mode.
pub fn normalize(
    x: &Tensor,
    eps: f64,
    centre: bool,
    composed: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if !fast_grads(x) {
        return composed(x);
    }
    let fast = composed(&x.detach())?;
    let e = eps as f32;
    attach(x, x, fast, "normalize", move |x, _, g| {
        let gx = rows_map2(x, g, |xr, gr, o| norm_row_grad(xr, gr, o, e, centre))?;
        Ok((Some(gx), None))
    })
}

/// Softmax over the last dim: candle's fused kernel forward, in differentiable mode with the
/// row-wise backward `p·(g − Σ g·p)`.
pub fn softmax_last_dim(s: &Tensor) -> Result<Tensor> {
    if !super::differentiable() {
        return candle_nn::ops::softmax_last_dim(s);
    }
    if !fast_grads(s) {
        return candle_nn::ops::softmax(s, candle_core::D::Minus1);
    }
    let p = candle_nn::ops::softmax_last_dim(&s.detach())?;
    let p_saved = p.clone();
    attach(s, s, p, "softmax", move |_, _, g| {
        let gs = rows_map2(&p_saved, g, |pr, gr, o| softmax_row_grad(pr, gr, o, 1.0))?;
        Ok((Some(gs), None))
    })
}

/// The softmax backward pass of one row: `o = scale · p·(g − Σ g·p)`.
fn softmax_row_grad(p: &[f32], g: &[f32], o: &mut [f32], scale: f32) {
    let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
    for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
        *o = scale * p * (g - dot);
    }
}

/// `softmax(q·kᵀ·scale + bias)·v` (`q` `[B, H, Nq, D]`, `k`/`v` `[B, H, Nk, D]`, `bias` a
/// constant broadcastable to the scores) as one node of the training graph: candle's ops on
/// detached inputs forward, and a backward pass from the saved probabilities
/// (`dV = Pᵀ·dO`, `dS = scale·P·(dP − Σ dP·P)` with `dP = dO·Vᵀ`, `dQ = dS·K`, `dK = dSᵀ·Q`).
/// The composed graph had five score-sized nodes, each of whose gradients candle allocates,
/// zeroes and accumulates. `k` and `v` enter as one `[B, H, Nk, 2D]` operand.
pub fn attention_trainable(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let kv = Tensor::cat(&[k, v], 3)?;
    let (qd, kd, vd) = (
        q.detach().contiguous()?,
        k.detach(),
        v.detach().contiguous()?,
    );
    let s = qd.matmul(&kd.t()?.contiguous()?)?;
    let p = match bias {
        Some(b) => candle_nn::ops::softmax_last_dim(&s.affine(scale, 0.0)?.broadcast_add(b)?)?,
        None => super::kernels::softmax_scaled(&s, scale as f32)?,
    };
    let o = p.matmul(&vd)?;
    let sc = scale as f32;
    attach(q, &kv, o, "attention", move |q, kv, g| {
        let k = kv.narrow(3, 0, d)?.contiguous()?;
        let v = kv.narrow(3, d, d)?.contiguous()?;
        let g = g.contiguous()?;
        let dv = p.t()?.matmul(&g)?;
        let dp = g.matmul(&v.t()?)?;
        let ds = rows_map2(&p, &dp, |pr, gr, o| softmax_row_grad(pr, gr, o, sc))?;
        let dq = ds.matmul(&k)?;
        let dk = ds.t()?.matmul(q)?;
        Ok((Some(dq), Some(Tensor::cat(&[dk, dv], 3)?)))
    })
}

/// Interleaved rotary embedding (`candle_nn::rotary_emb::rope_i`): candle's fused kernel
/// forward; the backward pass is the inverse rotation of the gradient (`sin` negated).
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    if !super::differentiable() {
        return candle_nn::rotary_emb::rope_i(&x, cos, sin);
    }
    if !fast_grads(&x) {
        return candle_nn::rotary_emb::rope_i_slow(&x, cos, sin);
    }
    let fast = candle_nn::rotary_emb::rope_i(&x.detach(), cos, sin)?;
    let (cos, neg_sin) = (cos.clone(), sin.neg()?);
    attach(&x, &x, fast, "rope", move |_, _, g| {
        let gx = candle_nn::rotary_emb::rope_i(&g.contiguous()?, &cos, &neg_sin)?;
        Ok((Some(gx), None))
    })
}
