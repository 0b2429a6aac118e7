#!/usr/bin/env bash
# Rebuilds the bundled model from nothing, exactly as shipped: trains the VAE, encodes the
# synthetic dataset, fine-tunes the decoder, trains the DiT and exports into weights/.
#
# The shipped DiT was trained in three segments (each resumes the previous checkpoint with the
# cosine schedule recomputed for the new total):
#   1. 5,000 steps, plain flow-matching MSE (the recipe's first `train all`);
#   2. resumed to 7,000 steps, plain MSE;
#   3. resumed to 11,000 steps with object tokens weighted 5x (--dit-object-weight 4).
# About 3 h 20 min on 2 cores (VAE stages ~25 min, encode 4 min, DiT ~0.75 s/step).
# Interrupt with Ctrl-C at any time; run again to resume from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-weights}"
cargo build --release --locked
sora=target/release/sora
segment() { # steps object-weight
    local marker="$out/work-dit/segment-$1-done"
    [[ -f $marker ]] && return 0
    # A finished segment leaves the exported DiT; move it aside so the next one resumes.
    rm -rf "$out/transformer"
    "$sora" train dit --out "$out" --dit-steps "$1" --dit-object-weight "$2"
    touch "$marker"
}
if [[ ! -f $out/work-dit/segment-5000-done ]]; then
    "$sora" train all --out "$out" --dit-steps 5000 --dit-object-weight 0
    touch "$out/work-dit/segment-5000-done"
fi
segment 7000 0
segment 11000 4
"$sora" train all --out "$out" --dit-steps 11000 --dit-object-weight 4
echo "training files not shipped: $out/work-* $out/latents.safetensors $out/captions.json" >&2
