//! The training loop shared by the VAE and the DiT: schedule, clipping, AdamW, EMA,
//! checkpoints every few minutes and on interruption, a progress bar with loss and throughput.
//!
//! A step's batch can be cut into shards that run forward and backward at the same time, one
//! per core (data parallelism inside one process): a training step of these tiny models is
//! bound by candle's per-op overhead (allocation, graph bookkeeping, thread hand-offs), not by
//! arithmetic, so one single-threaded shard per core beats every op split across the cores.

use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

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
    /// Shards a step's batch is cut into, run in parallel (1: the whole batch at once).
    pub shards: usize,
}

/// Which part of a step's batch one loss call computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// This shard's rows of a batch of `n`: contiguous, sizes differing by at most one.
    pub fn rows(&self, n: usize) -> Range<usize> {
        let at = |i: usize| i * n / self.count;
        at(self.index)..at(self.index + 1)
    }

    /// This shard's fraction of a batch of `n` rows (what its mean loss is scaled by, so the
    /// shards' losses add up to the batch's).
    pub fn share(&self, n: usize) -> f64 {
        self.rows(n).len() as f64 / n as f64
    }
}

/// How many shards to cut a batch of `batch` into: one per thread of the pool, at most one
/// per row.
pub fn data_shards(batch: usize) -> usize {
    rayon::current_num_threads().clamp(1, batch.max(1))
}

/// How a run ended.
pub struct Outcome {
    pub log: Vec<LogRow>,
    /// False when interrupted before `steps`.
    pub finished: bool,
    pub ema: Option<Ema>,
    pub elapsed: f64,
}

/// Trains `params` for `cfg.steps` steps, resuming from `dir/ckpt` when present.
/// `loss_fn(step, shard)` returns the scalar loss of `shard`'s part of that step's batch, scaled
/// so that the shards' losses add up to the batch's (see [`Shard::share`]); the shards run in
/// parallel, each on its own thread in differentiable mode, and their gradients are summed. It
/// must derive all randomness from `step`, so a resumed run sees exactly the batches it would
/// have seen.
pub fn train_loop(
    cfg: &LoopConfig,
    params: &Params,
    dir: &Path,
    cancel: &dyn Fn() -> bool,
    loss_fn: &(dyn Fn(u64, Shard) -> Result<Tensor> + Sync),
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
        let (loss_v, mut grads) = sharded_grads(params, cfg.shards, &|shard| loss_fn(step, shard))?;
        if !loss_v.is_finite() {
            anyhow::bail!(
                "{}: loss became {loss_v} at step {step}; lower the learning rate",
                cfg.name
            );
        }
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

/// Runs forward and backward of every shard (in parallel when there are several) and returns the
/// summed loss and the summed gradients of `params`.
pub fn sharded_grads(
    params: &Params,
    shards: usize,
    loss_fn: &(dyn Fn(Shard) -> Result<Tensor> + Sync),
) -> Result<(f64, GradStore)> {
    let run = |index: usize| -> Result<(f64, GradStore)> {
        let was = crate::nn::differentiable();
        crate::nn::set_differentiable(true);
        let out = loss_fn(Shard {
            index,
            count: shards.max(1),
        })
        .and_then(|loss| {
            let v = loss.to_scalar::<f32>()? as f64;
            Ok((v, loss.backward()?))
        });
        crate::nn::set_differentiable(was);
        out
    };
    if shards <= 1 {
        return run(0);
    }
    let parts: Vec<(f64, GradStore)> = (0..shards)
        .into_par_iter()
        .map(run)
        .collect::<Result<_>>()?;
    let mut parts = parts.into_iter();
    let (mut loss, mut grads) = parts.next().expect("at least one shard");
    for (l, g) in parts {
        loss += l;
        for (_, var) in params {
            if let Some(b) = g.get(var.as_tensor()) {
                let sum = match grads.remove(var.as_tensor()) {
                    Some(a) => (a + b)?,
                    None => b.clone(),
                };
                grads.insert(var.as_tensor(), sum);
            }
        }
    }
    Ok((loss, grads))
}
