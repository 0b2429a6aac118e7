//! How a guided step combines the conditional and unconditional predictions, equal to
//! diffusers' guiders (`diffusers.guiders`, `use_original_formulation=False`):
//! `ClassifierFreeGuidance`, `ClassifierFreeZeroStarGuidance` (CFG-Zero*) and
//! `AdaptiveProjectedGuidance` (APG). Pure functions of the predictions, the step index and
//! the scale, plus APG's running average of the guidance direction across steps.

use candle_core::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

/// A guidance method and its settings (the scale itself is per step: see
/// `GenRequest::guidance_at`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Guider {
    /// Classifier-free guidance: `u + g·(c − u)`.
    #[default]
    Cfg,
    /// CFG-Zero* (Fan et al. 2025): the unconditional prediction is first scaled by the
    /// projection coefficient `α = ⟨c, u⟩ / ‖u‖²` (per batch item), which corrects a velocity
    /// field that is still inaccurate: `α·u + g·(c − α·u)`. The first `zero_init_steps` steps
    /// predict zero velocity.
    ZeroStar {
        #[serde(default)]
        zero_init_steps: usize,
    },
    /// Adaptive projected guidance (Sadat et al. 2024): the guidance direction `c − u`, averaged
    /// over steps with `momentum` (negative values damp it), shortened to at most
    /// `norm_threshold` (0: no limit), is split into its parts parallel and orthogonal to `c`;
    /// the parallel part (which oversaturates) is weighted by `eta`:
    /// `u + g·(d⊥ + eta·d∥)`.
    Apg {
        #[serde(default)]
        eta: f64,
        #[serde(default)]
        momentum: Option<f64>,
        #[serde(default)]
        norm_threshold: f64,
    },
    /// Frequency-decoupled guidance (Sadat et al. 2025): a two-level Laplacian pyramid over
    /// each frame's height × width splits the predictions into a low-frequency band (layout,
    /// colour, the object's blob) guided at the step's scale, and a high-frequency band (edges
    /// and corners) guided at `high` (1 when left out, in `sora.json` as on the command line).
    Fdg {
        #[serde(default = "fdg_high")]
        high: f64,
    },
}

/// FDG's high-band scale when none is given.
fn fdg_high() -> f64 {
    1.0
}

impl Guider {
    /// Plain classifier-free guidance (what configs omit).
    pub fn is_cfg(&self) -> bool {
        *self == Guider::Cfg
    }

    /// Rejects settings outside the method's domain, naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Guider::Apg {
            eta,
            momentum,
            norm_threshold,
        } = *self
        {
            if !eta.is_finite() {
                anyhow::bail!("APG eta {eta} must be a finite number");
            }
            if let Some(m) = momentum {
                if !(m.is_finite() && m.abs() < 1.0) {
                    anyhow::bail!("APG momentum {m} must be in (-1, 1)");
                }
            }
            if !(norm_threshold.is_finite() && norm_threshold >= 0.0) {
                anyhow::bail!("APG norm threshold {norm_threshold} must be 0 (off) or positive");
            }
        }
        if let Guider::Fdg { high } = *self {
            if !(high.is_finite() && high >= 0.0) {
                anyhow::bail!("FDG high-frequency scale {high} must be a non-negative number");
            }
        }
        Ok(())
    }

    /// Whether step `step` needs no model pass at all (CFG-Zero*'s zero-init steps).
    pub fn zeroes_step(&self, step: usize) -> bool {
        matches!(*self, Guider::ZeroStar { zero_init_steps } if step < zero_init_steps)
    }
}

/// The command-line form: `cfg`, `zero-star[:zero-init-steps=N]`,
/// `apg[:eta=X,momentum=X,norm-threshold=X]`, `fdg[:high=X]` (settings left out take the
/// defaults above; FDG's `high` 1).
impl std::str::FromStr for Guider {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (kind, settings) = s.split_once(':').unwrap_or((s, ""));
        let kind = kind.trim();
        let mut pairs = Vec::new();
        for kv in settings.split(',').filter(|kv| !kv.trim().is_empty()) {
            let Some((k, v)) = kv.split_once('=') else {
                anyhow::bail!("guider setting {kv:?} in {s:?} is not of the form name=value");
            };
            pairs.push((k.trim(), v.trim()));
        }
        let known: &[&str] = match kind {
            "cfg" => &[],
            "zero-star" => &["zero-init-steps"],
            "apg" => &["eta", "momentum", "norm-threshold"],
            "fdg" => &["high"],
            other => anyhow::bail!(
                "unknown guider {other:?} in {s:?}: use cfg, zero-star, apg or fdg (e.g. apg:eta=0,momentum=-0.5 or fdg:high=1.5)"
            ),
        };
        for (k, _) in &pairs {
            if !known.contains(k) {
                anyhow::bail!(
                    "guider {kind:?} has no setting {k:?}: it takes {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                );
            }
        }
        let num = |name: &str| -> anyhow::Result<Option<f64>> {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| {
                    v.parse::<f64>().map_err(|_| {
                        anyhow::anyhow!("guider setting {name}={v:?} in {s:?} is not a number")
                    })
                })
                .transpose()
        };
        let g = match kind {
            "cfg" => Guider::Cfg,
            "zero-star" => {
                let n = num("zero-init-steps")?.unwrap_or(0.0);
                if !(n >= 0.0 && n.fract() == 0.0 && n <= 1000.0) {
                    anyhow::bail!("guider setting zero-init-steps={n} in {s:?} must be a whole number of steps");
                }
                Guider::ZeroStar {
                    zero_init_steps: n as usize,
                }
            }
            "fdg" => Guider::Fdg {
                high: num("high")?.unwrap_or_else(fdg_high),
            },
            _ => Guider::Apg {
                eta: num("eta")?.unwrap_or(0.0),
                momentum: num("momentum")?,
                norm_threshold: num("norm-threshold")?.unwrap_or(0.0),
            },
        };
        g.validate()?;
        Ok(g)
    }
}

impl std::fmt::Display for Guider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Guider::Cfg => write!(f, "cfg"),
            Guider::ZeroStar { zero_init_steps } => {
                write!(f, "zero-star:zero-init-steps={zero_init_steps}")
            }
            Guider::Apg {
                eta,
                momentum,
                norm_threshold,
            } => {
                write!(f, "apg:eta={eta}")?;
                if let Some(m) = momentum {
                    write!(f, ",momentum={m}")?;
                }
                write!(f, ",norm-threshold={norm_threshold}")
            }
            Guider::Fdg { high } => write!(f, "fdg:high={high}"),
        }
    }
}

/// A guider's state over one generation (APG's running average).
#[derive(Debug, Clone)]
pub struct Guidance {
    guider: Guider,
    running: Option<Tensor>,
}

impl Guidance {
    pub fn new(guider: Guider) -> Self {
        Self {
            guider,
            running: None,
        }
    }

    /// The guided prediction at scale `g` from `cond` and `uncond` (`[B, …]`, f32, norms and
    /// projections per batch item), for a step that [`Guider::zeroes_step`] does not zero.
    /// `uncond` is `None` on unguided steps, which return `cond`.
    pub fn combine(&mut self, g: f64, cond: &Tensor, uncond: Option<&Tensor>) -> Result<Tensor> {
        let Some(uncond) = uncond else {
            return Ok(cond.clone());
        };
        match self.guider {
            Guider::Cfg => uncond + ((cond - uncond)? * g)?,
            Guider::ZeroStar { .. } => {
                let alpha = zero_star_scale(cond, uncond)?;
                let u = uncond.broadcast_mul(&alpha)?;
                &u + ((cond - &u)? * g)?
            }
            Guider::Apg {
                eta,
                momentum,
                norm_threshold,
            } => {
                let mut diff = (cond - uncond)?;
                if let Some(m) = momentum {
                    if let Some(r) = &self.running {
                        diff = (diff + (r * m)?)?;
                    }
                    self.running = Some(diff.clone());
                }
                if norm_threshold > 0.0 {
                    let norm = per_item_sum(&diff.sqr()?)?.sqrt()?;
                    // min(1, threshold / ‖d‖), as torch computes it (‖d‖ = 0 gives 1).
                    let factor = (norm.recip()? * norm_threshold)?.clamp(f32::MIN, 1f32)?;
                    diff = diff.broadcast_mul(&factor)?;
                }
                // The projection in f64, as the reference does.
                let d64 = diff.to_dtype(DType::F64)?;
                let c64 = cond.to_dtype(DType::F64)?;
                let cnorm = per_item_sum(&c64.sqr()?)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                let chat = c64.broadcast_div(&cnorm)?;
                let dot = per_item_sum(&(&d64 * &chat)?)?;
                let par64 = chat.broadcast_mul(&dot)?;
                let orth = (&d64 - &par64)?.to_dtype(diff.dtype())?;
                let par = par64.to_dtype(diff.dtype())?;
                let update = (orth + (par * eta)?)?;
                uncond + (update * g)?
            }
            Guider::Fdg { high } => {
                // Level 0 (high band) d − L(d) at `high`, level 1 (low band) L(d) at `g`;
                // the pyramid's reconstruction is linear, so this is u + high·d + (g − high)·L(d).
                let d = (cond - uncond)?;
                let low = pyramid_lowpass(&d)?;
                let high_band = (&d - &low)?;
                (uncond + (high_band * high)?)? + (low * g)?
            }
        }
    }
}

/// The Laplacian pyramid's low band as seen at full size, `pyrup(pyrdown(x))` with kornia's
/// operators (5×5 binomial blur with reflected borders; bilinear resampling by 2 without
/// aligned corners, i.e. 2×2 means down and 3:1 interpolation up), over the last two axes
/// (height and width, both even) of `x`.
pub fn pyramid_lowpass(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let n = dims.len();
    if n < 2 || !dims[n - 1].is_multiple_of(2) || !dims[n - 2].is_multiple_of(2) {
        candle_core::bail!("pyramid_lowpass needs even height and width, got shape {dims:?}");
    }
    let (h, w) = (dims[n - 2], dims[n - 1]);
    let mut data: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (h2, w2) = (h / 2, w / 2);
    let mut small = vec![0f32; h2 * w2];
    for plane in data.chunks_mut(h * w) {
        let blurred = blur5(plane, h, w);
        for y in 0..h2 {
            for xx in 0..w2 {
                let at = |yy: usize, xc: usize| blurred[yy * w + xc];
                small[y * w2 + xx] = 0.25
                    * ((at(2 * y, 2 * xx) + at(2 * y, 2 * xx + 1))
                        + (at(2 * y + 1, 2 * xx) + at(2 * y + 1, 2 * xx + 1)));
            }
        }
        // Bilinear ×2, align_corners=False: output 2k blends k with k−1, 2k+1 with k+1 (3:1),
        // clamped at the borders.
        let up_axis = |i: usize, len: usize| -> (usize, usize) {
            let k = i / 2;
            if i.is_multiple_of(2) {
                (k, k.saturating_sub(1))
            } else {
                (k, (k + 1).min(len - 1))
            }
        };
        let mut up = vec![0f32; h * w];
        for y in 0..h {
            let (y0, y1) = up_axis(y, h2);
            for xx in 0..w {
                let (x0, x1) = up_axis(xx, w2);
                let s = |yy: usize, xc: usize| small[yy * w2 + xc];
                let r0 = 0.75 * s(y0, x0) + 0.25 * s(y0, x1);
                let r1 = 0.75 * s(y1, x0) + 0.25 * s(y1, x1);
                up[y * w + xx] = 0.75 * r0 + 0.25 * r1;
            }
        }
        plane.copy_from_slice(&blur5(&up, h, w));
    }
    Tensor::from_vec(data, dims, x.device())?.to_dtype(x.dtype())
}

/// kornia's pyramid blur: the 5×5 binomial kernel ([1, 4, 6, 4, 1]/16 in each axis) with
/// reflected borders (`…, 2, 1, 0, 1, 2, …`), applied separably.
fn blur5(src: &[f32], h: usize, w: usize) -> Vec<f32> {
    const K: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
    let reflect = |i: isize, len: usize| -> usize {
        let n = len as isize;
        let mut i = i;
        if i < 0 {
            i = -i;
        }
        if i >= n {
            i = 2 * (n - 1) - i;
        }
        i.clamp(0, n - 1) as usize
    };
    // One pass along an axis of `len` positions `stride` apart.
    let pass = |src: &[f32], along_x: bool| -> Vec<f32> {
        let (len, stride) = if along_x { (w, 1) } else { (h, w) };
        (0..h * w)
            .map(|i| {
                let pos = if along_x { i % w } else { i / w };
                let base = i - pos * stride;
                K.iter()
                    .enumerate()
                    .map(|(k, c)| {
                        c * src[base + reflect(pos as isize + k as isize - 2, len) * stride]
                    })
                    .sum()
            })
            .collect()
    };
    pass(&pass(src, true), false)
}

/// Sum over every axis but the first, keeping them as size-1 axes: `[B, 1, …, 1]`.
fn per_item_sum(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let s = x.flatten_from(1)?.sum_keepdim(D::Minus1)?;
    let mut shape = vec![dims[0]];
    shape.extend(std::iter::repeat_n(1, dims.len() - 1));
    s.reshape(shape)
}

/// CFG-Zero*'s `α = ⟨c, u⟩ / (‖u‖² + 1e-8)` per batch item, `[B, 1, …, 1]`.
pub fn zero_star_scale(cond: &Tensor, uncond: &Tensor) -> Result<Tensor> {
    let dot = per_item_sum(&(cond * uncond)?)?;
    let sq = (per_item_sum(&uncond.sqr()?)? + 1e-8)?;
    dot / sq
}
