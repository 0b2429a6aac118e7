# Usage: /opt/refvenv/bin/python scripts/diagnose/decoded_targets.py TRAIN_DIR
# Shape features of the DiT's training targets: the training latents decoded by the shipped VAE
# (one-object clips, objects clear of the frame edge; same two-colour mask as the other scripts).
import json, os, sys, numpy as np, torch
from safetensors.torch import load_file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BG, COL, level_feats, load, one_object_clips

DIR = sys.argv[1]  # a training directory (latents.safetensors, captions.json)
_, decode = load("weights")
L = list(load_file(DIR + "/latents.safetensors").values())[0]
caps = json.load(open(DIR + "/captions.json"))["captions"]
res = {}
for n, (i, cap, col, shape, bg) in enumerate(one_object_clips(caps)):
    if n >= 240:
        break
    res.setdefault(shape, []).extend(level_feats(decode(L[i:i + 1]), COL[col], BG[bg]))
for s, v in res.items():
    a = np.array(v)
    print(s, len(a), "median fill/TL/TR/BL/BR", np.round(np.median(a, 0), 3))
