#!/usr/bin/env bash
# Rebuilds the bundled model from nothing: trains the VAE, encodes the synthetic dataset,
# fine-tunes the decoder, trains the DiT and exports into weights/ (about 2 h on 2 cores).
# Interrupt with Ctrl-C at any time; run again to resume from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-weights}"
cargo run --release -- train all --out "$out"
echo "training files not shipped: $out/work-* $out/latents.safetensors $out/captions.json" >&2
