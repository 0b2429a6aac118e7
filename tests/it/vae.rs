//! AutoencoderKLWan parity against diffusers (fixtures from scripts/reference/ref_vae.py):
//! encode and chunked decode of config A (diffusers layout) and config B (native layout), the
//! decode stream, the latent normalisation, the native <-> diffusers key map, loading errors and
//! the parameter count. Tolerance: max abs error 1e-5 on f32 outputs of O(1).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sora::models::wan::vae::{param_count, tensor_specs, AutoencoderKLWan};
use sora::models::wan::vae_keys::{
    detect_layout, diffusers_to_native, load_vae, native_to_diffusers, VaeLayout,
};
use sora::models::wan::WanVaeConfig;
use sora::weights::{read_config, TensorStore};

use crate::common::{assert_close, fixture, get, load, max_abs_diff};

const TOL: f32 = 1e-5;

/// `sum(p.numel() for p in AutoencoderKLWan().parameters())` with diffusers 0.42.1 (default =
/// Wan2.1 config), printed by `real_param_count()` in scripts/reference/ref_vae.py.
const WAN21_VAE_PARAMS: u64 = 126_892_531;

fn vae_a() -> AutoencoderKLWan {
    load_vae(
        &fixture("wan-tiny/vae"),
        &WanVaeConfig::tiny(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn cfg_b() -> WanVaeConfig {
    read_config(&fixture("wan-tiny-native/vae_config.json")).unwrap()
}

fn vae_b() -> AutoencoderKLWan {
    load_vae(
        &fixture("wan-tiny-native/wan_2.1_vae.safetensors"),
        &cfg_b(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sora-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Decodes through the stream, checking each chunk's frame count, and returns the chunks.
fn stream_chunks(vae: &AutoencoderKLWan, z: &Tensor) -> Vec<Tensor> {
    let t = z.dim(2).unwrap();
    let chunks: Vec<Tensor> = vae.decode_stream(z).unwrap().map(|c| c.unwrap()).collect();
    let counts: Vec<usize> = chunks.iter().map(|c| c.dim(2).unwrap()).collect();
    let mut expected = vec![1];
    expected.resize(t, vae.config().temporal_factor());
    assert_eq!(counts, expected, "pixel frames per latent frame");
    chunks
}

#[test]
fn vae_a_config_matches_tiny() {
    let cfg: WanVaeConfig = read_config(&fixture("wan-tiny/vae/config.json")).unwrap();
    assert_eq!(
        cfg,
        WanVaeConfig::tiny(),
        "fixture config drifted from WanVaeConfig::tiny()"
    );
}

#[test]
fn vae_a_encode_matches_reference() {
    let io = load("vae_a_io.safetensors");
    let (mean, logvar) = vae_a().encode(&get(&io, "video")).unwrap();
    assert_eq!(mean.dims(), &[1, 4, 3, 4, 6]);
    assert_close("vae A encode mean", &mean, &get(&io, "mean"), TOL);
    assert_close("vae A encode logvar", &logvar, &get(&io, "logvar"), TOL);
}

#[test]
fn vae_a_decode_matches_reference_and_streams() {
    let io = load("vae_a_io.safetensors");
    let vae = vae_a();
    let z = get(&io, "latent");
    let t0 = Instant::now();
    let video = vae.decode(&z).unwrap();
    eprintln!(
        "vae A decode [1,4,3,4,6] -> {:?}: {:.2?} on CPU",
        video.dims(),
        t0.elapsed()
    );
    assert_eq!(vae.num_frames(3), 9);
    assert_close("vae A decode", &video, &get(&io, "decoded"), TOL);
    let chunks = stream_chunks(&vae, &z);
    let joined = Tensor::cat(&chunks, 2).unwrap();
    assert_eq!(
        max_abs_diff(&joined, &video),
        0.0,
        "stream chunks differ from decode()"
    );
}

#[test]
fn vae_a_latent_normalization_matches_pipeline() {
    let io = load("vae_a_io.safetensors");
    let vae = vae_a();
    let den = vae.denormalize_latents(&get(&io, "latent")).unwrap();
    assert_close(
        "denormalize (WanPipeline)",
        &den,
        &get(&io, "denormalized"),
        0.0,
    );
    let norm = vae.normalize_latents(&get(&io, "mean")).unwrap();
    assert_close(
        "normalize (WanVideoToVideoPipeline)",
        &norm,
        &get(&io, "normalized"),
        0.0,
    );
}

#[test]
fn vae_b_native_layout_matches_reference() {
    let io = load("vae_b_io.safetensors");
    let vae = vae_b();
    let (mean, logvar) = vae.encode(&get(&io, "video")).unwrap();
    assert_eq!(mean.dims(), &[1, 5, 2, 3, 5]);
    assert_close("vae B encode mean", &mean, &get(&io, "mean"), TOL);
    assert_close("vae B encode logvar", &logvar, &get(&io, "logvar"), TOL);
    let z = get(&io, "latent");
    let chunks = stream_chunks(&vae, &z);
    let video = Tensor::cat(&chunks, 2).unwrap();
    assert_eq!(video.dims(), &[1, 3, 17, 24, 40]);
    assert_close("vae B decode (streamed)", &video, &get(&io, "decoded"), TOL);
}

fn store_shapes(store: &TensorStore) -> HashMap<String, Vec<usize>> {
    store
        .names()
        .into_iter()
        .map(|n| {
            let s = store.shape(&n).unwrap();
            (n, s)
        })
        .collect()
}

#[test]
fn vae_tensor_specs_equal_fixture_tensors() {
    let a = TensorStore::open_dir(&fixture("wan-tiny/vae")).unwrap();
    let specs: HashMap<String, Vec<usize>> =
        tensor_specs(&WanVaeConfig::tiny()).into_iter().collect();
    assert_eq!(store_shapes(&a), specs, "config A tensors");
    let n: u64 = specs
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum();
    assert_eq!(param_count(&WanVaeConfig::tiny()), n);
    eprintln!("tiny VAE (config A): {n} parameters");
}

#[test]
fn vae_keys_round_trip_and_match_model_names() {
    // Config A (diffusers names): diffusers -> native -> diffusers.
    let cfg_a = WanVaeConfig::tiny();
    let a = TensorStore::open_dir(&fixture("wan-tiny/vae"))
        .unwrap()
        .names();
    let mut native_a = HashSet::new();
    for k in &a {
        let n = diffusers_to_native(k, &cfg_a).unwrap_or_else(|| panic!("no native name for {k}"));
        assert_eq!(
            native_to_diffusers(&n, &cfg_a).as_deref(),
            Some(k.as_str()),
            "{k} -> {n}"
        );
        assert!(
            native_a.insert(n),
            "two diffusers keys map to one native key"
        );
    }
    // Config B (native names): native -> diffusers -> native, and the diffusers names are the
    // model's.
    let cfg = cfg_b();
    let b = TensorStore::open_file(&fixture("wan-tiny-native/wan_2.1_vae.safetensors")).unwrap();
    let shapes = store_shapes(&b);
    let mut mapped = HashMap::new();
    for (k, shape) in &shapes {
        let d = native_to_diffusers(k, &cfg).unwrap_or_else(|| panic!("no diffusers name for {k}"));
        assert_eq!(
            diffusers_to_native(&d, &cfg).as_deref(),
            Some(k.as_str()),
            "{k} -> {d}"
        );
        mapped.insert(d, shape.clone());
    }
    let specs: HashMap<String, Vec<usize>> = tensor_specs(&cfg).into_iter().collect();
    assert_eq!(
        mapped, specs,
        "native fixture mapped to diffusers names vs the model's tensors"
    );
    // Names outside the structure map to nothing.
    assert_eq!(
        native_to_diffusers("decoder.upsamples.15.resample.1.weight", &cfg),
        None
    );
    assert_eq!(
        native_to_diffusers("decoder.upsamples.14.resample.1.weight", &cfg),
        None
    );
    assert_eq!(
        diffusers_to_native("decoder.up_blocks.3.upsamplers.0.resample.1.weight", &cfg),
        None
    );
    assert_eq!(
        diffusers_to_native("encoder.down_blocks.2.norm1.gamma", &cfg),
        None
    );
}

#[test]
fn vae_layout_detection_accepts_prefixes() {
    assert_eq!(
        detect_layout(&["first_stage_model.encoder.conv1.weight"]),
        Some(VaeLayout::Native {
            prefix: "first_stage_model.".into()
        })
    );
    assert_eq!(
        detect_layout(&["vae.encoder.conv_in.weight"]),
        Some(VaeLayout::Diffusers {
            prefix: "vae.".into()
        })
    );
    assert_eq!(
        detect_layout(&["encoder.conv1.weight"]),
        Some(VaeLayout::Native {
            prefix: String::new()
        })
    );
    assert_eq!(
        detect_layout(&["text_encoder.conv1.weight", "blocks.0.x"]),
        None
    );

    // A prefixed native file loads and decodes like the plain one.
    let dir = temp_dir("vae-prefixed");
    let tensors = candle_core::safetensors::load(
        fixture("wan-tiny-native/wan_2.1_vae.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let prefixed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (format!("first_stage_model.{k}"), v))
        .collect();
    let path = dir.join("combined.safetensors");
    candle_core::safetensors::save(&prefixed, &path).unwrap();
    let vae = load_vae(&path, &cfg_b(), DType::F32, &Device::Cpu).unwrap();
    let io = load("vae_b_io.safetensors");
    let z = get(&io, "latent").narrow(2, 0, 2).unwrap();
    let expected = get(&io, "decoded").narrow(2, 0, 5).unwrap();
    assert_close(
        "vae B decode, prefixed file",
        &vae.decode(&z).unwrap(),
        &expected,
        TOL,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vae_load_wrong_shape_names_tensor_and_shapes() {
    let cfg = WanVaeConfig {
        base_dim: 16,
        ..WanVaeConfig::tiny()
    };
    let err = load_vae(&fixture("wan-tiny/vae"), &cfg, DType::F32, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(msg.contains("`encoder.conv_in.weight`"), "{msg}");
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
    assert!(
        msg.contains("[8, 3, 3, 3, 3]") && msg.contains("[16, 3, 3, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn vae_load_missing_tensor_names_tensor_and_file() {
    let dir = temp_dir("vae-missing");
    let mut tensors = candle_core::safetensors::load(
        fixture("wan-tiny/vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.remove("decoder.norm_out.gamma").unwrap();
    let path = dir.join("broken_vae.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = load_vae(&path, &WanVaeConfig::tiny(), DType::F32, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    eprintln!("{msg}");
    assert!(msg.contains("`decoder.norm_out.gamma`"), "{msg}");
    assert!(msg.contains("broken_vae.safetensors"), "{msg}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vae_rejects_wan22_config() {
    let cfg = WanVaeConfig {
        is_residual: true,
        ..WanVaeConfig::tiny()
    };
    let err = load_vae(&fixture("wan-tiny/vae"), &cfg, DType::F32, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("Wan2.2"), "{err:#}");
}

#[test]
fn vae_wan21_param_count() {
    let n = WanVaeConfig::wan2_1().param_count();
    eprintln!(
        "Wan2.1 VAE (AutoencoderKLWan): {n} parameters ({:.1}M)",
        n as f64 / 1e6
    );
    assert_eq!(n, WAN21_VAE_PARAMS);
}
