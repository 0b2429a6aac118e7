//! Criterion benches of the hot paths, each named with the shape it measures:
//! attention at several token counts, causal conv3d, one DiT denoise step, one VAE decode of a
//! latent frame, text encoding, and end-to-end `sora gen` with the bundled model.
//! Run: `cargo bench --bench sora` (add `-- <filter>` for one group).

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use sora::models::umt5::{Umt5Config, Umt5Encoder};
use sora::models::wan::dit::WanTransformer3DModel;
use sora::models::wan::vae::AutoencoderKLWan;
use sora::models::wan::{WanTransformerConfig, WanVaeConfig};
use sora::nn::attention;
use sora::nn::conv3d::CausalConv3d;
use sora::train::optim::params;
use sora::train::recipe::init_params;

fn dev() -> Device {
    // As the sora binary does at start (glibc keeps freed buffers instead of unmapping them).
    sora::nn::tune_allocator(256);
    Device::Cpu
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &dev()).unwrap()
}

/// A random-weight model of `cfg`, initialised like the training recipe does.
fn random_dit(cfg: &WanTransformerConfig) -> WanTransformer3DModel {
    let vm = VarMap::new();
    let m =
        WanTransformer3DModel::load(VarBuilder::from_varmap(&vm, DType::F32, &dev()), cfg).unwrap();
    init_params(&params(&vm), 1).unwrap();
    m
}

fn random_vae(cfg: &WanVaeConfig) -> AutoencoderKLWan {
    let vm = VarMap::new();
    let m = AutoencoderKLWan::load(VarBuilder::from_varmap(&vm, DType::F32, &dev()), cfg).unwrap();
    init_params(&params(&vm), 2).unwrap();
    m
}

/// The mid-sized DiT of the side-by-side comparison (scripts/bench/side_by_side.py).
pub fn mid_dit_config() -> WanTransformerConfig {
    WanTransformerConfig {
        num_attention_heads: 8,
        attention_head_dim: 64,
        in_channels: 16,
        out_channels: Some(16),
        text_dim: 512,
        freq_dim: 256,
        ffn_dim: 2048,
        num_layers: 4,
        ..WanTransformerConfig::t2v_1_3b()
    }
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    for n in [512usize, 2048, 8192] {
        let (q, k, v) = (
            randn(&[1, 8, n, 64]),
            randn(&[1, 8, n, 64]),
            randn(&[1, 8, n, 64]),
        );
        g.bench_function(format!("b1_h8_n{n}_d64"), |b| {
            b.iter(|| black_box(attention(&q, &k, &v, 0.125, None).unwrap()))
        });
        // The DiT's inference kernel on the [B, N, H·D] layout (no head transposes).
        let (q, k, v) = (
            randn(&[1, n, 512]),
            randn(&[1, n, 512]),
            randn(&[1, n, 512]),
        );
        g.bench_function(format!("kernel_b1_n{n}_h8_d64"), |b| {
            b.iter(|| {
                black_box(sora::nn::kernels::attention_bnhd(&q, &k, &v, 8, 0.125, None).unwrap())
            })
        });
    }
    // The side-by-side DiT's self-attention: 1,280 tokens per item, guided batch of 2.
    let (q, k, v) = (
        randn(&[2, 1280, 512]),
        randn(&[2, 1280, 512]),
        randn(&[2, 1280, 512]),
    );
    g.bench_function("kernel_b2_n1280_h8_d64", |b| {
        b.iter(|| black_box(sora::nn::kernels::attention_bnhd(&q, &k, &v, 8, 0.125, None).unwrap()))
    });
    g.finish();
}

fn bench_conv3d(c: &mut Criterion) {
    let mut g = c.benchmark_group("causal_conv3d");
    g.sample_size(10);
    for (ch, hw, t) in [(96usize, 64usize, 4usize), (384, 32, 4), (384, 32, 1)] {
        let conv = CausalConv3d::from_weights(
            &(randn(&[ch, ch, 3, 3, 3]) * 0.02).unwrap(),
            Some(randn(&[ch])),
            (1, 1, 1),
            (1, 1, 1),
        )
        .unwrap();
        // t 1: the VAE decoder's low-resolution layers run one latent frame at a time.
        let x = randn(&[1, ch, t, hw, hw]);
        let cache = randn(&[1, ch, 2, hw, hw]);
        g.bench_function(format!("k3_c{ch}to{ch}_t{t}_{hw}x{hw}_cached"), |b| {
            b.iter(|| black_box(conv.forward(&x, Some(&cache)).unwrap()))
        });
    }
    g.finish();
}

fn bench_dit(c: &mut Criterion) {
    let mut g = c.benchmark_group("dit_step");
    g.sample_size(10);
    // Bundled size: 64×64×17 → latent 8×5×16×16 → 320 tokens, guided (batch 2).
    let tiny = sora::train::recipe::Recipe::bundled(40).dit;
    let m = random_dit(&tiny);
    let (x, t, ctx) = (
        randn(&[2, 8, 5, 16, 16]),
        Tensor::new(&[500f32, 500.0], &dev()).unwrap(),
        randn(&[2, 16, 64]),
    );
    let e = m.embed_text(&ctx).unwrap();
    g.bench_function("bundled_b2_tokens320_d96_l4", |b| {
        b.iter(|| black_box(m.forward_embedded(&x, &t, &e, (0, 0, 0)).unwrap()))
    });
    // Mid-size: d 512, 4 layers, latent 16×5×32×32 → 1280 tokens per item, guided.
    let mid = random_dit(&mid_dit_config());
    let (x, ctx) = (randn(&[2, 16, 5, 32, 32]), randn(&[2, 64, 512]));
    let e = mid.embed_text(&ctx).unwrap();
    g.bench_function("mid_b2_tokens1280_d512_l4", |b| {
        b.iter(|| black_box(mid.forward_embedded(&x, &t, &e, (0, 0, 0)).unwrap()))
    });
    // What a guided sampler step runs: one latent under two contexts (`forward_guided`, the
    // first block's self-attention shared).
    let x1 = x.narrow(0, 0, 1).unwrap();
    let t1 = t.narrow(0, 0, 1).unwrap();
    g.bench_function("mid_guided_1x2_tokens1280_d512_l4", |b| {
        b.iter(|| black_box(mid.forward_guided(&x1, &t1, &e, (0, 0, 0)).unwrap()))
    });
    g.finish();
}

fn bench_vae(c: &mut Criterion) {
    let mut g = c.benchmark_group("vae_decode_latent_frame");
    g.sample_size(10);
    for (name, cfg, hw) in [
        (
            "bundled_z8_16x16_to_64x64",
            sora::train::recipe::Recipe::bundled(40).vae,
            16usize,
        ),
        ("wan21_z16_16x16_to_128x128", WanVaeConfig::wan2_1(), 16),
    ] {
        let vae = random_vae(&cfg);
        let z = randn(&[1, cfg.z_dim, 2, hw, hw]);
        g.bench_function(name, |b| {
            b.iter(|| {
                // The second latent frame: 4 pixel frames through the warm causal cache.
                let mut s = vae.decode_stream(&z).unwrap();
                s.next_chunk().unwrap();
                black_box(s.next_chunk().unwrap())
            })
        });
    }
    g.finish();
}

fn bench_text(c: &mut Criterion) {
    let mut g = c.benchmark_group("text_encode");
    g.sample_size(10);
    for (name, cfg, len) in [
        (
            "bundled_d64_l2_16tokens",
            sora::train::recipe::Recipe::bundled(40).text,
            16usize,
        ),
        (
            "mid_d512_l4_64tokens",
            Umt5Config {
                vocab_size: 1000,
                d_model: 512,
                d_kv: 64,
                num_heads: 8,
                d_ff: 1024,
                num_layers: 4,
                ..Umt5Config::umt5_xxl()
            },
            64,
        ),
    ] {
        let vm = VarMap::new();
        let enc =
            Umt5Encoder::load(VarBuilder::from_varmap(&vm, DType::F32, &dev()), &cfg).unwrap();
        init_params(&params(&vm), 3).unwrap();
        let ids = Tensor::ones((2, len), DType::U32, &dev()).unwrap();
        g.bench_function(name, |b| {
            b.iter(|| black_box(enc.forward(&ids, None).unwrap()))
        });
    }
    g.finish();
}

fn bench_end_to_end(c: &mut Criterion) {
    let Some(dir) = sora::cli::run::bundled_dir() else {
        eprintln!("end_to_end: no bundled model in weights/, skipped");
        return;
    };
    let model = sora::pipeline::WanModel::load(&dir, &dev(), DType::F32).unwrap();
    let mut g = c.benchmark_group("end_to_end");
    g.sample_size(10);
    let d = model.defaults.clone();
    g.bench_function(
        format!(
            "bundled_{}x{}x{}_{}steps",
            d.width, d.height, d.frames, d.steps
        ),
        |b| {
            b.iter(|| {
                black_box(
                    sora::cli::train::generate_frames(
                        &model,
                        "a red circle moving right on a black background",
                        1,
                    )
                    .unwrap(),
                )
            })
        },
    );
    g.finish();
}

criterion_group!(
    benches,
    bench_attention,
    bench_conv3d,
    bench_dit,
    bench_vae,
    bench_text,
    bench_end_to_end
);
criterion_main!(benches);
