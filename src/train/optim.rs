//! AdamW with inspectable state (so checkpoints resume exactly), a warmup + cosine learning-rate
//! schedule, global-norm gradient clipping and an exponential moving average of the weights.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Named trainable variables, in a fixed (sorted) order.
pub type Params = Vec<(String, Var)>;

/// Sorted `(name, var)` pairs of a `VarMap`.
pub fn params(varmap: &candle_nn::VarMap) -> Params {
    let data = varmap.data().lock().expect("varmap lock");
    let mut v: Params = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments). Weight decay skips 1-D tensors
/// (norm gains, biases).
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub step: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            step: 0,
            m: HashMap::new(),
            v: HashMap::new(),
        }
    }

    /// One update with learning rate `lr` from `grads` (already clipped).
    pub fn step(&mut self, params: &Params, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients may carry candle's op graph (those computed from variables); the
            // moments must not, or every step's backward intermediates stay alive through
            // them (a leak of ~8 MB per DiT step).
            let g = g.detach();
            let g = &g;
            let m = match self.m.get(name) {
                Some(m) => ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?,
                None => (g * (1.0 - c.beta1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                None => (g.sqr()? * (1.0 - c.beta2))?,
            };
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let mut w = var.as_tensor().clone();
            if var.rank() > 1 && c.weight_decay > 0.0 {
                w = (w * (1.0 - lr * c.weight_decay))?;
            }
            var.set(&(w - (update * lr)?)?)?;
            self.m.insert(name.clone(), m.detach());
            self.v.insert(name.clone(), v.detach());
        }
        Ok(())
    }

    /// The moments as named tensors (`m.<name>`, `v.<name>`), for checkpoints.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut s = HashMap::new();
        for (k, t) in &self.m {
            s.insert(format!("m.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            s.insert(format!("v.{k}"), t.clone());
        }
        s
    }

    /// Restores moments saved by [`Self::state`] at optimizer step `step`.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: u64) {
        self.step = step;
        for (k, t) in state {
            if let Some(n) = k.strip_prefix("m.") {
                self.m.insert(n.to_string(), t.clone());
            } else if let Some(n) = k.strip_prefix("v.") {
                self.v.insert(n.to_string(), t.clone());
            }
        }
    }
}

/// Linear warmup to `peak` over `warmup` steps, then cosine decay to `peak · floor` at `total`.
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = ((step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    peak * (floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

/// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(params: &Params, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for (_, var) in params {
        if let Some(g) = grads.get(var.as_tensor()) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for (_, var) in params {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g.detach() * s)?);
            }
        }
    }
    Ok(norm)
}

/// An exponential moving average of parameters (the shipped DiT weights).
pub struct Ema {
    pub decay: f64,
    pub shadow: HashMap<String, Tensor>,
}

impl Ema {
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        let mut shadow = HashMap::new();
        for (k, v) in params {
            // `copy` of a variable records the op: detach, or every update's shadow would
            // keep the previous one (and its temporaries) alive: a leak of ~7 MB per DiT step
            // in fresh runs (resumed runs load a plain tensor and did not leak).
            shadow.insert(k.clone(), v.as_tensor().detach().copy()?.detach());
        }
        Ok(Self { decay, shadow })
    }

    /// `shadow ← d·shadow + (1−d)·param`, with `d` warmed up as `min(decay, (1+n)/(10+n))`.
    pub fn update(&mut self, params: &Params, step: u64) -> Result<()> {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for (k, v) in params {
            let s = self
                .shadow
                .get(k)
                .context("EMA shadow missing a parameter")?;
            let n = ((s * d)? + (v.as_tensor().detach() * (1.0 - d))?)?.detach();
            self.shadow.insert(k.clone(), n);
        }
        Ok(())
    }
}

/// Saves named tensors to a safetensors file, atomically (temp file + rename).
pub fn save_tensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    candle_core::safetensors::save(map, &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}
