"""Reference fixtures for the flow samplers: diffusers' FlowMatchEulerDiscreteScheduler and
UniPCMultistepScheduler (flow prediction, as Wan2.1 ships it). For each, the sigma and timestep
schedules and every intermediate sample of a run driven by fixed pseudo-velocities.

Writes tests/fixtures/sched_io.safetensors. Run from the repository root.
"""

import os
import sys

import torch
from safetensors.torch import save_file

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
        tensors[f"{key}_x"] = x
        tensors[f"{key}_v"] = torch.stack(vs)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(FIX, "sched_io.safetensors"))
    print("sched fixtures written", file=sys.stderr)


if __name__ == "__main__":
    main()
