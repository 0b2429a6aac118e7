# Shared by flip_latent.py and corners.py: the bundled pipeline in diffusers, latent decoding, and
# the simple two-colour mask they measure objects with.
import numpy as np, torch
from diffusers import WanPipeline
from transformers import PreTrainedTokenizerFast

COL = {"red": (255, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (250, 220, 40), "white": (240, 240, 240)}
BG = {"black": (0, 0, 0), "gray": (128, 128, 128), "navy": (20, 30, 90)}
SCENES = [("red", "black"), ("white", "black"), ("yellow", "navy"), ("green", "gray")]


def load(model_dir):
    """WanPipeline on `model_dir` with its word-level tokenizer, and a decode(latent) -> T H W C."""
    torch.set_num_threads(2)
    tok = PreTrainedTokenizerFast(tokenizer_file=model_dir + "/tokenizer/tokenizer.json", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    pipe = WanPipeline.from_pretrained(model_dir, tokenizer=tok, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    def decode(lat):
        with torch.no_grad():
            v = vae.decode(lat * std + mean, return_dict=False)[0]
        return ((v.clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 3, 0).numpy()

    return pipe, decode


def latent(pipe, prompt, seed):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt=prompt, negative_prompt="", height=64, width=64, num_frames=17, num_inference_steps=24,
                guidance_scale=6.0, max_sequence_length=16, output_type="latent", generator=g).frames


def boxes(frames, col, bg):
    """Per frame with an object: its mask cropped to the bounding box, and the corner cell size."""
    for f in frames:
        m = ((f - np.array(col)) ** 2).sum(-1) < ((f - np.array(bg)) ** 2).sum(-1)
        if m.sum() < 20:
            continue
        ys, xs = np.nonzero(m)
        b = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(float)
        yield b, max(1, b.shape[0] // 3), max(1, b.shape[1] // 3)


def corners(b, t3, w3):
    return b[:t3, :w3].mean(), b[:t3, -w3:].mean(), b[-t3:, :w3].mean(), b[-t3:, -w3:].mean()
