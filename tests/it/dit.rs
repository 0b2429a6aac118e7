//! WanTransformer3DModel parity against diffusers (fixtures from scripts/reference/ref_dit.py),
//! RoPE tables, attention, key layouts, loading errors and published-size parameter counts.
//! Tolerance: max abs error 1e-5 on f32 outputs unless stated.

use std::collections::HashSet;

use candle_core::{DType, Device, IndexOp, Tensor};
use sora::models::wan::dit::{load_transformer, merge_repeated_keys, WanTransformer3DModel};
use sora::models::wan::keys::{diffusers_to_native, native_to_diffusers, COMFY_PREFIX};
use sora::models::wan::rope::WanRope;
use sora::models::wan::WanTransformerConfig;
use sora::nn::attention::{attention, blockwise};
use sora::weights::{read_config, TensorStore};

use crate::common::{assert_close, fixture, get, load, max_abs_diff};

const TOL: f32 = 1e-5;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sora-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn dit_a_diffusers_layout_matches_reference() {
    let io = load("dit_a_io.safetensors");
    let (model, cfg) = load_transformer(
        &fixture("wan-tiny/transformer"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        cfg,
        WanTransformerConfig::tiny(),
        "fixture config drifted from ::tiny()"
    );
    let v = model
        .forward(
            &get(&io, "latents"),
            &get(&io, "timestep"),
            &get(&io, "context"),
        )
        .unwrap();
    assert_close("dit A velocity", &v, &get(&io, "velocity"), TOL);
}

/// Text zero-padded as WanPipeline pads it (to 512 there): the pad rows embed to one vector,
/// which the DiT merges into one key per item with a log-multiplicity bias. Item 0 has 3 real
/// rows and 37 pads, item 1 has 17 and 23: 18 keys remain.
#[test]
fn dit_padded_text_merges_repeated_keys_and_matches_reference() {
    let io = load("dit_a_padded_io.safetensors");
    let (model, _) = load_transformer(
        &fixture("wan-tiny/transformer"),
        None,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ctx = get(&io, "context");
    let (merged, bias) = merge_repeated_keys(&model.embed_text(&ctx).unwrap()).unwrap();
    assert_eq!(merged.dims(), [2, 18, 48]);
    let bias = bias.expect("pads were merged").to_vec2::<f32>().unwrap();
    assert_eq!(&bias[0][..3], &[0.0; 3]);
    for b in &bias[0][3..] {
        assert!((b - (37f32 / 15.0).ln()).abs() < 1e-6, "item 0 bias {b}");
    }
    assert!(bias[1][..17].iter().all(|b| *b == 0.0));
    assert!((bias[1][17] - 23f32.ln()).abs() < 1e-6);
    // No repeats, nothing merged.
    let plain = model
        .embed_text(&get(&load("dit_a_io.safetensors"), "context"))
        .unwrap();
    assert!(merge_repeated_keys(&plain).unwrap().1.is_none());

    let v = model
        .forward(&get(&io, "latents"), &get(&io, "timestep"), &ctx)
        .unwrap();
    assert_close("dit A padded-text velocity", &v, &get(&io, "velocity"), TOL);
}

/// The tiny random Wan transformer of fixtures/wan-tiny-native (native/Comfy layout, its
/// config given), f32 on the CPU: the model of `dit_b_io.safetensors`.
fn tiny_native_dit() -> WanTransformer3DModel {
    let cfg: WanTransformerConfig =
        read_config(&fixture("wan-tiny-native/transformer_config.json")).unwrap();
    load_transformer(
        &fixture("wan-tiny-native/wan2.1_t2v_tiny.safetensors"),
        Some(cfg),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .0
}

#[test]
fn dit_b_native_comfy_layout_matches_reference() {
    let io = load("dit_b_io.safetensors");
    let model = tiny_native_dit();
    let v = model
        .forward(
            &get(&io, "latents"),
            &get(&io, "timestep"),
            &get(&io, "context"),
        )
        .unwrap();
    assert_close(
        "dit B (native, 5×6×10 latent) velocity",
        &v,
        &get(&io, "velocity"),
        TOL,
    );
}

#[test]
fn dit_rope_tables_match_reference() {
    for (file, head_dim, grid) in [
        ("dit_a_io.safetensors", 24, (3, 2, 3)),
        ("dit_b_io.safetensors", 16, (5, 3, 5)),
    ] {
        let io = load(file);
        let (cos, sin) = WanRope::new(head_dim)
            .tables(grid, (0, 0, 0), &Device::Cpu)
            .unwrap();
        // The reference repeats each pair's value twice; column 2j is pair j.
        let idx = Tensor::arange_step(0u32, head_dim as u32, 2, &Device::Cpu).unwrap();
        let rc = get(&io, "rope_cos").index_select(&idx, 1).unwrap();
        let rs = get(&io, "rope_sin").index_select(&idx, 1).unwrap();
        assert_close(&format!("{file} rope cos"), &cos, &rc, 1e-6);
        assert_close(&format!("{file} rope sin"), &sin, &rs, 1e-6);
    }
}

#[test]
fn dit_attention_direct_and_blockwise_match_sdpa() {
    let io = load("attention_io.safetensors");
    let (q, k, v, o) = (get(&io, "q"), get(&io, "k"), get(&io, "v"), get(&io, "out"));
    let scale = 1.0 / 4.0;
    assert_close(
        "attention direct",
        &attention(&q, &k, &v, scale, None).unwrap(),
        &o,
        TOL,
    );
    // Uneven blocks on both axes exercise the online-softmax rescaling and the ragged tails.
    let b = blockwise(&q, &k, &v, scale, None, 64, 96).unwrap();
    assert_close("attention blockwise 64×96", &b, &o, TOL);
    // An additive bias is honoured identically by both paths.
    let bias = Tensor::randn(0f32, 1.0, (1, 2, 300, 257), &Device::Cpu).unwrap();
    let d = attention(&q, &k, &v, scale, Some(&bias)).unwrap();
    let b = blockwise(&q, &k, &v, scale, Some(&bias), 128, 100).unwrap();
    assert_close("attention blockwise with bias", &b, &d, TOL);
}

#[test]
fn dit_key_layouts_round_trip() {
    let native =
        TensorStore::open_file(&fixture("wan-tiny-native/wan2.1_t2v_tiny.safetensors")).unwrap();
    let diffusers = TensorStore::open_dir(&fixture("wan-tiny/transformer")).unwrap();
    let native_names = native.names();
    assert!(native_names.iter().all(|k| k.starts_with(COMFY_PREFIX)));
    let mapped: HashSet<String> = native_names
        .iter()
        .map(|k| native_to_diffusers(k))
        .collect();
    for k in &native_names {
        let d = native_to_diffusers(k);
        assert_eq!(
            format!("{COMFY_PREFIX}{}", diffusers_to_native(&d)),
            *k,
            "round trip of {k}"
        );
    }
    // Config A (2 blocks) and B (3 blocks) share the structure: A's names are B's mapped names
    // less block 2.
    let a: HashSet<String> = diffusers.names().into_iter().collect();
    let b_minus_block2: HashSet<String> = mapped
        .iter()
        .filter(|k| !k.starts_with("blocks.2."))
        .cloned()
        .collect();
    assert_eq!(a, b_minus_block2);
    for k in &a {
        assert_eq!(
            native_to_diffusers(&diffusers_to_native(k)),
            *k,
            "round trip of {k}"
        );
    }
    // The norm swap: the affine cross-attention norm is norm3 natively, norm2 in diffusers.
    assert_eq!(
        native_to_diffusers("blocks.0.norm3.weight"),
        "blocks.0.norm2.weight"
    );
    assert_eq!(native_to_diffusers("head.modulation"), "scale_shift_table");
    assert_eq!(
        native_to_diffusers("blocks.7.modulation"),
        "blocks.7.scale_shift_table"
    );
}

/// Copies the config-A transformer into a temp dir, letting `edit` change its tensors.
fn edited_copy(
    name: &str,
    edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>),
) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let src = fixture("wan-tiny/transformer");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut t = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    dir
}

#[test]
fn dit_missing_tensor_names_tensor_and_file() {
    let dir = edited_copy("dit-missing", |t| {
        t.remove("blocks.1.attn2.to_k.weight");
    });
    let e = err_text(load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap_err());
    assert!(e.contains("blocks.1.attn2.to_k.weight"), "{e}");
    assert!(e.contains("diffusion_pytorch_model.safetensors"), "{e}");
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn dit_wrong_shape_names_expected_and_actual() {
    let dir = edited_copy("dit-shape", |t| {
        let w = t["blocks.0.ffn.net.2.weight"]
            .i((.., ..64))
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert("blocks.0.ffn.net.2.weight".into(), w);
    });
    let e = err_text(load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap_err());
    assert!(e.contains("blocks.0.ffn.net.2.weight"), "{e}");
    assert!(e.contains("[48, 64]") && e.contains("[48, 96]"), "{e}");
}

#[test]
fn dit_config_mismatch_is_reported() {
    let dir = temp_dir("dit-config");
    let src = fixture("wan-tiny/transformer");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut cfg = WanTransformerConfig::tiny();
    cfg.num_layers = 1;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let e = err_text(load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap_err());
    assert!(e.contains("num_layers") && e.contains("config.json"), "{e}");

    cfg = WanTransformerConfig::tiny();
    cfg.ffn_dim = 128;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let e = err_text(load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("blocks.0.ffn.net.0.proj.weight")
            && e.contains("[128, 48]")
            && e.contains("[96, 48]"),
        "{e}"
    );
}

#[test]
fn dit_truncated_file_is_reported_as_corrupt() {
    let dir = temp_dir("dit-trunc");
    let src = fixture("wan-tiny/transformer");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(
        dir.join("diffusion_pytorch_model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = err_text(load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("diffusion_pytorch_model.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );
}

#[test]
fn dit_not_a_transformer_is_reported() {
    let e = err_text(
        load_transformer(
            &fixture("dit_a_io.safetensors"),
            None,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap_err(),
    );
    assert!(e.contains("not a Wan transformer checkpoint"), "{e}");
}

#[test]
fn dit_weights_in_half_precision_load() {
    // bf16 and f16 files load and compute in f32 close to the f32 result (rounding of weights).
    let io = load("dit_a_io.safetensors");
    let (x, t, c) = (
        get(&io, "latents"),
        get(&io, "timestep"),
        get(&io, "context"),
    );
    let reference = get(&io, "velocity");
    for dt in [DType::BF16, DType::F16] {
        let dir = edited_copy(&format!("dit-{dt:?}"), |m| {
            for v in m.values_mut() {
                *v = v.to_dtype(dt).unwrap();
            }
        });
        let (model, _) = load_transformer(&dir, None, DType::F32, &Device::Cpu).unwrap();
        let v = model.forward(&x, &t, &c).unwrap();
        // Loose on purpose: the weights themselves were rounded to 8 (bf16) or 11 (f16) bits.
        assert_close(&format!("dit A from {dt:?} weights"), &v, &reference, 0.1);
    }
}

#[test]
fn dit_published_sizes_parameter_counts() {
    // Exact counts from instantiating diffusers' WanTransformer3DModel with these configs on
    // the meta device (diffusers 0.42.1).
    for (name, cfg, expected) in [
        (
            "Wan2.1-T2V-1.3B",
            WanTransformerConfig::t2v_1_3b(),
            1_418_996_800u64,
        ),
        (
            "Wan2.1-T2V-14B",
            WanTransformerConfig::t2v_14b(),
            14_288_491_584u64,
        ),
    ] {
        let n = cfg.param_count();
        eprintln!(
            "{name} transformer: {n} parameters, {:.2} GB in bf16, {:.2} GB in f32",
            n as f64 * 2.0 / 1e9,
            n as f64 * 4.0 / 1e9
        );
        assert_eq!(n, expected, "{name}");
    }
}

#[test]
fn dit_rope_offsets_cancel_in_attention() {
    // RoPE attention depends only on position differences: a window given its absolute
    // offset computes what it computes at offset 0 (why windows may all start at 0).
    let io = load("dit_b_io.safetensors");
    let model = tiny_native_dit();
    let ctx = model.embed_text(&get(&io, "context")).unwrap();
    let (x, t) = (get(&io, "latents"), get(&io, "timestep"));
    let a = model.forward_embedded(&x, &t, &ctx, (0, 0, 0)).unwrap();
    let b = model.forward_embedded(&x, &t, &ctx, (40, 7, 13)).unwrap();
    assert_close("offset (40, 7, 13) vs 0", &b, &a, 1e-5);
}

#[test]
fn dit_guided_forward_shares_the_first_self_attention_exactly() {
    // Classifier-free guidance runs the latent under two contexts; `forward_guided` computes
    // the first block's self-attention once for both. It must equal the plain forward pass
    // on the latent and timestep repeated, context by context (same ops on the same numbers;
    // 1e-6 allows a GEMM blocking the smaller batch differently).
    let io = load("dit_b_io.safetensors");
    let model = tiny_native_dit();
    let ctx = model.embed_text(&get(&io, "context")).unwrap();
    let (x, t) = (get(&io, "latents"), get(&io, "timestep"));
    let b = x.dim(0).unwrap();
    // Two contexts per item: the fixture's and a different one (cross-attention ignores key
    // order, so a permutation would not do: scale and shift it).
    let other = ctx.affine(-0.7, 0.3).unwrap();
    let ctx2 = Tensor::cat(&[&ctx, &other], 0).unwrap();
    let got = model.forward_guided(&x, &t, &ctx2, (0, 0, 0)).unwrap();
    let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
    let t2 = Tensor::cat(&[&t, &t], 0).unwrap();
    let want = model.forward_embedded(&x2, &t2, &ctx2, (0, 0, 0)).unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff = max_abs_diff(&got, &want);
    assert!(
        diff <= 1e-6,
        "guided vs repeated forward: max abs diff {diff}"
    );
    // The two contexts really give different velocities (the check above is not vacuous).
    let spread = max_abs_diff(&got.narrow(0, 0, b).unwrap(), &got.narrow(0, b, b).unwrap());
    assert!(
        spread > 1e-3,
        "contexts gave the same velocity (spread {spread})"
    );
    // A context count that is not a multiple of the latents is refused, and so are timesteps
    // given per context instead of per latent.
    let e = model
        .forward_guided(&x2, &t2, &ctx, (0, 0, 0))
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("contexts"), "{e}");
    let e = model
        .forward_guided(&x, &t2, &ctx2, (0, 0, 0))
        .map(|_| ())
        .unwrap_err();
    assert!(e.to_string().contains("one per latent"), "{e}");
}

/// The training forward (differentiable mode: composed candle ops, no key merging) computes the
/// same velocity as inference and as diffusers, on the fixture and on the bundled model: a
/// model trained through one path and sampled through the other sees the same function.
#[test]
fn dit_training_path_matches_inference_and_reference() {
    let io = load("dit_a_io.safetensors");
    let (x, t, ctx) = (
        get(&io, "latents"),
        get(&io, "timestep"),
        get(&io, "context"),
    );
    let run = |dir: &std::path::Path, differentiable: bool, x: &Tensor, t: &Tensor, c: &Tensor| {
        sora::nn::set_differentiable(differentiable);
        let (model, _) = load_transformer(dir, None, DType::F32, &Device::Cpu).unwrap();
        let v = model.forward(x, t, c).unwrap();
        sora::nn::set_differentiable(false);
        v
    };
    let dir = fixture("wan-tiny/transformer");
    let train = run(&dir, true, &x, &t, &ctx);
    assert_close(
        "dit A velocity, training path",
        &train,
        &get(&io, "velocity"),
        TOL,
    );
    let infer = run(&dir, false, &x, &t, &ctx);
    assert_close("dit A velocity, training vs inference", &train, &infer, TOL);

    let bundled = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/transformer");
    let x = crate::common::randn(31, &[2, 8, 5, 16, 16]);
    let t = Tensor::new(&[700f32, 120.0], &Device::Cpu).unwrap();
    let ctx = (crate::common::randn(32, &[2, 16, 64]) * 0.5).unwrap();
    let train = run(&bundled, true, &x, &t, &ctx);
    let infer = run(&bundled, false, &x, &t, &ctx);
    assert_close("bundled DiT, training vs inference", &train, &infer, TOL);
}
