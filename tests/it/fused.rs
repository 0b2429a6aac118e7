//! The training-time backward passes of `sora::nn::fused` against candle's own autograd of the
//! same computation written with plain candle ops.

use candle_core::{DType, Module, Tensor, Var, D};
use sora::nn::fused;

use crate::common::{assert_close, randn};

/// Runs `f` on fresh variables in differentiable mode and returns the output and the gradients
/// of `Σ out·r` (r a fixed random tensor) with respect to each input.
fn grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
    sora::nn::set_differentiable(true);
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = randn(99, out.dims());
    let loss = (&out * &r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    sora::nn::set_differentiable(false);
    let gs = ts
        .iter()
        .map(|t| g.get(t).expect("gradient present").clone())
        .collect();
    (out, gs)
}

fn check(
    what: &str,
    inputs: &[Tensor],
    fast: impl Fn(&[Tensor]) -> Tensor,
    reference: impl Fn(&[Tensor]) -> Tensor,
) {
    let (yf, gf) = grads(inputs, fast);
    let (yr, gr) = grads(inputs, reference);
    assert_close(&format!("{what} forward"), &yf, &yr, 1e-6);
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        assert_close(&format!("{what} grad of input {i}"), a, b, 2e-5 * scale);
    }
}

#[test]
fn fused_backward_passes_match_candle_autograd() {
    let x = randn(1, &[2, 7, 12]);
    let s_batch = randn(2, &[2, 1, 12]);
    let s_weight = randn(3, &[12]);

    check(
        "mul_rows (per batch)",
        &[x.clone(), s_batch.clone()],
        |t| fused::mul_rows(&t[0], &t[1]).unwrap(),
        |t| t[0].broadcast_mul(&t[1]).unwrap(),
    );
    check(
        "mul_rows (weight)",
        &[x.clone(), s_weight.clone()],
        |t| fused::mul_rows(&t[0], &t[1]).unwrap(),
        |t| t[0].broadcast_mul(&t[1]).unwrap(),
    );
    check(
        "add_rows (per batch)",
        &[x.clone(), s_batch.clone()],
        |t| fused::add_rows(&t[0], &t[1]).unwrap(),
        |t| t[0].broadcast_add(&t[1]).unwrap(),
    );
    check(
        "add_rows (weight)",
        &[x.clone(), s_weight],
        |t| fused::add_rows(&t[0], &t[1]).unwrap(),
        |t| t[0].broadcast_add(&t[1]).unwrap(),
    );
    check(
        "gelu_tanh",
        &[(&x * 2.0).unwrap()],
        |t| fused::gelu_tanh(&t[0]).unwrap(),
        |t| t[0].gelu().unwrap(),
    );

    let w = randn(4, &[5, 12]);
    let b = randn(5, &[5]);
    check(
        "Linear",
        &[x.clone(), w, b],
        |t| {
            fused::Linear::new(t[1].clone(), Some(t[2].clone()))
                .unwrap()
                .forward(&t[0])
                .unwrap()
        },
        |t| {
            candle_nn::Linear::new(t[1].clone(), Some(t[2].clone()))
                .forward(&t[0])
                .unwrap()
        },
    );

    let eps = 1e-6;
    let layer_norm = move |x: &Tensor| {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        xc.broadcast_div(&(var + eps)?.sqrt()?)
    };
    let rms = move |x: &Tensor| {
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(ms + eps)?.sqrt()?)
    };
    check(
        "layer norm",
        &[(&x * 3.0).unwrap()],
        |t| fused::normalize(&t[0], eps, true, layer_norm).unwrap(),
        |t| layer_norm(&t[0]).unwrap(),
    );
    check(
        "rms norm",
        &[(&x * 3.0).unwrap()],
        |t| fused::normalize(&t[0], eps, false, rms).unwrap(),
        |t| rms(&t[0]).unwrap(),
    );

    let scores = (randn(6, &[2, 3, 5, 9]) * 3.0).unwrap();
    check(
        "softmax",
        &[scores],
        |t| fused::softmax_last_dim(&t[0]).unwrap(),
        |t| candle_nn::ops::softmax(&t[0], D::Minus1).unwrap(),
    );

    // Attention [B, H, N, D]: self (Nq = Nk) and cross (Nk ≠ Nq) with a key bias.
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>| {
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(b) = bias {
            s = s.broadcast_add(b).unwrap();
        }
        candle_nn::ops::softmax(&s, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    };
    let (q, k, v) = (
        randn(10, &[2, 3, 7, 8]),
        randn(11, &[2, 3, 7, 8]),
        randn(12, &[2, 3, 7, 8]),
    );
    check(
        "attention (self)",
        &[q.clone(), k, v],
        |t| fused::attention_trainable(&t[0], &t[1], &t[2], 0.35, None).unwrap(),
        |t| sdpa(&t[0], &t[1], &t[2], 0.35, None),
    );
    let (k, v) = (randn(13, &[2, 3, 4, 8]), randn(14, &[2, 3, 4, 8]));
    let key_bias = randn(15, &[2, 1, 1, 4]);
    check(
        "attention (cross, key bias)",
        &[q, k, v],
        |t| fused::attention_trainable(&t[0], &t[1], &t[2], 0.35, Some(&key_bias)).unwrap(),
        |t| sdpa(&t[0], &t[1], &t[2], 0.35, Some(&key_bias)),
    );
    // A bias that trains (UMT5's relative position bias when the text encoder trains with the
    // DiT) gets its gradient: `attention` leaves the fused node, which takes the bias as a
    // constant, for the composed graph.
    check(
        "attention (trainable position bias)",
        &[
            randn(10, &[2, 3, 7, 8]),
            randn(11, &[2, 3, 7, 8]),
            randn(12, &[2, 3, 7, 8]),
            randn(16, &[1, 3, 7, 7]),
        ],
        |t| sora::nn::attention::attention(&t[0], &t[1], &t[2], 0.35, Some(&t[3])).unwrap(),
        |t| sdpa(&t[0], &t[1], &t[2], 0.35, Some(&t[3])),
    );

    // RoPE: [B, H, N, D] with [N, D/2] tables.
    let q = randn(7, &[2, 3, 5, 8]);
    let ang = randn(8, &[5, 4]);
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    check(
        "rope",
        &[q],
        |t| fused::rope_interleaved(&t[0], &cos, &sin).unwrap(),
        |t| candle_nn::rotary_emb::rope_i_slow(&t[0], &cos, &sin).unwrap(),
    );
    assert_eq!(x.dtype(), DType::F32);
}

/// A stride-1 3D convolution written with plain candle ops (autograd reference): `zero_front`
/// zero frames in front, then one candle conv2d per temporal tap, summed.
fn conv3d_reference(x: &Tensor, w: &Tensor, zero_front: usize, ph: usize, pw: usize) -> Tensor {
    let (b, c, _, h, wd) = x.dims5().unwrap();
    let (o, _, kt, _, _) = w.dims5().unwrap();
    let x = x.pad_with_zeros(2, zero_front, 0).unwrap();
    let x = x
        .pad_with_zeros(3, ph, ph)
        .unwrap()
        .pad_with_zeros(4, pw, pw)
        .unwrap();
    let t_out = x.dim(2).unwrap() - kt + 1;
    let mut sum: Option<Tensor> = None;
    for i in 0..kt {
        let frames = x
            .narrow(2, i, t_out)
            .unwrap()
            .permute((0, 2, 1, 3, 4))
            .unwrap()
            .reshape((b * t_out, c, h + 2 * ph, wd + 2 * pw))
            .unwrap();
        let wi = w.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
        let y = frames.conv2d(&wi, 0, 1, 1, 1).unwrap();
        sum = Some(match sum {
            Some(s) => (s + y).unwrap(),
            None => y,
        });
    }
    let y = sum.unwrap();
    let (_, _, ho, wo) = y.dims4().unwrap();
    y.reshape((b, t_out, o, ho, wo))
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap()
}

/// The training convolution of the VAE (`conv3d_trainable`: shifted-GEMM forward, input and
/// weight gradients) against candle autograd through candle's conv2d, over the kernel shapes
/// and paddings the Wan VAE uses (3×3×3 causal, 1×3×3, 3×1×1 time conv, 1×1×1) and a
/// cache-shortened front padding.
#[test]
fn conv3d_training_gradients_match_candle_autograd() {
    for (i, &(kt, kh, kw, zf, ph, pw, t, h, w)) in [
        (3, 3, 3, 2, 1, 1, 5, 9, 7),
        (3, 3, 3, 1, 1, 1, 4, 6, 6),
        (3, 3, 3, 0, 1, 1, 4, 5, 8),
        (3, 3, 3, 2, 0, 0, 3, 6, 5),
        (1, 3, 3, 0, 1, 1, 3, 7, 6),
        (3, 1, 1, 2, 0, 0, 4, 5, 5),
        (1, 1, 1, 0, 0, 0, 2, 4, 3),
        (3, 3, 1, 2, 1, 0, 4, 6, 5),
        (1, 1, 3, 0, 0, 1, 2, 3, 7),
    ]
    .iter()
    .enumerate()
    {
        let seed = 40 + 2 * i as u64;
        let x = randn(seed, &[2, 3, t, h, w]);
        let wt = (randn(seed + 1, &[4, 3, kt, kh, kw]) * 0.3).unwrap();
        let (yf, gf) = grads(&[x.clone(), wt.clone()], |v| {
            sora::nn::conv3d::conv3d_trainable(&v[0], zf, &v[1], ph, pw).unwrap()
        });
        let (yr, gr) = grads(&[x, wt], |v| conv3d_reference(&v[0], &v[1], zf, ph, pw));
        let what = format!("conv3d {kt}x{kh}x{kw}, {zf} zero frames, padding ({ph}, {pw})");
        assert_close(&format!("{what} forward"), &yf, &yr, 2e-5);
        assert_close(&format!("{what} input grad"), &gf[0], &gr[0], 2e-5);
        assert_close(&format!("{what} weight grad"), &gf[1], &gr[1], 1e-4);
    }
}

/// The VAE's channel RMS norm and a convolution's per-channel bias in training (fused backward
/// passes) against candle autograd of the composed formulas.
#[test]
fn channel_norm_and_bias_gradients_match_candle_autograd() {
    let x = randn(60, &[2, 5, 3, 4, 6]);
    let gamma = (randn(61, &[5, 1, 1, 1]) + 1.0).unwrap();
    check(
        "channel_rms_norm",
        &[x.clone(), gamma],
        |t| sora::nn::norm::channel_rms_norm(&t[0], &t[1]).unwrap(),
        |t| {
            let norm = t[0]
                .sqr()
                .unwrap()
                .sum_keepdim(1)
                .unwrap()
                .sqrt()
                .unwrap()
                .maximum(1e-12)
                .unwrap();
            (t[0].broadcast_div(&norm).unwrap() * 5f64.sqrt())
                .unwrap()
                .broadcast_mul(&t[1])
                .unwrap()
        },
    );
    check(
        "add_channel_bias",
        &[x, randn(62, &[5])],
        |t| fused::add_channel_bias(&t[0], &t[1]).unwrap(),
        |t| {
            t[0].broadcast_add(&t[1].reshape((1, 5, 1, 1, 1)).unwrap())
                .unwrap()
        },
    );
}

/// `CausalConv3d` in training with a cache of the previous chunk's last frames (how the Wan
/// decoder streams): gradients reach the input, the cache, the weight and the bias, equal to
/// candle autograd of the reference convolution over the cache and input frames.
#[test]
fn causal_conv3d_training_with_cache_matches_candle_autograd() {
    for cached in [1, 2] {
        let inputs = [
            randn(70, &[2, 3, 3, 5, 6]),
            randn(71, &[2, 3, cached, 5, 6]),
            (randn(72, &[4, 3, 3, 3, 3]) * 0.3).unwrap(),
            randn(73, &[4]),
        ];
        let (yf, gf) = grads(&inputs, |v| {
            let conv = sora::nn::conv3d::CausalConv3d::from_weights(
                &v[2],
                Some(v[3].clone()),
                (1, 1, 1),
                (1, 1, 1),
            )
            .unwrap();
            conv.forward(&v[0], Some(&v[1])).unwrap()
        });
        let (yr, gr) = grads(&inputs, |v| {
            let xs = Tensor::cat(&[&v[1], &v[0]], 2).unwrap();
            conv3d_reference(&xs, &v[2], 2 - cached, 1, 1)
                .broadcast_add(&v[3].reshape((1, 4, 1, 1, 1)).unwrap())
                .unwrap()
        });
        let what = format!("causal conv3d, {cached} cached frames");
        assert_close(&format!("{what} forward"), &yf, &yr, 2e-5);
        for (i, name) in ["input", "cache", "weight", "bias"].iter().enumerate() {
            assert_close(&format!("{what} {name} grad"), &gf[i], &gr[i], 1e-4);
        }
    }
}
