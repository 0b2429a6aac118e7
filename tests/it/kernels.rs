//! The hand-written CPU inference kernels (`sora::nn::kernels`) against the composed candle
//! ops they replace, on shapes that cross every block boundary.

use candle_core::{DType, Tensor, D};
use sora::nn::kernels;

use crate::common::{assert_close, randn};

#[test]
fn kernel_exp_is_accurate_over_the_softmax_range() {
    let mut worst = 0f64;
    let mut x = -87.0f32;
    while x <= 88.0 {
        let want = (x as f64).exp();
        let got = kernels::exp_f32(x) as f64;
        worst = worst.max(((got - want) / want).abs());
        x += 0.0137;
    }
    println!("exp_f32 worst relative error on [-87, 88]: {worst:.2e}");
    assert!(worst < 3e-7, "exp_f32 relative error {worst:.2e}");
    assert!(kernels::exp_f32(-1000.0) < 1e-37);
}

/// `[B, N, H·Dh]` → `[B, H, N, Dh]`, contiguous (the composed attention's layout).
fn split_heads(t: &Tensor, b: usize, n: usize, h: usize, hd: usize) -> Tensor {
    t.reshape((b, n, h, hd))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
}

/// Attention evaluated in f64 on `[B, N, H·Dh]` operands (with an optional `[B, Nk]` key bias),
/// returned as f32 `[B, Nq, H·Dh]`: the reference the kernels' rounding is measured against.
fn attention_f64(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    h: usize,
    scale: f64,
    bias: Option<&Tensor>,
) -> Tensor {
    let (b, nq, d) = q.dims3().unwrap();
    let nk = k.dim(1).unwrap();
    let f = |t: &Tensor, n: usize| split_heads(t, b, n, h, d / h).to_dtype(DType::F64).unwrap();
    let mut s = (f(q, nq).matmul(&f(k, nk).t().unwrap()).unwrap() * scale).unwrap();
    if let Some(bias) = bias {
        let bias = bias
            .to_dtype(DType::F64)
            .unwrap()
            .reshape((b, 1, 1, nk))
            .unwrap();
        s = s.broadcast_add(&bias).unwrap();
    }
    candle_nn::ops::softmax_last_dim(&s)
        .or_else(|_| candle_nn::ops::softmax(&s, D::Minus1))
        .unwrap()
        .matmul(&f(v, nk))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, nq, d))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// A per-key additive bias (the DiT's merged padding keys) equals the composed attention
/// with the same bias broadcast over heads and queries.
#[test]
fn kernel_attention_key_bias_matches_composed_attention() {
    let (b, h, hd, nq, nk) = (2, 3, 32, 300, 40);
    let q = (randn(11, &[b, nq, h * hd]) * 2.0).unwrap();
    let k = (randn(12, &[b, nk, h * hd]) * 2.0).unwrap();
    let v = randn(13, &[b, nk, h * hd]);
    let bias = (randn(14, &[b, nk]).abs().unwrap() * 1.5).unwrap();
    let scale = 1.0 / (hd as f64).sqrt();
    let got = kernels::attention_bnhd(&q, &k, &v, h, scale, Some(&bias)).unwrap();
    let split = |t: &Tensor, n: usize| split_heads(t, b, n, h, hd);
    let want = sora::nn::attention::attention(
        &split(&q, nq),
        &split(&k, nk),
        &split(&v, nk),
        scale,
        Some(&bias.reshape((b, 1, 1, nk)).unwrap()),
    )
    .unwrap()
    .transpose(1, 2)
    .unwrap()
    .reshape((b, nq, h * hd))
    .unwrap();
    assert_close("attention with key bias", &got, &want, 2e-6);
    let wrong = Tensor::zeros((b, nk + 1), DType::F32, q.device()).unwrap();
    let e = kernels::attention_bnhd(&q, &k, &v, h, scale, Some(&wrong)).unwrap_err();
    assert!(e.to_string().contains("key bias"), "{e}");
}

#[test]
fn kernel_attention_matches_composed_attention() {
    // 2 batches, 3 heads: 700 queries (3 query blocks, the last partial, and row counts that
    // leave 6-, 3- and 1-row remainders) over 2701 keys (3 key steps of the online softmax);
    // then 1100 keys (one step) and cross-attention to 9 keys; head dims 40, 64 (the
    // side-by-side DiT's) and 32 (the bundled model's).
    let b = 2;
    for (h, hd, nq, nk) in [
        (3, 40, 700, 2701),
        (3, 40, 300, 1100),
        (3, 40, 70, 9),
        (3, 64, 700, 2701),
        (2, 64, 301, 1100),
        (3, 64, 70, 9),
        (3, 32, 302, 1281),
        (3, 32, 71, 9),
    ] {
        let q = (randn(1, &[b, nq, h * hd]) * 2.0).unwrap();
        let k = (randn(2, &[b, nk, h * hd]) * 2.0).unwrap();
        let v = randn(3, &[b, nk, h * hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        let got = kernels::attention_bnhd(&q, &k, &v, h, scale, None).unwrap();
        let split = |t: &Tensor, n: usize| split_heads(t, b, n, h, hd);
        let want = sora::nn::attention::blockwise(
            &split(&q, nq),
            &split(&k, nk),
            &split(&v, nk),
            scale,
            None,
            nq,
            nk,
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, nq, h * hd))
        .unwrap();
        // Both against an f64 evaluation: the kernel must be at least as close as candle's.
        let exact = attention_f64(&q, &k, &v, h, scale, None);
        let err_kernel = crate::common::max_abs_diff(&got, &exact);
        let err_candle = crate::common::max_abs_diff(&want, &exact);
        println!("attention hd {hd} {nq}×{nk} vs f64: kernel {err_kernel:.2e}, candle blockwise {err_candle:.2e}");
        assert!(
            err_kernel <= 1.5 * err_candle.max(1e-6),
            "kernel {err_kernel:.2e} vs candle {err_candle:.2e}"
        );
        assert_close(
            &format!("attention kernel hd {hd} {nq}×{nk}"),
            &got,
            &want,
            1e-5,
        );
    }
}

/// One key far longer than the rest (300 against ~6) but orthogonal to every query: scores
/// that stay small next to the keys' norms, over one key step and three, with and without a
/// key bias, against f64.
#[test]
fn kernel_attention_is_exact_with_one_long_orthogonal_key() {
    let (b, h, hd) = (2, 2, 32);
    for (nq, nk, with_bias) in [(300, 40, false), (300, 2701, false), (70, 1100, true)] {
        // Queries in the first half of each head's dims, one long key in the second half.
        let mask: Vec<f32> = (0..h * hd)
            .map(|i| if i % hd < hd / 2 { 1.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, h * hd, &candle_core::Device::Cpu).unwrap();
        let q = randn(21, &[b, nq, h * hd]).broadcast_mul(&mask).unwrap();
        let mut kv = randn(22, &[b, nk, h * hd]).to_vec3::<f32>().unwrap();
        for batch in kv.iter_mut() {
            for (i, x) in batch[7].iter_mut().enumerate() {
                *x = if i % hd < hd / 2 { 0.0 } else { 300.0 };
            }
        }
        let k = Tensor::new(kv, &candle_core::Device::Cpu).unwrap();
        let v = randn(23, &[b, nk, h * hd]);
        let bias = with_bias.then(|| (randn(24, &[b, nk]).abs().unwrap() * 2.0).unwrap());
        let scale = 1.0 / (hd as f64).sqrt();
        let got = kernels::attention_bnhd(&q, &k, &v, h, scale, bias.as_ref()).unwrap();
        let split = |t: &Tensor, n: usize| split_heads(t, b, n, h, hd);
        let want = sora::nn::attention::attention(
            &split(&q, nq),
            &split(&k, nk),
            &split(&v, nk),
            scale,
            bias.as_ref()
                .map(|b_| b_.reshape((b, 1, 1, nk)).unwrap())
                .as_ref(),
        )
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, nq, h * hd))
        .unwrap();
        // f64 reference: the kernel must be at least as close to it as the composed f32 path.
        let exact = attention_f64(&q, &k, &v, h, scale, bias.as_ref());
        let err_kernel = crate::common::max_abs_diff(&got, &exact);
        let err_candle = crate::common::max_abs_diff(&want, &exact);
        println!(
            "long orthogonal key {nq}×{nk} vs f64: kernel {err_kernel:.2e}, composed {err_candle:.2e}"
        );
        assert!(
            err_kernel <= 1.5 * err_candle.max(1e-6),
            "long orthogonal key {nq}×{nk}: kernel {err_kernel:.2e} vs composed {err_candle:.2e}"
        );
    }
}

#[test]
fn kernel_norms_gelu_gate_and_rope_match_composed_ops() {
    let eps = 1e-6;
    let x = randn(4, &[2, 37, 48]).affine(3.0, 0.5).unwrap();
    let scale = randn(5, &[2, 1, 48]);
    let shift = randn(6, &[2, 1, 48]);
    let w = randn(7, &[48]);
    let bias = randn(8, &[48]);

    let ln = |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap()
    };
    let mul = (&scale + 1.0).unwrap();
    let want = ln(&x)
        .broadcast_mul(&mul)
        .unwrap()
        .broadcast_add(&shift)
        .unwrap();
    let got = kernels::norm_affine(&x, &mul, Some(&shift), eps, true).unwrap();
    assert_close("layer norm + modulation", &got, &want, 2e-6);

    let want = ln(&x)
        .broadcast_mul(&w)
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
    let got = kernels::norm_affine(&x, &w, Some(&bias), eps, true).unwrap();
    assert_close("affine layer norm", &got, &want, 2e-6);

    let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let want = x
        .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w)
        .unwrap();
    let got = kernels::norm_affine(&x, &w, None, eps, false).unwrap();
    assert_close("rms norm", &got, &want, 2e-6);

    let a = randn(9, &[2, 37, 48]);
    let want = (&x + a.broadcast_mul(&scale).unwrap()).unwrap();
    assert_close(
        "gated residual",
        &kernels::gated_residual(&x, &a, &scale).unwrap(),
        &want,
        1e-6,
    );

    let big = (randn(10, &[3, 1000]) * 4.0).unwrap();
    assert_close(
        "gelu tanh",
        &kernels::gelu_tanh(&big).unwrap(),
        &big.gelu().unwrap(),
        2e-6,
    );

    // RoPE on [B, N, H·Dh] vs candle's rope_i on [B, H, N, Dh].
    let (b, n, h, hd) = (2, 13, 3, 8);
    let q = randn(11, &[b, n, h * hd]);
    let ang = (randn(12, &[n, hd / 2]) * 3.0).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let got = kernels::rope_bnhd(&q, &cos, &sin, h).unwrap();
    let bhnd = q
        .reshape((b, n, h, hd))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap();
    let want = candle_nn::rotary_emb::rope_i(&bhnd, &cos, &sin)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((b, n, h * hd))
        .unwrap();
    assert_close("rope [B, N, H·Dh]", &got, &want, 1e-6);
}

#[test]
fn kernel_channel_rms_norm_silu_matches_composed_ops() {
    // [B, C, T, H, W] with a plane larger than one 4096-position block.
    let x = randn(13, &[2, 5, 3, 70, 61]);
    let gamma = randn(14, &[5, 1, 1, 1]);
    let want =
        candle_nn::ops::silu(&sora::nn::norm::channel_rms_norm(&x, &gamma).unwrap()).unwrap();
    let got = kernels::channel_rms_silu(&x, &gamma, true).unwrap();
    assert_close("channel rms norm + silu", &got, &want, 2e-6);
    let want = sora::nn::norm::channel_rms_norm(&x, &gamma).unwrap();
    let got = kernels::channel_rms_silu(&x, &gamma, false).unwrap();
    assert_close("channel rms norm", &got, &want, 2e-6);
}

/// The fused Linear epilogues (GEMM, then bias + GELU, bias + RMS norm + RoPE, or bias + gated
/// residual in one pass over each row) against the ops composed one by one, with and without a
/// bias. 602 rows of 128 outputs run as parallel tasks of 128 rows, so task boundaries fall
/// inside the 301-token groups (the RoPE token and the gate group are taken per row).
#[test]
fn kernel_linear_epilogues_match_composed_ops() {
    use kernels::Epilogue;
    let (b, n, k, h, hd) = (2, 301, 40, 4, 32);
    let out = h * hd;
    let x = randn(20, &[b * n, k]);
    let w = (randn(21, &[out, k]) * 0.3).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let gamma = randn(23, &[out]);
    let eps = 1e-6;
    let ang = (randn(24, &[n, hd / 2]) * 3.0).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let res = randn(25, &[b, n, out]);
    let gate = randn(26, &[b, 1, out]);
    let bias_t = randn(22, &[out]);
    for bias in [Some(&bias_t), None] {
        let tag = if bias.is_some() {
            "with bias"
        } else {
            "no bias"
        };
        let lin = x.matmul(&wt).unwrap();
        let lin = match bias {
            Some(bv) => lin.broadcast_add(bv).unwrap(),
            None => lin,
        };

        let got = kernels::linear_epilogue(&x, &wt, bias, Epilogue::Gelu).unwrap();
        assert_close(
            &format!("linear + gelu, {tag}"),
            &got,
            &lin.gelu().unwrap(),
            2e-6,
        );

        let ms = lin.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let normed = lin
            .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma)
            .unwrap();
        let norm_only = Epilogue::RmsRope {
            gamma: &gamma,
            eps,
            rope: None,
            heads: h,
            tokens: n,
        };
        let got = kernels::linear_epilogue(&x, &wt, bias, norm_only).unwrap();
        assert_close(&format!("linear + rms norm, {tag}"), &got, &normed, 2e-6);

        let want = kernels::rope_bnhd(&normed.reshape((b, n, out)).unwrap(), &cos, &sin, h)
            .unwrap()
            .reshape((b * n, out))
            .unwrap();
        let with_rope = Epilogue::RmsRope {
            gamma: &gamma,
            eps,
            rope: Some((&cos, &sin)),
            heads: h,
            tokens: n,
        };
        let got = kernels::linear_epilogue(&x, &wt, bias, with_rope).unwrap();
        assert_close(
            &format!("linear + rms norm + rope, {tag}"),
            &got,
            &want,
            2e-6,
        );

        let want = (&res
            + lin
                .reshape((b, n, out))
                .unwrap()
                .broadcast_mul(&gate)
                .unwrap())
        .unwrap()
        .reshape((b * n, out))
        .unwrap();
        let gated = Epilogue::Gated {
            x: &res,
            gate: &gate,
        };
        let got = kernels::linear_epilogue(&x, &wt, bias, gated).unwrap();
        assert_close(
            &format!("linear + gated residual, {tag}"),
            &got,
            &want,
            2e-6,
        );
    }

    // Tables for the wrong token count are refused, naming the shapes.
    let bad = Epilogue::RmsRope {
        gamma: &gamma,
        eps,
        rope: Some((&cos, &sin)),
        heads: h,
        tokens: n + 1,
    };
    let e = kernels::linear_epilogue(&x, &wt, None, bad).unwrap_err();
    assert!(e.to_string().contains("RoPE tables"), "{e}");
    // A gate whose groups are not the residual's (one per item of a batch that was fanned out
    // to two contexts) is refused, not applied to the wrong rows.
    let gate1 = gate.narrow(0, 0, 1).unwrap();
    let e = kernels::linear_epilogue(
        &x,
        &wt,
        None,
        Epilogue::Gated {
            x: &res,
            gate: &gate1,
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("gate [1, 1, 128]"), "{e}");
}

/// The shifted-GEMM causal conv3d (row bands of one output frame in parallel, all taps
/// accumulated per band) against candle's composed conv path (the training path), on a
/// two-thread pool so the band split does not depend on the machine: 37 rows of 31 padded
/// columns run as bands of 17, 17 and 3 rows (2 × 1 output frames) or 19 and 18 (2 × 3, with
/// a cached frame: batch and frame indices both above 0).
#[test]
fn kernel_conv3d_bands_match_composed_conv() {
    use sora::nn::conv3d::CausalConv3d;
    let w = (randn(21, &[7, 5, 3, 3, 3]) * 0.2).unwrap();
    let b = randn(22, &[7]);
    let build = |differentiable: bool| {
        sora::nn::set_differentiable(differentiable);
        let c = CausalConv3d::from_weights(&w, Some(b.clone()), (1, 1, 1), (1, 1, 1)).unwrap();
        sora::nn::set_differentiable(false);
        c
    };
    let (fast, composed) = (build(false), build(true));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (x, cache) in [
        (randn(23, &[2, 5, 1, 37, 29]), None),
        (
            randn(24, &[2, 5, 3, 37, 29]),
            Some(randn(25, &[2, 5, 1, 37, 29])),
        ),
    ] {
        let got = pool.install(|| fast.forward(&x, cache.as_ref()).unwrap());
        sora::nn::set_differentiable(true);
        let want = composed.forward(&x, cache.as_ref()).unwrap();
        sora::nn::set_differentiable(false);
        assert_eq!(got.dims(), want.dims());
        assert_close("conv3d bands vs composed conv", &got, &want, 2e-5);
    }
}

/// Cross-attention with the output projection folded into the values equals attention
/// followed by the projection with bias and residual (the DiT's plain path), with and without
/// a key bias, for key counts that do and do not leave vector remainders, and it refuses
/// mismatched operands by name.
#[test]
fn kernel_folded_cross_attention_matches_attention_then_projection() {
    for (b, h, hd, nq, nk, dout, with_bias) in [
        (2, 8, 64, 300, 12, 512, true),
        (2, 6, 32, 65, 17, 192, true),
        (1, 3, 40, 70, 1, 100, false),
        (2, 4, 16, 33, 40, 64, false),
    ] {
        let d = h * hd;
        let q = (randn(21, &[b, nq, d]) * 2.0).unwrap();
        let k = (randn(22, &[b, nk, d]) * 2.0).unwrap();
        let v = randn(23, &[b, nk, d]);
        let wt = (randn(24, &[d, dout]) * (1.0 / (d as f64).sqrt())).unwrap();
        let bias = randn(25, &[dout]);
        let residual = randn(26, &[b, nq, dout]);
        let kb = (randn(27, &[b, nk]).abs().unwrap() * 2.0).unwrap();
        let key_bias = with_bias.then_some(&kb);
        let scale = 1.0 / (hd as f64).sqrt();
        let o = kernels::attention_bnhd(&q, &k, &v, h, scale, key_bias).unwrap();
        let want = kernels::linear(
            &o.reshape((b * nq, d)).unwrap(),
            &wt,
            Some(&bias),
            Some(&residual.reshape((b * nq, dout)).unwrap()),
        )
        .unwrap()
        .reshape((b, nq, dout))
        .unwrap();
        let got = kernels::attention_out_folded(
            &q,
            &k,
            &v,
            h,
            scale,
            key_bias,
            &wt,
            Some(&bias),
            &residual,
        )
        .unwrap();
        assert_close(
            &format!("folded cross-attention b{b} h{h} d{hd} nq{nq} nk{nk} out{dout}"),
            &got,
            &want,
            2e-5,
        );
    }
    let (q, k) = (randn(1, &[1, 10, 64]), randn(2, &[1, 5, 64]));
    let (wt, r) = (randn(3, &[64, 32]), randn(4, &[1, 10, 32]));
    let e =
        kernels::attention_out_folded(&q, &k, &k, 4, 0.25, None, &wt, None, &randn(5, &[1, 9, 32]))
            .unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    let e =
        kernels::attention_out_folded(&q, &k, &k, 4, 0.25, None, &randn(6, &[32, 32]), None, &r)
            .unwrap_err();
    assert!(e.to_string().contains("projection"), "{e}");
    assert!(kernels::folding_pays(8, 12, 512) && !kernels::folding_pays(8, 80, 512));
}
