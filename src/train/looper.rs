//! The training loop shared by the VAE and the DiT: schedule, clipping, AdamW, EMA,
//! checkpoints every few minutes and on interruption, a progress bar with loss and throughput.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{write_loss_csv, Checkpoint, LogRow};
use super::optim::{clip_grad_norm, lr_at, AdamW, AdamWConfig, Ema, Params};

/// Settings of one training run.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub name: String,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    /// Final learning rate as a fraction of `lr`.
    pub lr_floor: f64,
    pub clip: f64,
    pub weight_decay: f64,
    /// EMA decay of the weights (None: no EMA).
    pub ema: Option<f64>,
    pub ckpt_every: u64,
    pub progress: bool,
}

/// How a run ended.
pub struct Outcome {
    pub log: Vec<LogRow>,
    /// False when interrupted before `steps`.
    pub finished: bool,
    pub ema: Option<Ema>,
    pub elapsed: f64,
}

/// Trains `params` for `cfg.steps` steps, resuming from `dir/ckpt` when present. `loss_fn(step)`
/// returns the scalar loss of that step's batch; it must derive all randomness from `step`, so
/// a resumed run sees exactly the batches it would have seen.
pub fn train_loop(
    cfg: &LoopConfig,
    params: &Params,
    dir: &Path,
    cancel: &dyn Fn() -> bool,
    loss_fn: &mut dyn FnMut(u64) -> Result<Tensor>,
) -> Result<Outcome> {
    let ckpt = Checkpoint::new(&dir.join("ckpt"));
    let mut opt = AdamW::new(AdamWConfig {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    });
    let mut ema = match cfg.ema {
        Some(d) => Some(Ema::new(params, d)?),
        None => None,
    };
    let (mut step, mut log, base_elapsed) = match ckpt.load(params, &mut opt, ema.as_mut())? {
        Some(r) => (r.step, r.log, r.elapsed),
        None => (0, Vec::new(), 0.0),
    };
    let bar = if cfg.progress {
        let b = ProgressBar::new(cfg.steps);
        b.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.set_prefix(cfg.name.clone());
        b.set_position(step);
        b
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut last_ckpt = step;
    let mut smooth: Option<f64> = None;
    let mut finished = true;
    while step < cfg.steps {
        if cancel() {
            finished = false;
            break;
        }
        let lr = lr_at(step, cfg.steps, cfg.warmup, cfg.lr, cfg.lr_floor);
        let loss = loss_fn(step)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            anyhow::bail!(
                "{}: loss became {loss_v} at step {step}; lower the learning rate",
                cfg.name
            );
        }
        let mut grads = loss.backward()?;
        let gn = clip_grad_norm(params, &mut grads, cfg.clip)?;
        opt.step(params, &grads, lr)?;
        if let Some(e) = ema.as_mut() {
            e.update(params, step)?;
        }
        step += 1;
        let elapsed = base_elapsed + started.elapsed().as_secs_f64();
        log.push(LogRow {
            step,
            loss: loss_v,
            lr,
            grad_norm: gn,
            elapsed,
        });
        let s = smooth.map_or(loss_v, |s| 0.95 * s + 0.05 * loss_v);
        smooth = Some(s);
        bar.set_message(format!("loss {s:.4} lr {lr:.1e}"));
        bar.inc(1);
        if step - last_ckpt >= cfg.ckpt_every && step < cfg.steps {
            ckpt.save(step, elapsed, params, &opt, ema.as_ref(), &log)?;
            write_loss_csv(&dir.join("loss.csv"), &log)?;
            last_ckpt = step;
        }
    }
    bar.finish_and_clear();
    let elapsed = base_elapsed + started.elapsed().as_secs_f64();
    ckpt.save(step, elapsed, params, &opt, ema.as_ref(), &log)?;
    write_loss_csv(&dir.join("loss.csv"), &log)?;
    Ok(Outcome {
        log,
        finished,
        ema,
        elapsed,
    })
}
