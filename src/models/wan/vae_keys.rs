//! Wan2.1 VAE checkpoint names: the original Wan layout (`Wan2.1_VAE.pth`, Comfy's
//! `wan_2.1_vae.safetensors`) and diffusers' `AutoencoderKLWan` layout, mapped both ways from
//! the config (stage count and res blocks per stage), plus a loader that opens either.
//!
//! The map equals diffusers' `convert_wan_vae_to_diffusers` on the standard structure; unlike it,
//! it is computed from the config, and keys that do not fit the structure (stage count, res
//! blocks per stage, which encoder layers are resamples) map to `None`.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device};

use super::config::WanVaeConfig;
use super::vae::{encoder_plan, AutoencoderKLWan, DownLayer};
use crate::weights::TensorStore;

/// Residual-block parameter tails: native (`nn.Sequential` indices) and diffusers names.
const RES_TAILS: &[(&str, &str)] = &[
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.weight", "conv1.weight"),
    ("residual.2.bias", "conv1.bias"),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.weight", "conv2.weight"),
    ("residual.6.bias", "conv2.bias"),
    ("shortcut.weight", "conv_shortcut.weight"),
    ("shortcut.bias", "conv_shortcut.bias"),
];

/// Parameter tails shared by both layouts.
const ATTN_TAILS: &[&str] = &[
    "norm.gamma",
    "to_qkv.weight",
    "to_qkv.bias",
    "proj.weight",
    "proj.bias",
];
const RESAMPLE_TAILS: &[&str] = &[
    "resample.1.weight",
    "resample.1.bias",
    "time_conv.weight",
    "time_conv.bias",
];
const CONV_TAILS: &[&str] = &["weight", "bias"];

/// Single modules: (native, diffusers) prefixes, each followed by `.weight`/`.bias`/`.gamma`.
const FIXED: &[(&str, &str)] = &[
    ("conv1", "quant_conv"),
    ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"),
    ("decoder.conv1", "decoder.conv_in"),
    ("encoder.head.0", "encoder.norm_out"),
    ("encoder.head.2", "encoder.conv_out"),
    ("decoder.head.0", "decoder.norm_out"),
    ("decoder.head.2", "decoder.conv_out"),
];

fn res_n2d(tail: &str) -> Option<&'static str> {
    RES_TAILS.iter().find(|(n, _)| *n == tail).map(|(_, d)| *d)
}

fn res_d2n(tail: &str) -> Option<&'static str> {
    RES_TAILS.iter().find(|(_, d)| *d == tail).map(|(n, _)| *n)
}

fn fixed_tail_ok(prefix: &str, tail: &str) -> bool {
    if prefix.ends_with("head.0") || prefix.ends_with("norm_out") {
        tail == "gamma"
    } else {
        CONV_TAILS.contains(&tail)
    }
}

/// Splits `"<index>.<rest>"`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// Whether flat encoder layer `i` is a resample (`Some(true)`), a res block, or absent.
fn encoder_layer_is_resample(cfg: &WanVaeConfig, i: usize) -> Option<bool> {
    encoder_plan(cfg)
        .get(i)
        .map(|l| matches!(l, DownLayer::Resample { .. }))
}

/// Native decoder `upsamples.{i}` -> (stage, slot in stage); slot `num_res_blocks + 1` is the
/// upsampler, which the last stage lacks.
fn decoder_slot(cfg: &WanVaeConfig, i: usize) -> Option<(usize, usize)> {
    let per = cfg.num_res_blocks + 2;
    let (s, r) = (i / per, i % per);
    let n = cfg.dim_mult.len();
    (s < n && (r <= cfg.num_res_blocks || s + 1 < n)).then_some((s, r))
}

/// Maps an original-Wan VAE key (no prefix) to its diffusers name; `None` if it does not fit
/// the structure `cfg` describes.
pub fn native_to_diffusers(key: &str, cfg: &WanVaeConfig) -> Option<String> {
    if let Some((module, tail)) = key.rsplit_once('.') {
        if let Some((_, d)) = FIXED.iter().find(|(n, _)| *n == module) {
            return fixed_tail_ok(module, tail).then(|| format!("{d}.{tail}"));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if let Some(rest) = rest.strip_prefix("middle.") {
        let (i, tail) = split_index(rest)?;
        return match i {
            0 | 2 => Some(format!(
                "{side}.mid_block.resnets.{}.{}",
                i / 2,
                res_n2d(tail)?
            )),
            1 => ATTN_TAILS
                .contains(&tail)
                .then(|| format!("{side}.mid_block.attentions.0.{tail}")),
            _ => None,
        };
    }
    if side == "encoder" {
        let (i, tail) = split_index(rest.strip_prefix("downsamples.")?)?;
        return if encoder_layer_is_resample(cfg, i)? {
            RESAMPLE_TAILS
                .contains(&tail)
                .then(|| format!("encoder.down_blocks.{i}.{tail}"))
        } else {
            Some(format!("encoder.down_blocks.{i}.{}", res_n2d(tail)?))
        };
    }
    let (i, tail) = split_index(rest.strip_prefix("upsamples.")?)?;
    let (s, r) = decoder_slot(cfg, i)?;
    if r <= cfg.num_res_blocks {
        Some(format!(
            "decoder.up_blocks.{s}.resnets.{r}.{}",
            res_n2d(tail)?
        ))
    } else {
        RESAMPLE_TAILS
            .contains(&tail)
            .then(|| format!("decoder.up_blocks.{s}.upsamplers.0.{tail}"))
    }
}

/// Maps a diffusers `AutoencoderKLWan` key to its original-Wan name; `None` if it does not fit
/// the structure `cfg` describes.
pub fn diffusers_to_native(key: &str, cfg: &WanVaeConfig) -> Option<String> {
    if let Some((module, tail)) = key.rsplit_once('.') {
        if let Some((n, _)) = FIXED.iter().find(|(_, d)| *d == module) {
            return fixed_tail_ok(module, tail).then(|| format!("{n}.{tail}"));
        }
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if let Some(rest) = rest.strip_prefix("mid_block.") {
        if let Some(rest) = rest.strip_prefix("resnets.") {
            let (i, tail) = split_index(rest)?;
            if i >= 2 {
                return None;
            }
            return Some(format!("{side}.middle.{}.{}", 2 * i, res_d2n(tail)?));
        }
        let tail = rest.strip_prefix("attentions.0.")?;
        return ATTN_TAILS
            .contains(&tail)
            .then(|| format!("{side}.middle.1.{tail}"));
    }
    if side == "encoder" {
        let (i, tail) = split_index(rest.strip_prefix("down_blocks.")?)?;
        return if encoder_layer_is_resample(cfg, i)? {
            RESAMPLE_TAILS
                .contains(&tail)
                .then(|| format!("encoder.downsamples.{i}.{tail}"))
        } else {
            Some(format!("encoder.downsamples.{i}.{}", res_d2n(tail)?))
        };
    }
    let (s, rest) = split_index(rest.strip_prefix("up_blocks.")?)?;
    let n = cfg.dim_mult.len();
    let base = s * (cfg.num_res_blocks + 2);
    if s >= n {
        return None;
    }
    if let Some(rest) = rest.strip_prefix("resnets.") {
        let (r, tail) = split_index(rest)?;
        if r > cfg.num_res_blocks {
            return None;
        }
        return Some(format!("decoder.upsamples.{}.{}", base + r, res_d2n(tail)?));
    }
    let tail = rest.strip_prefix("upsamplers.0.")?;
    (s + 1 < n && RESAMPLE_TAILS.contains(&tail))
        .then(|| format!("decoder.upsamples.{}.{tail}", base + cfg.num_res_blocks + 1))
}

/// Which naming a VAE checkpoint uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaeLayout {
    /// diffusers names (`encoder.conv_in.weight`).
    Diffusers { prefix: String },
    /// Original Wan / Comfy names (`encoder.conv1.weight`).
    Native { prefix: String },
}

/// Detects the layout from tensor names, allowing a prefix that ends in `.` (e.g.
/// `first_stage_model.` or `vae.` in a combined checkpoint). `None` if no VAE is found.
pub fn detect_layout<S: AsRef<str>>(names: &[S]) -> Option<VaeLayout> {
    let prefix_of = |name: &str, suffix: &str| -> Option<String> {
        let p = name.strip_suffix(suffix)?;
        (p.is_empty() || p.ends_with('.')).then(|| p.to_string())
    };
    let names: Vec<&str> = names.iter().map(|s| s.as_ref()).collect();
    if let Some(prefix) = names
        .iter()
        .find_map(|n| prefix_of(n, "encoder.conv_in.weight"))
    {
        return Some(VaeLayout::Diffusers { prefix });
    }
    names
        .iter()
        .find_map(|n| prefix_of(n, "encoder.conv1.weight"))
        .map(|prefix| VaeLayout::Native { prefix })
}

/// Opens a VAE checkpoint (a diffusers `vae/` directory or a single safetensors file in either
/// layout) as a store with diffusers names.
pub fn open_vae_store(path: &Path, cfg: &WanVaeConfig) -> anyhow::Result<TensorStore> {
    let store = if path.is_dir() {
        TensorStore::open_dir(path)?
    } else {
        TensorStore::open_file(path)?
    };
    let store = match detect_layout(&store.names()) {
        Some(VaeLayout::Diffusers { prefix }) if prefix.is_empty() => store,
        Some(VaeLayout::Diffusers { prefix }) => store.remap(|k| k.strip_prefix(prefix.as_str()).map(str::to_string))?,
        Some(VaeLayout::Native { prefix }) => {
            let cfg = cfg.clone();
            store.remap(move |k| native_to_diffusers(k.strip_prefix(prefix.as_str())?, &cfg))?
        }
        None => anyhow::bail!(
            "{} is not a Wan VAE checkpoint: it has neither `encoder.conv_in.weight` (diffusers) nor `encoder.conv1.weight` (original Wan / Comfy)",
            path.display()
        ),
    };
    Ok(store)
}

/// Loads the Wan VAE from `path` (see [`open_vae_store`]) in `dtype` on `device`.
pub fn load_vae(
    path: &Path,
    cfg: &WanVaeConfig,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<AutoencoderKLWan> {
    cfg.validate()?;
    let store = open_vae_store(path, cfg)?;
    let vb = store.into_var_builder(dtype, device);
    AutoencoderKLWan::load(vb, cfg)
        .with_context(|| format!("loading the Wan VAE from {}", path.display()))
}
