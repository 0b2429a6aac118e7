# Usage: /opt/refvenv/bin/python scripts/diagnose/corners.py [MODEL_DIR]  (default: weights)
# Per-corner coverage (TL, TR, BL, BR) of the DiT's circles and squares over all motions (the
# "A" rows) and per motion (the "B" rows); same simple two-colour mask as flip_latent.py.
import os, sys, numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BG, COL, SCENES, boxes, corners, latent, load

pipe, decode = load(sys.argv[1] if len(sys.argv) > 1 else "weights")
res = {"A": [], "B": []}
for shape in ["circle", "square"]:
    for colour, bg in SCENES:
        for motion in ["right", "left", "up", "down"]:
            frames = decode(latent(pipe, f"a {colour} {shape} moving {motion} on a {bg} background", 0))
            out = [corners(*c) for c in boxes(frames, COL[colour], BG[bg])]
            if not out:
                continue
            a = np.median(np.array(out), 0)
            print(shape, colour, motion, "TL TR BL BR", np.round(a, 2), flush=True)
            res["A"].append((shape, *a)); res["B"].append((shape + "-" + motion, *a))
for k, v in res.items():
    for s in sorted(set(x[0] for x in v)):
        arr = np.array([x[1:] for x in v if x[0] == s])
        print(k, s, "median TL TR BL BR", np.round(np.median(arr, 0), 3))
