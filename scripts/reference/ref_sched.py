"""Reference fixtures for the flow samplers: diffusers' FlowMatchEulerDiscreteScheduler (plain
and with stochastic_sampling) and UniPCMultistepScheduler (flow prediction, as Wan2.1 ships it).
For each, the sigma and timestep schedules and every intermediate sample of a run driven by fixed
pseudo-velocities; the stochastic run's per-step noises are recorded so the Rust side can replay
them.

Writes tests/fixtures/sched_io.safetensors. Run from the repository root.
"""

import os
import sys

import torch
from safetensors.torch import save_file

import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm_euler
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

WAN_UNIPC = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    timestep_spacing="linspace",
)


def run(sched, steps, x, velocities):
    sched.set_timesteps(steps)
    out = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(velocities[i], t, x, return_dict=False)[0]
        out.append(x)
    return torch.stack(out)


def main():
    os.makedirs(FIX, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    g_noise = torch.Generator().manual_seed(8)
    tensors = {}
    for steps, shift in [(7, 3.0), (20, 5.0), (1, 3.0), (2, 8.0)]:
        x = torch.randn(1, 2, 3, 4, 5, generator=g)
        vs = [torch.randn(1, 2, 3, 4, 5, generator=g) for _ in range(steps)]
        key = f"{steps}_{shift:g}"
        e = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        tensors[f"euler_{key}_samples"] = run(e, steps, x, vs)
        tensors[f"euler_{key}_sigmas"] = e.sigmas.float()
        tensors[f"euler_{key}_timesteps"] = e.timesteps.float()
        u = UniPCMultistepScheduler(**{**WAN_UNIPC, "flow_shift": shift})
        tensors[f"unipc_{key}_samples"] = run(u, steps, x, vs)
        tensors[f"unipc_{key}_sigmas"] = u.sigmas.float()
        tensors[f"unipc_{key}_timesteps"] = u.timesteps.float()
        # Stochastic Euler: the scheduler's noise draws replaced by recorded ones (their own
        # generator, so the tensors above stay as they were).
        noises = [torch.randn(1, 2, 3, 4, 5, generator=g_noise) for _ in range(steps)]
        queue = list(noises)
        orig = fm_euler.randn_tensor
        fm_euler.randn_tensor = lambda shape, **kw: queue.pop(0)
        try:
            es = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, stochastic_sampling=True)
            tensors[f"eulersde_{key}_samples"] = run(es, steps, x, vs)
        finally:
            fm_euler.randn_tensor = orig
        assert not queue, "every recorded noise is used once"
        tensors[f"eulersde_{key}_noise"] = torch.stack(noises)
        tensors[f"{key}_x"] = x
        tensors[f"{key}_v"] = torch.stack(vs)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(FIX, "sched_io.safetensors"))
    print("sched fixtures written", file=sys.stderr)


if __name__ == "__main__":
    main()
