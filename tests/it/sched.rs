//! Flow samplers against diffusers (fixtures from scripts/reference/ref_sched.py): schedules
//! exactly, and every intermediate sample of a run with fixed velocities within 1e-5.

use candle_core::IndexOp;
use sora::sched::{build, SamplerKind, SchedulerConfig};

use crate::common::{assert_close, get, load};

#[test]
fn sched_euler_and_unipc_match_diffusers() {
    let io = load("sched_io.safetensors");
    let cfg = SchedulerConfig::wan2_1();
    for (steps, shift) in [(7usize, 3.0f64), (20, 5.0), (1, 3.0), (2, 8.0)] {
        let key = format!("{steps}_{shift}");
        let x0 = get(&io, &format!("{key}_x"));
        let vs = get(&io, &format!("{key}_v"));
        for (name, kind) in [("euler", SamplerKind::Euler), ("unipc", SamplerKind::Unipc)] {
            let mut s = build(kind, &cfg, steps, shift);
            let ref_sigmas: Vec<f32> = get(&io, &format!("{name}_{key}_sigmas")).to_vec1().unwrap();
            let ref_ts: Vec<f32> = get(&io, &format!("{name}_{key}_timesteps"))
                .to_vec1()
                .unwrap();
            assert_eq!(s.sigmas(), ref_sigmas.as_slice(), "{name} {key} sigmas");
            assert_eq!(s.timesteps(), ref_ts.as_slice(), "{name} {key} timesteps");
            let samples = get(&io, &format!("{name}_{key}_samples"));
            let mut x = x0.clone();
            for i in 0..steps {
                x = s.step(&vs.i(i).unwrap(), &x).unwrap();
                assert_close(
                    &format!("{name} {key} step {i}"),
                    &x,
                    &samples.i(i).unwrap(),
                    1e-5,
                );
            }
        }
    }
}
