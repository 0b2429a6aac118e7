"""End-to-end reference: diffusers' WanPipeline on the tiny checkpoint in tests/fixtures/wan-tiny
(built by ref_umt5.py, ref_vae.py and ref_dit.py), with injected noise, for both samplers.

Adds to tests/fixtures/wan-tiny/: model_index.json, scheduler/scheduler_config.json, sora.json.
Writes tests/fixtures/pipeline_io.safetensors: the noise latent, the final latents and the 8-bit
frames [F, H, W, 3] of each sampler (round(clamp(x/2 + 0.5, 0, 1) * 255), sora's conversion).
Run from the repository root, after the component scripts.
"""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import AutoTokenizer, UMT5EncoderModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(FIX, "wan-tiny")

PROMPT = "a red circle moving right on a  blue background"
NEGATIVE = "blurry, static"
WIDTH, HEIGHT, FRAMES, STEPS, GUIDANCE, SHIFT = 48, 32, 9, 4, 5.0, 3.0

SCHED = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
    solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    timestep_spacing="linspace",
)


def main():
    torch.set_num_threads(2)
    unipc = UniPCMultistepScheduler(**SCHED)
    unipc.save_pretrained(os.path.join(MODEL, "scheduler"))
    pipe = WanPipeline(
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(MODEL, "tokenizer")),
        text_encoder=UMT5EncoderModel.from_pretrained(os.path.join(MODEL, "text_encoder")),
        transformer=WanTransformer3DModel.from_pretrained(os.path.join(MODEL, "transformer")),
        vae=AutoencoderKLWan.from_pretrained(os.path.join(MODEL, "vae")),
        scheduler=unipc,
    )
    pipe.set_progress_bar_config(disable=True)
    # model_index.json as save_pretrained writes it, without rewriting the component folders.
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    with open(os.path.join(MODEL, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    card = {
        "name": "wan-tiny (random weights, test fixture)",
        "defaults": {
            "steps": STEPS, "guidance": GUIDANCE, "shift": SHIFT, "sampler": "unipc", "fps": 8,
            "width": WIDTH, "height": HEIGHT, "frames": FRAMES, "negative_prompt": NEGATIVE, "text_len": 512,
        },
    }
    with open(os.path.join(MODEL, "sora.json"), "w") as f:
        json.dump(card, f, indent=2)

    g = torch.Generator().manual_seed(99)
    noise = torch.randn(1, 4, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=g)
    out = {"noise": noise}
    for name, sched in [("unipc", unipc), ("euler", FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT))]:
        pipe.scheduler = sched
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                  num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.clone())
        latents = pipe(**kw, output_type="latent").frames
        video = pipe(**kw, output_type="pt").frames  # [1, F, 3, H, W] in [0, 1]
        frames = (video[0].permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8)
        out[f"{name}_latents"] = latents.float()
        out[f"{name}_frames"] = frames.contiguous()
    save_file(out, os.path.join(FIX, "pipeline_io.safetensors"))
    with open(os.path.join(FIX, "pipeline_prompts.json"), "w") as f:
        json.dump({"prompt": PROMPT, "negative_prompt": NEGATIVE, "width": WIDTH, "height": HEIGHT,
                   "frames": FRAMES, "steps": STEPS, "guidance": GUIDANCE, "shift": SHIFT}, f, indent=2)
    print("pipeline fixtures written", file=sys.stderr)


if __name__ == "__main__":
    main()
