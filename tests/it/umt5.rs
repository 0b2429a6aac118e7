//! UMT5 encoder and tokenizer parity against transformers (`scripts/reference/ref_umt5.py`),
//! and weight-loading errors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sora::models::umt5::{
    relative_position_bucket, rows_to_tensor, Umt5Config, Umt5Encoder, Umt5Tokenizer,
};
use sora::weights::TensorStore;

use crate::common::{assert_close, fixture, get, load};

/// f32 parity tolerance (max abs error) for `last_hidden_state`.
const TOL: f32 = 1e-5;

fn encoder_dir() -> PathBuf {
    fixture("wan-tiny/text_encoder")
}

fn load_encoder(dir: &Path) -> candle_core::Result<Umt5Encoder> {
    let cfg = Umt5Config::from_file(&dir.join("config.json")).map_err(candle_core::Error::wrap)?;
    let vb = TensorStore::open_dir(dir)
        .map_err(candle_core::Error::wrap)?
        .into_var_builder(DType::F32, &Device::Cpu);
    Umt5Encoder::load(vb, &cfg)
}

fn prompts() -> (Vec<String>, usize) {
    let text = std::fs::read_to_string(fixture("umt5_prompts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let prompts = v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    (prompts, v["max_length"].as_u64().unwrap() as usize)
}

fn rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u32).collect())
        .collect()
}

/// A unique scratch copy of the fixture encoder directory.
fn scratch_copy(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sora-umt5-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(encoder_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> String {
    let err = load_encoder(dir).expect_err("loading should fail");
    let msg = err.to_string();
    eprintln!("error: {msg}");
    msg
}

#[test]
fn umt5_tokenizer_matches_transformers() {
    let io = load("umt5_io.safetensors");
    let (prompts, max_len) = prompts();
    let tok = Umt5Tokenizer::from_file(&fixture("wan-tiny/tokenizer/tokenizer.json")).unwrap();
    assert_eq!(tok.pad_id(), 0);
    let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let (ids, mask) = tok.encode_padded(&texts, max_len).unwrap();
    assert_eq!(ids, rows(&get(&io, "input_ids")));
    assert_eq!(mask, rows(&get(&io, "attention_mask")));
    // The long prompt is truncated and still ends with `</s>` (id 1); the short one is padded.
    assert_eq!(ids[1].len(), max_len);
    assert_eq!(*ids[1].last().unwrap(), 1);
    assert!(
        mask[0].contains(&0) && ids[0].contains(&2),
        "short prompt: padding and <unk>"
    );

    let (single, _) = tok.encode_padded(&texts[..1], 64).unwrap();
    let n = mask[0].iter().filter(|&&m| m == 1).count();
    assert_eq!(single[0][..n], ids[0][..n]);

    let (t_ids, t_mask) = tok.encode_tensors(&texts, max_len, &Device::Cpu).unwrap();
    assert_eq!(t_ids.dims(), &[2, max_len]);
    assert_eq!(rows(&t_ids), ids);
    assert_eq!(rows(&t_mask), mask);
}

#[test]
fn umt5_tokenizer_missing_file_is_named() {
    let path = fixture("wan-tiny/tokenizer/no-such-tokenizer.json");
    let msg = Umt5Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(msg.contains("no-such-tokenizer.json"), "{msg}");
}

#[test]
fn umt5_relative_position_buckets_match_transformers() {
    let io = load("umt5_io.safetensors");
    let rel = get(&io, "relative_positions").to_vec1::<i64>().unwrap();
    let expected = get(&io, "relative_buckets").to_vec1::<i64>().unwrap();
    assert_eq!(rel.len(), 601);
    let actual: Vec<i64> = rel
        .iter()
        .map(|&r| relative_position_bucket(r, true, 32, 128) as i64)
        .collect();
    assert_eq!(actual, expected);
    // Spot checks at the log-branch boundaries where f32 rounding matters.
    assert_eq!(relative_position_bucket(16, true, 32, 128), 16 + 10);
    assert_eq!(relative_position_bucket(-128, true, 32, 128), 15);
}

#[test]
fn umt5_padded_batch_matches_transformers() {
    let io = load("umt5_io.safetensors");
    let enc = load_encoder(&encoder_dir()).unwrap();
    assert_eq!(enc.config(), &Umt5Config::tiny());
    let ids = get(&io, "input_ids");
    let mask = get(&io, "attention_mask");
    let out = enc.forward(&ids, Some(&mask)).unwrap();
    // Includes the padded positions: transformers computes them deterministically too.
    assert_close(
        "umt5 last_hidden_state (padded batch)",
        &out,
        &get(&io, "last_hidden_state"),
        TOL,
    );

    // Same through u32 ids/mask as produced by the tokenizer wrapper.
    let ids_u32 = rows_to_tensor(&rows(&ids), &Device::Cpu).unwrap();
    let mask_u32 = rows_to_tensor(&rows(&mask), &Device::Cpu).unwrap();
    let out_u32 = enc.forward(&ids_u32, Some(&mask_u32)).unwrap();
    assert_close(
        "umt5 last_hidden_state (u32 inputs)",
        &out_u32,
        &get(&io, "last_hidden_state"),
        TOL,
    );
}

#[test]
fn umt5_single_prompt_matches_transformers() {
    let io = load("umt5_io.safetensors");
    let enc = load_encoder(&encoder_dir()).unwrap();
    let out = enc.forward(&get(&io, "single_input_ids"), None).unwrap();
    let expected = get(&io, "single_last_hidden_state");
    assert_close(
        "umt5 last_hidden_state (single, unpadded)",
        &out,
        &expected,
        TOL,
    );
    // Padding must not change the real tokens' states.
    let n = expected.dim(1).unwrap();
    let padded = enc
        .forward(&get(&io, "input_ids"), Some(&get(&io, "attention_mask")))
        .unwrap()
        .narrow(0, 0, 1)
        .unwrap()
        .narrow(1, 0, n)
        .unwrap();
    assert_close("umt5 padded row 0 vs unpadded", &padded, &expected, TOL);
}

#[test]
fn umt5_missing_shard_names_shard_and_index() {
    let dir = scratch_copy("missing");
    let shard = "model-00002-of-00003.safetensors";
    std::fs::remove_file(dir.join(shard)).unwrap();
    let msg = load_err(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(msg.contains(shard), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn umt5_truncated_shard_names_file() {
    let dir = scratch_copy("truncated");
    let shard = "model-00003-of-00003.safetensors";
    let path = dir.join(shard);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let msg = load_err(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(msg.contains(shard), "{msg}");
    assert!(msg.contains("truncated or corrupt"), "{msg}");
}

#[test]
fn umt5_config_shape_mismatch_names_tensor_and_shapes() {
    let cfg = Umt5Config {
        d_model: 48,
        ..Umt5Config::tiny()
    };
    let vb = TensorStore::open_dir(&encoder_dir())
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let msg = Umt5Encoder::load(vb, &cfg).unwrap_err().to_string();
    eprintln!("error: {msg}");
    assert!(msg.contains("`shared.weight`"), "{msg}");
    assert!(msg.contains("model-00001-of-00003.safetensors"), "{msg}");
    assert!(
        msg.contains("[98, 32]") && msg.contains("[98, 48]"),
        "{msg}"
    );
}

#[test]
fn umt5_unsupported_activation_names_field() {
    let dir = scratch_copy("activation");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("gated-gelu", "gated-swish");
    std::fs::write(&path, text).unwrap();
    let msg = format!("{:#}", Umt5Config::from_file(&path).unwrap_err());
    std::fs::remove_dir_all(&dir).unwrap();
    eprintln!("error: {msg}");
    assert!(
        msg.contains("feed_forward_proj") && msg.contains("gated-swish"),
        "{msg}"
    );
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn umt5_xxl_param_count() {
    let cfg = Umt5Config::umt5_xxl();
    let n = cfg.param_count();
    let (d, ff, l, v) = (4096f64, 10240f64, 24f64, 256384f64);
    let formula = l * (4.0 * d * d + 3.0 * d * ff) + l * 32.0 * 64.0 + v * d + (2.0 * l + 1.0) * d;
    eprintln!(
        "UMT5-XXL encoder parameters: {n} ({:.3}B); formula {formula}",
        n as f64 / 1e9
    );
    assert!(((n as f64 - formula) / formula).abs() < 0.01);
    assert!((5.6e9..5.8e9).contains(&(n as f64)), "{n}");
    assert_eq!(Umt5Config::tiny().param_count(), 24_032);
}

#[test]
fn umt5_accepts_embed_tokens_key() {
    // Comfy single files name the embedding `encoder.embed_tokens.weight` and omit `shared`.
    let io = load("umt5_io.safetensors");
    let vb = TensorStore::open_dir(&encoder_dir())
        .unwrap()
        .remap(|n| {
            Some(if n == "shared.weight" {
                "encoder.embed_tokens.weight".to_string()
            } else {
                n.to_string()
            })
        })
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let enc = Umt5Encoder::load(vb, &Umt5Config::tiny()).unwrap();
    let out = enc
        .forward(&get(&io, "input_ids"), Some(&get(&io, "attention_mask")))
        .unwrap();
    assert_close(
        "umt5 last_hidden_state (embed_tokens key)",
        &out,
        &get(&io, "last_hidden_state"),
        TOL,
    );
}

#[test]
fn umt5_half_precision_stays_close() {
    // Reduced-precision compute (norms, softmax and the residual stream stay f32): loose
    // tolerances of a few bf16/f16 ulps of the O(1) outputs.
    let io = load("umt5_io.safetensors");
    let expected = get(&io, "last_hidden_state");
    for (dtype, tol) in [(DType::F16, 2e-2f32), (DType::BF16, 1e-1)] {
        let vb = TensorStore::open_dir(&encoder_dir())
            .unwrap()
            .into_var_builder(dtype, &Device::Cpu);
        let enc = Umt5Encoder::load(vb, &Umt5Config::tiny()).unwrap();
        let out = enc
            .forward(&get(&io, "input_ids"), Some(&get(&io, "attention_mask")))
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_close(
            &format!("umt5 last_hidden_state ({dtype:?})"),
            &out,
            &expected,
            tol,
        );
    }
}
