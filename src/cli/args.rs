//! Command-line flags, parsed faithfully; [`super::plan`] turns them into validated jobs.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::sched::guidance::Guider;
use crate::sched::SamplerKind;

#[derive(Debug, Parser)]
#[command(
    name = "sora",
    version,
    about = "Text-to-video generation on any machine: Wan2.1 in pure Rust",
    long_about = "sora turns a text prompt into an MP4 video: a UMT5 text encoder, a Diffusion Transformer \
denoising spacetime patches of a video latent (flow matching, classifier-free guidance) and a causal 3D VAE \
decoder, all in Rust on candle. With no --model it uses the small model bundled in weights/."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a video (or image) from a prompt, or a batch from a prompt file.
    #[command(after_help = GEN_EXAMPLES)]
    Gen(Box<GenArgs>),
    /// Train the tiny model of the bundled recipe (VAE, latent dataset, DiT) into a directory.
    Train(TrainArgs),
    /// Score a model's prompt-following on the synthetic-world prompt suites.
    Eval(EvalArgs),
}

/// Which stage of the recipe to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TrainStage {
    /// Every stage in order (resumes whatever is done).
    All,
    /// Train the VAE on synthetic clips.
    Vae,
    /// Encode the synthetic dataset into latents with the trained VAE.
    Encode,
    /// Fine-tune the VAE decoder on full-length clips (encoder frozen).
    Decoder,
    /// Train the DiT on the latents with captions.
    Dit,
    /// Fine-tune the VAE decoder on the trained DiT's guided predictions (what generation feeds it).
    DecoderDit,
}

#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    /// Stage to run.
    #[arg(value_enum, default_value = "all")]
    pub stage: TrainStage,
    /// Training directory; the finished model lands here in the `--model DIR` layout.
    #[arg(short, long, default_value = "weights")]
    pub out: PathBuf,
    /// A seconds-long run of the same recipe at toy sizes (for tests and a quick look).
    #[arg(long)]
    pub smoke: bool,
    /// Override the DiT training steps.
    #[arg(long)]
    pub dit_steps: Option<u64>,
    /// Override the extra loss weight of object tokens in DiT training (0: plain MSE).
    #[arg(long, value_name = "W")]
    pub dit_object_weight: Option<f64>,
    /// Override how many latent positions around the object also get its loss weight
    /// (0: the object's positions only).
    #[arg(long, value_name = "N")]
    pub dit_object_dilate: Option<usize>,
    /// Override the shift of the DiT's logit-normal training noise level σ (`s·σ/(1+(s−1)·σ)`;
    /// 1: unshifted, median σ 0.5; above 1 trains more at high noise).
    #[arg(long, value_name = "S")]
    pub dit_sigma_shift: Option<f64>,
    /// Override the DiT's number of transformer blocks (the recipe's: 4).
    #[arg(long, value_name = "N")]
    pub dit_layers: Option<usize>,
    /// Override the probability of training the DiT on the empty caption (the recipe's: 0.1), which
    /// trains the unconditional prediction classifier-free guidance extrapolates from.
    #[arg(long, value_name = "P")]
    pub dit_cfg_dropout: Option<f64>,
    /// Draw the DiT's training clips whose captions hold WORD FACTOR times as often
    /// (`--dit-oversample red=3`; repeatable, factors of several matched words multiply).
    #[arg(long, value_name = "WORD=FACTOR", value_parser = parse_oversample)]
    pub dit_oversample: Vec<(String, f64)>,
    /// Train the text encoder with the DiT (same optimiser and learning rate; its EMA weights
    /// replace `text_encoder/`) instead of keeping it frozen at its random initialisation.
    #[arg(long)]
    pub dit_train_text: bool,
    /// Override the steps of the last stage, the decoder fine-tune on the DiT's predictions
    /// (the recipe's: 600; 0 skips it).
    #[arg(long, value_name = "N")]
    pub decoder_dit_steps: Option<u64>,
    /// What that stage trains the decoder to draw from the DiT's predictions: `rendered` (the
    /// recipe's), the clip the latent was encoded from; `decoded`, the frozen decoder's
    /// reconstruction of the clean latent.
    #[arg(long, value_name = "TARGET")]
    pub decoder_dit_target: Option<crate::train::recipe::DecoderTarget>,
    /// Share of that stage's samples decoded from the clean latent instead of the DiT's
    /// prediction (the recipe's: 0.25).
    #[arg(long, value_name = "P")]
    pub decoder_dit_clean: Option<f64>,
    /// Draw that stage's training clips whose captions hold WORD FACTOR times as often (as
    /// --dit-oversample; the recipe draws every clip equally often).
    #[arg(long, value_name = "WORD=FACTOR", value_parser = parse_oversample)]
    pub decoder_dit_oversample: Vec<(String, f64)>,
    /// That stage noises training latents to σ ~ U(0.1, S) before the DiT predicts them (the
    /// recipe's: 0.6).
    #[arg(long, value_name = "S")]
    pub decoder_dit_sigma_max: Option<f64>,
    /// Override the VAE training steps.
    #[arg(long)]
    pub vae_steps: Option<u64>,
    /// Override the number of training clips the encode stage renders (the recipe's: 3,000).
    #[arg(long)]
    pub clips: Option<usize>,
    /// Override the DiT's peak learning rate (the recipe's: 5e-4).
    #[arg(long)]
    pub dit_lr: Option<f64>,
    /// Start the DiT from these weights (a model directory or its transformer safetensors)
    /// instead of a random initialisation: a fine-tune, with a fresh optimiser and schedule.
    #[arg(long, value_name = "PATH")]
    pub dit_init: Option<PathBuf>,
    /// Save a checkpoint every N steps (also on Ctrl-C).
    #[arg(long, default_value = "100")]
    pub ckpt_every: u64,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Model to score (default: the bundled model).
    #[arg(long)]
    pub model: Option<String>,
    /// Seeds per prompt.
    #[arg(long, default_value = "2")]
    pub seeds: u64,
    /// The first seed: clips use seeds `first-seed .. first-seed + seeds`, so a setting chosen on
    /// one range of seeds can be checked on fresh ones.
    #[arg(long, default_value = "0", value_name = "N")]
    pub first_seed: u64,
    /// Write every generated clip's frames here as PNG strips for inspection.
    #[arg(long, value_name = "DIR")]
    pub frames_out: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the summary as JSON, with every clip's verdicts and the measurements behind them
    /// (colour coverage, centroid displacement, the shape classifier's features).
    #[arg(long)]
    pub json: bool,
    /// Also score the ceiling the model's VAE sets: the suites' scenes rendered (placed at
    /// random, one per seed), encoded and decoded by the VAE, with no DiT involved.
    #[arg(long)]
    pub ceiling: bool,
    /// Score these prompts instead of the built-in suites: a text file, one prompt per line
    /// (blank lines and `#` comments skipped), each naming a colour, a shape and a motion of
    /// the synthetic world; reported as the suite "prompts".
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
}

const GEN_EXAMPLES: &str = "Examples:
  sora gen --prompt \"a red circle moving right on a black background\" -o circle.mp4
  sora gen --prompt \"a red kite over a beach\" --res 1920x1080 --secs 60 -o kite.mp4 --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers
  sora gen --prompt \"a green square\" --frames 1 -o square.png
  sora gen --prompts prompts/shapes.txt -o out/ --skip-existing --json
  cat prompts.jsonl | sora gen --prompts - -o out/";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// The text to turn into a video.
    #[arg(short, long, conflicts_with = "prompts")]
    pub prompt: Option<String>,

    /// A batch: a file with one prompt per line (`#` starts a comment) or JSON Lines with
    /// per-item overrides ({"prompt": …, "seed": …, "res": "WxH", "secs": …, "frames": …,
    /// "out": …}); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,

    /// What to steer away from (classifier-free guidance's negative prompt). Default: the model's.
    #[arg(long, value_name = "TEXT")]
    pub negative_prompt: Option<String>,

    /// Output size WIDTHxHEIGHT, any aspect ratio (e.g. 1920x1080, 1080x1920). Default: the model's.
    #[arg(long, value_name = "WxH")]
    pub res: Option<String>,

    /// Duration in seconds (frames = secs × fps). Default: the model's native clip length.
    #[arg(long, conflicts_with = "frames", allow_negative_numbers = true)]
    pub secs: Option<f64>,

    /// Frames per second of the output. Default: the model's.
    #[arg(long)]
    pub fps: Option<u32>,

    /// Exact number of frames (1 + 4k for Wan models; 1 writes an image).
    #[arg(long)]
    pub frames: Option<usize>,

    /// Temporal window (frames, 1 + 4k for Wan): longer clips are denoised in overlapping
    /// windows of this length, blended at every step; cost grows linearly with duration.
    /// Default: the model's native clip length.
    #[arg(long, value_name = "FRAMES")]
    pub window: Option<usize>,

    /// Frames shared by neighbouring temporal windows. Default: the model's.
    #[arg(long, value_name = "FRAMES")]
    pub overlap: Option<usize>,

    /// Spatial tile side in pixels: larger frames are denoised in overlapping tiles so cost
    /// grows with area, not its square. 0 turns tiling off. Default: automatic for frames more
    /// than twice the model's native size.
    #[arg(long, value_name = "PIXELS")]
    pub tile: Option<usize>,

    /// Denoising steps. Default: the model's.
    #[arg(long)]
    pub steps: Option<usize>,

    /// Guidance scale; 1 disables classifier-free guidance (one model pass per step).
    #[arg(long, value_name = "SCALE", allow_negative_numbers = true)]
    pub cfg: Option<f64>,

    /// Guidance scale at low noise: used instead of `--cfg` at the steps whose noise level σ is
    /// below `--cfg-late-below`, where the sampler refines details (lower guidance there keeps
    /// shapes from being pushed away from the unconditional prediction). Default: the model's
    /// (the bundled model: 2 below σ 0.7; Wan2.1 checkpoints: none).
    #[arg(long, value_name = "SCALE", allow_negative_numbers = true)]
    pub cfg_late: Option<f64>,

    /// The noise level σ (0 < σ ≤ 1) below which `--cfg-late` applies. Default: the model's, or
    /// 0.5.
    #[arg(long, value_name = "SIGMA", allow_negative_numbers = true)]
    pub cfg_late_below: Option<f64>,

    /// Flow-matching timestep shift. Default: the model's.
    #[arg(long, allow_negative_numbers = true)]
    pub shift: Option<f64>,

    /// Sampler. Default: the model's (the bundled model: euler-sde; Wan2.1 checkpoints: UniPC).
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,

    /// How guided steps combine the prompt's and the negative prompt's predictions: `cfg`
    /// (classifier-free guidance), `zero-star[:zero-init-steps=N]` (CFG-Zero*: the negative
    /// prediction rescaled by its projection on the prompt's; the first N steps zeroed),
    /// `apg[:eta=X,momentum=X,norm-threshold=X]` (adaptive projected guidance: the guidance
    /// direction's part parallel to the prediction weighted by eta, default 0) or `fdg[:high=X]`
    /// (frequency-decoupled guidance: each frame's low band guided at --cfg, its high band at X,
    /// default 1). Default: the model's (cfg unless its sora.json says otherwise).
    #[arg(long, value_name = "SPEC")]
    pub guider: Option<Guider>,

    /// Random seed; the same seed and settings give the same video. Default: random (reported).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Model: a local directory (diffusers layout), a Hugging Face repo id
    /// (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or a bundled model name. Default: the bundled model.
    #[arg(long, env = "SORA_MODEL")]
    pub model: Option<String>,

    /// Output file (.mp4, or .png for one frame). For batches, a directory (default: .).
    #[arg(short, long, value_name = "PATH")]
    pub out: Option<PathBuf>,

    /// Compute device: cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute dtype. Default: f32 on CPU, bf16 on GPUs.
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,

    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Never touch the network: models must be local or in the Hugging Face cache.
    #[arg(long)]
    pub offline: bool,

    /// In a batch, skip items whose output file already exists.
    #[arg(long)]
    pub skip_existing: bool,

    /// Also write a JSON sidecar (out.json) with the prompt, seed, model and settings.
    #[arg(long)]
    pub sidecar: bool,

    /// Start from this noise latent (safetensors tensor `latents`, [1, C, T', H', W']) instead of the seeded one.
    #[arg(long, value_name = "FILE")]
    pub init_noise: Option<PathBuf>,

    /// Also write every decoded frame as a lossless PNG into DIR.
    #[arg(long, value_name = "DIR")]
    pub frames_out: Option<PathBuf>,

    /// Print the plan (latent grid, windows, memory per stage, estimated time) and exit.
    #[arg(long)]
    pub dry_run: bool,

    /// Run even when the estimated memory exceeds what is available.
    #[arg(long)]
    pub force: bool,

    /// No progress bars or summaries: only results (also the case when stdout is not a terminal).
    #[arg(short, long)]
    pub quiet: bool,

    /// Print one JSON line per item (path, seconds, frames, seed, …) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses `--dit-oversample WORD=FACTOR`.
fn parse_oversample(s: &str) -> Result<(String, f64), String> {
    let (word, factor) = s
        .split_once('=')
        .ok_or_else(|| format!("expected WORD=FACTOR (e.g. red=3), got {s:?}"))?;
    let word = word.trim().to_lowercase();
    if !crate::train::world::vocabulary().contains(&word) {
        return Err(format!(
            "{word:?} is not a word of the synthetic world's captions (e.g. red, square, up, gray)"
        ));
    }
    let f: f64 = factor
        .trim()
        .parse()
        .map_err(|_| format!("the factor of {word:?} must be a number, got {factor:?}"))?;
    if !(f.is_finite() && f > 0.0) {
        return Err(format!(
            "the factor of {word:?} must be a positive number, got {f}"
        ));
    }
    Ok((word, f))
}
