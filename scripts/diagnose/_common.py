# Shared by the scripts here: the bundled pipeline in diffusers, latent decoding, and
# the simple two-colour mask they measure objects with.
import numpy as np, torch
from diffusers import WanPipeline
from transformers import PreTrainedTokenizerFast

# The world's palette (src/train/world.rs: Color::rgb, Background::rgb).
COL = {"red": (225, 25, 50), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 240, 60),
       "white": (245, 245, 245), "purple": (160, 60, 220), "orange": (255, 150, 0), "cyan": (40, 220, 230)}
BG = {"black": (0, 0, 0), "gray": (90, 90, 90), "navy": (20, 20, 70)}
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


def level_feats(frames, col, bg):
    """Per frame with an object clear of the frame edge: (fill, TL, TR, BL, BR) of its mask."""
    out = []
    for f in frames:
        m = ((f - np.array(col)) ** 2).sum(-1) < ((f - np.array(bg)) ** 2).sum(-1)
        if m.sum() < 20:
            continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if y0 == 0 or x0 == 0 or y1 == f.shape[0] or x1 == f.shape[1]:
            continue
        b = m[y0:y1, x0:x1].astype(float)
        t3, w3 = max(1, b.shape[0] // 3), max(1, b.shape[1] // 3)
        out.append((b.mean(), *corners(b, t3, w3)))
    return out


def one_object_clips(captions, shapes=("circle", "square", "triangle")):
    """(index, caption, colour, shape, background) of the one-object training clips."""
    import re
    for i, c in enumerate(captions):
        cap = c[0]
        if " and " in cap:
            continue
        m = re.search(r"(%s) (%s)" % ("|".join(COL), "|".join(shapes)), cap)
        b = re.search(r"(%s)" % "|".join(BG), cap)
        if m and b:
            yield i, cap, m.group(1), m.group(2), b.group(1)
