# Usage: /opt/refvenv/bin/python scripts/diagnose/decoded_targets.py TRAIN_DIR
# Shape features of the DiT's training targets: the training latents decoded by the shipped VAE.
import json, re, numpy as np, torch
from safetensors.torch import load_file
from diffusers import AutoencoderKLWan
torch.set_num_threads(2)
import sys
DIR = sys.argv[1]  # a training directory (latents.safetensors, captions.json, vae/)
vae = AutoencoderKLWan.from_pretrained(DIR + "/vae").eval()
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
lat = load_file(DIR + "/latents.safetensors")
print({k: v.shape for k, v in lat.items()})
L = list(lat.values())[0]
caps = json.load(open(DIR + "/captions.json"))["captions"]
COL = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 255), "yellow": (250, 220, 40), "white": (240, 240, 240),
       "purple": (150, 60, 200), "orange": (250, 140, 30), "cyan": (40, 220, 220)}
BG = {"black": (0, 0, 0), "gray": (128, 128, 128), "navy": (20, 30, 90)}
def feats(frames, col, bg):
    out = []
    for f in frames:
        m = ((f - np.array(col)) ** 2).sum(-1) < ((f - np.array(bg)) ** 2).sum(-1)
        if m.sum() < 20: continue
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        if y0 == 0 or x0 == 0 or y1 == 64 or x1 == 64: continue  # touching the frame edge
        b = m[y0:y1, x0:x1].astype(float); h, w = b.shape
        t3, w3 = max(1, h // 3), max(1, w // 3)
        tl, tr, bl, br = b[:t3, :w3].mean(), b[:t3, -w3:].mean(), b[-t3:, :w3].mean(), b[-t3:, -w3:].mean()
        out.append((b.mean(), 0.5 * (tl + tr), 0.5 * (bl + br), tl, tr, bl, br))
    return out
res = {}
n = 0
for i, c in enumerate(caps):
    cap = c[0]
    if " and " in cap or "two" in cap: continue  # one-object scenes only
    m = re.search(r"(red|green|blue|yellow|white|purple|orange|cyan) (circle|square|triangle)", cap)
    b = re.search(r"(black|gray|navy)", cap)
    if not m or not b: continue
    with torch.no_grad():
        v = vae.decode(L[i:i+1] * std + mean, return_dict=False)[0]
    fr = ((v.clamp(-1, 1) + 1) * 127.5)[0].permute(1, 2, 3, 0).numpy()
    res.setdefault(m.group(2), []).extend(feats(fr, COL[m.group(1)], BG[b.group(1)]))
    n += 1
    if n >= 240: break
for s, v in res.items():
    a = np.array(v)
    print(s, len(a), "median fill/top/bottom/TL/TR/BL/BR", np.round(np.median(a, 0), 3), "mean", np.round(a.mean(0), 3))
