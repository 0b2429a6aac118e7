# Usage: /opt/refvenv/bin/python scripts/diagnose/flip_latent.py [MODEL_DIR]  (default: weights)
# Where does the DiT's top-heavy shape bias live: in the latent, or in the decoder?
# A = D(L); B = flip_y(D(flip_y(L))). B top-heavy like A -> the latent carries it (DiT);
# B bottom-heavy -> the decoder imposes it.
import os, sys, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BG, COL, SCENES, boxes, corners, latent, load

pipe, decode = load(sys.argv[1] if len(sys.argv) > 1 else "weights")


def feats(frames, col, bg):
    out = []
    for b, t3, w3 in boxes(frames, col, bg):
        tl, tr, bl, br = corners(b, t3, w3)
        out.append((b.mean(), 0.5 * (tl + tr), 0.5 * (bl + br)))
    return np.median(np.array(out), 0) if out else None


res = {"A": [], "B": []}
for shape in ["circle", "square"]:
    for colour, bg in SCENES:
        for seed in range(3):
            lat = latent(pipe, f"a {colour} {shape} moving right on a {bg} background", seed)
            a = feats(decode(lat), COL[colour], BG[bg])
            b = feats(decode(lat.flip(-2))[:, ::-1], COL[colour], BG[bg])
            print(shape, colour, seed, "A fill/top/bottom", np.round(a, 2), "B", np.round(b, 2), flush=True)
            if a is not None and b is not None:
                res["A"].append((shape, *a)); res["B"].append((shape, *b))
for k, v in res.items():
    for s in ["circle", "square"]:
        arr = np.array([x[1:] for x in v if x[0] == s])
        print(k, s, "median fill/top/bottom", np.round(np.median(arr, 0), 3))
