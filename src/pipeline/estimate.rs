//! A plan before the work: latent grid, windows, memory per stage and time, computed from the
//! model configs alone (no weights loaded), for `--dry-run` and for refusing runs that would not
//! fit in memory.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use super::{GenRequest, ModelDefaults, SoraModelCard};
use crate::models::umt5::Umt5Config;
use crate::models::wan::vae::{decoder_plan, param_count as vae_params, ResampleMode};
use crate::models::wan::{WanTransformerConfig, WanVaeConfig};
use crate::nn::attention::{BLOCK_K, BLOCK_Q, DIRECT_LIMIT};
use crate::weights::read_config;

/// The configs of a model directory (what planning needs; no weights).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub transformer: WanTransformerConfig,
    pub vae: WanVaeConfig,
    pub text: Umt5Config,
    pub defaults: ModelDefaults,
    pub default_shift: f64,
}

impl ModelInfo {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        super::model::check_model_dir(dir)?;
        let card: Option<SoraModelCard> = if dir.join("sora.json").is_file() {
            Some(read_config(&dir.join("sora.json"))?)
        } else {
            None
        };
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let sched_shift = if sched_path.is_file() {
            read_config::<crate::sched::SchedulerConfig>(&sched_path)?.default_shift()
        } else {
            crate::sched::SchedulerConfig::wan2_1().default_shift()
        };
        let (name, defaults) = match card {
            Some(c) => (c.name, c.defaults),
            None => (
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                ModelDefaults::wan2_1(),
            ),
        };
        Ok(Self {
            name,
            transformer: read_config(&dir.join("transformer/config.json"))?,
            vae: read_config(&dir.join("vae/config.json"))?,
            text: Umt5Config::from_file(&dir.join("text_encoder/config.json"))?,
            default_shift: defaults.shift.unwrap_or(sched_shift),
            defaults,
        })
    }

    pub fn spatial_grid(&self) -> usize {
        let p = self.transformer.patch_size;
        self.vae.spatial_factor() * p[1].max(p[2])
    }
}

/// Resident memory of the process before any model work (code, FFmpeg, allocator), measured.
pub const PROCESS_BASE_BYTES: u64 = 48 << 20;

/// Estimated cost of one generation.
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    /// Latent `[C, T', H', W']`.
    pub latent: [usize; 4],
    pub windows: usize,
    pub tokens_per_window: usize,
    pub decode_tiles: usize,
    pub weights_bytes: u64,
    pub text_encode_bytes: u64,
    pub denoise_bytes: u64,
    pub decode_bytes: u64,
    /// Peak over the stages (weights stay resident).
    pub peak_bytes: u64,
    pub denoise_tflop: f64,
    pub decode_tflop: f64,
    pub denoise_secs: f64,
    pub decode_secs: f64,
    pub total_secs: f64,
    /// The GEMM rate the time estimate is based on.
    pub gemm_gflops: f64,
}

/// Sustained throughput of sora's DiT and VAE on CPU, as fractions of the 1024³ GEMM probe
/// ([`measure_gemm_gflops`], 324 GFLOP/s on the 2-core development machine). Measured with the
/// CPU kernels: DiT 122 / 252 / 126 GFLOP/s and VAE 45 / 173 / 52 GFLOP/s for the bundled model's
/// 60 s clip, the 512-wide side-by-side model at 256²×17, and the bundled model at 1920×1080
/// (tiles). The constants are about the geometric means (157 and ~88 GFLOP/s): those runs'
/// totals land within 1.8× of the estimate, their stage times within about 2×.
pub const DIT_EFFICIENCY: f64 = 0.48;
pub const VAE_EFFICIENCY: f64 = 0.27;

/// Measures the machine's f32 matmul rate in GFLOP/s: a 1024³ product, best of 5 after one
/// warm-up (a 512³ best-of-3 probe varied by 2× between runs).
pub fn measure_gemm_gflops() -> f64 {
    use candle_core::{Device, Tensor};
    const N: usize = 1024;
    let dev = Device::Cpu;
    let (Ok(a), Ok(b)) = (
        Tensor::ones((N, N), candle_core::DType::F32, &dev),
        Tensor::ones((N, N), candle_core::DType::F32, &dev),
    ) else {
        return 50.0;
    };
    if a.matmul(&b).is_err() {
        return 50.0;
    }
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        if a.matmul(&b).is_err() {
            return 50.0;
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (N as f64).powi(3) / best.max(1e-6) / 1e9
}

/// Estimates memory and time of `req` on a machine doing `gemm_gflops`, with weights stored as
/// `weight_bytes` per parameter (4 for f32).
pub fn estimate(
    info: &ModelInfo,
    req: &GenRequest,
    weight_bytes: u64,
    gemm_gflops: f64,
) -> Estimate {
    let t = &info.transformer;
    let v = &info.vae;
    let tf = v.temporal_factor();
    let sf = v.spatial_factor();
    let [pt, ph, pw] = t.patch_size;
    let latent = [
        v.z_dim,
        (req.frames - 1) / tf + 1,
        req.height / sf,
        req.width / sf,
    ];
    let win_t = req.window.map_or(latent[1], |(w, _)| w.min(latent[1]));
    let win_s = |len: usize| req.tile.map_or(len, |(w, _)| w.min(len));
    let count = |len: usize, win: usize, ov: usize| {
        if win >= len {
            1
        } else {
            (len - ov).div_ceil((win - ov).max(1))
        }
    };
    let windows = count(latent[1], win_t, req.window.map_or(0, |w| w.1))
        * count(latent[2], win_s(latent[2]), req.tile.map_or(0, |w| w.1))
        * count(latent[3], win_s(latent[3]), req.tile.map_or(0, |w| w.1));
    let tokens = (win_t / pt) * (win_s(latent[2]) / ph) * (win_s(latent[3]) / pw);
    let d = t.inner_dim() as f64;
    let heads = t.num_attention_heads as f64;
    let ctx = info.defaults.text_len as f64;
    // Guided steps run two passes (an upper bound when only some steps are guided).
    let cfg_mult = if req.guided() { 2.0 } else { 1.0 };
    // Per token per layer: self q,k,v,o; cross q,o; FFN; attention over tokens and context.
    let per_token_layer =
        2.0 * (6.0 * d * d + 2.0 * d * t.ffn_dim as f64) + 4.0 * d * (tokens as f64 + ctx);
    let per_call = tokens as f64 * t.num_layers as f64 * per_token_layer;
    let denoise_flop = per_call * windows as f64 * cfg_mult * req.steps as f64;

    // VAE decode FLOPs per latent frame (4 pixel frames): every conv of the decoder plan at its
    // resolution.
    let lat_px = (req.height / sf * req.width / sf) as f64;
    let conv3 = |cin: usize, cout: usize| 2.0 * 27.0 * (cin * cout) as f64;
    let plan = decoder_plan(v);
    let mid = plan.first().map_or(0, |p| p.resnets[0].0);
    let mut per_frame = lat_px * (conv3(v.z_dim, mid) + 4.0 * conv3(mid, mid));
    let mut scale = 1.0;
    let mut frames = 1.0;
    for b in &plan {
        for (ci, co) in &b.resnets {
            per_frame += lat_px * scale * frames * (2.0 * conv3(*ci, *co));
        }
        match b.upsample {
            Some(ResampleMode::Upsample3d) => {
                per_frame +=
                    lat_px * scale * frames * 2.0 * 3.0 * (b.out_dim * 2 * b.out_dim) as f64;
                frames *= 2.0;
                scale *= 4.0;
                per_frame +=
                    lat_px * scale * frames * 2.0 * 9.0 * (b.out_dim * b.out_dim / 2) as f64;
            }
            Some(ResampleMode::Upsample2d) => {
                scale *= 4.0;
                per_frame +=
                    lat_px * scale * frames * 2.0 * 9.0 * (b.out_dim * b.out_dim / 2) as f64;
            }
            _ => {}
        }
    }
    let decode_flop = per_frame * latent[1] as f64;

    // Memory.
    let params = t.param_count() + vae_params(v) + info.text.param_count() as u64;
    let weights_bytes = params * weight_bytes;
    let text_encode_bytes = (info.defaults.text_len * info.text.d_model * 4 * 12
        + info.text.d_ff * info.defaults.text_len * 8) as u64;
    let batch_tokens = tokens as f64 * cfg_mult;
    let attn_elems = cfg_mult * heads * (tokens as f64).powi(2);
    let attn_bytes = if attn_elems <= DIRECT_LIMIT as f64 {
        attn_elems * 4.0 * 3.0
    } else {
        cfg_mult * heads * (BLOCK_Q * BLOCK_K) as f64 * 4.0 * 4.0
    };
    let latent_elems = latent.iter().product::<usize>() as f64;
    let denoise_bytes = (batch_tokens * (12.0 * d + 2.0 * t.ffn_dim as f64) * 4.0
        + attn_bytes
        + latent_elems * 4.0 * 8.0) as u64;
    let tile_px = if req.width * req.height > super::DECODE_TILE_ABOVE {
        (super::DECODE_TILE_PX * super::DECODE_TILE_PX) as f64
    } else {
        (req.width * req.height) as f64
    };
    let decode_tiles = if req.width * req.height > super::DECODE_TILE_ABOVE {
        req.width
            .div_ceil(super::DECODE_TILE_PX - super::DECODE_OVERLAP_PX)
            * req
                .height
                .div_ceil(super::DECODE_TILE_PX - super::DECODE_OVERLAP_PX)
    } else {
        1
    };
    // Per tile: the causal caches (two frames of every conv's input, all tiles alive at once),
    // the widest activation (channels × frames × pixels) times live copies, and the im2col
    // buffer; plus one blended output chunk.
    let tile_lat = tile_px / (sf * sf) as f64;
    let mut cache_elems = 2.0 * (v.z_dim + 4 * mid) as f64 * tile_lat;
    let mut s = 1.0;
    let mut fr = 1.0;
    let mut act_elems = 0f64;
    for b in &plan {
        for (ci, co) in &b.resnets {
            cache_elems += 2.0 * (*ci + *co) as f64 * tile_lat * s;
            act_elems = act_elems.max(*co as f64 * tile_lat * s * fr);
        }
        match b.upsample {
            Some(ResampleMode::Upsample3d) => {
                cache_elems += 2.0 * b.out_dim as f64 * tile_lat * s;
                s *= 4.0;
                fr *= 2.0;
            }
            Some(ResampleMode::Upsample2d) => s *= 4.0,
            _ => {}
        }
    }
    if let Some(last) = plan.last() {
        cache_elems += 2.0 * last.out_dim as f64 * tile_lat * s;
    }
    let cache = decode_tiles as f64 * cache_elems * 4.0;
    let act = act_elems * 4.0 * 6.0;
    let im2col = ((1u64 << 26) as f64 * 4.0).min(act * 4.0);
    let out_chunk = (req.width * req.height * 3 * tf * 4 * 2) as f64;
    let decode_bytes = (act + im2col + cache + out_chunk) as u64;
    let peak_bytes =
        PROCESS_BASE_BYTES + weights_bytes + text_encode_bytes.max(denoise_bytes).max(decode_bytes);
    let denoise_secs = denoise_flop / (gemm_gflops * 1e9 * DIT_EFFICIENCY);
    let decode_secs = decode_flop / (gemm_gflops * 1e9 * VAE_EFFICIENCY);
    Estimate {
        latent,
        windows,
        tokens_per_window: tokens,
        decode_tiles,
        weights_bytes,
        text_encode_bytes,
        denoise_bytes,
        decode_bytes,
        peak_bytes,
        denoise_tflop: denoise_flop / 1e12,
        decode_tflop: decode_flop / 1e12,
        denoise_secs,
        decode_secs,
        total_secs: denoise_secs + decode_secs,
        gemm_gflops,
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes (None where unknown).
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Human-readable bytes (GiB/MiB).
pub fn fmt_bytes(b: u64) -> String {
    let g = b as f64 / (1u64 << 30) as f64;
    if g >= 1.0 {
        format!("{g:.2} GiB")
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}
