//! The recipe that produces the bundled model: train the VAE on synthetic clips, encode the
//! dataset into latents (the video compression step), train the DiT on latents with captions
//! under flow matching (with caption dropout for classifier-free guidance), and export a model
//! directory in the layout `--model DIR` reads. Every stage resumes from its checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::looper::{data_shards, train_loop, LoopConfig};
use super::optim::{params, save_tensors, Params};
use super::world::{self, Scene, Split};
use crate::models::umt5::{Umt5Config, Umt5Encoder, Umt5Tokenizer};
use crate::models::wan::dit::WanTransformer3DModel;
use crate::models::wan::vae::AutoencoderKLWan;
use crate::models::wan::{WanTransformerConfig, WanVaeConfig};
use crate::pipeline::{encode_text, LateGuidance, ModelDefaults, SoraModelCard};
use crate::sched::guidance::Guider;
use crate::sched::{SamplerKind, SchedulerConfig};

/// Sizes and schedules of the tiny model. `Recipe::bundled()` is what ships in `weights/`;
/// `Recipe::smoke()` is a seconds-long version for tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub width: usize,
    pub height: usize,
    /// Frames of a generated clip (1 + 4k).
    pub frames: usize,
    pub fps: u32,
    /// Frames of a VAE training clip (1 + 4k).
    pub vae_frames: usize,
    /// Side of the random square crops the VAE trains on (it is fully convolutional).
    pub vae_crop: usize,
    pub vae: WanVaeConfig,
    pub text: Umt5Config,
    pub dit: WanTransformerConfig,
    pub text_len: usize,
    pub vae_steps: u64,
    pub vae_batch: usize,
    pub vae_lr: f64,
    /// Steps of decoder fine-tuning on full-length clips (stage 1b).
    pub decoder_steps: u64,
    pub clips: usize,
    pub dit_steps: u64,
    pub dit_batch: usize,
    pub dit_lr: f64,
    /// Weights the DiT starts from instead of a random initialisation (a fine-tune); `None`:
    /// from scratch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dit_init: Option<PathBuf>,
    /// Probability of training on the empty caption (classifier-free guidance).
    pub cfg_dropout: f64,
    /// Caption words whose clips the DiT stage draws more often: a clip whose captions hold
    /// the word is drawn `factor` times as often as one without (factors of several matched
    /// words multiply). Empty (the default): every clip equally often.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dit_oversample: Vec<(String, f64)>,
    /// Trains the text encoder jointly with the DiT (same optimiser, learning rate and EMA)
    /// and rewrites `text_encoder/` with it; false (the default): the encoder stays frozen as
    /// `text_encoder/` holds it (the recipe's random initialisation) and caption embeddings
    /// are computed once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dit_train_text: bool,
    /// Shift applied to the DiT's logit-normal training σ (`s·σ / (1 + (s−1)·σ)`, as the
    /// sampler shifts its schedule): above 1 it trains more at high noise, where the layout
    /// and colours are decided from the text alone.
    #[serde(default = "one")]
    pub dit_sigma_shift: f64,
    /// Extra weight of object tokens in the DiT's flow-matching loss: latent positions that
    /// differ from their frame's background (see [`object_weights`]) weigh `1 + w`. The object
    /// is 2–3 tokens wide, so without it its outline is a sliver of a loss dominated by the
    /// plain background. 0 (the default of older recipes) is the plain mean squared error.
    #[serde(default)]
    pub dit_object_weight: f64,
    /// Grows the object positions of [`Self::dit_object_weight`] by this many latent positions
    /// (a square neighbourhood in each latent frame), so the weighted set also covers the
    /// object's outline: the partly covered positions at its edges and the background right
    /// around it, where a square's corners and a circle's empty corners differ. 0 (older
    /// recipes): the positions themselves.
    #[serde(default)]
    pub dit_object_dilate: usize,
    /// Steps of the last stage (see [`finetune_decoder_on_dit`]): the VAE decoder fine-tuned on
    /// the DiT's guided predictions, what generation feeds it. 0 (older recipes): skipped.
    #[serde(default)]
    pub decoder_dit_steps: u64,
    /// That stage noises training latents to σ ~ U(0.1, this) before the DiT predicts them.
    #[serde(default = "decoder_dit_sigma_max")]
    pub decoder_dit_sigma_max: f64,
    /// Share of that stage's samples decoded from the clean latent instead, so the decoder
    /// keeps decoding the encoder's latents.
    #[serde(default)]
    pub decoder_dit_clean: f64,
    /// What that stage trains the decoder to draw (the frozen decoder's own reconstruction of
    /// the clean latent in recipes before session 15).
    #[serde(default)]
    pub decoder_dit_target: DecoderTarget,
    /// Caption words whose clips that stage draws more often (as [`Self::dit_oversample`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decoder_dit_oversample: Vec<(String, f64)>,
    pub seed: u64,
    /// Inference defaults written to `sora.json`.
    pub steps: usize,
    pub guidance: f64,
    pub shift: f64,
    /// Guidance at low noise written to `sora.json` (none in recipes before session 13).
    #[serde(default)]
    pub cfg_late: Option<LateGuidance>,
    /// UniPC in recipes before session 13.
    #[serde(default = "unipc")]
    pub sampler: SamplerKind,
    /// How guided steps combine the two predictions, written to `sora.json` (CFG in recipes
    /// before session 14).
    #[serde(default)]
    pub guider: Guider,
}

/// The target of the decoder-dit stage ([`finetune_decoder_on_dit`]) for a training latent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DecoderTarget {
    /// The frozen decoder's reconstruction of the clean latent: the decoder learns to draw the
    /// DiT's predictions as it draws the encoder's latents (its own rounding included).
    #[default]
    Decoded,
    /// The rendered clip the latent was encoded from, object pixels weighted 4× as in the VAE
    /// stage: the decoder learns to draw the DiT's predictions as the shapes they stand for.
    Rendered,
}

fn unipc() -> SamplerKind {
    SamplerKind::Unipc
}

fn one() -> f64 {
    1.0
}

fn decoder_dit_sigma_max() -> f64 {
    0.6
}

impl Recipe {
    /// The bundled model: 64×64, 17 frames at 8 fps.
    pub fn bundled(vocab_size: usize) -> Self {
        let vae = WanVaeConfig {
            base_dim: 16,
            z_dim: 8,
            dim_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            temperal_downsample: vec![true, true],
            latents_mean: vec![0.0; 8],
            latents_std: vec![1.0; 8],
            ..WanVaeConfig::wan2_1()
        };
        let text = Umt5Config {
            vocab_size,
            d_model: 64,
            d_kv: 16,
            d_ff: 128,
            num_layers: 2,
            num_heads: 4,
            ..Umt5Config::umt5_xxl()
        };
        let dit = WanTransformerConfig {
            num_attention_heads: 6,
            attention_head_dim: 32,
            in_channels: 8,
            out_channels: Some(8),
            text_dim: 64,
            freq_dim: 64,
            ffn_dim: 768,
            num_layers: 4,
            ..WanTransformerConfig::t2v_1_3b()
        };
        Self {
            width: 64,
            height: 64,
            frames: 17,
            fps: 8,
            vae_frames: 9,
            vae_crop: 32,
            vae,
            text,
            dit,
            text_len: 16,
            vae_steps: 900,
            vae_batch: 4,
            vae_lr: 2e-3,
            decoder_steps: 150,
            clips: 3000,
            dit_steps: 16_000,
            dit_batch: 8,
            dit_lr: 5e-4,
            dit_init: None,
            cfg_dropout: 0.1,
            dit_oversample: Vec::new(),
            dit_train_text: false,
            dit_sigma_shift: 3.0,
            dit_object_weight: 10.0,
            dit_object_dilate: 1,
            // Session 15: the decoder fine-tuned to draw the DiT's predictions as the rendered
            // clips (a quarter of the samples from clean latents) took the shipped DiT from
            // 84.2% / 80.5% to 89.6% / 88.5% (24 seeds per prompt; squares 130 → 158 of 192
            // seen). Against the decoder's own reconstructions (session 11) it was mixed.
            decoder_dit_steps: 600,
            decoder_dit_sigma_max: 0.6,
            decoder_dit_clean: 0.25,
            decoder_dit_target: DecoderTarget::Rendered,
            decoder_dit_oversample: Vec::new(),
            seed: 2026,
            steps: 24,
            guidance: 3.0,
            shift: 3.0,
            // Session 13: guidance 2 below σ 0.7 (24 seeds per prompt: 84.2% / 80.5% against
            // 81.4% / 78.6% at guidance 3 throughout).
            cfg_late: Some(LateGuidance {
                scale: 2.0,
                below: 0.7,
            }),
            sampler: SamplerKind::EulerSde,
            guider: Guider::Cfg,
        }
    }

    /// A seconds-long variant for tests: same architecture, fewer and smaller everything.
    pub fn smoke(vocab_size: usize) -> Self {
        let mut r = Self::bundled(vocab_size);
        r.width = 32;
        r.height = 32;
        r.frames = 5;
        r.vae_frames = 5;
        r.vae_crop = 16;
        r.vae.base_dim = 4;
        r.dit.num_layers = 1;
        r.dit.num_attention_heads = 2;
        r.dit.ffn_dim = 64;
        r.vae_steps = 3;
        r.decoder_steps = 2;
        r.decoder_dit_steps = 2;
        r.vae_batch = 2;
        r.clips = 6;
        r.dit_steps = 3;
        r.dit_batch = 4;
        r.steps = 2;
        r
    }
}

/// Builds a model's variables in a fresh `VarMap` and initialises each by its role: norm gains
/// 1, biases 0, modulation tables N(0, 1/d), the DiT's output head and time projection 0 (the
/// blocks start near identity), token embeddings N(0, 1), other weights N(0, 1/fan_in).
pub fn init_params(ps: &Params, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (name, var) in ps {
        let shape = var.shape().clone();
        let dims = shape.dims().to_vec();
        let n = shape.elem_count();
        let is_gain = name.ends_with("gamma")
            || name.ends_with("layer_norm.weight")
            || name.ends_with("norm_q.weight")
            || name.ends_with("norm_k.weight")
            || (name.contains(".norm2.") && name.ends_with("weight"));
        let zero = name.ends_with(".bias")
            || name.starts_with("proj_out.")
            || name.starts_with("condition_embedder.time_proj.");
        let values: Vec<f32> = if is_gain {
            vec![1.0; n]
        } else if zero {
            vec![0.0; n]
        } else {
            let std = if name.contains("scale_shift_table") {
                1.0 / (*dims.last().unwrap_or(&1) as f64).sqrt()
            } else if name == "shared.weight" {
                1.0
            } else if name.contains("relative_attention_bias") {
                0.5
            } else {
                let fan_in = if dims.len() > 1 { n / dims[0] } else { n };
                1.0 / (fan_in as f64).sqrt()
            };
            (0..n)
                .map(|_| (rng.sample::<f64, _>(rand_distr::StandardNormal) * std) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims, var.device())?)?;
    }
    Ok(())
}

fn step_rng(seed: u64, stage: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(
        seed ^ stage.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03),
    )
}

/// Renders a batch of training scenes as `[B, 3, F, H, W]` in [-1, 1], with their scenes.
fn render_batch(
    rng: &mut ChaCha8Rng,
    r: &Recipe,
    frames: usize,
    n: usize,
    dev: &Device,
) -> Result<(Tensor, Vec<Scene>)> {
    let mut clips = Vec::with_capacity(n);
    let mut scenes = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Scene::sample(rng, r.width, r.height, frames, Split::Train);
        clips.push(world::render_tensor(&s, r.width, r.height, frames, dev)?);
        scenes.push(s);
    }
    Ok((Tensor::stack(&clips, 0)?, scenes))
}

/// `[B, 3, F, crop, crop]` crops of clips `x` around each scene's first object at the middle
/// frame, shifted by up to ±`jitter` pixels (drawn from `rng` when non-zero), inside the frame.
fn object_crops(
    x: &Tensor,
    scenes: &[Scene],
    r: &Recipe,
    frames: usize,
    jitter: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let half = r.vae_crop as f32 / 2.0;
    let mut pick = |c: f32, len: usize| {
        let j: f32 = if jitter > 0.0 {
            rng.random_range(-jitter..=jitter)
        } else {
            0.0
        };
        ((c - half + j).round().max(0.0) as usize).min(len - r.vae_crop)
    };
    let mut crops = Vec::with_capacity(scenes.len());
    for (i, s) in scenes.iter().enumerate() {
        let (cx, cy) = s.objects[0].center_at(frames / 2);
        let (x0, y0) = (pick(cx, r.width), pick(cy, r.height));
        crops.push(
            x.get(i)?
                .narrow(2, y0, r.vae_crop)?
                .narrow(3, x0, r.vae_crop)?,
        );
    }
    Ok(Tensor::stack(&crops, 0)?.contiguous()?)
}

/// Options shared by the stages.
#[derive(Debug, Clone)]
pub struct StageOptions {
    pub progress: bool,
    pub ckpt_every: u64,
}

/// Stage 1: trains the VAE to reconstruct synthetic clips (L1 + L2, small latent L2 penalty).
/// Writes `dir/vae/` (config + weights) when done; returns false if interrupted.
pub fn train_vae(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    let dev = Device::Cpu;
    let out = dir.join("vae");
    if out.join("diffusion_pytorch_model.safetensors").is_file() {
        return Ok(true);
    }
    crate::nn::set_differentiable(true);
    let varmap = VarMap::new();
    let vae = AutoencoderKLWan::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &r.vae)?;
    let ps = params(&varmap);
    init_params(&ps, r.seed ^ 1)?;
    let cfg = LoopConfig {
        name: "vae".into(),
        steps: r.vae_steps,
        lr: r.vae_lr,
        warmup: 30.min(r.vae_steps),
        lr_floor: 0.1,
        clip: 1.0,
        weight_decay: 0.0,
        ema: None,
        ckpt_every: opts.ckpt_every,
        progress: opts.progress,
        shards: data_shards(r.vae_batch),
    };
    let work = dir.join("work-vae");
    std::fs::create_dir_all(&work)?;
    let outcome = train_loop(&cfg, &ps, &work, cancel, &|step, shard| {
        let mut rng = step_rng(r.seed, 1, step);
        let (x, scenes) = render_batch(&mut rng, r, r.vae_frames, r.vae_batch, &dev)?;
        // Crops around the first object (jittered), so every crop has object pixels.
        let x = object_crops(
            &x,
            &scenes,
            r,
            r.vae_frames,
            r.vae_crop as f32 / 4.0,
            &mut rng,
        )?;
        let rows = shard.rows(scenes.len());
        let x = x.narrow(0, rows.start, rows.len())?;
        let scenes = &scenes[rows];
        let (mean, _) = vae.encode(&x)?;
        let recon = vae.decode(&mean)?;
        let reg = (mean.sqr()?.mean_all()? * 1e-4)?;
        Ok(((object_weighted_l1_l2(&recon, &x, scenes)? + reg)? * shard.share(r.vae_batch))?)
    })?;
    crate::nn::set_differentiable(false);
    if !outcome.finished {
        return Ok(false);
    }
    std::fs::create_dir_all(&out)?;
    let weights: HashMap<String, Tensor> = ps
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&weights, &out.join("diffusion_pytorch_model.safetensors"))?;
    write_json(&out.join("config.json"), &vae_config_json(&r.vae))?;
    Ok(true)
}

/// The VAE's reconstruction loss of `recon` against rendered clips `x` (`[B, 3, F, H, W]` in
/// [-1, 1]) of `scenes`: L1 + L2, with object pixels (those differing from their scene's
/// background colour) weighing 4×.
fn object_weighted_l1_l2(recon: &Tensor, x: &Tensor, scenes: &[Scene]) -> Result<Tensor> {
    let bg: Vec<f32> = scenes
        .iter()
        .flat_map(|s| s.background.rgb().map(|v| v as f32 / 127.5 - 1.0))
        .collect();
    let bg = Tensor::from_vec(bg, (scenes.len(), 3, 1, 1, 1), x.device())?;
    let obj = x
        .broadcast_sub(&bg)?
        .abs()?
        .sum_keepdim(1)?
        .gt(0.05)?
        .to_dtype(DType::F32)?;
    let weight = ((obj * 3.0)? + 1.0)?;
    let diff = (recon - x)?;
    let l1 = diff.abs()?.broadcast_mul(&weight)?.mean_all()?;
    let l2 = diff.sqr()?.broadcast_mul(&weight)?.mean_all()?;
    Ok((l1 + l2)?)
}

/// Clips the encode stage renders per seed: clip `k` of the dataset is the `k % 8`-th scene
/// drawn from `step_rng(seed, 2, k - k % 8)`.
const ENCODE_CHUNK: usize = 8;

/// The scenes of dataset clips `idx` (of `total` encoded by [`encode_dataset`]), drawn again
/// from the seeds the encode stage drew them from.
pub fn dataset_scenes(r: &Recipe, total: usize, idx: &[u32]) -> Vec<Scene> {
    idx.iter()
        .map(|&k| {
            let k = k as usize;
            assert!(k < total, "clip {k} of a dataset of {total}");
            let start = k - k % ENCODE_CHUNK;
            let mut rng = step_rng(r.seed, 2, start as u64);
            std::iter::repeat_with(|| {
                Scene::sample(&mut rng, r.width, r.height, r.frames, Split::Train)
            })
            .nth(k - start)
            .expect("an endless iterator")
        })
        .collect()
}

/// Clips per step of the decoder fine-tune (stage 1b).
const DECODER_BATCH: usize = 2;

/// Stage 1b: fine-tunes the VAE decoder (encoder frozen, so encoded latents stay valid) on
/// clips of the full generation length. The causal decoder's caches carry context across
/// latent frames; trained only on short clips it drifts (colours shift) on later frames of
/// longer ones. Overwrites `dir/vae/` weights when done.
pub fn finetune_decoder(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    let dev = Device::Cpu;
    let vae_dir = dir.join("vae");
    let done = dir.join("work-vae-decoder/done");
    if done.is_file() || r.decoder_steps == 0 {
        return Ok(true);
    }
    let cfg: WanVaeConfig = crate::weights::read_config(&vae_dir.join("config.json"))?;
    let tune = DecoderTune {
        name: "vae-decoder",
        steps: r.decoder_steps,
        lr: r.vae_lr * 0.25,
        warmup: 10,
        work: &dir.join("work-vae-decoder"),
    };
    tune_decoder(dir, &cfg, &tune, opts, cancel, &|vae, step, shard| {
        let mut rng = step_rng(r.seed, 5, step);
        let (x, scenes) = render_batch(&mut rng, r, r.frames, DECODER_BATCH, &dev)?;
        let x = object_crops(&x, &scenes, r, r.frames, 0.0, &mut rng)?;
        let rows = shard.rows(DECODER_BATCH);
        let x = x.narrow(0, rows.start, rows.len())?;
        let (mean, _) = vae.encode(&x.detach())?;
        let recon = vae.decode(&mean.detach())?;
        let diff = (recon - &x)?;
        Ok(((diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)? * shard.share(DECODER_BATCH))?)
    })
}

/// Which decoder fine-tune [`tune_decoder`] runs: its loop's name, steps, learning rate and
/// warmup, and its work directory (checkpoint, loss log, `done` marker).
struct DecoderTune<'a> {
    name: &'a str,
    steps: u64,
    lr: f64,
    warmup: u64,
    work: &'a Path,
}

/// What the decoder fine-tunes share: the VAE in `dir/vae/` loaded trainable, its decoder
/// (and post-quant conv) trained on `loss` (given the trainable VAE, the step and the shard)
/// with the encoder frozen, then every weight written back to `dir/vae/` and `done` marked.
/// Returns whether the loop finished (false: cancelled, resumable from the checkpoint).
fn tune_decoder(
    dir: &Path,
    cfg: &WanVaeConfig,
    tune: &DecoderTune,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
    loss: &(dyn Fn(&AutoencoderKLWan, u64, super::looper::Shard) -> Result<Tensor> + Sync),
) -> Result<bool> {
    let dev = Device::Cpu;
    let weights = dir.join("vae").join("diffusion_pytorch_model.safetensors");
    crate::nn::set_differentiable(true);
    let mut varmap = VarMap::new();
    let vae = AutoencoderKLWan::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
    varmap
        .load(&weights)
        .with_context(|| format!("cannot load {}", weights.display()))?;
    let all = params(&varmap);
    let ps: Params = all
        .iter()
        .filter(|(k, _)| k.starts_with("decoder.") || k.starts_with("post_quant_conv."))
        .cloned()
        .collect();
    let lc = LoopConfig {
        name: tune.name.into(),
        steps: tune.steps,
        lr: tune.lr,
        warmup: tune.warmup.min(tune.steps),
        lr_floor: 0.1,
        clip: 1.0,
        weight_decay: 0.0,
        ema: None,
        ckpt_every: opts.ckpt_every,
        progress: opts.progress,
        shards: data_shards(DECODER_BATCH),
    };
    std::fs::create_dir_all(tune.work)?;
    let outcome = train_loop(&lc, &ps, tune.work, cancel, &|step, shard| {
        loss(&vae, step, shard)
    })?;
    crate::nn::set_differentiable(false);
    if !outcome.finished {
        return Ok(false);
    }
    let w: HashMap<String, Tensor> = all
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    save_tensors(&w, &weights)?;
    std::fs::write(tune.work.join("done"), "")?;
    Ok(true)
}

fn vae_config_json(c: &WanVaeConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(c).expect("serialisable");
    v["_class_name"] = "AutoencoderKLWan".into();
    v
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The encoded dataset: normalised latents and, per clip, three caption paraphrases.
#[derive(Debug, Serialize, Deserialize)]
struct Captions {
    captions: Vec<Vec<String>>,
}

/// Stage 2: renders `r.clips` training clips, encodes them with the trained VAE (mean of the
/// posterior), measures per-channel latent mean/std (stored in the VAE config, as Wan does) and
/// saves the normalised latents `[N, z, T', h, w]` with captions.
pub fn encode_dataset(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    let dev = Device::Cpu;
    let latents_path = dir.join("latents.safetensors");
    if latents_path.is_file() {
        return Ok(true);
    }
    let vae_dir = dir.join("vae");
    let mut cfg: WanVaeConfig = crate::weights::read_config(&vae_dir.join("config.json"))?;
    let vae = crate::models::wan::vae_keys::load_vae(&vae_dir, &cfg, DType::F32, &dev)?;
    let bar = if opts.progress {
        indicatif::ProgressBar::new(r.clips as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut lat = Vec::with_capacity(r.clips);
    let mut captions = Vec::with_capacity(r.clips);
    // Chunks of 8 clips, each drawn from its own seed, encoded one chunk per thread at a time
    // (`dataset_scenes` draws them again).
    let chunk = ENCODE_CHUNK;
    let starts: Vec<usize> = (0..r.clips).step_by(chunk).collect();
    for group in starts.chunks(rayon::current_num_threads().max(1)) {
        if cancel() {
            return Ok(false);
        }
        let encoded = group
            .par_iter()
            .map(|&i| -> Result<(Tensor, Vec<Vec<String>>)> {
                let n = chunk.min(r.clips - i);
                let mut rng = step_rng(r.seed, 2, i as u64);
                let (x, scenes) = render_batch(&mut rng, r, r.frames, n, &dev)?;
                let (mean, _) = vae.encode(&x)?;
                let caps = scenes
                    .iter()
                    .map(|s| (0..3).map(|_| world::caption(s, &mut rng)).collect())
                    .collect();
                bar.inc(n as u64);
                Ok((mean, caps))
            })
            .collect::<Result<Vec<_>>>()?;
        for (mean, caps) in encoded {
            for (j, c) in caps.into_iter().enumerate() {
                lat.push(mean.get(j)?);
                captions.push(c);
            }
        }
    }
    bar.finish_and_clear();
    let all = Tensor::stack(&lat, 0)?; // [N, z, T, h, w]
    let z = cfg.z_dim;
    let per_channel = all.transpose(0, 1)?.reshape((z, ()))?;
    let mean: Vec<f32> = per_channel.mean(D::Minus1)?.to_vec1()?;
    let var: Vec<f32> = per_channel
        .broadcast_sub(&Tensor::from_vec(mean.clone(), (z, 1), &dev)?)?
        .sqr()?
        .mean(D::Minus1)?
        .to_vec1()?;
    cfg.latents_mean = mean
        .iter()
        .map(|v| (*v as f64 * 1e4).round() / 1e4)
        .collect();
    cfg.latents_std = var
        .iter()
        .map(|v| ((v.sqrt() as f64).max(1e-3) * 1e4).round() / 1e4)
        .collect();
    write_json(&vae_dir.join("config.json"), &vae_config_json(&cfg))?;
    let vae = crate::models::wan::vae_keys::load_vae(&vae_dir, &cfg, DType::F32, &dev)?;
    let normed = vae.normalize_latents(&all)?;
    let mut m = HashMap::new();
    m.insert("latents".to_string(), normed);
    write_json(&dir.join("captions.json"), &Captions { captions })?;
    save_tensors(&m, &latents_path)?;
    Ok(true)
}

/// Builds (or reloads) the frozen text encoder and tokenizer of the model in `dir`.
fn text_stack(r: &Recipe, dir: &Path, dev: &Device) -> Result<(Umt5Tokenizer, Umt5Encoder)> {
    let tok_dir = dir.join("tokenizer");
    let te_dir = dir.join("text_encoder");
    if !te_dir.join("model.safetensors").is_file() {
        std::fs::create_dir_all(&tok_dir)?;
        std::fs::create_dir_all(&te_dir)?;
        let tok = super::tokenizer::build_tokenizer(&world::vocabulary())?;
        super::tokenizer::save_tokenizer(&tok, &tok_dir.join("tokenizer.json"))?;
        let varmap = VarMap::new();
        Umt5Encoder::load(VarBuilder::from_varmap(&varmap, DType::F32, dev), &r.text)?;
        let ps = params(&varmap);
        init_params(&ps, r.seed ^ 3)?;
        let w: HashMap<String, Tensor> = ps
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&w, &te_dir.join("model.safetensors"))?;
        let mut c = serde_json::to_value(&r.text)?;
        c["architectures"] = serde_json::json!(["UMT5EncoderModel"]);
        c["model_type"] = "umt5".into();
        write_json(&te_dir.join("config.json"), &c)?;
    }
    let tok = Umt5Tokenizer::from_file(&tok_dir.join("tokenizer.json"))?;
    let store = crate::weights::TensorStore::open_dir(&te_dir)?;
    let enc = Umt5Encoder::load(store.into_var_builder(DType::F32, dev), &r.text)?;
    Ok((tok, enc))
}

/// Stage 3: trains the DiT on the latents under the flow-matching objective: `x_σ = (1−σ)·x0 +
/// σ·ε`, target velocity `ε − x0`, σ logit-normal shifted by `dit_sigma_shift`; captions dropped with `cfg_dropout`. Writes
/// the EMA weights to `dir/transformer/`.
pub fn train_dit(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    let dev = Device::Cpu;
    let out = dir.join("transformer");
    if out.join("diffusion_pytorch_model.safetensors").is_file() {
        return Ok(true);
    }
    let (tok, enc) = text_stack(r, dir, &dev)?;
    let (latents, caps) = load_latent_dataset(dir, &dev)?;
    let obj_w = if r.dit_object_weight > 0.0 {
        Some(object_weights(
            &latents,
            r.dit_object_weight,
            r.dit_object_dilate,
        )?)
    } else {
        None
    };
    crate::nn::set_differentiable(true);
    let mut varmap = VarMap::new();
    let dit =
        WanTransformer3DModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &r.dit)?;
    let mut ps = params(&varmap);
    init_params(&ps, r.seed ^ 4)?;
    if let Some(init) = &r.dit_init {
        varmap
            .load(init)
            .with_context(|| format!("cannot start the DiT from {}", init.display()))?;
    }
    // Joint training: a second, trainable copy of the text encoder whose parameters join the
    // DiT's under a prefix; frozen: every caption's embedding computed once.
    let mut te_varmap = VarMap::new();
    let text = if r.dit_train_text {
        let e = Umt5Encoder::load(
            VarBuilder::from_varmap(&te_varmap, DType::F32, &dev),
            &r.text,
        )?;
        let file = dir.join("text_encoder").join("model.safetensors");
        te_varmap.load(&file).with_context(|| {
            format!(
                "cannot load the text encoder to train from {}",
                file.display()
            )
        })?;
        ps.extend(
            params(&te_varmap)
                .into_iter()
                .map(|(k, v)| (format!("{TEXT_PREFIX}{k}"), v)),
        );
        CaptionText::Trained(e)
    } else {
        crate::nn::set_differentiable(false);
        let cache = caption_embeddings(r, &tok, &enc, &caps, &dev)?;
        crate::nn::set_differentiable(true);
        CaptionText::Cached(cache)
    };
    let cfg = LoopConfig {
        name: "dit".into(),
        steps: r.dit_steps,
        lr: r.dit_lr,
        warmup: 100.min(r.dit_steps),
        lr_floor: 0.05,
        clip: 1.0,
        weight_decay: 0.01,
        ema: Some(0.999),
        ckpt_every: opts.ckpt_every,
        progress: opts.progress,
        shards: data_shards(r.dit_batch),
    };
    let work = dir.join("work-dit");
    std::fs::create_dir_all(&work)?;
    let draw = ClipSampler::new(&caps.captions, &r.dit_oversample);
    let outcome = train_loop(&cfg, &ps, &work, cancel, &|step, shard| {
        let mut rng = step_rng(r.seed, 3, step);
        let b = r.dit_batch;
        let idx: Vec<u32> = (0..b).map(|_| draw.sample(&mut rng)).collect();
        let idx_t = Tensor::new(idx.as_slice(), &dev)?;
        let x0 = latents.index_select(&idx_t, 0)?;
        let texts: Vec<String> = idx
            .iter()
            .map(|i| {
                if rng.random::<f64>() < r.cfg_dropout {
                    String::new()
                } else {
                    caps.captions[*i as usize][rng.random_range(0..3)].clone()
                }
            })
            .collect();
        let shift = r.dit_sigma_shift;
        let sig: Vec<f32> = (0..b)
            .map(|_| {
                let u: f64 = rng.sample(rand_distr::StandardNormal);
                let s = 1.0 / (1.0 + (-u).exp());
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let noise_v: Vec<f32> = (0..x0.elem_count())
            .map(|_| rng.sample(rand_distr::StandardNormal))
            .collect();
        let noise = Tensor::from_vec(noise_v, x0.shape(), &dev)?;
        let w = obj_w
            .as_ref()
            .map(|w| w.index_select(&idx_t, 0))
            .transpose()?;
        // The batch's normaliser, then this shard's rows of everything.
        let norm = flow_matching_norm(&x0, w.as_ref())?;
        let rows = shard.rows(b);
        let part = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let (x0, noise) = (part(&x0)?, part(&noise)?);
        let texts = &texts[rows.clone()];
        let ctx = match &text {
            CaptionText::Trained(e) => {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                encode_text(&tok, e, &refs, r.text_len, &dev)?
            }
            CaptionText::Cached(cache) => {
                let rows: Vec<Tensor> = texts.iter().map(|t| cache[t.as_str()].clone()).collect();
                Tensor::stack(&rows, 0)?
            }
        };
        let w = w.as_ref().map(part).transpose()?;
        let sig = sig[rows.clone()].to_vec();
        let s = Tensor::from_vec(sig.clone(), (rows.len(), 1, 1, 1, 1), &dev)?;
        let xt = (x0.broadcast_mul(&(1.0 - &s)?)? + noise.broadcast_mul(&s)?)?;
        let target = (&noise - &x0)?;
        let t = (Tensor::from_vec(sig, rows.len(), &dev)? * 1000.0)?;
        let v = dit.forward(&xt, &t, &ctx)?;
        flow_matching_loss_part(&v, &target, w.as_ref(), norm)
    })?;
    crate::nn::set_differentiable(false);
    if !outcome.finished {
        return Ok(false);
    }
    let ema = outcome.ema.context("DiT training keeps an EMA")?;
    let (text, dit_w): (HashMap<String, Tensor>, HashMap<String, Tensor>) = ema
        .shadow
        .into_iter()
        .partition(|(k, _)| k.starts_with(TEXT_PREFIX));
    if r.dit_train_text {
        // Written before the DiT, whose file marks the stage done.
        let text: HashMap<String, Tensor> = text
            .into_iter()
            .map(|(k, v)| (k[TEXT_PREFIX.len()..].to_string(), v))
            .collect();
        save_tensors(&text, &dir.join("text_encoder").join("model.safetensors"))?;
    }
    std::fs::create_dir_all(&out)?;
    save_tensors(&dit_w, &out.join("diffusion_pytorch_model.safetensors"))?;
    let mut c = serde_json::to_value(&r.dit)?;
    c["_class_name"] = "WanTransformer3DModel".into();
    write_json(&out.join("config.json"), &c)?;
    Ok(true)
}

/// Prefix of the text encoder's parameters among the DiT stage's when they train together.
const TEXT_PREFIX: &str = "text_encoder.";

/// Where the DiT stage's caption embeddings come from.
enum CaptionText {
    /// Frozen encoder: every distinct caption (and the empty one) encoded once.
    Cached(HashMap<String, Tensor>),
    /// The text encoder training with the DiT: the batch's captions encoded every step.
    Trained(Umt5Encoder),
}

/// Draws training clips, uniformly or, with oversampled caption words, in proportion to each
/// clip's weight (the product of the factors of the words its captions hold).
pub struct ClipSampler {
    /// Cumulative weights; `None`: uniform.
    cumulative: Option<Vec<f64>>,
    n: u32,
}

impl ClipSampler {
    pub fn new(captions: &[Vec<String>], oversample: &[(String, f64)]) -> Self {
        let n = captions.len() as u32;
        if oversample.is_empty() {
            return Self {
                cumulative: None,
                n,
            };
        }
        let mut total = 0.0;
        let cumulative = captions
            .iter()
            .map(|caps| {
                let words: Vec<String> = caps.iter().flat_map(|c| world::words(c)).collect();
                let w: f64 = oversample
                    .iter()
                    .filter(|(word, _)| words.iter().any(|x| x == word))
                    .map(|(_, f)| *f)
                    .product();
                total += w;
                total
            })
            .collect();
        Self {
            cumulative: Some(cumulative),
            n,
        }
    }

    /// One clip index (the uniform case draws exactly as recipes before oversampling did).
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        match &self.cumulative {
            None => rng.random_range(0..self.n),
            Some(c) => {
                let u = rng.random::<f64>() * c[c.len() - 1];
                c.partition_point(|&x| x <= u).min(c.len() - 1) as u32
            }
        }
    }
}

/// The encoded dataset of `dir`: latents `[N, z, T', h, w]` and their captions.
fn load_latent_dataset(dir: &Path, dev: &Device) -> Result<(Tensor, Captions)> {
    let path = dir.join("latents.safetensors");
    let data = candle_core::safetensors::load(&path, dev).with_context(|| {
        format!(
            "cannot load {} (run the encode stage first)",
            path.display()
        )
    })?;
    let latents = data
        .get("latents")
        .with_context(|| format!("{} has no `latents` tensor", path.display()))?
        .clone();
    let caps: Captions = crate::weights::read_config(&dir.join("captions.json"))?;
    let n = latents.dim(0)?;
    if caps.captions.len() != n {
        bail!(
            "captions.json has {} entries but there are {n} latent clips",
            caps.captions.len()
        );
    }
    Ok((latents, caps))
}

/// The frozen text encoder's embedding of every caption and of the empty one, computed once.
fn caption_embeddings(
    r: &Recipe,
    tok: &Umt5Tokenizer,
    enc: &Umt5Encoder,
    caps: &Captions,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut distinct: Vec<&str> = caps
        .captions
        .iter()
        .flatten()
        .map(String::as_str)
        .chain(std::iter::once(""))
        .collect();
    distinct.sort_unstable();
    distinct.dedup();
    let mut cache = HashMap::with_capacity(distinct.len());
    for chunk in distinct.chunks(64) {
        let emb = encode_text(tok, enc, chunk, r.text_len, dev)?;
        for (i, c) in chunk.iter().enumerate() {
            cache.insert(c.to_string(), emb.get(i)?);
        }
    }
    Ok(cache)
}

/// Stage 5: fine-tunes the VAE decoder (and its post-quant conv) on what generation feeds it,
/// the DiT's guided predictions, rather than the encoder's latents. Each sample is a training
/// latent noised to σ ~ U(0.1, `decoder_dit_sigma_max`) (or, with probability
/// `decoder_dit_clean`, left clean), the frozen DiT's x0 prediction from it under the recipe's
/// guidance (`x0 = x_σ − σ·v`, at the late scale below its threshold), decoded; the loss
/// (L1 + L2) is against the decoder's own reconstruction of the clean latent before this stage,
/// or with [`DecoderTarget::Rendered`] against the clip the latent was encoded from (object
/// pixels weighted 4×). The DiT's guided latents come out
/// smoother than the encoder's, and the decoder trained only on the latter draws them as rounded
/// blobs (session 11: squares scored 10 of 32 seen prompts before this stage). Rewrites
/// `dir/vae/`.
pub fn finetune_decoder_on_dit(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    let dev = Device::Cpu;
    let work = dir.join("work-vae-dit");
    let done = work.join("done");
    if done.is_file() || r.decoder_dit_steps == 0 {
        return Ok(true);
    }
    if !(r.decoder_dit_sigma_max > 0.1 && r.decoder_dit_sigma_max <= 1.0) {
        bail!(
            "decoder_dit_sigma_max {} is outside (0.1, 1]",
            r.decoder_dit_sigma_max
        );
    }
    let vae_dir = dir.join("vae");
    let cfg: WanVaeConfig = crate::weights::read_config(&vae_dir.join("config.json"))?;
    let (latents, caps) = load_latent_dataset(dir, &dev)?;
    let draw = ClipSampler::new(&caps.captions, &r.decoder_dit_oversample);
    let n = latents.dim(0)?;
    // The frozen parts, in inference mode: text embeddings, the DiT, the decoder as it was.
    crate::nn::set_differentiable(false);
    let (tok, enc) = text_stack(r, dir, &dev)?;
    let text_cache = caption_embeddings(r, &tok, &enc, &caps, &dev)?;
    let (dit, _) =
        crate::models::wan::dit::load_transformer(&dir.join("transformer"), None, DType::F32, &dev)
            .context("the decoder-dit stage needs the trained DiT (run the dit stage first)")?;
    let frozen = crate::models::wan::vae_keys::load_vae(&vae_dir, &cfg, DType::F32, &dev)?;
    let empty = text_cache[""].clone();
    let tune = DecoderTune {
        name: "vae-dit-decoder",
        steps: r.decoder_dit_steps,
        lr: r.vae_lr * 0.1,
        warmup: 20,
        work: &work,
    };
    tune_decoder(dir, &cfg, &tune, opts, cancel, &|vae, step, shard| {
        let mut rng = step_rng(r.seed, 6, step);
        let b = DECODER_BATCH;
        let idx: Vec<u32> = (0..b).map(|_| draw.sample(&mut rng)).collect();
        let texts: Vec<&str> = idx
            .iter()
            .map(|i| caps.captions[*i as usize][rng.random_range(0..3)].as_str())
            .collect();
        let sig: Vec<f32> = (0..b)
            .map(|_| {
                if rng.random::<f64>() < r.decoder_dit_clean {
                    0.0
                } else {
                    (0.1 + (r.decoder_dit_sigma_max - 0.1) * rng.random::<f64>()) as f32
                }
            })
            .collect();
        let x0 = latents.index_select(&Tensor::new(idx.as_slice(), &dev)?, 0)?;
        let noise_v: Vec<f32> = (0..x0.elem_count())
            .map(|_| rng.sample(rand_distr::StandardNormal))
            .collect();
        let noise = Tensor::from_vec(noise_v, x0.shape(), &dev)?;
        let rows = shard.rows(b);
        let m = rows.len();
        let x0 = x0.narrow(0, rows.start, m)?;
        let noise = noise.narrow(0, rows.start, m)?;
        let sig = sig[rows.clone()].to_vec();
        // The frozen DiT's guided x0 prediction and the frozen decoder's target, on this
        // shard's thread in inference mode.
        crate::nn::set_differentiable(false);
        let frozen_part = (|| -> Result<(Tensor, Option<Tensor>)> {
            let s = Tensor::from_vec(sig.clone(), (m, 1, 1, 1, 1), &dev)?;
            let xt = (x0.broadcast_mul(&(1.0 - &s)?)? + noise.broadcast_mul(&s)?)?;
            let mut ctx: Vec<Tensor> = texts[rows.clone()]
                .iter()
                .map(|t| text_cache[*t].clone())
                .collect();
            ctx.extend(std::iter::repeat_n(empty.clone(), m));
            let ctx = dit.embed_text(&Tensor::stack(&ctx, 0)?)?;
            let t = (Tensor::from_vec(sig.clone(), m, &dev)? * 1000.0)?;
            let v = dit.forward_guided(&xt, &t, &ctx, (0, 0, 0))?;
            let (cond, uncond) = (v.narrow(0, 0, m)?, v.narrow(0, m, m)?);
            // Each row at the scale generation uses at its σ (the late scale below its
            // threshold).
            let g: Vec<f32> = sig
                .iter()
                .map(|&sg| match &r.cfg_late {
                    Some(l) if (sg as f64) < l.below => l.scale as f32,
                    _ => r.guidance as f32,
                })
                .collect();
            let g = Tensor::from_vec(g, (m, 1, 1, 1, 1), &dev)?;
            let v = (&uncond + (cond - &uncond)?.broadcast_mul(&g)?)?;
            let x0_hat = (xt - v.broadcast_mul(&s)?)?;
            // The frozen decoder's reconstruction, for the `decoded` target only.
            let decoded = match r.decoder_dit_target {
                DecoderTarget::Decoded => Some(
                    frozen
                        .decode(&frozen.denormalize_latents(&x0)?)?
                        .clamp(-1f32, 1f32)?,
                ),
                DecoderTarget::Rendered => None,
            };
            Ok((x0_hat, decoded))
        })();
        crate::nn::set_differentiable(true);
        let (x0_hat, decoded) = frozen_part?;
        let recon = vae.decode(&vae.denormalize_latents(&x0_hat.detach())?)?;
        let loss = match decoded {
            Some(target) => {
                let diff = (recon - target.detach())?;
                (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?
            }
            None => {
                let scenes = dataset_scenes(r, n, &idx[rows.clone()]);
                let clips = scenes
                    .iter()
                    .map(|s| Ok(world::render_tensor(s, r.width, r.height, r.frames, &dev)?))
                    .collect::<Result<Vec<_>>>()?;
                object_weighted_l1_l2(&recon, &Tensor::stack(&clips, 0)?, &scenes)?
            }
        };
        Ok((loss * shard.share(b))?)
    })
}

/// The DiT's training loss: the mean squared error of the predicted velocity `v` against
/// `target` (`[B, C, T, h, w]`), or with per-position weights `w` (`[B, 1, T, h, w]`, see
/// [`object_weights`]) the weighted mean `Σ w·e / (C·Σ w)`, on the same scale as the plain MSE.
pub fn flow_matching_loss(v: &Tensor, target: &Tensor, w: Option<&Tensor>) -> Result<Tensor> {
    flow_matching_loss_part(v, target, w, flow_matching_norm(target, w)?)
}

/// The denominator of [`flow_matching_loss`] for a batch shaped like `x` (`[B, C, T, h, w]`)
/// with weights `w`: its element count, or `C·Σ w`.
pub fn flow_matching_norm(x: &Tensor, w: Option<&Tensor>) -> Result<f64> {
    Ok(match w {
        Some(w) => w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()? * x.dim(1)? as f64,
        None => x.elem_count() as f64,
    })
}

/// `Σ (w·)e / norm` over the rows given: one shard's part of [`flow_matching_loss`] when `norm`
/// is the whole batch's [`flow_matching_norm`].
pub fn flow_matching_loss_part(
    v: &Tensor,
    target: &Tensor,
    w: Option<&Tensor>,
    norm: f64,
) -> Result<Tensor> {
    let se = (v - target)?.sqr()?;
    let sum = match w {
        Some(w) => se.broadcast_mul(w)?.sum_all()?,
        None => se.sum_all()?,
    };
    Ok((sum / norm)?)
}

/// Distance (in normalised latent units, L2 over channels) from a frame's background beyond
/// which a latent position counts as object. Measured on the bundled recipe's 3,000 clips: 1.5
/// marks 24% of positions (the object, smeared along its path within a latent frame's 4
/// frames); the VAE's border effects on plain backgrounds stay below it.
const OBJECT_LATENT_DISTANCE: f32 = 1.5;

/// Loss weights `[N, 1, T, h, w]` of latents `[N, C, T, h, w]`: `1 + extra` where a position
/// differs from its frame's background or lies within `dilate` positions (rows and columns of
/// the same latent frame) of one that does, else 1. The background of each (clip, latent frame)
/// is the per-channel median over its positions (backgrounds are plain, objects cover < half).
pub fn object_weights(latents: &Tensor, extra: f64, dilate: usize) -> Result<Tensor> {
    let (n, c, t, h, w) = latents.dims5()?;
    let hw = h * w;
    let v: Vec<f32> = latents.flatten_all()?.to_vec1()?;
    let mut out = vec![1f32; n * t * hw];
    let mut med = vec![0f32; c];
    let mut col = vec![0f32; hw];
    let mut object = vec![false; hw];
    for i in 0..n {
        for f in 0..t {
            let at = |ch: usize, p: usize| v[(((i * c + ch) * t + f) * hw) + p];
            for (ch, m) in med.iter_mut().enumerate() {
                for (p, x) in col.iter_mut().enumerate() {
                    *x = at(ch, p);
                }
                col.sort_unstable_by(f32::total_cmp);
                *m = 0.5 * (col[(hw - 1) / 2] + col[hw / 2]);
            }
            for (p, o) in object.iter_mut().enumerate() {
                let d2: f32 = med
                    .iter()
                    .enumerate()
                    .map(|(ch, m)| (at(ch, p) - m).powi(2))
                    .sum();
                *o = d2.sqrt() > OBJECT_LATENT_DISTANCE;
            }
            let frame = &mut out[(i * t + f) * hw..][..hw];
            for (p, o) in object.iter().enumerate() {
                if !o {
                    continue;
                }
                let (y, x) = (p / w, p % w);
                for yy in y.saturating_sub(dilate)..(y + dilate + 1).min(h) {
                    for xx in x.saturating_sub(dilate)..(x + dilate + 1).min(w) {
                        frame[yy * w + xx] = 1.0 + extra as f32;
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (n, 1, t, h, w), latents.device())?)
}

/// Stage 4: writes the remaining files of a model directory (scheduler, model index, sora.json).
pub fn export(r: &Recipe, dir: &Path) -> Result<()> {
    let sched_dir = dir.join("scheduler");
    std::fs::create_dir_all(&sched_dir)?;
    let mut s = SchedulerConfig::wan2_1();
    s.flow_shift = Some(r.shift);
    write_json(&sched_dir.join("scheduler_config.json"), &s)?;
    write_json(
        &dir.join("model_index.json"),
        &serde_json::json!({
            "_class_name": "WanPipeline",
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }),
    )?;
    write_json(
        &dir.join("sora.json"),
        &SoraModelCard {
            name: "sora-tiny".into(),
            defaults: ModelDefaults {
                steps: r.steps,
                guidance: r.guidance,
                cfg_late: r.cfg_late,
                shift: Some(r.shift),
                sampler: r.sampler,
                guider: r.guider,
                fps: r.fps,
                width: r.width,
                height: r.height,
                frames: r.frames,
                negative_prompt: String::new(),
                text_len: r.text_len,
                window_frames: Some(r.frames),
                overlap_frames: Some((r.frames - 1) / 2),
                tile_px: Some(r.width.min(r.height)),
            },
        },
    )?;
    write_json(&dir.join("recipe.json"), r)?;
    Ok(())
}

/// Runs every stage in order into `dir` (resuming whatever is done); true when complete.
pub fn run_all(
    r: &Recipe,
    dir: &Path,
    opts: &StageOptions,
    cancel: &dyn Fn() -> bool,
) -> Result<bool> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(train_vae(r, dir, opts, cancel)?
        && encode_dataset(r, dir, opts, cancel)?
        && finetune_decoder(r, dir, opts, cancel)?
        && train_dit(r, dir, opts, cancel)?
        && finetune_decoder_on_dit(r, dir, opts, cancel)?
        && {
            export(r, dir)?;
            true
        })
}

/// Files of a training directory that are not part of the shipped model.
pub fn work_paths(dir: &Path) -> Vec<PathBuf> {
    [
        "work-vae",
        "work-dit",
        "work-vae-dit",
        "latents.safetensors",
        "captions.json",
    ]
    .iter()
    .map(|p| dir.join(p))
    .collect()
}
