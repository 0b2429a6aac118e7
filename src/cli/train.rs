//! `sora train` (the recipe of the bundled model) and `sora eval` (prompt-following scores).

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::args::{EvalArgs, TrainArgs, TrainStage};
use super::run::{resolve_model, EXIT_INTERRUPTED, EXIT_OK};
use crate::pipeline::{generate, GenRequest, Silent, WanModel};
use crate::train::eval::{
    prompt_suite, score_clip, score_suite, ClipAnalysis, Score, SuiteSummary,
};
use crate::train::recipe::{
    encode_dataset, finetune_decoder, finetune_decoder_on_dit, run_all, train_dit, train_vae,
    Recipe, StageOptions,
};
use crate::train::world::{self, Split};
use crate::video::{tensor_to_frames, write_png, RgbFrame};

fn interrupt_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || f.store(true, Ordering::SeqCst));
    flag
}

/// Runs `sora train`; returns the exit status.
pub fn run_train(a: TrainArgs) -> Result<i32> {
    let vocab = world::vocabulary().len() + 3;
    let mut r = if a.smoke {
        Recipe::smoke(vocab)
    } else {
        Recipe::bundled(vocab)
    };
    if let Some(s) = a.dit_steps {
        r.dit_steps = s;
    }
    if let Some(w) = a.dit_object_weight {
        if !(w.is_finite() && w >= 0.0) {
            anyhow::bail!("--dit-object-weight must be a finite number ≥ 0, got {w}");
        }
        r.dit_object_weight = w;
    }
    if let Some(d) = a.dit_object_dilate {
        r.dit_object_dilate = d;
    }
    if let Some(s) = a.dit_sigma_shift {
        if !(s.is_finite() && s > 0.0) {
            anyhow::bail!("--dit-sigma-shift must be a finite number > 0, got {s}");
        }
        r.dit_sigma_shift = s;
    }
    if let Some(p) = a.dit_cfg_dropout {
        if !(p.is_finite() && (0.0..1.0).contains(&p)) {
            anyhow::bail!("--dit-cfg-dropout must be a probability in [0, 1), got {p}");
        }
        r.cfg_dropout = p;
    }
    if !a.dit_oversample.is_empty() {
        r.dit_oversample = a.dit_oversample.clone();
    }
    if a.dit_train_text {
        r.dit_train_text = true;
    }
    if !a.decoder_dit_oversample.is_empty() {
        r.decoder_dit_oversample = a.decoder_dit_oversample.clone();
    }
    if let Some(n) = a.dit_layers {
        if n == 0 {
            anyhow::bail!("--dit-layers must be at least 1, got 0");
        }
        r.dit.num_layers = n;
    }
    if let Some(s) = a.decoder_dit_steps {
        r.decoder_dit_steps = s;
    }
    if let Some(t) = a.decoder_dit_target {
        r.decoder_dit_target = t;
    }
    if let Some(p) = a.decoder_dit_clean {
        if !(p.is_finite() && (0.0..=1.0).contains(&p)) {
            anyhow::bail!("--decoder-dit-clean must be a probability in [0, 1], got {p}");
        }
        r.decoder_dit_clean = p;
    }
    if let Some(s) = a.decoder_dit_sigma_max {
        if !(s.is_finite() && s > 0.1 && s <= 1.0) {
            anyhow::bail!("--decoder-dit-sigma-max must be in (0.1, 1], got {s}");
        }
        r.decoder_dit_sigma_max = s;
    }
    if let Some(n) = a.clips {
        if n == 0 {
            anyhow::bail!("--clips must be at least 1, got 0");
        }
        r.clips = n;
    }
    if let Some(lr) = a.dit_lr {
        if !(lr.is_finite() && lr > 0.0) {
            anyhow::bail!("--dit-lr must be a positive number, got {lr}");
        }
        r.dit_lr = lr;
    }
    if let Some(p) = &a.dit_init {
        // A model directory, its transformer directory, or the safetensors file itself.
        let tried = if p.is_dir() {
            vec![
                p.join("transformer/diffusion_pytorch_model.safetensors"),
                p.join("diffusion_pytorch_model.safetensors"),
            ]
        } else {
            vec![p.clone()]
        };
        let Some(file) = tried.iter().find(|f| f.is_file()) else {
            let names: Vec<String> = tried.iter().map(|f| f.display().to_string()).collect();
            anyhow::bail!(
                "--dit-init {}: no such file ({}); give a model directory, its transformer \
                 directory or the transformer's safetensors file",
                p.display(),
                names.join(" nor ")
            );
        };
        r.dit_init = Some(file.clone());
    }
    if let Some(s) = a.vae_steps {
        r.vae_steps = s;
    }
    let opts = StageOptions {
        progress: !a.quiet && std::io::stderr().is_terminal(),
        ckpt_every: a.ckpt_every.max(1),
    };
    let flag = interrupt_flag();
    let cancel = || flag.load(Ordering::SeqCst);
    let t0 = Instant::now();
    let dir = &a.out;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let done = match a.stage {
        TrainStage::All => run_all(&r, dir, &opts, &cancel)?,
        TrainStage::Vae => train_vae(&r, dir, &opts, &cancel)?,
        TrainStage::Encode => encode_dataset(&r, dir, &opts, &cancel)?,
        TrainStage::Decoder => finetune_decoder(&r, dir, &opts, &cancel)?,
        TrainStage::Dit => train_dit(&r, dir, &opts, &cancel)?,
        TrainStage::DecoderDit => finetune_decoder_on_dit(&r, dir, &opts, &cancel)?,
    };
    if !done {
        eprintln!(
            "interrupted after {:.0} s; progress is checkpointed in {}: run the same command to resume",
            t0.elapsed().as_secs_f64(),
            dir.display()
        );
        return Ok(EXIT_INTERRUPTED);
    }
    println!(
        "{:?} stage(s) complete in {}: {:.0} s",
        a.stage,
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(EXIT_OK)
}

/// Generates one clip with the model's defaults and returns its frames.
pub fn generate_frames(model: &WanModel, prompt: &str, seed: u64) -> Result<Vec<RgbFrame>> {
    let d = &model.defaults;
    let req = GenRequest {
        prompt: prompt.to_string(),
        negative_prompt: d.negative_prompt.clone(),
        width: d.width,
        height: d.height,
        frames: d.frames,
        steps: d.steps,
        guidance: d.guidance,
        cfg_late: d.cfg_late,
        shift: model.default_shift(),
        sampler: d.sampler,
        guider: d.guider,
        seed,
        window: None,
        tile: None,
    };
    let mut frames = Vec::new();
    let mut sink = |c: &Tensor| -> Result<()> {
        frames.extend(tensor_to_frames(c, None)?);
        Ok(())
    };
    generate(model, &req, None, &mut Silent, &|| false, &mut sink)?;
    Ok(frames)
}

fn strip(frames: &[RgbFrame]) -> RgbFrame {
    let (w, h) = (frames[0].width, frames[0].height);
    let n = frames.len();
    let mut data = vec![0u8; n * w * h * 3];
    for (i, f) in frames.iter().enumerate() {
        for y in 0..h {
            let dst = (y * n * w + i * w) * 3;
            data[dst..dst + w * 3].copy_from_slice(&f.data[y * w * 3..(y + 1) * w * 3]);
        }
    }
    RgbFrame {
        width: n * w,
        height: h,
        data,
    }
}

/// Scores the VAE's reconstructions of rendered suite scenes (one random placement per seed):
/// the most the DiT could reach through this decoder.
fn vae_ceiling(
    model: &WanModel,
    prompts: &[String],
    seeds: std::ops::Range<u64>,
    label: &'static str,
    frames_out: Option<&Path>,
    clips: &mut Vec<EvalClip>,
) -> Result<SuiteSummary> {
    use rand::SeedableRng;
    let defaults = &model.defaults;
    let mut scores = Vec::new();
    for (pi, prompt) in prompts.iter().enumerate() {
        let p = world::parse_prompt(prompt)
            .with_context(|| format!("suite prompt {prompt:?} does not parse"))?;
        let bg = p.background.unwrap_or(world::Background::Black);
        for seed in seeds.clone() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed << 16 | pi as u64);
            let scene = world::random_single_object_scene(
                &mut rng,
                (p.color, p.shape, p.motion),
                bg,
                defaults.width,
                defaults.height,
                defaults.frames,
            );
            let (w, h, f) = (defaults.width, defaults.height, defaults.frames);
            let x = world::render_tensor(&scene, w, h, f, &model.device)?.unsqueeze(0)?;
            let (mean, _) = model.vae.encode(&x)?;
            let y = model.vae.decode(&mean)?;
            let frames = tensor_to_frames(&y.get(0)?, None)?;
            if let Some(dir) = frames_out {
                let name = format!(
                    "{label}-vae-{pi:02}-s{seed}-{}.png",
                    crate::cli::plan::slug(prompt)
                );
                write_png(&dir.join(name), &strip(&frames))?;
            }
            let (s, analysis) = score_clip(&frames, &p);
            clips.push(EvalClip {
                suite: label,
                vae_ceiling: true,
                prompt: prompt.clone(),
                seed,
                score: s,
                analysis,
            });
            scores.push(s);
        }
    }
    Ok(score_suite(&scores))
}

/// One clip of [`eval_suites`] (generated, or a VAE-ceiling one): its verdicts and what they
/// were measured from.
#[derive(Debug, Clone)]
pub struct EvalClip {
    /// "seen" or "held-out".
    pub suite: &'static str,
    /// A VAE-ceiling clip (the scene rendered, encoded and decoded; no DiT), not a generated one.
    pub vae_ceiling: bool,
    pub prompt: String,
    pub seed: u64,
    pub score: Score,
    pub analysis: ClipAnalysis,
}

/// What [`eval_suites`] measured: each suite's summary (with `ceiling`, each followed by its
/// VAE ceiling) and every clip behind them.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub suites: Vec<(String, SuiteSummary)>,
    pub clips: Vec<EvalClip>,
}

/// The built-in prompt suites: "seen" (combinations trained on) and "held-out" (combinations
/// never rendered for training).
pub fn builtin_suites() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("seen", prompt_suite(Split::Train)),
        ("held-out", prompt_suite(Split::HeldOut)),
    ]
}

/// Scores `model` on prompt suites (one clip per prompt and seed), each followed, with
/// `ceiling`, by the VAE's ceiling on the same suite (see [`vae_ceiling`]). Every prompt must
/// parse as a synthetic-world prompt. With `frames_out`, every clip's frames are written there
/// as a PNG strip.
pub fn eval_suites(
    model: &WanModel,
    suites: &[(&'static str, Vec<String>)],
    seeds: std::ops::Range<u64>,
    ceiling: bool,
    frames_out: Option<&Path>,
) -> Result<EvalReport> {
    let mut report = Vec::new();
    let mut clips = Vec::new();
    for (label, prompts) in suites {
        let label = *label;
        let mut scores = Vec::new();
        for (pi, prompt) in prompts.iter().enumerate() {
            let parsed = world::parse_prompt(prompt)
                .with_context(|| format!("suite prompt {prompt:?} does not parse"))?;
            for seed in seeds.clone() {
                let frames = generate_frames(model, prompt, seed)?;
                let (s, analysis) = score_clip(&frames, &parsed);
                clips.push(EvalClip {
                    suite: label,
                    vae_ceiling: false,
                    prompt: prompt.clone(),
                    seed,
                    score: s,
                    analysis,
                });
                if let Some(d) = frames_out {
                    let name = format!(
                        "{label}-{pi:02}-s{seed}-{}.png",
                        crate::cli::plan::slug(prompt)
                    );
                    write_png(&d.join(name), &strip(&frames))?;
                }
                scores.push(s);
            }
        }
        report.push((label.to_string(), score_suite(&scores)));
        if ceiling {
            report.push((
                format!("{label} (VAE)"),
                vae_ceiling(model, prompts, seeds.clone(), label, frames_out, &mut clips)?,
            ));
        }
    }
    Ok(EvalReport {
        suites: report,
        clips,
    })
}

/// Reads `sora eval --prompts FILE`: one synthetic-world prompt per line (blank lines and
/// lines starting with `#` skipped). Every line that does not parse is named in the error.
pub fn read_eval_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompt file {}", path.display()))?;
    let mut prompts = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if world::parse_prompt(line).is_none() {
            bad.push(format!("line {}: {line:?}", i + 1));
        } else {
            prompts.push(line.to_string());
        }
    }
    if !bad.is_empty() {
        anyhow::bail!(
            "{}: {} prompt(s) the scorer cannot read ({}); `sora eval` scores synthetic-world \
             prompts naming one colour, one shape (circle, square, triangle) and one motion \
             (left, right, up, down), e.g. \"a red circle moving right on a black background\"",
            path.display(),
            bad.len(),
            bad.join("; ")
        );
    }
    if prompts.is_empty() {
        anyhow::bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// One clip of `sora eval --json`.
fn clip_json(c: &EvalClip) -> serde_json::Value {
    let name = |s: Option<world::Shape>| s.map(|s| s.name());
    let a = &c.analysis;
    json!({
        "suite": c.suite,
        "vae_ceiling": c.vae_ceiling,
        "prompt": c.prompt,
        "seed": c.seed,
        "color": c.score.color_present,
        "shape": c.score.shape_correct,
        "motion": c.score.motion_correct,
        "all": c.score.all(),
        "shape_asked": name(c.score.asked_shape),
        "shape_seen": name(c.score.seen_shape),
        "coverage": a.coverage,
        "displacement": a.displacement.map(|(x, y)| [x, y]),
        "shape_features": a.features.map(|f| json!({
            "fill": f.fill,
            "drop": f.drop,
            "top_corners": f.top_corners,
            "bottom_corners": f.bottom_corners,
        })),
    })
}

/// Runs `sora eval`; returns the exit status.
pub fn run_eval(a: EvalArgs) -> Result<i32> {
    let dir = resolve_model(a.model.as_deref(), true, false)?;
    let model = WanModel::load(&dir, &Device::Cpu, DType::F32)?;
    if let Some(d) = &a.frames_out {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let t0 = Instant::now();
    let seeds = a.first_seed..a.first_seed.saturating_add(a.seeds);
    let suites = match &a.prompts {
        Some(p) => vec![("prompts", read_eval_prompts(p)?)],
        None => builtin_suites(),
    };
    let EvalReport {
        suites: report,
        clips,
    } = eval_suites(
        &model,
        &suites,
        seeds.clone(),
        a.ceiling,
        a.frames_out.as_deref(),
    )?;
    let secs = t0.elapsed().as_secs_f64();
    if a.json {
        let clips: Vec<serde_json::Value> = clips.iter().map(clip_json).collect();
        let v: Vec<serde_json::Value> = report
            .iter()
            .map(|(l, s)| json!({"split": l, "n": s.n, "color": s.color, "shape": s.shape, "motion": s.motion, "all": s.all, "shapes_asked_by_seen": s.shapes}))
            .collect();
        println!(
            "{}",
            json!({"model": dir, "seeds": a.seeds, "first_seed": a.first_seed, "seconds": secs, "suites": v, "clips": clips})
        );
    } else {
        println!(
            "{:<15} {:>4} {:>7} {:>7} {:>7} {:>7}",
            "suite", "n", "colour", "shape", "motion", "all"
        );
        for (l, s) in &report {
            println!(
                "{:<15} {:>4} {:>6.1}% {:>6.1}% {:>6.1}% {:>6.1}%",
                l,
                s.n,
                100.0 * s.color,
                100.0 * s.shape,
                100.0 * s.motion,
                100.0 * s.all
            );
        }
        println!("shapes drawn per shape asked (circle/square/triangle/none or unclear):");
        for (l, s) in &report {
            let rows: Vec<String> = world::Shape::ALL
                .iter()
                .zip(&s.shapes)
                .map(|(sh, r)| format!("{} {}/{}/{}/{}", sh.name(), r[0], r[1], r[2], r[3]))
                .collect();
            println!("  {:<15} {}", l, rows.join("  "));
        }
        println!(
            "({} seeds per prompt, {}..{}, {:.0} s)",
            a.seeds, seeds.start, seeds.end, secs
        );
    }
    Ok(EXIT_OK)
}
