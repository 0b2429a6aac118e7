//! Flow-matching samplers, equal to diffusers' `FlowMatchEulerDiscreteScheduler` (plain and
//! with `stochastic_sampling`) and `UniPCMultistepScheduler` (configured for flow prediction,
//! as Wan ships it).
//!
//! A sampler owns its sigma schedule and (UniPC) its short history of model outputs; each step
//! maps (latent, velocity) to the next latent. Scalar coefficients are computed in f32 with the
//! reference's order of operations, the schedules in f64 then rounded to f32, as numpy/torch do.

pub mod guidance;

use candle_core::{Result, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde::{Deserialize, Serialize};

/// Which sampler to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SamplerKind {
    /// First-order flow-matching Euler (`FlowMatchEulerDiscreteScheduler`).
    Euler,
    /// UniPC multistep predictor-corrector, order 2, bh2 (`UniPCMultistepScheduler`).
    Unipc,
    /// Stochastic flow-matching Euler (`FlowMatchEulerDiscreteScheduler` with
    /// `stochastic_sampling`): each step predicts the clean latent and re-noises it to the next
    /// noise level with fresh seeded noise, which corrects the model's earlier errors instead
    /// of carrying them along the ODE path.
    #[serde(rename = "euler-sde")]
    #[value(name = "euler-sde")]
    EulerSde,
}

fn d_1000() -> usize {
    1000
}
fn d_order() -> usize {
    2
}
fn d_true() -> bool {
    true
}
fn d_bh2() -> String {
    "bh2".into()
}
fn d_zero() -> String {
    "zero".into()
}
fn d_flow() -> String {
    "flow_prediction".into()
}
fn d_linspace() -> String {
    "linspace".into()
}

/// `scheduler/scheduler_config.json` (UniPC fields; unknown fields ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default)]
    pub _class_name: Option<String>,
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default)]
    pub flow_shift: Option<f64>,
    /// `FlowMatchEulerDiscreteScheduler`'s name for the shift.
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default = "d_order")]
    pub solver_order: usize,
    #[serde(default = "d_bh2")]
    pub solver_type: String,
    #[serde(default = "d_true")]
    pub predict_x0: bool,
    #[serde(default = "d_true")]
    pub lower_order_final: bool,
    #[serde(default = "d_zero")]
    pub final_sigmas_type: String,
    #[serde(default = "d_flow")]
    pub prediction_type: String,
    #[serde(default = "d_true")]
    pub use_flow_sigmas: bool,
    #[serde(default = "d_linspace")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub disable_corrector: Vec<usize>,
}

impl SchedulerConfig {
    /// The Wan2.1 T2V scheduler as diffusers' conversion script writes it.
    pub fn wan2_1() -> Self {
        Self {
            _class_name: Some("UniPCMultistepScheduler".into()),
            num_train_timesteps: 1000,
            flow_shift: Some(3.0),
            shift: None,
            solver_order: 2,
            solver_type: d_bh2(),
            predict_x0: true,
            lower_order_final: true,
            final_sigmas_type: d_zero(),
            prediction_type: d_flow(),
            use_flow_sigmas: true,
            timestep_spacing: d_linspace(),
            use_dynamic_shifting: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            thresholding: false,
            shift_terminal: None,
            disable_corrector: vec![],
        }
    }

    /// The configured shift (`flow_shift` for UniPC, `shift` for flow-match Euler), default 1.
    pub fn default_shift(&self) -> f64 {
        self.flow_shift.or(self.shift).unwrap_or(1.0)
    }

    /// Rejects settings this implementation does not reproduce, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        let bad = |field: &str, v: &dyn std::fmt::Debug| {
            anyhow::bail!(
                "scheduler_config.json: {field} = {v:?} is not supported by sora's flow samplers"
            )
        };
        if self.prediction_type != "flow_prediction" {
            return bad("prediction_type", &self.prediction_type);
        }
        if !self.use_flow_sigmas && self.flow_shift.is_some() {
            return bad("use_flow_sigmas", &self.use_flow_sigmas);
        }
        if self.use_dynamic_shifting {
            return bad("use_dynamic_shifting", &true);
        }
        if self.use_karras_sigmas || self.use_exponential_sigmas || self.use_beta_sigmas {
            return bad("use_karras/exponential/beta_sigmas", &true);
        }
        if self.thresholding {
            return bad("thresholding", &true);
        }
        if self.shift_terminal.is_some() {
            return bad("shift_terminal", &self.shift_terminal);
        }
        if self.final_sigmas_type != "zero" && self.final_sigmas_type != "sigma_min" {
            return bad("final_sigmas_type", &self.final_sigmas_type);
        }
        if self.solver_type != "bh1" && self.solver_type != "bh2" {
            return bad("solver_type", &self.solver_type);
        }
        if self.solver_order == 0 || self.solver_order > 3 {
            return bad("solver_order", &self.solver_order);
        }
        Ok(())
    }
}

/// A flow-matching sampler: the timesteps to evaluate the model at and the update rule.
pub trait Sampler {
    /// Model timesteps (0..1000 scale), one per step.
    fn timesteps(&self) -> &[f32];
    /// Noise levels, one per step plus the final one (0).
    fn sigmas(&self) -> &[f32];
    /// Advances `sample` (the latent at the current step) given the model's velocity.
    fn step(&mut self, velocity: &Tensor, sample: &Tensor) -> Result<Tensor>;
}

/// Builds the sampler of `kind` for `steps` steps with `shift`; `seed` seeds the stochastic
/// sampler's per-step noise (the deterministic ones ignore it).
pub fn build(
    kind: SamplerKind,
    cfg: &SchedulerConfig,
    steps: usize,
    shift: f64,
    seed: u64,
) -> Box<dyn Sampler> {
    match kind {
        SamplerKind::Euler => Box::new(FlowMatchEuler::new(steps, shift, cfg.num_train_timesteps)),
        SamplerKind::Unipc => Box::new(UniPc::new(cfg, steps, shift)),
        SamplerKind::EulerSde => Box::new(FlowMatchEulerSde::new(
            steps,
            shift,
            cfg.num_train_timesteps,
            seed,
        )),
    }
}

/// `FlowMatchEulerDiscreteScheduler` (no dynamic shifting): `x ← x + (σ_next − σ)·v`.
#[derive(Debug, Clone)]
pub struct FlowMatchEuler {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    index: usize,
}

impl FlowMatchEuler {
    pub fn new(steps: usize, shift: f64, num_train_timesteps: usize) -> Self {
        let n = num_train_timesteps as f64;
        // __init__: sigmas of the training grid, shifted in f32.
        let shift32 = shift as f32;
        let train_shift = |s: f32| shift32 * s / (1.0 + (shift32 - 1.0) * s);
        // The training grid's first sigma is N/N = 1 exactly.
        let sigma_max = train_shift(1.0) as f64;
        let sigma_min = train_shift(1.0f32 / num_train_timesteps as f32) as f64;
        // set_timesteps: linspace in f64 over t = σ·N, back to σ, shifted again, rounded to f32.
        let (t0, t1) = (sigma_max * n, sigma_min * n);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if steps == 1 {
                    t0
                } else {
                    t0 + (t1 - t0) * i as f64 / (steps - 1) as f64
                };
                let s = t / n;
                (shift * s / (1.0 + (shift - 1.0) * s)) as f32
            })
            .collect();
        let timesteps = sigmas
            .iter()
            .map(|s| s * num_train_timesteps as f32)
            .collect();
        sigmas.push(0.0);
        Self {
            sigmas,
            timesteps,
            index: 0,
        }
    }
}

impl Sampler for FlowMatchEuler {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    fn step(&mut self, velocity: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let dt = self.sigmas[self.index + 1] - self.sigmas[self.index];
        self.index += 1;
        sample.add(&(velocity * dt as f64)?)
    }
}

/// `FlowMatchEulerDiscreteScheduler` with `stochastic_sampling = True`: the same schedule as
/// [`FlowMatchEuler`], and the step `x0 = x − σ·v`, `x ← (1 − σ_next)·x0 + σ_next·z` with
/// fresh standard-normal `z`. The noise is a ChaCha8 stream of the generation's seed (stream 1;
/// the initial latent noise is stream 0), drawn row-major over the latent at every step, so a
/// seed gives the same video on every run, platform and thread count.
#[derive(Debug, Clone)]
pub struct FlowMatchEulerSde {
    euler: FlowMatchEuler,
    rng: rand_chacha::ChaCha8Rng,
}

impl FlowMatchEulerSde {
    pub fn new(steps: usize, shift: f64, num_train_timesteps: usize, seed: u64) -> Self {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        Self {
            euler: FlowMatchEuler::new(steps, shift, num_train_timesteps),
            rng,
        }
    }

    /// One step with the given noise `z` (same shape as `sample`).
    pub fn step_with_noise(
        &mut self,
        velocity: &Tensor,
        sample: &Tensor,
        noise: &Tensor,
    ) -> Result<Tensor> {
        let i = self.euler.index;
        let (sigma, next) = (self.euler.sigmas[i], self.euler.sigmas[i + 1]);
        self.euler.index += 1;
        let x0 = (sample - (velocity * sigma as f64)?)?;
        (x0 * (1.0 - next) as f64)? + (noise * next as f64)?
    }
}

impl Sampler for FlowMatchEulerSde {
    fn timesteps(&self) -> &[f32] {
        &self.euler.timesteps
    }
    fn sigmas(&self) -> &[f32] {
        &self.euler.sigmas
    }
    fn step(&mut self, velocity: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let z: Vec<f32> = rand_distr::StandardNormal
            .sample_iter(&mut self.rng)
            .take(sample.elem_count())
            .collect();
        let z = Tensor::from_vec(z, sample.shape(), sample.device())?.to_dtype(sample.dtype())?;
        self.step_with_noise(velocity, sample, &z)
    }
}

/// numpy's `linspace(start, stop, num)` in f64.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i == num - 1 {
                stop
            } else {
                start + i as f64 * step
            }
        })
        .collect()
}

/// `UniPCMultistepScheduler` with `use_flow_sigmas`, `prediction_type = flow_prediction`.
#[derive(Debug, Clone)]
pub struct UniPc {
    sigmas: Vec<f32>,
    timesteps: Vec<f32>,
    order: usize,
    bh2: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    index: usize,
    /// Converted model outputs (x0 predictions), oldest first; at most `order`.
    model_outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    lower_order_nums: usize,
    this_order: usize,
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, steps: usize, shift: f64) -> Self {
        let n = cfg.num_train_timesteps as f64;
        let mut s: Vec<f64> = linspace(1.0, 1.0 / n, steps + 1);
        s.pop();
        for v in s.iter_mut() {
            *v = shift * *v / (1.0 + (shift - 1.0) * *v);
        }
        if (s[0] - 1.0).abs() < 1e-6 {
            s[0] -= 1e-6;
        }
        // Timesteps are int64 in diffusers: truncation of σ·N.
        let timesteps: Vec<f32> = s.iter().map(|v| (v * n).trunc() as f32).collect();
        let last = if cfg.final_sigmas_type == "sigma_min" {
            *s.last().expect("at least one step")
        } else {
            0.0
        };
        let mut sigmas: Vec<f32> = s.iter().map(|v| *v as f32).collect();
        sigmas.push(last as f32);
        Self {
            sigmas,
            timesteps,
            order: cfg.solver_order,
            bh2: cfg.solver_type == "bh2",
            predict_x0: cfg.predict_x0,
            lower_order_final: cfg.lower_order_final,
            disable_corrector: cfg.disable_corrector.clone(),
            index: 0,
            model_outputs: Vec::new(),
            last_sample: None,
            lower_order_nums: 0,
            this_order: 0,
        }
    }

    /// λ = log α − log σ with α = 1 − σ (flow sigmas), in f32.
    fn lambda(sigma: f32) -> f32 {
        (1.0 - sigma).ln() - sigma.ln()
    }

    /// The coefficient vectors `R` (rows `rks^(i-1)`) and `b` of the UniPC linear system, and
    /// `h_phi_1`, `B_h`. All f32 like the reference.
    fn coefficients(
        &self,
        h: f32,
        rks: &[f32],
        order: usize,
    ) -> (Vec<Vec<f32>>, Vec<f32>, f32, f32) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial_i = 1.0f32;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|rk| rk.powi(i as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial_i / b_h);
            factorial_i *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial_i;
        }
        (r, b, h_phi_1, b_h)
    }

    /// What the predictor and corrector share: for the step from sigma index `s0` to `t`, the
    /// ratios `rk` and differences `D1` of the older model outputs (indices `s0 − k`), the UniPC
    /// system `(R, b)`, the scale `c` of the correction term, and the first-order update
    /// `x_t_` of `x` from `m0` (the newest stored output).
    fn setup(&self, t: usize, s0: usize, x: &Tensor, order: usize, what: &str) -> Result<Setup> {
        let (sigma_t, sigma_s0) = (self.sigmas[t], self.sigmas[s0]);
        let (alpha_t, alpha_s0) = (1.0 - sigma_t, 1.0 - sigma_s0);
        let lambda_s0 = alpha_s0.ln() - sigma_s0.ln();
        let h = (alpha_t.ln() - sigma_t.ln()) - lambda_s0;
        let m0 = self
            .model_outputs
            .last()
            .unwrap_or_else(|| panic!("{what} needs a model output"));
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let mi = &self.model_outputs[self.model_outputs.len() - 1 - k];
            let rk = (Self::lambda(self.sigmas[s0 - k]) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(((mi - m0)? / rk as f64)?);
        }
        rks.push(1.0);
        let (r, b, h_phi_1, b_h) = self.coefficients(h, &rks, order);
        let (x_coef, m_coef, c) = if self.predict_x0 {
            (sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * b_h)
        } else {
            (alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * b_h)
        };
        let x_t_ = ((x * x_coef as f64)? - (m0 * m_coef as f64)?)?;
        Ok(Setup { d1s, r, b, c, x_t_ })
    }

    /// Predictor (`multistep_uni_p_bh_update`).
    fn predict(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.index;
        let Setup { d1s, r, b, c, x_t_ } = self.setup(i + 1, i, sample, order, "predictor")?;
        if d1s.is_empty() {
            return Ok(x_t_);
        }
        let rhos_p: Vec<f32> = if order == 2 {
            vec![0.5]
        } else {
            let n = order - 1;
            let sub: Vec<Vec<f32>> = r[..n].iter().map(|row| row[..n].to_vec()).collect();
            solve(&sub, &b[..n])
        };
        let pred_res = weighted_sum(&rhos_p, &d1s)?;
        x_t_ - (pred_res * c as f64)?
    }

    /// Corrector (`multistep_uni_c_bh_update`); `model_t` is the current converted output.
    fn correct(&self, model_t: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.index;
        let Setup { d1s, r, b, c, x_t_ } = self.setup(i, i - 1, last_sample, order, "corrector")?;
        let rhos_c: Vec<f32> = if order == 1 { vec![0.5] } else { solve(&r, &b) };
        let m0 = self.model_outputs.last().expect("checked in setup");
        let d1_t = (model_t - m0)?;
        let last = *rhos_c.last().expect("non-empty");
        let mut res = (d1_t * last as f64)?;
        if !d1s.is_empty() {
            res = (weighted_sum(&rhos_c[..rhos_c.len() - 1], &d1s)? + res)?;
        }
        x_t_ - (res * c as f64)?
    }
}

/// See [`UniPc::setup`].
struct Setup {
    d1s: Vec<Tensor>,
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
    c: f32,
    x_t_: Tensor,
}

fn weighted_sum(w: &[f32], xs: &[Tensor]) -> Result<Tensor> {
    let mut acc = (&xs[0] * w[0] as f64)?;
    for (wi, x) in w.iter().zip(xs).skip(1) {
        acc = (acc + (x * *wi as f64)?)?;
    }
    Ok(acc)
}

/// Solves the small dense system `a·x = b` (Gaussian elimination with partial pivoting).
fn solve(a: &[Vec<f32>], b: &[f32]) -> Vec<f32> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, bi)| row.iter().map(|v| *v as f64).chain([*bi as f64]).collect())
        .collect();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))
            .expect("non-empty");
        m.swap(col, piv);
        let pivot_row = m[col].clone();
        for row in m.iter_mut().skip(col + 1) {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - s) / m[row][row];
    }
    x.into_iter().map(|v| v as f32).collect()
}

impl Sampler for UniPc {
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    fn step(&mut self, velocity: &Tensor, sample: &Tensor) -> Result<Tensor> {
        // Flow prediction → x0 prediction.
        let sigma = self.sigmas[self.index];
        let x0 = (sample - (velocity * sigma as f64)?)?;
        let use_corrector = self.index > 0
            && !self.disable_corrector.contains(&(self.index - 1))
            && self.last_sample.is_some();
        let sample = if use_corrector {
            let last = self.last_sample.clone().expect("checked");
            self.correct(&x0, &last, self.this_order)?
        } else {
            sample.clone()
        };
        self.model_outputs.push(x0);
        if self.model_outputs.len() > self.order {
            self.model_outputs.remove(0);
        }
        let this_order = if self.lower_order_final {
            self.order.min(self.timesteps.len() - self.index)
        } else {
            self.order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev = self.predict(&sample, self.this_order)?;
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Ok(prev)
    }
}
