"""Seam check for temporal windows: mean absolute difference between consecutive frames at
window boundaries vs inside windows, from a `sora gen --frames-out DIR` run.

  python3 scripts/bench/seams.py DIR --window 17 --overlap 8 [--temporal 4]

Window w covers latent frames [s, s+W) with stride W−O (latent units); the frames where one
window's blend ramp starts or ends are the boundary frames.
"""

import argparse
import glob
import os

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--window", type=int, required=True, help="window in frames (1 + 4k)")
    ap.add_argument("--overlap", type=int, required=True, help="overlap in frames")
    ap.add_argument("--temporal", type=int, default=4)
    a = ap.parse_args()
    files = sorted(glob.glob(os.path.join(a.dir, "frame_*.png")))
    frames = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    diffs = np.abs(frames[1:] - frames[:-1]).mean(axis=(1, 2, 3))  # diffs[i]: frame i -> i+1
    tf = a.temporal
    win = (a.window - 1) // tf + 1
    ov = -(-a.overlap // tf)
    stride = win - ov
    n_lat = (len(frames) - 1) // tf + 1
    edges = set()
    s = stride
    while s + win <= n_lat + stride:
        for lat in (s, s + ov):  # where a ramp begins and where the previous one ends
            if 0 < lat < n_lat:
                px = 1 + (lat - 1) * tf
                edges.update({px - 1, px})
        s += stride
    edges = sorted(e for e in edges if 0 <= e < len(diffs))
    inside = [d for i, d in enumerate(diffs) if i not in edges]
    print(f"{len(frames)} frames; consecutive-frame mean abs diff (0-255): "
          f"at window boundaries {np.mean(diffs[edges]):.2f} (n={len(edges)}, max {np.max(diffs[edges]):.2f}), "
          f"inside windows {np.mean(inside):.2f} (n={len(inside)}, max {np.max(inside):.2f})")


if __name__ == "__main__":
    main()
