//! Training checkpoints that resume exactly: the parameters, AdamW moments, EMA shadow, step
//! and loss log of a run, written atomically into one directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{save_tensors, AdamW, Ema, Params};

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Wall seconds since the run began (across resumes).
    pub elapsed: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    step: u64,
    elapsed: f64,
    log: Vec<LogRow>,
}

/// A checkpoint directory (`params.safetensors`, `optim.safetensors`, `ema.safetensors`,
/// `state.json`).
pub struct Checkpoint {
    pub dir: PathBuf,
}

/// What a resumed run starts from.
pub struct Resumed {
    pub step: u64,
    pub elapsed: f64,
    pub log: Vec<LogRow>,
}

impl Checkpoint {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    pub fn exists(&self) -> bool {
        self.dir.join("state.json").is_file()
    }

    /// Writes everything; `state.json` last, so a checkpoint interrupted mid-write is ignored
    /// and the previous one (its files replaced only by complete renames) stays consistent.
    pub fn save(
        &self,
        step: u64,
        elapsed: f64,
        params: &Params,
        opt: &AdamW,
        ema: Option<&Ema>,
        log: &[LogRow],
    ) -> Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let p: HashMap<String, Tensor> = params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        save_tensors(&p, &self.dir.join("params.safetensors"))?;
        save_tensors(&opt.state(), &self.dir.join("optim.safetensors"))?;
        if let Some(e) = ema {
            save_tensors(&e.shadow, &self.dir.join("ema.safetensors"))?;
        }
        let state = State {
            step,
            elapsed,
            log: log.to_vec(),
        };
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, serde_json::to_string(&state)?)?;
        std::fs::rename(&tmp, self.dir.join("state.json"))?;
        Ok(())
    }

    /// Restores parameters, optimizer and EMA in place; `None` when there is no checkpoint.
    pub fn load(
        &self,
        params: &Params,
        opt: &mut AdamW,
        ema: Option<&mut Ema>,
    ) -> Result<Option<Resumed>> {
        if !self.exists() {
            return Ok(None);
        }
        let state: State =
            serde_json::from_str(&std::fs::read_to_string(self.dir.join("state.json"))?)
                .with_context(|| format!("corrupt checkpoint state in {}", self.dir.display()))?;
        let dev = Device::Cpu;
        let p = candle_core::safetensors::load(self.dir.join("params.safetensors"), &dev)
            .with_context(|| format!("cannot read {}/params.safetensors", self.dir.display()))?;
        for (k, v) in params {
            let t = p.get(k).with_context(|| {
                format!(
                    "checkpoint {} has no parameter `{k}`: it was written by a run with other \
                     settings (another model size, or without --dit-train-text); move that \
                     directory aside to start afresh",
                    self.dir.display()
                )
            })?;
            v.set(&t.to_device(v.device())?)?;
        }
        let o = candle_core::safetensors::load(self.dir.join("optim.safetensors"), &dev)?;
        opt.load_state(&o, state.step);
        if let Some(e) = ema {
            e.shadow = candle_core::safetensors::load(self.dir.join("ema.safetensors"), &dev)?;
        }
        Ok(Some(Resumed {
            step: state.step,
            elapsed: state.elapsed,
            log: state.log,
        }))
    }
}

/// Writes the loss log as CSV (`step,loss,lr,grad_norm,elapsed`).
pub fn write_loss_csv(path: &Path, log: &[LogRow]) -> Result<()> {
    let mut s = String::from("step,loss,lr,grad_norm,elapsed_s\n");
    for r in log {
        s.push_str(&format!(
            "{},{:.6},{:.3e},{:.4},{:.1}\n",
            r.step, r.loss, r.lr, r.grad_norm, r.elapsed
        ));
    }
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}
