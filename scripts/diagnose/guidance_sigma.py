# Usage: /opt/refvenv/bin/python scripts/diagnose/guidance_sigma.py TRAIN_DIR [MODEL_DIR] [N]
# Where classifier-free guidance bends shapes: training latents noised to sigma, one x0
# prediction of the DiT (x0 = x_sigma - sigma * v) under guidance 0 (the unconditional branch),
# 1 (the conditional one), 3 and 6, decoded, measured with the two-colour mask. N one-object
# circle and square clips (default 24).
import json, os, sys, numpy as np, torch
from safetensors.torch import load_file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BG, COL, level_feats, load, one_object_clips

DIR = sys.argv[1]
pipe, decode = load(sys.argv[2] if len(sys.argv) > 2 else "weights")
N = int(sys.argv[3]) if len(sys.argv) > 3 else 24
L = list(load_file(DIR + "/latents.safetensors").values())[0]
caps = json.load(open(DIR + "/captions.json"))["captions"]
clips = list(one_object_clips(caps, ("circle", "square")))[:N]
g = torch.Generator().manual_seed(0)
res = {}
for i, cap, col, shape, bg in clips:
    x0 = L[i:i + 1]
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(cap, "", do_classifier_free_guidance=True, max_sequence_length=16)
        eps = torch.randn(x0.shape, generator=g)
        for s in (0.3, 0.5, 0.7):
            xs = (1 - s) * x0 + s * eps
            t = torch.tensor([s * 1000.0])
            vc = pipe.transformer(hidden_states=xs, timestep=t, encoder_hidden_states=pe, return_dict=False)[0]
            vu = pipe.transformer(hidden_states=xs, timestep=t, encoder_hidden_states=ne, return_dict=False)[0]
            for gs in (0.0, 1.0, 3.0, 6.0):
                x0h = xs - s * (vu + gs * (vc - vu))
                res.setdefault((shape, s, gs), []).extend(level_feats(decode(x0h), COL[col], BG[bg]))
print("shape sigma guidance frames  median fill TL TR BL BR")
for (shape, s, gs), v in sorted(res.items()):
    print(shape, s, gs, len(v), np.round(np.median(np.array(v), 0), 2))
