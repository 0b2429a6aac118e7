# Usage: /opt/refvenv/bin/python scripts/diagnose/corners.py [MODEL_DIR]  (default: weights)
# Per-corner coverage (TL, TR, BL, BR) of the DiT's circles and squares, per motion (the "B" rows)
# and over all motions (the "A" rows); same simple two-colour mask as flip_latent.py.
import sys, json, numpy as np, torch
from diffusers import WanPipeline
from transformers import PreTrainedTokenizerFast
torch.set_num_threads(2)
W = sys.argv[1] if len(sys.argv) > 1 else "weights"
tok = PreTrainedTokenizerFast(tokenizer_file=W + "/tokenizer/tokenizer.json", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
pipe = WanPipeline.from_pretrained(W, tokenizer=tok, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
vae = pipe.vae
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
COL = {"red": (255, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (250, 220, 40), "white": (240, 240, 240)}
BG = {"black": (0, 0, 0), "gray": (128, 128, 128), "navy": (20, 30, 90)}
def decode(lat):
    x = lat * std + mean
    with torch.no_grad():
        v = vae.decode(x, return_dict=False)[0]
    return ((v.clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 3, 0).numpy()  # T H W C
def feats(frames, col, bg):
    out = []
    for f in frames:
        d1 = ((f - np.array(col)) ** 2).sum(-1); d0 = ((f - np.array(bg)) ** 2).sum(-1)
        m = d1 < d0
        if m.sum() < 20: continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        h, w = y1 - y0, x1 - x0
        b = m[y0:y1, x0:x1].astype(float)
        t3, w3 = max(1, h // 3), max(1, w // 3)
        top = 0.5 * (b[:t3, :w3].mean() + b[:t3, -w3:].mean())
        bot = 0.5 * (b[-t3:, :w3].mean() + b[-t3:, -w3:].mean())
        out.append((b[:t3, :w3].mean(), b[:t3, -w3:].mean(), b[-t3:, :w3].mean(), b[-t3:, -w3:].mean()))
    return np.median(np.array(out), 0) if out else None
res = {"A": [], "B": []}
for shape in ["circle", "square"]:
    for colour, bg in [("red", "black"), ("white", "black"), ("yellow", "navy"), ("green", "gray")]:
      for motion in ["right", "left", "up", "down"]:
        for seed in range(1):
            p = f"a {colour} {shape} moving {motion} on a {bg} background"
            g = torch.Generator().manual_seed(seed)
            lat = pipe(prompt=p, negative_prompt="", height=64, width=64, num_frames=17, num_inference_steps=24,
                       guidance_scale=6.0, max_sequence_length=16, output_type="latent", generator=g).frames
            a = feats(decode(lat), COL[colour], BG[bg])
            b = a
            print(shape, colour, motion, "TL TR BL BR", np.round(a, 2), flush=True)
            if a is not None and b is not None:
                res["A"].append((shape, *a)); res["B"].append((shape+"-"+motion, *b))
for k, v in res.items():
    for s in sorted(set(x[0] for x in v)):
        arr = np.array([x[1:] for x in v if x[0] == s])
        print(k, s, "median TL TR BL BR", np.round(np.median(arr, 0), 3))
