//! Flow samplers against diffusers (fixtures from scripts/reference/ref_sched.py): schedules
//! exactly, and every intermediate sample of a run with fixed velocities within 1e-5 (the
//! stochastic Euler replaying diffusers' recorded noise).

use std::collections::HashMap;

use candle_core::{IndexOp, Tensor};
use sora::sched::{build, FlowMatchEulerSde, Sampler, SamplerKind, SchedulerConfig};

use crate::common::{assert_close, get, load};

type Io = HashMap<String, Tensor>;

/// The fixture's runs: `(steps, shift, key, start latent, velocities [steps, …])`.
fn fixture_runs(io: &Io) -> Vec<(usize, f64, String, Tensor, Tensor)> {
    [(7usize, 3.0f64), (20, 5.0), (1, 3.0), (2, 8.0)]
        .into_iter()
        .map(|(steps, shift)| {
            let key = format!("{steps}_{shift}");
            let x0 = get(io, &format!("{key}_x"));
            let vs = get(io, &format!("{key}_v"));
            (steps, shift, key, x0, vs)
        })
        .collect()
}

/// Steps `x0` `steps` times with `step(i, x)` and checks every sample against `samples[i]`.
fn assert_run(
    label: &str,
    x0: &Tensor,
    samples: &Tensor,
    steps: usize,
    mut step: impl FnMut(usize, &Tensor) -> Tensor,
) {
    let mut x = x0.clone();
    for i in 0..steps {
        x = step(i, &x);
        assert_close(
            &format!("{label} step {i}"),
            &x,
            &samples.i(i).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn sched_euler_and_unipc_match_diffusers() {
    let io = load("sched_io.safetensors");
    let cfg = SchedulerConfig::wan2_1();
    for (steps, shift, key, x0, vs) in fixture_runs(&io) {
        for (name, kind) in [("euler", SamplerKind::Euler), ("unipc", SamplerKind::Unipc)] {
            let mut s = build(kind, &cfg, steps, shift, 0);
            let ref_sigmas: Vec<f32> = get(&io, &format!("{name}_{key}_sigmas")).to_vec1().unwrap();
            let ref_ts: Vec<f32> = get(&io, &format!("{name}_{key}_timesteps"))
                .to_vec1()
                .unwrap();
            assert_eq!(s.sigmas(), ref_sigmas.as_slice(), "{name} {key} sigmas");
            assert_eq!(s.timesteps(), ref_ts.as_slice(), "{name} {key} timesteps");
            let samples = get(&io, &format!("{name}_{key}_samples"));
            assert_run(&format!("{name} {key}"), &x0, &samples, steps, |i, x| {
                s.step(&vs.i(i).unwrap(), x).unwrap()
            });
        }
    }
}

#[test]
fn sched_stochastic_euler_matches_diffusers_and_is_seeded() {
    let io = load("sched_io.safetensors");
    let cfg = SchedulerConfig::wan2_1();
    for (steps, shift, key, x0, vs) in fixture_runs(&io) {
        let noise = get(&io, &format!("eulersde_{key}_noise"));
        let samples = get(&io, &format!("eulersde_{key}_samples"));
        let mut s = FlowMatchEulerSde::new(steps, shift, cfg.num_train_timesteps, 0);
        // The schedule is the plain Euler's (checked against diffusers above).
        let plain = build(SamplerKind::Euler, &cfg, steps, shift, 0);
        assert_eq!(s.sigmas(), plain.sigmas(), "{key} sigmas");
        assert_run(&format!("euler-sde {key}"), &x0, &samples, steps, |i, x| {
            s.step_with_noise(&vs.i(i).unwrap(), x, &noise.i(i).unwrap())
                .unwrap()
        });
    }
    // Its own noise: the same seed replays the same run, another seed gives another one, and
    // the last step lands on the clean prediction (σ_next = 0) whatever the noise.
    let run = |seed: u64| {
        let mut s = build(SamplerKind::EulerSde, &cfg, 7, 3.0, seed);
        let vs = get(&io, "7_3_v");
        let mut x = get(&io, "7_3_x");
        let mut last_in = x.clone();
        for i in 0..7 {
            last_in = x.clone();
            x = s.step(&vs.i(i).unwrap(), &x).unwrap();
        }
        let sigma = s.sigmas()[6] as f64;
        let x0 = (&last_in - (vs.i(6).unwrap() * sigma).unwrap()).unwrap();
        (x, x0)
    };
    let (a, a0) = run(5);
    let (b, _) = run(5);
    let (c, _) = run(6);
    assert_close("same seed", &a, &b, 0.0);
    assert_close("last step is x0", &a, &a0, 1e-6);
    let diff = crate::common::max_abs_diff(&a, &c);
    assert!(
        diff > 1e-2,
        "seeds 5 and 6 gave the same run (max diff {diff})"
    );
}

/// Runs `guider` over the fixture's steps (`cond` / `uncond` `[steps, …]`, the scale of each
/// step from `scales`; scale 1 runs no unconditional pass, as the pipeline does) and checks
/// every guided prediction against `want` within 1e-5.
fn assert_guider_run(
    label: &str,
    guider: sora::sched::guidance::Guider,
    scales: &[f64],
    (cond, uncond): (&Tensor, &Tensor),
    want: &Tensor,
) {
    let mut guidance = sora::sched::guidance::Guidance::new(guider);
    for (i, &g) in scales.iter().enumerate() {
        let c = cond.i(i).unwrap();
        let got = if guider.zeroes_step(i) {
            c.zeros_like().unwrap()
        } else {
            let u = uncond.i(i).unwrap();
            guidance.combine(g, &c, (g > 1.0).then_some(&u)).unwrap()
        };
        assert_close(
            &format!("{label} step {i} (scale {g})"),
            &got,
            &want.i(i).unwrap(),
            1e-5,
        );
    }
}

/// diffusers' guiders (fixture from scripts/reference/ref_guiders.py): every step's guided
/// prediction within 1e-5, over steps whose scale changes (including an unguided step at
/// scale 1), for batch 2 (norms and projections per item).
#[test]
fn sched_guiders_match_diffusers() {
    use sora::sched::guidance::Guider;
    let io = load("guiders_io.safetensors");
    let scales: Vec<f64> = get(&io, "scales").to_vec1().unwrap();
    let (cond, uncond) = (get(&io, "cond"), get(&io, "uncond"));
    let cases = [
        ("cfg", Guider::Cfg),
        ("zero_star_0", Guider::ZeroStar { zero_init_steps: 0 }),
        (
            "zero_star_2",
            "zero-star:zero-init-steps=2".parse().unwrap(),
        ),
        ("apg_eta0", "apg".parse().unwrap()),
        (
            "apg_full",
            "apg:eta=0.3,momentum=-0.5,norm-threshold=20"
                .parse()
                .unwrap(),
        ),
    ];
    for (name, guider) in cases {
        let want = get(&io, &format!("{name}_out"));
        assert_guider_run(
            &format!("guider {name}"),
            guider,
            &scales,
            (&cond, &uncond),
            &want,
        );
    }
}

/// Frequency-decoupled guidance against diffusers' `FrequencyDecoupledGuidance` (kornia's
/// Laplacian pyramid, frames folded into channels): the high band at its own scale, the low
/// band at the step's, within 1e-5; steps at scale 1 return the conditional prediction.
#[test]
fn sched_frequency_decoupled_guidance_matches_diffusers() {
    use sora::sched::guidance::Guider;
    let io = load("guiders_io.safetensors");
    let scales: Vec<f64> = get(&io, "scales").to_vec1().unwrap();
    let (cond, uncond) = (get(&io, "fdg_cond"), get(&io, "fdg_uncond"));
    for (key, high) in [("1.5", 1.5), ("4", 4.0)] {
        let want = get(&io, &format!("fdg_{key}_out"));
        assert_guider_run(
            &format!("fdg high {high}"),
            Guider::Fdg { high },
            &scales,
            (&cond, &uncond),
            &want,
        );
    }
}
