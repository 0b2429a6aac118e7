"""Reference fixtures for the guidance methods: diffusers' guiders (`diffusers.guiders`)
ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance, AdaptiveProjectedGuidance and
FrequencyDecoupledGuidance (two levels, needs kornia) driven
over a few steps by random conditional / unconditional predictions (batch 2, so per-item norms
and projections are checked), with the guidance scale changing between steps as sora's late
guidance changes it. Records every step's inputs, scale and guided prediction.

Writes tests/fixtures/guiders_io.safetensors. Run from the repository root.
"""

import os

import torch
from safetensors.torch import save_file

from diffusers.guiders import (
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    ClassifierFreeZeroStarGuidance,
    FrequencyDecoupledGuidance,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

SCALES = [5.0, 5.0, 3.0, 1.0, 3.0, 2.0, 2.0]

# name -> guider; the Rust test builds the same settings from the name.
CASES = {
    "cfg": lambda: ClassifierFreeGuidance(guidance_scale=SCALES[0]),
    "zero_star_0": lambda: ClassifierFreeZeroStarGuidance(guidance_scale=SCALES[0], zero_init_steps=0),
    "zero_star_2": lambda: ClassifierFreeZeroStarGuidance(guidance_scale=SCALES[0], zero_init_steps=2),
    "apg_eta0": lambda: AdaptiveProjectedGuidance(
        guidance_scale=SCALES[0], eta=0.0, adaptive_projected_guidance_rescale=0.0
    ),
    # Momentum and a norm threshold that binds on some steps (the diff norms here are ~15-30).
    "apg_full": lambda: AdaptiveProjectedGuidance(
        guidance_scale=SCALES[0],
        eta=0.3,
        adaptive_projected_guidance_momentum=-0.5,
        adaptive_projected_guidance_rescale=20.0,
    ),
}


def main():
    os.makedirs(FIX, exist_ok=True)
    g = torch.Generator().manual_seed(14)
    shape = (2, 4, 3, 5, 6)
    tensors = {"scales": torch.tensor(SCALES, dtype=torch.float64)}
    conds, unconds = [], []
    for i in range(len(SCALES)):
        # Correlated, as a model's two predictions are, with per-item magnitudes that differ.
        base = torch.randn(shape, generator=g)
        c = base + 0.6 * torch.randn(shape, generator=g)
        u = 0.8 * base + 0.6 * torch.randn(shape, generator=g)
        c[1] *= 1.7
        conds.append(c)
        unconds.append(u)
    tensors["cond"] = torch.stack(conds)
    tensors["uncond"] = torch.stack(unconds)
    # FDG: kornia's pyramid takes [B, C, H, W], so frames are folded into channels (the
    # pyramid works per plane); H×W 8×6 needs no padding (kornia pads other sizes and returns
    # the padded size, which sora does not reproduce: it needs only even sides).
    fshape = (2, 4, 3, 8, 6)
    fconds = [torch.randn(fshape, generator=g) for _ in SCALES]
    funconds = [0.7 * c + 0.7 * torch.randn(fshape, generator=g) for c in fconds]
    tensors["fdg_cond"] = torch.stack(fconds)
    tensors["fdg_uncond"] = torch.stack(funconds)
    # (A level at exactly 1 hits an unbound variable in diffusers 0.42.1's FDG; 1 means the
    # conditional band, which u + 1·(c − u) is.)
    for high in [1.5, 4.0]:
        outs = []
        for i, scale in enumerate(SCALES):
            # Level 0 is the high band, level 1 the low band; sora guides the low band at the
            # step's scale.
            guider = FrequencyDecoupledGuidance(guidance_scales=[high, scale])
            guider.set_state(step=i, num_inference_steps=len(SCALES), timestep=torch.tensor(999 - i))
            fold = lambda x: x.reshape(2, 4 * 3, 8, 6)
            if scale > 1.0:
                out = guider.forward(fold(fconds[i]), fold(funconds[i])).pred.reshape(fshape)
            else:
                out = fconds[i]  # sora runs no unconditional pass at scale <= 1
            outs.append(out)
        tensors[f"fdg_{high:g}_out"] = torch.stack(outs).contiguous()
    for name, make in CASES.items():
        guider = make()
        outs = []
        for i, scale in enumerate(SCALES):
            guider.guidance_scale = scale
            guider.set_state(step=i, num_inference_steps=len(SCALES), timestep=torch.tensor(999 - i))
            guider.prepare_inputs({})
            out = guider.forward(conds[i], unconds[i]).pred
            outs.append(out)
        tensors[f"{name}_out"] = torch.stack(outs).contiguous()
    save_file(tensors, os.path.join(FIX, "guiders_io.safetensors"))
    print("wrote", os.path.join(FIX, "guiders_io.safetensors"))


if __name__ == "__main__":
    main()
