//! Hand-written CPU kernels for the inference hot spots candle composes from many ops:
//! LayerNorm + modulation, RMSNorm, GELU-tanh, the gated residual, interleaved RoPE on the
//! `[B, N, H, D]` layout, and attention built on GEMM tiles with an online softmax.
//!
//! Each kernel reads f32 inputs in place, writes one new buffer, and runs row blocks in
//! parallel on rayon. The elementwise loops are compiled three times (AVX-512, AVX2+FMA,
//! baseline) and picked at run time, so one binary is fast on new CPUs and safe on old ones.
//! Results match the composed candle ops to float rounding (tests/it/kernels.rs).

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Compiles `body` for AVX-512, AVX2+FMA and baseline x86-64 and dispatches at run time.
/// The body is generic over `const FMA: bool` (true in the AVX-512 and AVX2 builds): pass it to
/// [`madd`] and [`exp_with`] so multiply-adds become single FMA instructions where the CPU has
/// them (Rust never contracts `a * b + c` on its own) and stay plain arithmetic, not a libm
/// call, in the baseline build.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(unused)]
            fn generic<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { generic::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { generic::<true>($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features v3 is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic::<false>($($arg),*)
        }
    };
}

/// `a·b + c`: one fused multiply-add with `FMA` (callers compiled with the `fma` feature), else
/// a multiply and an add.
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `e^x` for f32 with relative error below 2e-7 (Cody–Waite reduction, degree-7 polynomial);
/// branch-free so loops over it vectorise. Inputs are clamped to [-87, 88].
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_with::<false>(x)
}

/// [`exp_f32`] with its multiply-adds fused when `FMA` (about half the instructions; the
/// softmax's exp went from 17% to 11% of an attention call on AVX-512).
#[inline(always)]
fn exp_with<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let f = madd::<FMA>;
    let x = x.clamp(-87.0, 88.0);
    let shifted = f(x, LOG2E, MAGIC);
    let n = shifted - MAGIC;
    let r = f(-n, LN2_LO, f(-n, LN2_HI, x)); // |r| ≤ ln2/2
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = f(p, r, c);
    }
    // The low mantissa bits of `shifted` hold n (two's complement around MAGIC's bit pattern,
    // whose own bits shift out): 2ⁿ without a float→int conversion, which Rust's saturating
    // `as i32` would make scalar.
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127).wrapping_shl(23));
    p * scale
}

/// GELU with the tanh approximation, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
#[inline(always)]
fn gelu_one<const FMA: bool>(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let u = C * x * (1.0 + 0.044_715 * x * x);
    // 0.5·(1 + tanh(u)) = 1 / (1 + e^{−2u}): no cancellation in the negative tail.
    x / (1.0 + exp_with::<FMA>(-2.0 * u))
}

multiversion! {
    fn gelu_slice(src: &[f32], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = gelu_one::<FMA>(s);
        }
    }
}

multiversion! {
    /// `dst = g · d/dx GELU-tanh(x)`, with tanh from the same vectorised exp.
    fn gelu_grad_slice(x: &[f32], g: &[f32], dst: &mut [f32]) {
        const C: f32 = 0.797_884_6;
        const A: f32 = 0.044_715;
        for ((d, &v), &gv) in dst.iter_mut().zip(x).zip(g) {
            let u = C * v * (1.0 + A * v * v);
            // σ = 0.5·(1 + tanh u) = 1/(1 + e^{−2u}); 1 − tanh² = 4σ(1 − σ).
            let sig = 1.0 / (1.0 + exp_with::<FMA>(-2.0 * u));
            let deriv = sig + v * 2.0 * sig * (1.0 - sig) * C * (1.0 + 3.0 * A * v * v);
            *d = gv * deriv;
        }
    }
}

multiversion! {
    /// Sum of a row (16 lanes, so it vectorises).
    fn row_sums(x: &[f32]) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for &v in chunks.remainder() {
            s += v;
        }
        s
    }
}

multiversion! {
    /// Sum of squared deviations from `mean`.
    fn row_sq_dev(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                let d = c[i] - mean;
                acc[i] += d * d;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for &v in chunks.remainder() {
            s += (v - mean) * (v - mean);
        }
        s
    }
}

multiversion! {
    /// `out = (x − mean)/std·mul + add`.
    fn norm_row(x: &[f32], mean: f32, std: f32, mul: &[f32], add: Option<&[f32]>, out: &mut [f32]) {
        match add {
            Some(a) => {
                for (((o, &xv), &mv), &av) in out.iter_mut().zip(x).zip(mul).zip(a) {
                    *o = ((xv - mean) / std) * mv + av;
                }
            }
            None => {
                for ((o, &xv), &mv) in out.iter_mut().zip(x).zip(mul) {
                    *o = ((xv - mean) / std) * mv;
                }
            }
        }
    }
}

multiversion! {
    /// `out = x + a·gate`.
    fn gated_row(x: &[f32], a: &[f32], gate: &[f32], out: &mut [f32]) {
        for (((o, &xv), &av), &gv) in out.iter_mut().zip(x).zip(a).zip(gate) {
            *o = xv + av * gv;
        }
    }
}

multiversion! {
    /// Row maximum (NaN-free input). Four independent 16-lane accumulators and a plain compare:
    /// `f32::max`'s NaN handling adds a blend per vector and one accumulator chains every
    /// vector on the previous one's latency (measured 7.4% → 5.9% of an attention call; what
    /// is left is reading the score tile from L2).
    fn row_max(x: &[f32]) -> f32 {
        #[inline(always)]
        fn mx(a: f32, b: f32) -> f32 {
            if a > b {
                a
            } else {
                b
            }
        }
        let mut acc = [f32::NEG_INFINITY; 64];
        let mut chunks = x.chunks_exact(64);
        for c in &mut chunks {
            for i in 0..64 {
                acc[i] = mx(acc[i], c[i]);
            }
        }
        let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, mx);
        for &v in chunks.remainder() {
            m = mx(m, v);
        }
        m
    }
}

multiversion! {
    /// Folds the column maxima of `x·scale + bias[key]` over a `[keys, rows]` score tile (row
    /// stride `rows`, one row per key) into `m`: a plain compare per element, vectorised across
    /// the columns (NaN-free input).
    fn col_max(tile: &[f32], rows: usize, scale: f32, bias: Option<&[f32]>, m: &mut [f32]) {
        let m = &mut m[..rows];
        for (j, row) in tile.chunks_exact(rows).enumerate() {
            let bj = bias.map_or(0.0, |b| b[j]);
            for (mv, &x) in m.iter_mut().zip(row) {
                let y = madd::<FMA>(x, scale, bj);
                *mv = if y > *mv { y } else { *mv };
            }
        }
    }
}

/// Keys per partial sum in [`exp_cols`]: the column sums add blocks of this many terms, so
/// their rounding stays near a blocked sum's rather than a 1,280-term running sum's.
const EXP_COLS_BLOCK: usize = 32;

multiversion! {
    /// `x ← e^{x·scale + bias[key] − m[col]}` over a `[keys, rows]` score tile (row stride
    /// `rows`, one row per key), adding each column's sum into `l`; `part` (at least `rows`
    /// long) is scratch for the blocked sums.
    fn exp_cols(
        tile: &mut [f32],
        rows: usize,
        scale: f32,
        bias: Option<&[f32]>,
        m: &[f32],
        l: &mut [f32],
        part: &mut [f32],
    ) {
        let (m, l, part) = (&m[..rows], &mut l[..rows], &mut part[..rows]);
        for (jb, block) in tile.chunks_mut(EXP_COLS_BLOCK * rows).enumerate() {
            part.fill(0.0);
            for (j, row) in block.chunks_exact_mut(rows).enumerate() {
                let bj = bias.map_or(0.0, |b| b[jb * EXP_COLS_BLOCK + j]);
                for ((x, &mv), p) in row.iter_mut().zip(m).zip(part.iter_mut()) {
                    let e = exp_with::<FMA>(madd::<FMA>(*x, scale, bj - mv));
                    *x = e;
                    *p += e;
                }
            }
            for (lv, &p) in l.iter_mut().zip(part.iter()) {
                *lv += p;
            }
        }
    }
}

multiversion! {
    /// `x ← e^{x·scale − m}` in place; returns the row sum.
    fn exp_row(x: &mut [f32], scale: f32, m: f32) -> f32 {
        let mut acc = [0f32; 16];
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            for i in 0..16 {
                let e = exp_with::<FMA>(madd::<FMA>(c[i], scale, -m));
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            *v = exp_with::<FMA>(madd::<FMA>(*v, scale, -m));
            s += *v;
        }
        s
    }
}

multiversion! {
    /// `x ← x·scale + bias` in place; returns the new row maximum.
    fn scale_bias_row(x: &mut [f32], scale: f32, bias: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; 16];
        let mut chunks = x.chunks_exact_mut(16);
        let mut bchunks = bias.chunks_exact(16);
        for (c, b) in (&mut chunks).zip(&mut bchunks) {
            for i in 0..16 {
                c[i] = c[i] * scale + b[i];
                acc[i] = acc[i].max(c[i]);
            }
        }
        let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (v, &b) in chunks.into_remainder().iter_mut().zip(bchunks.remainder()) {
            *v = *v * scale + b;
            m = m.max(*v);
        }
        m
    }
}

multiversion! {
    fn scale_row(x: &mut [f32], a: f32) {
        for v in x.iter_mut() {
            *v *= a;
        }
    }
}

multiversion! {
    /// `y ← gelu_tanh(y + b)` in place (no bias: `gelu_tanh(y)`).
    fn bias_gelu_row(y: &mut [f32], b: Option<&[f32]>) {
        match b {
            Some(b) => {
                for (v, &bv) in y.iter_mut().zip(b) {
                    *v = gelu_one::<FMA>(*v + bv);
                }
            }
            None => {
                for v in y.iter_mut() {
                    *v = gelu_one::<FMA>(*v);
                }
            }
        }
    }
}

multiversion! {
    /// `y ← y + b` in place.
    fn add_bias_row(y: &mut [f32], b: &[f32]) {
        for (v, &bv) in y.iter_mut().zip(b) {
            *v += bv;
        }
    }
}

multiversion! {
    /// `y ← (y / std)·g` in place, then, with tables, interleaved RoPE on each head of
    /// `c.len()·2` values: `(y₀, y₁) ← (y₀c − y₁s, y₀s + y₁c)`.
    fn norm_rope_row(y: &mut [f32], std: f32, g: &[f32], rope: Option<(&[f32], &[f32])>) {
        for (v, &gv) in y.iter_mut().zip(g) {
            *v = (*v / std) * gv;
        }
        if let Some((c, s)) = rope {
            rope_heads(y, c, s);
        }
    }
}

multiversion! {
    /// `y ← x + (y + b)·gate` in place.
    fn bias_gated_row(y: &mut [f32], b: Option<&[f32]>, x: &[f32], gate: &[f32]) {
        match b {
            Some(b) => {
                for (((v, &bv), &xv), &gv) in y.iter_mut().zip(b).zip(x).zip(gate) {
                    *v = xv + (*v + bv) * gv;
                }
            }
            None => {
                for ((v, &xv), &gv) in y.iter_mut().zip(x).zip(gate) {
                    *v = xv + *v * gv;
                }
            }
        }
    }
}

/// Interleaved RoPE in place on each head of `y` (heads of `2·c.len()` values):
/// `(y₀, y₁) ← (y₀c − y₁s, y₀s + y₁c)` for every pair, `c`/`s` the token's tables.
#[inline(always)]
fn rope_heads(y: &mut [f32], c: &[f32], s: &[f32]) {
    for head in y.chunks_exact_mut(2 * c.len()) {
        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
            let (x0, x1) = (pair[0], pair[1]);
            pair[0] = x0 * c[i] - x1 * s[i];
            pair[1] = x0 * s[i] + x1 * c[i];
        }
    }
}

/// An output buffer every element of which the caller overwrites before reading.
fn output_buffer(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and every kernel below writes each element of
    // its output before the buffer is read or handed to candle; skipping the zero fill saves
    // a full memory pass per op.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// The contiguous f32 data behind a tensor's storage guard (`Tensor::storage_and_layout`).
fn cpu_data<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("CPU kernel called on a {:?} tensor", storage.device());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("CPU kernel needs a contiguous tensor, got {:?}", layout);
    };
    Ok(&cpu.as_slice::<f32>()?[start..end])
}

/// Runs `f` on the contiguous f32 data of `t` (which must be a contiguous CPU f32 tensor).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    f(cpu_data(&storage, layout)?)
}

/// Whether the fast kernels apply: CPU, f32, not recording gradients. The kernels return
/// tensors without autograd history, so a training forward pass must run with the
/// differentiable flag set on its own thread ([`super::set_differentiable`]).
pub fn usable(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32 && !super::differentiable()
}

fn prep(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// Checks a per-group operand of `x` `[.., D]`: `[D]` (one group) or `[G, 1, D]` with `G` equal
/// to `x`'s leading dim (x `[G, N, D]`). Returns the number of groups.
pub(crate) fn group_count(x: &Tensor, s: &Tensor, what: &str) -> Result<usize> {
    let d = x.dim(candle_core::D::Minus1)?;
    match s.dims() {
        [sd] if *sd == d => Ok(1),
        [g, 1, sd] if *sd == d && x.rank() == 3 && x.dim(0)? == *g => Ok(*g),
        _ => candle_core::bail!(
            "{what}: operand {:?} is neither [{d}] nor [B, 1, {d}] for input {:?}",
            s.shape(),
            x.shape()
        ),
    }
}

/// Rows per parallel task for rows of length `d`: about 64 KiB of input.
pub(crate) fn rows_per_task(d: usize) -> usize {
    (16384 / d.max(1)).max(1)
}

/// LayerNorm (no affine) of the last dim followed by `·mul + add`, where `mul`/`add` are per
/// group of rows: `[G, 1, D]` with `x` `[G, N, D]`, or `[D]`. `add` may be omitted (RMS-style
/// callers). `centre = false` gives RMSNorm (no mean subtraction). Returns `[.., D]` f32.
pub fn norm_affine(
    x: &Tensor,
    mul: &Tensor,
    add: Option<&Tensor>,
    eps: f64,
    centre: bool,
) -> Result<Tensor> {
    let x = prep(x)?;
    let mul = prep(mul)?;
    let add = add.map(prep).transpose()?;
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    let groups = group_count(&x, &mul, "norm_affine")?;
    if let Some(a) = &add {
        if a.shape() != mul.shape() {
            candle_core::bail!("norm_affine: add {:?} but mul {:?}", a.shape(), mul.shape());
        }
    }
    if rows == 0 || d == 0 {
        return Ok(x);
    }
    let per_group = rows / groups;
    let mut out = output_buffer(x.elem_count());
    let add_guard = add.as_ref().map(|a| a.storage_and_layout());
    let adds = match &add_guard {
        Some((storage, layout)) => Some(cpu_data(storage, layout)?),
        None => None,
    };
    with_data(&x, |xs| {
        with_data(&mul, |ms| {
            let rpt = rows_per_task(d);
            out.par_chunks_mut(rpt * d)
                .zip(xs.par_chunks(rpt * d))
                .enumerate()
                .for_each(|(ti, (o, xc))| {
                    for (ri, (orow, xrow)) in o.chunks_mut(d).zip(xc.chunks(d)).enumerate() {
                        let g = (ti * rpt + ri) / per_group;
                        let mean = if centre {
                            row_sums(xrow) / d as f32
                        } else {
                            0.0
                        };
                        let var = row_sq_dev(xrow, mean) / d as f32;
                        let std = (var + eps as f32).sqrt();
                        norm_row(
                            xrow,
                            mean,
                            std,
                            &ms[g * d..(g + 1) * d],
                            adds.map(|a| &a[g * d..(g + 1) * d]),
                            orow,
                        );
                    }
                });
            Ok(())
        })
    })?;
    drop(add_guard);
    Tensor::from_vec(out, x.shape(), x.device())
}

/// `x + a·gate` with `x`, `a` `[G, N, D]` and `gate` `[G, 1, D]`, f32.
pub fn gated_residual(x: &Tensor, a: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (x, a, gate) = (prep(x)?, prep(a)?, prep(gate)?);
    let d = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / d.max(1);
    if x.shape() != a.shape() {
        candle_core::bail!("gated_residual: shapes {:?} and {:?}", x.shape(), a.shape());
    }
    let groups = group_count(&x, &gate, "gated_residual")?;
    if rows == 0 || d == 0 {
        return Ok(x);
    }
    let per_group = rows / groups;
    let mut out = output_buffer(x.elem_count());
    with_data(&x, |xs| {
        with_data(&a, |as_| {
            with_data(&gate, |gs| {
                let rpt = rows_per_task(d);
                out.par_chunks_mut(rpt * d)
                    .zip(xs.par_chunks(rpt * d).zip(as_.par_chunks(rpt * d)))
                    .enumerate()
                    .for_each(|(ti, (o, (xc, ac)))| {
                        for (ri, ((orow, xrow), arow)) in o
                            .chunks_mut(d)
                            .zip(xc.chunks(d))
                            .zip(ac.chunks(d))
                            .enumerate()
                        {
                            let g = (ti * rpt + ri) / per_group;
                            gated_row(xrow, arow, &gs[g * d..(g + 1) * d], orow);
                        }
                    });
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// GELU-tanh of an f32 tensor, vectorised and parallel.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let x = prep(x)?;
    let mut out = output_buffer(x.elem_count());
    with_data(&x, |xs| {
        out.par_chunks_mut(16384)
            .zip(xs.par_chunks(16384))
            .for_each(|(o, s)| gelu_slice(s, o));
        Ok(())
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// `softmax(x·scale)` over the last dim of an f32 tensor (finite input), vectorised and
/// parallel over rows: the training attention's probabilities (candle's softmax calls the
/// scalar `expf` per element: 5% of a DiT training step).
pub fn softmax_scaled(x: &Tensor, scale: f32) -> Result<Tensor> {
    let x = prep(x)?;
    let d = x.dim(candle_core::D::Minus1)?;
    let mut out = x.flatten_all()?.to_vec1::<f32>()?;
    let rows = rows_per_task(d) * d;
    out.par_chunks_mut(rows).for_each(|block| {
        for row in block.chunks_mut(d) {
            softmax_row(row, scale, None);
        }
    });
    Tensor::from_vec(out, x.shape(), x.device())
}

/// `row ← softmax(row·scale + bias)` in place (finite input).
fn softmax_row(row: &mut [f32], scale: f32, bias: Option<&[f32]>) {
    let sum = match bias {
        Some(b) => {
            let m = scale_bias_row(row, scale, b);
            exp_row(row, 1.0, m)
        }
        None => {
            let m = row_max(row) * scale;
            exp_row(row, scale, m)
        }
    };
    scale_row(row, 1.0 / sum);
}

/// Gradient of GELU-tanh: `g · gelu'(x)` for f32 tensors of one shape (training backward).
pub fn gelu_tanh_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (x, g) = (prep(x)?, prep(g)?);
    if x.dims() != g.dims() {
        candle_core::bail!("gelu_tanh_grad: x {:?} but grad {:?}", x.shape(), g.shape());
    }
    let mut out = output_buffer(x.elem_count());
    with_data(&x, |xs| {
        with_data(&g, |gs| {
            out.par_chunks_mut(16384)
                .zip(xs.par_chunks(16384).zip(gs.par_chunks(16384)))
                .for_each(|(o, (xc, gc))| gelu_grad_slice(xc, gc, o));
            Ok(())
        })
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// Interleaved RoPE on `x` `[B, N, H·Dh]` (heads interleaved in the last dim, as the Linear
/// produces them), with `cos`/`sin` `[N, Dh/2]`. Same numbers as `rope_i` on `[B, H, N, Dh]`.
pub fn rope_bnhd(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (x, cos, sin) = (prep(x)?, prep(cos)?, prep(sin)?);
    let (_, n, d) = x.dims3()?;
    let hd = d / heads;
    if !d.is_multiple_of(heads)
        || !hd.is_multiple_of(2)
        || cos.dims() != [n, hd / 2]
        || sin.dims() != [n, hd / 2]
    {
        candle_core::bail!(
            "rope_bnhd: tables {:?}/{:?} for {n} tokens of head dim {hd}",
            cos.shape(),
            sin.shape()
        );
    }
    let mut out = output_buffer(x.elem_count());
    with_data(&x, |xs| {
        with_data(&cos, |cs| {
            with_data(&sin, |ss| {
                out.par_chunks_mut(d)
                    .zip(xs.par_chunks(d))
                    .enumerate()
                    .for_each(|(row, (o, xr))| {
                        let t = row % n;
                        o.copy_from_slice(xr);
                        rope_heads(
                            o,
                            &cs[t * hd / 2..(t + 1) * hd / 2],
                            &ss[t * hd / 2..(t + 1) * hd / 2],
                        );
                    });
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

/// `dst = lhs·rhs` (`accumulate`: `dst += lhs·rhs`) for row-major operands: `lhs` `m×k` at row
/// stride `lhs_rs`, `rhs` `k×n` at row stride `rhs_rs`, `dst` `m×n` at row stride `dst_rs`.
///
/// # Safety
/// Each pointer must address its whole operand at its stride, and `dst` must not overlap the
/// inputs.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller (column strides 1).
    unsafe {
        gemm_strided(
            (m, n, k),
            (dst, dst_rs, 1),
            accumulate,
            (lhs, lhs_rs, 1),
            (rhs, rhs_rs, 1),
            parallelism,
        )
    }
}

/// `dst = a·bᵀ` on the calling thread, for row-major `a` `m×k` (row stride `a_rs`), `b` `n×k`
/// (row stride `b_rs`) and `dst` `m×n` (row stride `dst_rs`): attention scores `q·kᵀ`.
///
/// # Safety
/// As [`gemm_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_abt(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: *const f32,
    a_rs: usize,
    b: *const f32,
    b_rs: usize,
) {
    // SAFETY: forwarded from the caller; bᵀ is b read with its strides swapped.
    unsafe {
        gemm_strided(
            (m, n, k),
            (dst, dst_rs, 1),
            false,
            (a, a_rs, 1),
            (b, 1, b_rs),
            gemm::Parallelism::None,
        )
    }
}

/// `dst = lhs·rhs` (`accumulate`: `dst += lhs·rhs`) for operands at any strides: `(m, n, k)`,
/// then `(pointer, row stride, column stride)` for `dst` `m×n`, `lhs` `m×k` and `rhs` `k×n`.
/// The one call into the `gemm` crate; [`gemm_rows`] and [`gemm_abt`] are its row-major cases.
///
/// # Safety
/// Each pointer must address its whole operand at its strides, and `dst` must not overlap the
/// inputs.
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, usize, usize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller (alpha is ignored unless reading dst).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `out ← residual + bias` row by row (rows of `n`), in parallel; leaves `out` untouched and
/// returns false when there is neither. The pre-fill a GEMM then accumulates into.
fn prefill_rows(out: &mut [f32], n: usize, bias: Option<&[f32]>, residual: Option<&[f32]>) -> bool {
    if bias.is_none() && residual.is_none() {
        return false;
    }
    let rpt = rows_per_task(n);
    out.par_chunks_mut(rpt * n)
        .enumerate()
        .for_each(|(ti, rows)| {
            let r0 = ti * rpt;
            for (i, row) in rows.chunks_mut(n).enumerate() {
                match (residual, bias) {
                    (Some(rs), Some(b)) => {
                        for ((o, &r), &bv) in row.iter_mut().zip(&rs[(r0 + i) * n..]).zip(b) {
                            *o = r + bv;
                        }
                    }
                    (Some(rs), None) => row.copy_from_slice(&rs[(r0 + i) * n..(r0 + i + 1) * n]),
                    (None, Some(b)) => row.copy_from_slice(b),
                    (None, None) => {}
                }
            }
        });
    true
}

/// Query rows per attention task.
const ATT_BQ: usize = 256;
/// Most key rows per online-softmax step; the keys are cut into equal steps of at most this
/// many (1,280 keys: one step, not 1,024 + a 256-key remainder that costs a rescale pass and a
/// narrow GEMM: measured 30.0 → 29.2 ms at b2 h8 d64 1,280 tokens, interleaved runs).
const ATT_BK: usize = 1280;

/// Attention on the `[B, N, H·Dh]` layout: `q` `[B, Nq, H·Dh]`, `k`/`v` `[B, Nk, H·Dh]`,
/// `key_bias` an optional `[B, Nk]` f32 term added to every head's scaled scores (the log
/// multiplicity of merged duplicate keys, see `models::wan::dit::merge_repeated_keys`);
/// returns `[B, Nq, H·Dh]`. Each task takes 256 query rows of one head; scores for one key
/// step (the keys cut into equal steps of at most 1,280) come from one GEMM into a thread-local
/// tile (at most 1.25 MiB; tile shapes 64–512 × 256–2,048 all measured within noise of each
/// other at n = 2,048), stored transposed (`Sᵀ`, one row per key), an online softmax updates
/// them in place down the columns, and a second GEMM accumulates `P·V`, reading the tile as a
/// column-major `P`. Memory is O(tile), whatever N.
pub fn attention_bnhd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    key_bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (q, k, v) = (prep(q)?, prep(k)?, prep(v)?);
    let (b, nq, d) = q.dims3()?;
    let (bk, nk, dk) = k.dims3()?;
    if let Some(kb) = key_bias.filter(|kb| kb.dims() != [b, nk]) {
        candle_core::bail!(
            "attention_bnhd: key bias {:?} for keys {:?}",
            kb.shape(),
            k.shape()
        );
    }
    // `[B·Nk]`, a few values per key: read once.
    let key_bias: Option<Vec<f32>> = key_bias
        .map(|kb| prep(kb)?.flatten_all()?.to_vec1())
        .transpose()?;
    if bk != b || dk != d || v.dims() != k.dims() || d % heads != 0 {
        candle_core::bail!(
            "attention_bnhd: q {:?}, k {:?}, v {:?}, {heads} heads",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    let hd = d / heads;
    // Each head's keys and values as dense [Nk, Dh] blocks: in the [B, N, H·Dh] layout a
    // head's rows sit a power-of-two stride apart, which maps them onto a few L1 sets.
    // (Measured: 8% faster at 1280 and 2048 tokens, head dim 64.) Costs as much memory as K
    // and V.
    let mut kpk = output_buffer(b * heads * nk * hd);
    let mut vpk = output_buffer(b * heads * nk * hd);
    with_data(&k, |ks| {
        with_data(&v, |vs| {
            kpk.par_chunks_mut(nk * hd)
                .zip(vpk.par_chunks_mut(nk * hd))
                .enumerate()
                .for_each(|(i, (kd, vd))| {
                    let base = (i / heads) * nk * d + (i % heads) * hd;
                    for c in 0..nk {
                        let src = base + c * d..base + c * d + hd;
                        kd[c * hd..(c + 1) * hd].copy_from_slice(&ks[src.clone()]);
                        vd[c * hd..(c + 1) * hd].copy_from_slice(&vs[src]);
                    }
                });
            Ok(())
        })
    })?;
    let qblocks = nq.div_ceil(ATT_BQ);
    let kstep = nk.div_ceil(nk.div_ceil(ATT_BK).max(1)).max(1);
    let tasks = b * heads * qblocks;
    let scale = scale as f32;
    let mut out = output_buffer(q.elem_count());
    let out_ptr = SendPtr(out.as_mut_ptr());
    with_data(&q, |qs| {
        (0..tasks).into_par_iter().for_each_init(
            || {
                (
                    vec![0f32; ATT_BQ * kstep],
                    vec![0f32; ATT_BQ * hd],
                    vec![0f32; 4 * ATT_BQ],
                )
            },
            |(s, acc, st), task| {
                let qb = task % qblocks;
                let h = (task / qblocks) % heads;
                let bi = task / (qblocks * heads);
                let q0 = qb * ATT_BQ;
                let rows = ATT_BQ.min(nq - q0);
                let (m, rest) = st.split_at_mut(ATT_BQ);
                let (l, rest) = rest.split_at_mut(ATT_BQ);
                let (m_new, part) = rest.split_at_mut(ATT_BQ);
                m[..rows].fill(f32::NEG_INFINITY);
                l[..rows].fill(0.0);
                acc[..rows * hd].fill(0.0);
                let qp = qs[bi * nq * d + q0 * d + h * hd..].as_ptr();
                let mut k0 = 0;
                while k0 < nk {
                    let cols = kstep.min(nk - k0);
                    let o = (bi * heads + h) * nk * hd + k0 * hd;
                    let (kp, vp) = (kpk[o..].as_ptr(), vpk[o..].as_ptr());
                    let tile = &mut s[..cols * rows];
                    // Sᵀ[cols, rows] = K[cols, hd] · Q[rows, hd]ᵀ, keys down the tile: the GEMM
                    // then packs only the query block, not the keys, and the softmax runs down
                    // columns, vectorised across queries.
                    // SAFETY: pointers and strides stay inside q/k and the tile.
                    unsafe {
                        gemm_strided(
                            (cols, rows, hd),
                            (tile.as_mut_ptr(), rows, 1),
                            false,
                            (kp, hd, 1),
                            (qp, 1, d),
                            gemm::Parallelism::None,
                        )
                    };
                    let kb = key_bias
                        .as_deref()
                        .map(|kb| &kb[bi * nk + k0..bi * nk + k0 + cols]);
                    // Online softmax: fold this step's column maxima in, rescale what came
                    // before.
                    m_new[..rows].copy_from_slice(&m[..rows]);
                    col_max(tile, rows, scale, kb, m_new);
                    for r in 0..rows {
                        let alpha = exp_f32(m[r] - m_new[r]);
                        l[r] *= alpha;
                        m[r] = m_new[r];
                        if alpha != 1.0 {
                            scale_row(&mut acc[r * hd..(r + 1) * hd], alpha);
                        }
                    }
                    exp_cols(tile, rows, scale, kb, m, l, part);
                    // acc[rows, hd] += P[rows, cols] · V[cols, hd], P = the tile read
                    // transposed.
                    // SAFETY: as above.
                    unsafe {
                        gemm_strided(
                            (rows, hd, cols),
                            (acc.as_mut_ptr(), hd, 1),
                            true,
                            (tile.as_ptr(), 1, rows),
                            (vp, hd, 1),
                            gemm::Parallelism::None,
                        )
                    };
                    k0 += cols;
                }
                for r in 0..rows {
                    let inv = 1.0 / l[r];
                    let base = bi * nq * d + (q0 + r) * d + h * hd;
                    for j in 0..hd {
                        // SAFETY: each (b, row, head) slot is written by exactly one task.
                        unsafe { *out_ptr.get().add(base + j) = acc[r * hd + j] * inv };
                    }
                }
            },
        );
        Ok(())
    })?;
    Tensor::from_vec(out, q.shape(), q.device())
}

/// Whether [`attention_out_folded`] costs less than attention followed by its output
/// projection, for `heads` heads of a `d`-wide model attending to `keys` keys with a `d_out`
/// projection: per query row the folded form multiplies `heads·keys` probabilities into
/// `d_out` columns, the plain one `keys` per head into the values and then `d` into `d_out`.
pub fn folding_pays(heads: usize, keys: usize, d: usize) -> bool {
    heads * keys < d + keys
}

/// Attention with its output projection folded into the values: `residual + bias +
/// (softmax(q·kᵀ·scale + key_bias)·v)·Wᵀ` per head, computed as `P·(V·Wᵀ)`, where `P`
/// `[N, H·L]` holds every head's probabilities side by side and `V·Wᵀ` `[H·L, D_out]` each
/// head's values through its slice of the projection (`wt` = `Wᵀ` `[H·Dh, D_out]`). The same
/// sum reassociated: exact up to float rounding. For cross-attention to a short text (the
/// Wan DiT's prompt after [`merge`](crate::models::wan::dit::merge_repeated_keys) of its
/// padding: L ≈ 10–50 keys) `H·L` is far below `D`, so the `N·D·D_out` output projection
/// becomes an `N·H·L·D_out` product (see [`folding_pays`]).
///
/// `q` `[B, N, H·Dh]`, `k`/`v` `[B, L, H·Dh]`, `key_bias` `[B, L]`, `bias` `[D_out]`,
/// `residual` `[B, N, D_out]`; returns `[B, N, D_out]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_out_folded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    key_bias: Option<&Tensor>,
    wt: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> Result<Tensor> {
    let (q, k, v, wt, residual) = (prep(q)?, prep(k)?, prep(v)?, prep(wt)?, prep(residual)?);
    let (b, nq, d) = q.dims3()?;
    let (bk, l, dk) = k.dims3()?;
    let (wd, dout) = wt.dims2()?;
    if bk != b
        || dk != d
        || l == 0
        || v.dims() != k.dims()
        || heads == 0
        || d % heads != 0
        || wd != d
    {
        candle_core::bail!(
            "attention_out_folded: q {:?}, k {:?}, v {:?}, {heads} heads, projection {:?}",
            q.shape(),
            k.shape(),
            v.shape(),
            wt.shape()
        );
    }
    if residual.dims() != [b, nq, dout] {
        candle_core::bail!(
            "attention_out_folded: residual {:?} for output [{b}, {nq}, {dout}]",
            residual.shape()
        );
    }
    let key_bias: Option<Vec<f32>> = match key_bias {
        Some(kb) if kb.dims() != [b, l] => candle_core::bail!(
            "attention_out_folded: key bias {:?} for keys {:?}",
            kb.shape(),
            k.shape()
        ),
        Some(kb) => Some(prep(kb)?.flatten_all()?.to_vec1()?),
        None => None,
    };
    let bias: Option<Vec<f32>> = bias.map(|t| prep(t)?.to_vec1()).transpose()?;
    if bias.as_ref().is_some_and(|bv| bv.len() != dout) {
        candle_core::bail!(
            "attention_out_folded: bias of {} for {dout} outputs",
            bias.map_or(0, |bv| bv.len())
        );
    }
    let hd = d / heads;
    let hl = heads * l;
    let scale = scale as f32;
    // V·Wᵀ per (item, head): [B, H·L, D_out], rows (h, key).
    let mut vw = output_buffer(b * hl * dout);
    with_data(&v, |vs| {
        with_data(&wt, |ws| {
            vw.par_chunks_mut(l * dout)
                .enumerate()
                .for_each(|(i, dst)| {
                    let (bi, h) = (i / heads, i % heads);
                    // SAFETY: V's head block is l×hd at row stride d, Wᵀ's rows h·hd.. are hd×dout
                    // row-major, dst is l×dout row-major.
                    unsafe {
                        gemm_rows(
                            l,
                            dout,
                            hd,
                            dst.as_mut_ptr(),
                            dout,
                            vs[bi * l * d + h * hd..].as_ptr(),
                            d,
                            ws[h * hd * dout..].as_ptr(),
                            dout,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                });
            Ok(())
        })
    })?;
    // P: [B, N, H·L], every head's probabilities for a query row side by side.
    let mut p = output_buffer(b * nq * hl);
    let rows_per = (ATT_BQ / 4).max(1);
    let blocks = nq.div_ceil(rows_per);
    with_data(&q, |qs| {
        with_data(&k, |ks| {
            // Tasks are (item, block of query rows), so no block straddles two items.
            let pp = SendPtr(p.as_mut_ptr());
            (0..b * blocks).into_par_iter().for_each(|task| {
                let (bi, blk) = (task / blocks, task % blocks);
                let r0 = blk * rows_per;
                let rows = rows_per.min(nq - r0);
                // SAFETY: this task owns rows r0..r0+rows of item bi in P.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(pp.get().add((bi * nq + r0) * hl), rows * hl)
                };
                for h in 0..heads {
                    // S[rows, L] = Q_h · K_hᵀ into columns h·L.. of P (row stride H·L).
                    // SAFETY: strides stay inside q, k and this task's rows of P.
                    unsafe {
                        gemm_abt(
                            rows,
                            l,
                            hd,
                            dst[h * l..].as_mut_ptr(),
                            hl,
                            qs[(bi * nq + r0) * d + h * hd..].as_ptr(),
                            d,
                            ks[bi * l * d + h * hd..].as_ptr(),
                            d,
                        );
                    }
                }
                let kb = key_bias.as_deref().map(|kb| &kb[bi * l..(bi + 1) * l]);
                for seg in dst.chunks_exact_mut(l) {
                    softmax_row(seg, scale, kb);
                }
            });
            Ok(())
        })
    })?;
    // out = residual + bias + P·(V·Wᵀ), one GEMM per item accumulating into the pre-filled rows.
    let mut out = output_buffer(b * nq * dout);
    with_data(&residual, |rs| {
        prefill_rows(&mut out, dout, bias.as_deref(), Some(rs));
        Ok(())
    })?;
    for bi in 0..b {
        // SAFETY: item bi's P is nq×hl, its V·Wᵀ hl×dout, its output rows nq×dout, row-major.
        unsafe {
            gemm_rows(
                nq,
                dout,
                hl,
                out[bi * nq * dout..].as_mut_ptr(),
                dout,
                p[bi * nq * hl..].as_ptr(),
                hl,
                vw[bi * hl * dout..].as_ptr(),
                dout,
                true,
                gemm::Parallelism::Rayon(0),
            );
        }
    }
    Tensor::from_vec(out, (b, nq, dout), q.device())
}

/// Tasks per partial sum in [`ordered_sum`].
const SUM_CHUNK: usize = 8;

/// `Σ_task f(task)` over `0..tasks` for vectors of length `len`, in parallel but with a fixed
/// summation order: tasks are grouped into chunks of [`SUM_CHUNK`] in order, each chunk sums its
/// tasks in order into a fresh vector (`f` adds into the vector it is given, with per-chunk
/// scratch `S`), and the chunk sums are added in order. So the result does not depend on the
/// thread count or on work stealing (a rayon fold/reduce would make training runs differ in
/// the last bits from run to run).
fn ordered_sum<S>(
    tasks: usize,
    len: usize,
    scratch: impl Fn() -> S + Sync,
    f: impl Fn(&mut [f32], &mut S, usize) + Sync,
) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = (0..tasks.div_ceil(SUM_CHUNK))
        .into_par_iter()
        .map(|ci| {
            let mut acc = vec![0f32; len];
            let mut s = scratch();
            for task in ci * SUM_CHUNK..((ci + 1) * SUM_CHUNK).min(tasks) {
                f(&mut acc, &mut s, task);
            }
            acc
        })
        .collect();
    let mut sum = vec![0f32; len];
    for p in &partial {
        for (x, y) in sum.iter_mut().zip(p) {
            *x += y;
        }
    }
    sum
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint slots (see attention_bnhd, conv3d_shifted_gemm and
// channel_rms_grad).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Output rows per band for [`conv3d_shifted_gemm`]: up to ~2,048 columns, a band's output
/// block plus its input rows within ~512 KiB (L2), at least four tasks per thread over the
/// whole call when that leaves bands of ~512 columns or more, and never under ~512 columns
/// (or the whole frame). Measured: on the side-by-side VAE at 256×256, cache budgets of 0.4 /
/// 0.5 / 0.75 / 1 / 2 MiB gave 4.5 / 4.4–4.6 / 4.7 / 4.9–5.0 / 5.5 s of conv time in one decode
/// (the 32-channel 256² layers: 225 GFLOP/s with 3-row bands, 175 with 7); without the
/// 512-column floor, wide layers got 2-row bands of 68 columns (384→384 at 32², four frames:
/// 147 ms against 104 ms with it and 108 ms frame-wide).
fn band_rows(o: usize, ktc: usize, ho: usize, wp: usize, frames: usize) -> usize {
    let per_row = (o + ktc) * wp * 4;
    let by_cache = ((512 << 10) / per_row.max(1)).max(1);
    let by_cols = 2048usize.div_ceil(wp);
    let at_least = 512usize.div_ceil(wp);
    let mut rows = by_cols.min(by_cache).clamp(1, ho);
    let tasks = 4 * rayon::current_num_threads();
    // Halved for more tasks, but not below the column floor: a one-frame call at 32² (the
    // decoder's low-resolution layers) with 4-row bands of 136 columns took 30.8 ms
    // (384→384), with 16-row bands (one per thread) 26.1.
    while rows > at_least && frames * ho.div_ceil(rows) < tasks {
        rows = rows.div_ceil(2);
    }
    rows.max(at_least).min(ho)
}

/// An input laid out as zero-padded planes `[B, T, C, Hp, Wp]` (zero frames first), plus `Wp`
/// elements of zero slack: the last tap of the last row reads up to `kw − 1` elements past the
/// final plane (into columns that are dropped, or multiplied by zero).
struct Planes {
    data: Vec<f32>,
    /// `(B, C, T, H, W)`: `T` counts the zero frames; `H`, `W` are unpadded.
    dims: (usize, usize, usize, usize, usize),
    device: Device,
}

/// Lays out `zero_front` zero frames followed by the frames of `parts` (each `[B, C, Ti, H, W]`)
/// as [`Planes`] with spatial zero padding `(ph, pw)`.
fn padded_planes(
    parts: &[&Tensor],
    zero_front: usize,
    ph: usize,
    pw: usize,
    what: &str,
) -> Result<Planes> {
    let parts: Vec<Tensor> = parts.iter().map(|p| prep(p)).collect::<Result<_>>()?;
    let Some(first) = parts.first() else {
        candle_core::bail!("{what}: no input frames");
    };
    let (b, c, _, h, wd) = first.dims5()?;
    for p in &parts {
        let (pb, pc, _, ph_, pw_) = p.dims5()?;
        if (pb, pc, ph_, pw_) != (b, c, h, wd) {
            candle_core::bail!(
                "{what}: frame parts {:?} and {:?} differ",
                first.shape(),
                p.shape()
            );
        }
    }
    if b == 0 || c == 0 || h == 0 || wd == 0 {
        candle_core::bail!("{what}: empty input {:?}", first.shape());
    }
    let t = zero_front + parts.iter().map(|p| p.dim(2).unwrap_or(0)).sum::<usize>();
    let (hp, wp) = (h + 2 * ph, wd + 2 * pw);
    let plane = hp * wp;
    // Every plane is written exactly once (interior copied, padding border zeroed; zero frames
    // zeroed whole), so the buffer needs no zero fill of its own.
    let mut xp = output_buffer(b * t * c * plane + wp);
    xp[b * t * c * plane..].fill(0.0);
    // Which input part (and frame within it) feeds each of the t frames.
    let mut source: Vec<Option<(usize, usize)>> = vec![None; zero_front];
    for (pi, part) in parts.iter().enumerate() {
        source.extend((0..part.dim(2)?).map(|f| Some((pi, f))));
    }
    let guards: Vec<_> = parts.iter().map(|p| p.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| cpu_data(storage, layout))
        .collect::<Result<Vec<&[f32]>>>()?;
    let part_t: Vec<usize> = parts.iter().map(|p| p.dim(2).unwrap_or(0)).collect();
    xp[..b * t * c * plane]
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, dst)| {
            let ci = i % c;
            let ti = (i / c) % t;
            let bi = i / (c * t);
            let Some((pi, f)) = source[ti] else {
                dst.fill(0.0);
                return;
            };
            let tp = part_t[pi];
            let src = &slices[pi][((bi * c + ci) * tp + f) * h * wd..][..h * wd];
            dst[..ph * wp].fill(0.0);
            dst[(ph + h) * wp..].fill(0.0);
            for y in 0..h {
                let row = &mut dst[(y + ph) * wp..(y + ph + 1) * wp];
                row[..pw].fill(0.0);
                row[pw..pw + wd].copy_from_slice(&src[y * wd..(y + 1) * wd]);
                row[pw + wd..].fill(0.0);
            }
        });
    drop(slices);
    drop(guards);
    Ok(Planes {
        data: xp,
        dims: (b, c, t, h, wd),
        device: first.device().clone(),
    })
}

/// The weight gradient of [`conv3d_shifted_gemm`] at stride 1: given its input (`parts` after
/// `zero_front` zero frames, spatial padding `(ph, pw)`) and the output gradient `g`
/// `[B, O, T', H', W']`, returns `∂L/∂W` `[O, C, kt, kh, kw]` (PyTorch layout). Each spatial tap's
/// `[O, kt·C]` block is a sum over output-row bands of `G_band [O, rows·Wp] · X_tapᵀ`, with `G`
/// laid out on the padded width (its `Wp − W'` extra columns zero) and `X_tap` the same shifted
/// view of the padded planes the forward pass multiplies; bands run in parallel, summed in a
/// fixed order ([`ordered_sum`]).
#[allow(clippy::too_many_arguments)]
pub fn conv3d_weight_grad(
    parts: &[&Tensor],
    zero_front: usize,
    g: &Tensor,
    kt: usize,
    kh: usize,
    kw: usize,
    ph: usize,
    pw: usize,
) -> Result<Tensor> {
    let what = "conv3d_weight_grad";
    let Planes {
        data: xp,
        dims: (b, c, t, h, wd),
        device,
    } = padded_planes(parts, zero_front, ph, pw, what)?;
    let g = prep(g)?;
    let (gb, o, t_out, ho, wo) = g.dims5()?;
    let (hp, wp) = (h + 2 * ph, wd + 2 * pw);
    if gb != b
        || t < kt
        || hp < kh
        || wp < kw
        || (t_out, ho, wo) != (t - kt + 1, hp - kh + 1, wp - kw + 1)
    {
        candle_core::bail!(
            "{what}: gradient {:?} does not fit input [{b}, {c}, {t}, {h}, {wd}] (padded frames) \
             with kernel {kt}×{kh}×{kw} and padding ({ph}, {pw})",
            g.shape()
        );
    }
    let plane = hp * wp;
    let ktc = kt * c;
    let taps = kh * kw;
    let rows = band_rows(o, ktc, ho, wp, b * t_out);
    let bands = ho.div_ceil(rows);
    let sum = with_data(&g, |gs| {
        Ok(ordered_sum(
            b * t_out * bands,
            taps * o * ktc,
            || vec![0f32; o * rows * wp],
            |acc, gbuf, task| {
                let (frame, band) = (task / bands, task % bands);
                let (bi, j) = (frame / t_out, frame % t_out);
                let y0 = band * rows;
                let nr = rows.min(ho - y0);
                let n = nr * wp;
                for oi in 0..o {
                    let src = &gs[((bi * o + oi) * t_out + j) * ho * wo + y0 * wo..];
                    for y in 0..nr {
                        let row = &mut gbuf[oi * n + y * wp..oi * n + (y + 1) * wp];
                        row[..wo].copy_from_slice(&src[y * wo..(y + 1) * wo]);
                        row[wo..].fill(0.0);
                    }
                }
                let frame0 = (bi * t + j) * c * plane + y0 * wp;
                for ty in 0..kh {
                    for tx in 0..kw {
                        let tap = ty * kw + tx;
                        // acc_tap[O, kt·C] += G[O, n] · X_tap[kt·C, n]ᵀ
                        // SAFETY: gbuf holds o·n elements at row stride n; X_tap's kt·C
                        // columns are planes from the band's first row shifted by the tap,
                        // n elements each, inside xp plus its slack (as in the forward
                        // kernel); acc_tap holds o·ktc elements.
                        unsafe {
                            gemm_strided(
                                (o, ktc, n),
                                (acc[tap * o * ktc..].as_mut_ptr(), ktc, 1),
                                true,
                                (gbuf.as_ptr(), n, 1),
                                (xp[frame0 + ty * wp + tx..].as_ptr(), 1, plane),
                                gemm::Parallelism::None,
                            );
                        }
                    }
                }
            },
        ))
    })?;
    Tensor::from_vec(sum, (kh, kw, o, kt, c), &device)?
        .permute((2, 4, 3, 0, 1))?
        .contiguous()
}

/// Rearranges a PyTorch Conv3d weight `[O, C, kt, kh, kw]` for [`conv3d_shifted_gemm`]:
/// `[kh, kw, O, kt·C]`, so each spatial tap is one contiguous `[O, kt·C]` matrix.
pub fn conv3d_gemm_weight(w: &Tensor) -> Result<Tensor> {
    let (o, c, kt, kh, kw) = w.dims5()?;
    w.to_dtype(DType::F32)?
        .permute((3, 4, 0, 2, 1))?
        .reshape((kh, kw, o, kt * c))?
        .contiguous()
}

/// A 3D convolution with temporal stride `st`, spatial stride 1, no temporal padding (the caller
/// has padded causally) and symmetric spatial zero padding `(ph, pw)`, as shifted GEMMs: the
/// input is laid out once as zero-padded planes `[B, T, C, Hp, Wp]`; an output frame's
/// `[O, H'·Wp]` block is the sum over the `kh·kw` spatial taps of `W_tap [O, kt·C]` times the
/// input planes of its `kt` frames shifted by the tap's offset (a plain strided matrix, because
/// consecutive frames' channel planes are equally spaced). The `Wp − W'` extra columns per row
/// are computed and dropped. No im2col buffer; each GEMM has `K = kt·C`.
///
/// `x`: `[B, C, T, H, W]`, `w`: from [`conv3d_gemm_weight`], `bias`: `[O]`.
/// Returns `[B, O, T', H', W']` with `T' = (T − kt)/st + 1`.
#[allow(clippy::too_many_arguments)]
pub fn conv3d_shifted_gemm(
    parts: &[&Tensor],
    zero_front: usize,
    w: &Tensor,
    bias: Option<&Tensor>,
    kt: usize,
    st: usize,
    ph: usize,
    pw: usize,
) -> Result<Tensor> {
    let Planes {
        data: xp,
        dims: (b, c, t, h, wd),
        device,
    } = padded_planes(parts, zero_front, ph, pw, "conv3d_shifted_gemm")?;
    let (kh, kw, o, ktc) = w.dims4()?;
    if ktc != kt * c || t < kt {
        candle_core::bail!(
            "conv3d_shifted_gemm: input [{b}, {c}, {t}, {h}, {wd}] (padded frames), weight {:?}, kt {kt}",
            w.shape()
        );
    }
    let (hp, wp) = (h + 2 * ph, wd + 2 * pw);
    if hp < kh || wp < kw || st == 0 {
        candle_core::bail!(
            "conv3d_shifted_gemm: padded frame {hp}×{wp} smaller than the kernel {kh}×{kw}"
        );
    }
    let (ho, wo) = (hp - kh + 1, wp - kw + 1);
    let t_out = (t - kt) / st + 1;
    let plane = hp * wp;
    if o == 0 {
        candle_core::bail!(
            "conv3d_shifted_gemm: weight {:?} has no output channels",
            w.shape()
        );
    }
    let bias_v: Option<Vec<f32>> = match bias {
        Some(bt) => Some(bt.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    if bias_v.as_ref().is_some_and(|v| v.len() != o) {
        candle_core::bail!(
            "conv3d_shifted_gemm: bias {:?} for {o} output channels",
            bias.map(|b| b.shape().clone())
        );
    }
    let mut out = output_buffer(b * o * t_out * ho * wo);
    // Work is cut into bands of output rows of one output frame. A band accumulates all
    // kh·kw taps into its own [O, rows·Wp] block while that block and the input rows it
    // reads stay in cache (a whole frame's block per tap streamed through memory nine times,
    // and the large-plane, few-channel layers of a VAE decoder ran at under half the GEMM
    // rate), then crops, adds the bias and writes its rows. Bands run in parallel, each with
    // a single-threaded GEMM.
    let rows = band_rows(o, ktc, ho, wp, b * t_out);
    let bands = ho.div_ceil(rows);
    let w = prep(w)?;
    let out_ptr = SendPtr(out.as_mut_ptr());
    with_data(&w, |ws| {
        (0..b * t_out * bands).into_par_iter().for_each_init(
            || output_buffer(o * rows * wp),
            |dst, task| {
                let (frame, band) = (task / bands, task % bands);
                let (bi, j) = (frame / t_out, frame % t_out);
                let y0 = band * rows;
                let nr = rows.min(ho - y0);
                let n = nr * wp;
                let frame0 = (bi * t + j * st) * c * plane + y0 * wp;
                for ty in 0..kh {
                    for tx in 0..kw {
                        let lhs = ws[(ty * kw + tx) * o * ktc..].as_ptr();
                        let rhs = xp[frame0 + ty * wp + tx..].as_ptr();
                        let first = ty == 0 && tx == 0;
                        // dst[O, n] (+)= W_tap[O, kt·C] · X_tap[kt·C, n]
                        // SAFETY: lhs spans o·ktc elements of the weight; rhs rows are kt·C
                        // planes from the band's first row (inside xp, plus the slack), n
                        // columns each; dst holds o·rows·wp ≥ o·n elements.
                        unsafe {
                            gemm_rows(
                                o,
                                n,
                                ktc,
                                dst.as_mut_ptr(),
                                n,
                                lhs,
                                ktc,
                                rhs,
                                plane,
                                !first,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                }
                // Crop the extra columns, add the bias, write rows y0.. of [B, O, T', H', W'].
                for oi in 0..o {
                    let bv = bias_v.as_ref().map_or(0.0, |v| v[oi]);
                    let base = ((bi * o + oi) * t_out + j) * ho * wo + y0 * wo;
                    for y in 0..nr {
                        let src = &dst[oi * n + y * wp..oi * n + y * wp + wo];
                        // SAFETY: each (b, o, frame, row) of `out` is written by exactly one
                        // task (its band), and `out` outlives the parallel loop.
                        let row = unsafe {
                            std::slice::from_raw_parts_mut(out_ptr.get().add(base + y * wo), wo)
                        };
                        for (dv, sv) in row.iter_mut().zip(src) {
                            *dv = sv + bv;
                        }
                    }
                }
            },
        );
        Ok(())
    })?;
    Tensor::from_vec(out, (b, o, t_out, ho, wo), &device)
}

multiversion! {
    /// `acc[p] += x[p]²`.
    fn add_squares(x: &[f32], acc: &mut [f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v * v;
        }
    }
}

multiversion! {
    /// `ss[p] ← 1 / max(√ss[p], 1e-12)`.
    fn inv_norms(ss: &mut [f32]) {
        for s in ss.iter_mut() {
            *s = 1.0 / s.sqrt().max(1e-12);
        }
    }
}

multiversion! {
    /// `out[p] = x[p]·inv[p]·k`, then SiLU when `silu`.
    fn channel_scale(x: &[f32], inv: &[f32], k: f32, silu: bool, out: &mut [f32]) {
        if silu {
            for ((o, &v), &s) in out.iter_mut().zip(x).zip(inv) {
                let y = v * s * k;
                *o = y / (1.0 + exp_with::<FMA>(-y));
            }
        } else {
            for ((o, &v), &s) in out.iter_mut().zip(x).zip(inv) {
                *o = v * s * k;
            }
        }
    }
}

/// The Wan VAE's channel RMS norm (`F.normalize` over channels, `·√C·γ`) of `[B, C, T, H, W]`,
/// optionally followed by SiLU, in one pass over each frame (candle reduces over dim 1 with a
/// strided loop and needs six more elementwise passes).
pub fn channel_rms_silu(x: &Tensor, gamma: &Tensor, silu: bool) -> Result<Tensor> {
    let x = prep(x)?;
    let (b, c, t, h, w) = x.dims5()?;
    let gamma = prep(gamma)?.flatten_all()?.to_vec1::<f32>()?;
    if gamma.len() != c {
        candle_core::bail!("channel_rms_silu: {} gains for {c} channels", gamma.len());
    }
    let hw = h * w;
    if x.elem_count() == 0 {
        return Ok(x);
    }
    let sqrt_c = (c as f32).sqrt();
    // Tasks: (b, t, block of positions).
    let block = 4096.min(hw);
    let blocks = hw.div_ceil(block);
    let mut out = output_buffer(x.elem_count());
    let out_ptr = SendPtr(out.as_mut_ptr());
    with_data(&x, |xs| {
        (0..b * t * blocks).into_par_iter().for_each_init(
            || vec![0f32; block],
            |ss, task| {
                let pb = task % blocks;
                let ti = (task / blocks) % t;
                let bi = task / (blocks * t);
                let p0 = pb * block;
                let n = block.min(hw - p0);
                let ss = &mut ss[..n];
                ss.fill(0.0);
                let at = |ci: usize| ((bi * c + ci) * t + ti) * hw + p0;
                for ci in 0..c {
                    add_squares(&xs[at(ci)..at(ci) + n], ss);
                }
                inv_norms(ss);
                for (ci, g) in gamma.iter().enumerate() {
                    // SAFETY: each (b, c, t, position block) is written by exactly one task.
                    let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(at(ci)), n) };
                    channel_scale(&xs[at(ci)..at(ci) + n], ss, sqrt_c * g, silu, o);
                }
            },
        );
        Ok(())
    })?;
    Tensor::from_vec(out, x.shape(), x.device())
}

multiversion! {
    /// `dot[p] += h·g[p]·x[p]·inv[p]` and returns `Σ_p g[p]·x[p]·inv[p]`.
    fn add_projection(x: &[f32], g: &[f32], inv: &[f32], h: f32, dot: &mut [f32]) -> f32 {
        let mut sum = 0.0;
        for (((d, &xv), &gv), &iv) in dot.iter_mut().zip(x).zip(g).zip(inv) {
            let gu = gv * xv * iv;
            *d += h * gu;
            sum += gu;
        }
        sum
    }
}

multiversion! {
    /// `out[p] = inv[p]·(h·g[p] − x[p]·inv[p]·dot[p])`.
    fn project_out(x: &[f32], g: &[f32], inv: &[f32], dot: &[f32], h: f32, out: &mut [f32]) {
        for ((((o, &xv), &gv), &iv), &dv) in out.iter_mut().zip(x).zip(g).zip(inv).zip(dot) {
            *o = iv * (h * gv - xv * iv * dv);
        }
    }
}

/// The backward pass of [`channel_rms_silu`] without SiLU, `y = x·√C·γ / max(‖x‖, 1e-12)` with
/// the norm over channels at each position of `[B, C, T, H, W]`: given `g = ∂L/∂y`, returns
/// `∂L/∂x = inv·(h − u·Σ_c h_c u_c)` (`u = x·inv`, `h = √C·γ·g`) and `∂L/∂γ = √C·Σ g·u`
/// (`[C]`), in one pass over each block of positions; where the norm is under 1e-12 the clamp
/// makes it a constant, so `∂L/∂x = inv·h` there. The `γ` sums run in a fixed order
/// ([`ordered_sum`]).
pub fn channel_rms_grad(x: &Tensor, gamma: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = prep(x)?;
    let g = prep(g)?;
    let (b, c, t, h, w) = x.dims5()?;
    if g.dims() != x.dims() {
        candle_core::bail!(
            "channel_rms_grad: gradient {:?} for input {:?}",
            g.shape(),
            x.shape()
        );
    }
    let gamma_v = prep(gamma)?.flatten_all()?.to_vec1::<f32>()?;
    if gamma_v.len() != c {
        candle_core::bail!("channel_rms_grad: {} gains for {c} channels", gamma_v.len());
    }
    let hw = h * w;
    let sqrt_c = (c as f32).sqrt();
    let block = 4096.min(hw.max(1));
    let blocks = hw.div_ceil(block);
    let mut gx = output_buffer(x.elem_count());
    let gx_ptr = SendPtr(gx.as_mut_ptr());
    let gg = with_data(&x, |xs| {
        with_data(&g, |gs| {
            Ok(ordered_sum(
                b * t * blocks,
                c,
                || (vec![0f32; block], vec![0f32; block]),
                |gg, (inv, dot), task| {
                    let pb = task % blocks;
                    let ti = (task / blocks) % t;
                    let bi = task / (blocks * t);
                    let p0 = pb * block;
                    let n = block.min(hw - p0);
                    let at = |ci: usize| ((bi * c + ci) * t + ti) * hw + p0;
                    let (inv, dot) = (&mut inv[..n], &mut dot[..n]);
                    inv.fill(0.0);
                    dot.fill(0.0);
                    for ci in 0..c {
                        add_squares(&xs[at(ci)..at(ci) + n], inv);
                    }
                    inv_norms(inv);
                    for (ci, gm) in gamma_v.iter().enumerate() {
                        let r = at(ci)..at(ci) + n;
                        gg[ci] +=
                            sqrt_c * add_projection(&xs[r.clone()], &gs[r], inv, sqrt_c * gm, dot);
                    }
                    // Where the norm is clamped to 1e-12, it is a constant: no projection term
                    // (PyTorch's gradient there is inv·h).
                    for (d, &iv) in dot.iter_mut().zip(inv.iter()) {
                        if iv >= 1e12 {
                            *d = 0.0;
                        }
                    }
                    for (ci, gm) in gamma_v.iter().enumerate() {
                        let r = at(ci)..at(ci) + n;
                        // SAFETY: each (b, c, t, position block) is written by exactly one
                        // task (see SendPtr).
                        let o =
                            unsafe { std::slice::from_raw_parts_mut(gx_ptr.get().add(at(ci)), n) };
                        project_out(&xs[r.clone()], &gs[r], inv, dot, sqrt_c * gm, o);
                    }
                },
            ))
        })
    })?;
    Ok((
        Tensor::from_vec(gx, x.shape(), x.device())?,
        Tensor::from_vec(gg, c, x.device())?,
    ))
}

/// `y = x·Wᵀ (+ bias) (+ residual)` for `x` `[M, K]`, `wt` = `Wᵀ` `[K, N]`, `bias` `[N]`,
/// `residual` `[M, N]`: the output is pre-filled with residual + bias rows and one GEMM
/// accumulates into it, so neither addition costs a pass of its own.
pub fn linear(
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let ops = LinearOperands::new(x, wt, bias, "linear")?;
    let (m, n, bias) = (ops.m, ops.n, &ops.bias);
    let residual = residual.map(prep).transpose()?;
    if let Some(r) = &residual {
        if r.dims() != [m, n] {
            candle_core::bail!("linear: residual {:?} for output [{m}, {n}]", r.shape());
        }
    }
    let mut out = output_buffer(m * n);
    let prefilled = match &residual {
        Some(r) => with_data(r, |rs| {
            Ok(prefill_rows(&mut out, n, bias.as_deref(), Some(rs)))
        })?,
        None => prefill_rows(&mut out, n, bias.as_deref(), None),
    };
    ops.gemm_into(&mut out, prefilled)?;
    Tensor::from_vec(out, (m, n), ops.x.device())
}

/// The checked operands of a Linear: `x` `[M, K]` and `wt` = `Wᵀ` `[K, N]` as contiguous f32,
/// and the bias `[N]` read out.
struct LinearOperands {
    x: Tensor,
    wt: Tensor,
    m: usize,
    k: usize,
    n: usize,
    bias: Option<Vec<f32>>,
}

impl LinearOperands {
    /// Checks the shapes; errors start with `what`.
    fn new(x: &Tensor, wt: &Tensor, bias: Option<&Tensor>, what: &str) -> Result<Self> {
        let (x, wt) = (prep(x)?, prep(wt)?);
        let (m, k) = x.dims2()?;
        let (k2, n) = wt.dims2()?;
        if k2 != k {
            candle_core::bail!("{what}: input {:?} but weight {:?}", x.shape(), wt.shape());
        }
        let bias = bias
            .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
            .transpose()?;
        if bias.as_ref().is_some_and(|b| b.len() != n) {
            candle_core::bail!(
                "{what}: bias of {} for {n} outputs",
                bias.map_or(0, |b| b.len())
            );
        }
        Ok(Self {
            x,
            wt,
            m,
            k,
            n,
            bias,
        })
    }

    /// `out = x·Wᵀ` (`accumulate`: `out += x·Wᵀ`) for `out` `[M, N]` row-major, one GEMM on
    /// the rayon pool.
    fn gemm_into(&self, out: &mut [f32], accumulate: bool) -> Result<()> {
        let (m, k, n) = (self.m, self.k, self.n);
        assert_eq!(out.len(), m * n, "GEMM output buffer");
        with_data(&self.x, |xs| {
            with_data(&self.wt, |ws| {
                // SAFETY: dst is m×n row-major (read only when accumulating), lhs m×k and
                // rhs k×n row-major, all in bounds.
                unsafe {
                    gemm_rows(
                        m,
                        n,
                        k,
                        out.as_mut_ptr(),
                        n,
                        xs.as_ptr(),
                        k,
                        ws.as_ptr(),
                        n,
                        accumulate,
                        gemm::Parallelism::Rayon(0),
                    );
                }
                Ok(())
            })
        })
    }
}

/// What [`linear_epilogue`] does to each output row `y = x·Wᵀ` (bias not yet added) right
/// after the GEMM, in one pass over the row while it is in cache, instead of a bias pre-fill
/// pass, a read of it by the GEMM, and separate passes with new buffers for what follows.
pub enum Epilogue<'a> {
    /// `gelu_tanh(y + bias)`: the DiT's FFN input layer.
    Gelu,
    /// `rms_norm(y + bias)·gamma` over the whole row (`eps`), then, with `rope` tables
    /// `(cos, sin)` `[tokens, Dh/2]`, interleaved RoPE on each of `heads` heads, row `r` being
    /// token `r % tokens`: the Wan attention's q/k (`rms_norm_across_heads`).
    RmsRope {
        gamma: &'a Tensor,
        eps: f64,
        rope: Option<(&'a Tensor, &'a Tensor)>,
        heads: usize,
        tokens: usize,
    },
    /// `x + (y + bias)·gate` with `x` shaped like the output and `gate` `[G, 1, N]` (or `[N]`)
    /// for `G` equal groups of rows: the DiT's gated residuals.
    Gated { x: &'a Tensor, gate: &'a Tensor },
}

/// `epilogue(x·Wᵀ + bias)` for `x` `[M, K]` and `wt` = `Wᵀ` `[K, N]` (see [`Epilogue`]); the
/// GEMM writes its output without reading it, and the epilogue runs in place.
pub fn linear_epilogue(
    x: &Tensor,
    wt: &Tensor,
    bias: Option<&Tensor>,
    epilogue: Epilogue,
) -> Result<Tensor> {
    let ops = LinearOperands::new(x, wt, bias, "linear epilogue")?;
    let (m, n) = (ops.m, ops.n);
    if m == 0 || n == 0 {
        return Tensor::zeros((m, n), DType::F32, ops.x.device());
    }
    let mut out = output_buffer(m * n);
    ops.gemm_into(&mut out, false)?;
    let b = ops.bias.as_deref();
    let rpt = rows_per_task(n);
    match epilogue {
        Epilogue::Gelu => out
            .par_chunks_mut(rpt * n)
            .for_each(|rows| rows.chunks_mut(n).for_each(|y| bias_gelu_row(y, b))),
        Epilogue::RmsRope {
            gamma,
            eps,
            rope,
            heads,
            tokens,
        } => {
            let gamma = prep(gamma)?.to_vec1::<f32>()?;
            if gamma.len() != n {
                candle_core::bail!(
                    "linear RMS norm epilogue: norm weight of {} for {n} outputs",
                    gamma.len()
                );
            }
            let tables = match rope {
                Some((c, s)) => {
                    let half = n / heads.max(1) / 2;
                    if heads == 0
                        || n % (2 * heads) != 0
                        || tokens == 0
                        || m % tokens != 0
                        || c.dims() != [tokens, half]
                        || s.dims() != [tokens, half]
                    {
                        candle_core::bail!(
                            "linear RMS norm epilogue: RoPE tables {:?}/{:?} for {m} rows of {tokens} tokens, {heads} heads of {n} outputs (expected [{tokens}, {half}] each)",
                            c.shape(),
                            s.shape()
                        );
                    }
                    Some((
                        prep(c)?.flatten_all()?.to_vec1::<f32>()?,
                        prep(s)?.flatten_all()?.to_vec1::<f32>()?,
                        half,
                    ))
                }
                None => None,
            };
            out.par_chunks_mut(rpt * n)
                .enumerate()
                .for_each(|(ti, rows)| {
                    for (ri, y) in rows.chunks_mut(n).enumerate() {
                        if let Some(b) = b {
                            add_bias_row(y, b);
                        }
                        // As `norm_affine`'s RMS rows: the squares' sum of the deviations from 0.
                        let var = row_sq_dev(y, 0.0) / n as f32;
                        let std = (var + eps as f32).sqrt();
                        let rope = tables.as_ref().map(|(c, s, half)| {
                            let t = (ti * rpt + ri) % tokens;
                            (&c[t * half..(t + 1) * half], &s[t * half..(t + 1) * half])
                        });
                        norm_rope_row(y, std, &gamma, rope);
                    }
                });
        }
        Epilogue::Gated { x: res, gate } => {
            let res = prep(res)?;
            let gate = prep(gate)?;
            // The residual is the output's shape, flat `[M, N]` or grouped `[G, M/G, N]`; the
            // gate is `[N]` or `[G, 1, N]` with the residual's G (as `gated_residual` requires).
            let groups = match (res.dims(), gate.dims()) {
                (&[rm, rn], &[gn]) if rm == m && rn == n && gn == n => 1,
                (&[rg, rr, rn], &[gn]) if rg * rr == m && rn == n && gn == n => 1,
                (&[rg, rr, rn], &[g, 1, gn]) if rg == g && rg * rr == m && rn == n && gn == n => g,
                _ => candle_core::bail!(
                    "linear gated residual: residual {:?} and gate {:?} for output [{m}, {n}] (expected [{m}, {n}] or [G, {m}/G, {n}] and [{n}] or [G, 1, {n}])",
                    res.shape(),
                    gate.shape()
                ),
            };
            let per_group = m / groups;
            with_data(&res, |xs| {
                with_data(&gate, |gs| {
                    out.par_chunks_mut(rpt * n)
                        .enumerate()
                        .for_each(|(ti, rows)| {
                            for (ri, y) in rows.chunks_mut(n).enumerate() {
                                let r = ti * rpt + ri;
                                let g = r / per_group;
                                bias_gated_row(
                                    y,
                                    b,
                                    &xs[r * n..(r + 1) * n],
                                    &gs[g * n..(g + 1) * n],
                                );
                            }
                        });
                    Ok(())
                })
            })?;
        }
    }
    Tensor::from_vec(out, (m, n), ops.x.device())
}

#[cfg(test)]
mod tests {
    /// The fused path (what AVX2/AVX-512 machines run) is as accurate as the plain one: both
    /// within 2e-7 relative of the f64 exp over the softmax/GELU/SiLU input range.
    #[test]
    fn exp_with_fma_and_without_match_f64() {
        let mut worst = [0f64; 2];
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            for (i, got) in [super::exp_with::<true>(x), super::exp_with::<false>(x)]
                .into_iter()
                .enumerate()
            {
                worst[i] = worst[i].max(((got as f64 - want) / want).abs());
            }
            x += 0.013;
        }
        assert!(
            worst[0] < 2e-7 && worst[1] < 2e-7,
            "relative errors {worst:?}"
        );
    }
}
