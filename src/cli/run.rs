//! Executes `sora gen`: resolves the model and device, plans every item, generates, writes
//! outputs atomically, and reports one result per item.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::args::{DtypeArg, GenArgs};
use super::plan::{
    parse_res, read_prompt_file, resolve_job, Item, Job, ModelRules, OutputKind, Overrides,
};
use super::progress::Bars;
use crate::pipeline::estimate::{
    available_memory, estimate, fmt_bytes, measure_gemm_gflops, Estimate, ModelInfo,
};
use crate::pipeline::{generate, Timings, WanModel};
use crate::video::{tensor_to_frames, write_png, AtomicOutput, Mp4Writer};

/// Exit status: all items succeeded.
pub const EXIT_OK: i32 = 0;
/// Exit status: at least one item failed (the others were still generated).
pub const EXIT_FAILED: i32 = 1;
/// Exit status: bad flags or input; nothing was generated.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: interrupted (Ctrl-C); no partial output was left.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Name of the bundled model, accepted by `--model`.
pub const BUNDLED_NAME: &str = "sora-tiny";

/// An error the user caused (bad flags, missing files) rather than a failure while working.
#[derive(Debug)]
pub struct UsageError(pub anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}
impl std::error::Error for UsageError {}

fn usage<T>(r: Result<T>) -> Result<T> {
    r.map_err(|e| anyhow::Error::new(UsageError(e)))
}

/// The bundled model directory: `$SORA_WEIGHTS`, the source tree's `weights/`, or `weights/`
/// beside (or two levels above) the executable.
pub fn bundled_dir() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("SORA_WEIGHTS").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("weights"));
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("weights"));
            candidates.push(dir.join("../../weights"));
        }
    }
    candidates
        .into_iter()
        .find(|d| d.join("sora.json").is_file())
}

/// Resolves `--model` to a local directory.
pub fn resolve_model(model: Option<&str>, offline: bool, progress: bool) -> Result<PathBuf> {
    let bundled = || {
        bundled_dir().context(
            "the bundled model is missing (no weights/sora.json next to the sources or the executable, and SORA_WEIGHTS is unset): pass --model DIR or a Hugging Face repo id",
        )
    };
    match model {
        None => bundled(),
        Some(m) if Path::new(m).exists() => {
            let p = PathBuf::from(m);
            crate::pipeline::model::check_model_dir(&p)?;
            Ok(p)
        }
        Some(m) if m == BUNDLED_NAME || m == "tiny" => bundled(),
        Some(m) if crate::weights::hub::looks_like_repo_id(m) => {
            crate::weights::hub::resolve(m, offline || crate::weights::hub::offline_from_env(), progress)
        }
        Some(m) => bail!(
            "unknown model {m:?}: not an existing directory, the bundled model ({BUNDLED_NAME}), or a Hugging Face repo id (org/name)"
        ),
    }
}

/// Parses `--device`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(rest) = s.strip_prefix("cuda") {
        let ordinal = match rest.strip_prefix(':') {
            Some(n) => n
                .parse::<usize>()
                .with_context(|| format!("--device {s}: {n:?} is not a GPU number"))?,
            None if rest.is_empty() => 0,
            None => bail!("unknown device {s:?}: use cpu, cuda, cuda:N or metal"),
        };
        if !cfg!(feature = "cuda") {
            bail!("this sora was built without CUDA support: rebuild with `cargo build --release --features cuda`");
        }
        return Device::new_cuda(ordinal)
            .with_context(|| format!("cannot open CUDA device {ordinal}"));
    }
    if s == "metal" {
        if !cfg!(feature = "metal") {
            bail!("this sora was built without Metal support: rebuild with `cargo build --release --features metal` (macOS)");
        }
        return Device::new_metal(0).context("cannot open the Metal device");
    }
    bail!("unknown device {s:?}: use cpu, cuda, cuda:N or metal")
}

fn dtype_for(arg: Option<DtypeArg>, device: &Device) -> DType {
    match arg {
        Some(DtypeArg::F32) => DType::F32,
        Some(DtypeArg::F16) => DType::F16,
        Some(DtypeArg::Bf16) => DType::BF16,
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
    }
}

/// Flag checks that need no model, so bad input fails before anything is loaded.
fn prevalidate(a: &GenArgs) -> Result<()> {
    if a.prompt.is_none() && a.prompts.is_none() {
        bail!("nothing to generate: give --prompt TEXT or --prompts FILE");
    }
    if let Some(r) = &a.res {
        parse_res(r)?;
    }
    if let Some(s) = a.secs {
        if !s.is_finite() || s <= 0.0 {
            bail!("--secs {s} must be a positive number of seconds");
        }
    }
    if a.steps == Some(0) {
        bail!("--steps 0 is out of range: use 1 to 1000");
    }
    if a.frames == Some(0) {
        bail!("--frames 0 cannot be honoured: at least one frame is needed");
    }
    if a.fps == Some(0) {
        bail!("--fps 0 is out of range: use 1 to 240");
    }
    if let Some(d) = &a.frames_out {
        if d.exists() && !d.is_dir() {
            bail!("--frames-out {} exists and is not a directory", d.display());
        }
    }
    Ok(())
}

fn base_overrides(a: &GenArgs) -> Overrides {
    Overrides {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        res: a.res.clone(),
        secs: a.secs,
        fps: a.fps,
        frames: a.frames,
        steps: a.steps,
        cfg: a.cfg,
        cfg_late: a.cfg_late,
        cfg_late_below: a.cfg_late_below,
        shift: a.shift,
        sampler: a.sampler,
        guider: a.guider,
        seed: a.seed,
        out: None,
        window: a.window,
        overlap: a.overlap,
        tile: a.tile,
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() >> 11
}

/// Where results and notes go: stdout for results (text or JSON lines), stderr for notes,
/// which are shown only on a terminal without `--quiet`.
struct Printer {
    json: bool,
    chatty: bool,
}

impl Printer {
    fn note(&self, msg: &str) {
        if self.chatty {
            eprintln!("{msg}");
        }
    }
    fn error(&self, msg: &str) {
        eprintln!("error: {msg}");
    }
    fn result(&self, v: serde_json::Value, text: String) {
        if self.json {
            println!("{v}");
        } else {
            println!("{text}");
        }
    }
}

/// Runs `sora gen`; returns the exit status.
pub fn run_gen(a: GenArgs) -> Result<i32> {
    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let printer = Printer {
        json: a.json,
        chatty: tty && !a.quiet,
    };
    let bars_visible = tty && !a.quiet && !a.json;
    usage(prevalidate(&a))?;

    let batch = a.prompts.is_some();
    let items: Vec<std::result::Result<Item, (usize, String)>> = match &a.prompts {
        Some(p) => usage(read_prompt_file(p))?,
        None => vec![Ok(Item {
            line: None,
            overrides: Overrides::default(),
        })],
    };
    let batch_dir = if batch {
        let d = a.out.clone().unwrap_or_else(|| PathBuf::from("."));
        if !d.is_dir() {
            return Err(UsageError(anyhow::anyhow!(
                "for a batch, --out must be an existing directory; {} is not",
                d.display()
            ))
            .into());
        }
        Some(d)
    } else {
        None
    };
    let base = Overrides {
        out: if batch { None } else { a.out.clone() },
        ..base_overrides(&a)
    };

    let device = usage(parse_device(&a.device))?;
    let dtype = dtype_for(a.dtype, &device);
    if device.is_cpu() && dtype == DType::BF16 {
        return Err(UsageError(anyhow::anyhow!(
            "--dtype bf16 is not supported on the CPU (candle has no bf16 convolution for the VAE): use f32 (the default) or f16"
        ))
        .into());
    }
    let init_noise = match &a.init_noise {
        Some(p) => {
            let m = usage(
                candle_core::safetensors::load(p, &Device::Cpu)
                    .with_context(|| format!("cannot read --init-noise {}", p.display())),
            )?;
            Some(usage(m.get("latents").cloned().with_context(|| {
                format!("--init-noise {} has no tensor named `latents`", p.display())
            }))?)
        }
        None => None,
    };

    let dir = usage(resolve_model(a.model.as_deref(), a.offline, bars_visible))?;
    let info = usage(ModelInfo::from_dir(&dir))?;
    let rules = ModelRules {
        defaults: info.defaults.clone(),
        grid: info.spatial_grid(),
        temporal: info.vae.temporal_factor(),
        latent_px: info.vae.spatial_factor(),
        default_shift: info.default_shift,
    };
    let weight_bytes = match dtype {
        DType::F32 => 4,
        _ => 2,
    };
    let gemm_gflops = measure_gemm_gflops();
    // Loaded on first use, so --dry-run and plans refused up front never load weights.
    let mut model: Option<WanModel> = None;
    let mut load_secs = 0.0;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed (tests call run_gen repeatedly): ignore that.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }

    let base_seed = a.seed.unwrap_or_else(random_seed);
    let total = items.len();
    let mut failed = 0usize;
    let mut noted_grid = false;
    for (index, item) in items.into_iter().enumerate() {
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
        let item = match item {
            Ok(i) => i,
            Err((line, msg)) => {
                failed += 1;
                printer.error(&msg);
                printer.result(
                    json!({"index": index, "line": line, "status": "error", "error": msg}),
                    format!("item {} (line {line}): error: {msg}", index + 1),
                );
                continue;
            }
        };
        let merged = base.merged(&item.overrides);
        let seed = base_seed.wrapping_add(index as u64);
        let job = match resolve_job(
            &rules,
            &merged,
            index,
            item.line,
            batch_dir.as_deref(),
            seed,
        ) {
            Ok(j) => j,
            Err(e) => {
                if !batch {
                    return Err(UsageError(e).into());
                }
                failed += 1;
                let msg = format!("{e:#}");
                printer.error(&format!(
                    "item {} (line {}): {msg}",
                    index + 1,
                    item.line.unwrap_or(0)
                ));
                printer.result(
                    json!({"index": index, "line": item.line, "status": "error", "error": msg}),
                    format!("item {}: error: {msg}", index + 1),
                );
                continue;
            }
        };
        if a.skip_existing && job.out.exists() {
            printer.result(
                json!({"index": index, "line": job.line, "status": "skipped", "path": job.out}),
                format!("skipped {} (exists)", job.out.display()),
            );
            continue;
        }
        let est = estimate(&info, &job.request, weight_bytes, gemm_gflops);
        if a.dry_run {
            print_plan(&printer, &job, &est, &info);
            continue;
        }
        if let Some(avail) = available_memory() {
            if est.peak_bytes > avail && !a.force {
                let msg = format!(
                    "{} would need about {} of memory (weights {}, denoising {}, decoding {}) but {} is available: \
try --tile {} (spatial tiles), a shorter --window, --dtype bf16, or a smaller --res; --force runs anyway",
                    job.out.display(),
                    fmt_bytes(est.peak_bytes),
                    fmt_bytes(est.weights_bytes),
                    fmt_bytes(est.denoise_bytes),
                    fmt_bytes(est.decode_bytes),
                    fmt_bytes(avail),
                    info.spatial_grid() * 16
                );
                if !batch {
                    return Err(UsageError(anyhow::anyhow!(msg)).into());
                }
                failed += 1;
                printer.error(&msg);
                printer.result(
                    json!({"index": index, "line": job.line, "status": "error", "error": msg}),
                    format!("item {}: error: {msg}", index + 1),
                );
                continue;
            }
        }
        if model.is_none() {
            let t_load = Instant::now();
            let mut load_bars = Bars::new(bars_visible, String::new());
            crate::pipeline::Observer::stage(&mut load_bars, "loading model", 0);
            model = Some(usage(WanModel::load(&dir, &device, dtype))?);
            crate::pipeline::Observer::stage_done(
                &mut load_bars,
                "loading model",
                t_load.elapsed(),
            );
            load_secs = t_load.elapsed().as_secs_f64();
        }
        let model = model.as_ref().expect("loaded above");
        if !noted_grid && (job.request.width, job.request.height) != (job.width, job.height) {
            printer.note(&format!(
                "note: the model works on a {}-pixel grid: generating {}×{} and cropping to {}×{}",
                rules.grid, job.request.width, job.request.height, job.width, job.height
            ));
            noted_grid = true;
        }
        if job.write_frames != job.request.frames {
            printer.note(&format!(
                "note: this model makes 1 + {}·k frames: generating {} and keeping the first {}",
                rules.temporal, job.request.frames, job.write_frames
            ));
        }
        let prefix = if total > 1 {
            format!("[{}/{}]", index + 1, total)
        } else {
            String::new()
        };
        let mut bars = Bars::new(bars_visible, prefix);
        let t0 = Instant::now();
        let cancel = || interrupted.load(Ordering::SeqCst);
        match run_job(model, &job, &a, init_noise.as_ref(), &mut bars, &cancel) {
            Ok(timings) => {
                let secs = t0.elapsed().as_secs_f64();
                if a.sidecar {
                    if let Err(e) = write_sidecar(&job, model, &timings) {
                        printer.error(&format!("{e:#}"));
                    }
                }
                printer.result(
                    json!({
                        "index": index, "line": job.line, "status": "ok", "path": job.out,
                        "prompt": job.request.prompt, "seed": job.request.seed,
                        "frames": job.write_frames, "fps": job.fps,
                        "width": job.width, "height": job.height,
                        "duration": job.write_frames as f64 / job.fps as f64,
                        "seconds": secs,
                        "timings": timings_json(
                            &timings,
                            Some(if index == 0 { load_secs } else { 0.0 }),
                        ),
                    }),
                    format!(
                        "wrote {}: {} frame{} {}×{} @ {} fps, seed {}, {:.1} s",
                        job.out.display(),
                        job.write_frames,
                        if job.write_frames == 1 { "" } else { "s" },
                        job.width,
                        job.height,
                        job.fps,
                        job.request.seed,
                        secs
                    ),
                );
                printer.note(&format!(
                    "  model load {:.2} s · text encode {:.2} s · denoise {:.2} s ({} steps, {:.2} s/step) · decode {:.2} s + write {:.2} s",
                    load_secs,
                    timings.text_encode.as_secs_f64(),
                    timings.denoise.as_secs_f64(),
                    job.request.steps,
                    timings.denoise.as_secs_f64() / job.request.steps as f64,
                    timings.vae_decode().as_secs_f64(),
                    timings.write.as_secs_f64()
                ));
            }
            Err(e) => {
                if interrupted.load(Ordering::SeqCst) {
                    printer.error(&format!(
                        "interrupted; {} was not written",
                        job.out.display()
                    ));
                    return Ok(EXIT_INTERRUPTED);
                }
                failed += 1;
                let msg = format!("{e:#}");
                printer.error(&format!("{}: {msg}", job.out.display()));
                printer.result(
                    json!({"index": index, "line": job.line, "status": "error", "path": job.out, "error": msg}),
                    format!("failed {}: {msg}", job.out.display()),
                );
            }
        }
    }
    if interrupted.load(Ordering::SeqCst) {
        return Ok(EXIT_INTERRUPTED);
    }
    if batch {
        printer.note(&format!(
            "{} of {total} items done, {failed} failed, in {:.1} s",
            total - failed,
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(if failed > 0 { EXIT_FAILED } else { EXIT_OK })
}

/// Prints a job's plan (`--dry-run`): grid, windows, memory per stage, estimated time.
fn print_plan(printer: &Printer, job: &Job, e: &Estimate, info: &ModelInfo) {
    let r = &job.request;
    let mut cfg = r.guidance.to_string();
    if let Some(l) = r.cfg_late {
        cfg += &format!(" ({} below σ {})", l.scale, l.below);
    }
    if !r.guider.is_cfg() {
        cfg += &format!(", guider {}", r.guider);
    }
    let text = format!(
        "plan for {}: {} frames {}×{} (generated {}×{}, {} frames) @ {} fps, {} steps, cfg {}\n\
  latent {}×{}×{}×{} (C×T×H×W); {} window(s) of {} tokens; VAE decode in {} tile(s)\n\
  memory: weights {}, text encode {}, denoise {}, decode {}; peak ≈ {}\n\
  time on this machine ≈ {:.0} s (denoise {:.1} s for {:.2} TFLOP, decode {:.1} s for {:.2} TFLOP; GEMM probe {:.0} GFLOP/s)",
        job.out.display(),
        job.write_frames,
        job.width,
        job.height,
        r.width,
        r.height,
        r.frames,
        job.fps,
        r.steps,
        cfg,
        e.latent[0],
        e.latent[1],
        e.latent[2],
        e.latent[3],
        e.windows,
        e.tokens_per_window,
        e.decode_tiles,
        fmt_bytes(e.weights_bytes),
        fmt_bytes(e.text_encode_bytes),
        fmt_bytes(e.denoise_bytes),
        fmt_bytes(e.decode_bytes),
        fmt_bytes(e.peak_bytes),
        e.total_secs,
        e.denoise_secs,
        e.denoise_tflop,
        e.decode_secs,
        e.decode_tflop,
        e.gemm_gflops,
    );
    printer.result(
        json!({"index": job.index, "status": "plan", "path": job.out, "model": info.name, "width": job.width, "height": job.height,
               "frames": job.write_frames, "generated_frames": r.frames, "estimate": e}),
        text,
    );
}

fn settings_json(job: &Job, model: &WanModel) -> serde_json::Value {
    json!({
        "prompt": job.request.prompt,
        "negative_prompt": job.request.negative_prompt,
        "seed": job.request.seed,
        "model": model.name,
        "model_dir": model.dir,
        "steps": job.request.steps,
        "cfg": job.request.guidance,
        "cfg_late": job.request.cfg_late,
        "shift": job.request.shift,
        "sampler": job.request.sampler,
        "guider": job.request.guider.to_string(),
        "width": job.width,
        "height": job.height,
        "frames": job.write_frames,
        "fps": job.fps,
        "generator": format!("sora {}", env!("CARGO_PKG_VERSION")),
    })
}

/// A job's stage timings in seconds, as `--json` and the sidecar report them; `load` (the
/// model load, charged to a batch's first job) only where given.
fn timings_json(t: &Timings, load: Option<f64>) -> serde_json::Value {
    let mut v = json!({
        "text_encode": t.text_encode.as_secs_f64(),
        "denoise": t.denoise.as_secs_f64(),
        "decode_and_write": t.decode.as_secs_f64(),
        "vae_decode": t.vae_decode().as_secs_f64(),
        "write": t.write.as_secs_f64(),
    });
    if let Some(load) = load {
        v["load"] = json!(load);
    }
    v
}

fn write_sidecar(job: &Job, model: &WanModel, t: &Timings) -> Result<()> {
    let path = job.out.with_extension("json");
    let mut v = settings_json(job, model);
    v["output"] = json!(job.out);
    v["timings"] = timings_json(t, None);
    let out = AtomicOutput::new(&path)?;
    std::fs::write(out.tmp_path(), serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    out.commit()?;
    Ok(())
}

enum Writer {
    Mp4(Mp4Writer),
    Png,
}

fn run_job(
    model: &WanModel,
    job: &Job,
    a: &GenArgs,
    init_noise: Option<&Tensor>,
    bars: &mut Bars,
    cancel: &dyn Fn() -> bool,
) -> Result<Timings> {
    let out = AtomicOutput::new(&job.out)?;
    let frames_dir = match &a.frames_out {
        Some(d) => {
            let d = if a.prompts.is_some() {
                d.join(job.out.file_stem().unwrap_or_default())
            } else {
                d.clone()
            };
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create --frames-out {}", d.display()))?;
            Some(d)
        }
        None => None,
    };
    let settings = settings_json(job, model);
    let mut writer = match job.kind {
        OutputKind::Mp4 => {
            let meta = vec![
                ("title".to_string(), job.request.prompt.clone()),
                ("comment".to_string(), settings.to_string()),
                (
                    "encoder".to_string(),
                    format!("sora {}", env!("CARGO_PKG_VERSION")),
                ),
            ];
            Writer::Mp4(Mp4Writer::create(
                out.tmp_path(),
                job.width,
                job.height,
                job.fps,
                &meta,
            )?)
        }
        OutputKind::Png => Writer::Png,
    };
    let crop = Some((job.crop.0, job.crop.1, job.height, job.width));
    let mut written = 0usize;
    let mut sink = |chunk: &Tensor| -> Result<()> {
        for frame in tensor_to_frames(chunk, crop)? {
            if written >= job.write_frames {
                break;
            }
            if let Some(d) = &frames_dir {
                write_png(&d.join(format!("frame_{written:05}.png")), &frame)?;
            }
            match &mut writer {
                Writer::Mp4(w) => w.write(&frame)?,
                Writer::Png => write_png(out.tmp_path(), &frame)?,
            }
            written += 1;
        }
        Ok(())
    };
    let mut timings = generate(model, &job.request, init_noise, bars, cancel, &mut sink)?;
    if written != job.write_frames {
        bail!(
            "decoded {written} frames but {} were planned",
            job.write_frames
        );
    }
    if let Writer::Mp4(w) = writer {
        // The encoder's flush (frames x264 still holds) and the faststart rewrite belong to
        // the decode stage's writing part.
        let t = std::time::Instant::now();
        w.finish()?;
        let dt = t.elapsed();
        timings.write += dt;
        timings.decode += dt;
    }
    out.commit()?;
    Ok(timings)
}
