//! A loaded Wan2.1 text-to-video model: tokenizer, UMT5 encoder, transformer, VAE, scheduler
//! config and the generation defaults that suit it, read from a diffusers-layout directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::models::umt5::{Umt5Config, Umt5Encoder, Umt5Tokenizer};
use crate::models::wan::dit::{load_transformer, WanTransformer3DModel};
use crate::models::wan::vae::AutoencoderKLWan;
use crate::models::wan::vae_keys::load_vae;
use crate::models::wan::{WanTransformerConfig, WanVaeConfig};
use crate::sched::guidance::Guider;
use crate::sched::{SamplerKind, SchedulerConfig};
use crate::weights::{read_config, TensorStore};

/// The negative prompt the Wan2.1 authors use by default (`shared_config.py`); it lists
/// artefacts to steer away from (overexposure, blur, static frames, deformed limbs, …).
pub const WAN_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// Generation defaults of a model, from its `sora.json` or, for published Wan2.1 checkpoints,
/// the values their authors recommend. Every field can be overridden on the command line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDefaults {
    pub steps: usize,
    pub guidance: f64,
    /// A different guidance scale at low noise (the last steps, where details are refined);
    /// `None`: `guidance` throughout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg_late: Option<LateGuidance>,
    /// `None`: the scheduler config's shift.
    #[serde(default)]
    pub shift: Option<f64>,
    pub sampler: SamplerKind,
    /// How guided steps combine the two predictions (default: classifier-free guidance).
    #[serde(default, skip_serializing_if = "Guider::is_cfg")]
    pub guider: Guider,
    pub fps: u32,
    pub width: usize,
    pub height: usize,
    /// Frames of one clip at the native length (a 4k+1 count for Wan).
    pub frames: usize,
    #[serde(default)]
    pub negative_prompt: String,
    /// Maximum text tokens (512 for Wan).
    #[serde(default = "default_text_len")]
    pub text_len: usize,
    /// Longest clip (frames) denoised in one window; longer clips use overlapping temporal
    /// windows of this length. Default: `frames`.
    #[serde(default)]
    pub window_frames: Option<usize>,
    /// Frames shared by neighbouring windows. Default: about a third of the window.
    #[serde(default)]
    pub overlap_frames: Option<usize>,
    /// Native frame side in pixels: frames more than twice as large (in either axis) are
    /// denoised in overlapping tiles of this size. `None`: no automatic tiling.
    #[serde(default)]
    pub tile_px: Option<usize>,
}

/// Guidance `scale` at the steps whose noise level σ is below `below` (0 < below ≤ 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LateGuidance {
    pub scale: f64,
    pub below: f64,
}

fn default_text_len() -> usize {
    512
}

impl ModelDefaults {
    /// Wan2.1-T2V (diffusers docs and the Wan README): 50 steps, guidance 5, 16 fps, 832×480, 81 frames.
    pub fn wan2_1() -> Self {
        Self {
            steps: 50,
            guidance: 5.0,
            cfg_late: None,
            shift: None,
            sampler: SamplerKind::Unipc,
            guider: Guider::Cfg,
            fps: 16,
            width: 832,
            height: 480,
            frames: 81,
            negative_prompt: WAN_NEGATIVE_PROMPT.to_string(),
            text_len: 512,
            window_frames: Some(81),
            overlap_frames: Some(33),
            tile_px: None,
        }
    }
}

/// `sora.json`: what sora needs to know about a model beyond the diffusers configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoraModelCard {
    /// A short name shown in progress output and metadata.
    pub name: String,
    pub defaults: ModelDefaults,
}

/// Everything needed to generate with one model.
pub struct WanModel {
    pub name: String,
    pub dir: PathBuf,
    pub tokenizer: Umt5Tokenizer,
    pub text_encoder: Umt5Encoder,
    pub transformer: WanTransformer3DModel,
    pub vae: AutoencoderKLWan,
    pub scheduler: SchedulerConfig,
    pub defaults: ModelDefaults,
    pub device: Device,
    pub dtype: DType,
}

impl std::fmt::Debug for WanModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WanModel")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish()
    }
}

/// The files a diffusers-layout Wan directory must have; checked before anything is loaded so
/// the error lists everything that is missing at once.
pub const REQUIRED_FILES: &[&str] = &[
    "tokenizer/tokenizer.json",
    "text_encoder/config.json",
    "transformer/config.json",
    "vae/config.json",
];

/// Checks `dir` looks like a Wan model directory, naming every missing file.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let missing: Vec<&str> = REQUIRED_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} is not a Wan text-to-video model directory (diffusers layout): missing {}",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

impl WanModel {
    /// Loads a diffusers-layout directory (`tokenizer/`, `text_encoder/`, `transformer/`, `vae/`,
    /// optional `scheduler/` and `sora.json`), computing in `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        check_model_dir(dir)?;
        let card_path = dir.join("sora.json");
        let card: Option<SoraModelCard> = if card_path.is_file() {
            Some(read_config(&card_path)?)
        } else {
            None
        };
        let tokenizer = Umt5Tokenizer::from_file(&dir.join("tokenizer/tokenizer.json"))?;
        let te_dir = dir.join("text_encoder");
        let te_cfg = Umt5Config::from_file(&te_dir.join("config.json"))?;
        let te_store = TensorStore::open_dir(&te_dir)?;
        let text_encoder = Umt5Encoder::load(te_store.into_var_builder(dtype, device), &te_cfg)
            .with_context(|| format!("loading the text encoder from {}", te_dir.display()))?;
        let (transformer, tcfg) = load_transformer(&dir.join("transformer"), None, dtype, device)?;
        let vae_dir = dir.join("vae");
        let vae_cfg: WanVaeConfig = read_config(&vae_dir.join("config.json"))?;
        let vae = load_vae(&vae_dir, &vae_cfg, dtype, device)?;
        check_compatible(dir, &te_cfg, &tcfg, &vae_cfg)?;
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let scheduler = if sched_path.is_file() {
            let s: SchedulerConfig = read_config(&sched_path)?;
            s.validate()?;
            s
        } else {
            SchedulerConfig::wan2_1()
        };
        let (name, defaults) = match card {
            Some(c) => (c.name, c.defaults),
            None => (
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "wan".into()),
                ModelDefaults::wan2_1(),
            ),
        };
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            transformer,
            vae,
            scheduler,
            defaults,
            device: device.clone(),
            dtype,
        })
    }

    /// Pixels per latent cell times the patch size: frame sizes must be multiples of this (16).
    pub fn spatial_grid(&self) -> usize {
        let p = self.transformer.config().patch_size;
        self.vae.config().spatial_factor() * p[1].max(p[2])
    }

    /// Pixel frames per latent frame after the first (4).
    pub fn temporal_factor(&self) -> usize {
        self.vae.config().temporal_factor()
    }

    /// The shift to use when none is given: the model card's, else the scheduler config's.
    pub fn default_shift(&self) -> f64 {
        self.defaults
            .shift
            .unwrap_or_else(|| self.scheduler.default_shift())
    }
}

fn check_compatible(
    dir: &Path,
    te: &Umt5Config,
    t: &WanTransformerConfig,
    v: &WanVaeConfig,
) -> Result<()> {
    if t.text_dim != te.d_model {
        bail!(
            "{}: the transformer expects text_dim {} but the text encoder's d_model is {}",
            dir.display(),
            t.text_dim,
            te.d_model
        );
    }
    if t.in_channels != v.z_dim || t.out_channels() != v.z_dim {
        bail!(
            "{}: the transformer has {} input / {} output channels but the VAE's z_dim is {}",
            dir.display(),
            t.in_channels,
            t.out_channels(),
            v.z_dim
        );
    }
    Ok(())
}
