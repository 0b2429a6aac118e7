#!/usr/bin/env bash
# Measures the training step of the bundled recipe: seconds per DiT step (batch 8, 320 tokens a
# clip) and per VAE step (batch 4 x 9-frame 32x32 crops), from the loss logs of short runs.
#
#   scripts/bench/train-step.sh [WORK_DIR] [SORA_BINARY]
#
# WORK_DIR (default: target/train-step-bench) gets the shipped VAE, text encoder and tokenizer
# and, once, the encoded dataset (the encode stage, a few minutes); later runs reuse it. Each
# measurement starts from a fresh checkpoint-less directory and times steps 11-30 (the first ten
# include start-up and the allocator warming up). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
work="${1:-target/train-step-bench}"
sora="${2:-target/release/sora}"
[[ -x $sora ]] || cargo build --release --locked
mkdir -p "$work"
if [[ ! -f $work/latents.safetensors ]]; then
    cp -r weights/vae weights/text_encoder weights/tokenizer "$work/"
    mkdir -p "$work/work-vae-decoder" && touch "$work/work-vae-decoder/done"
    "$sora" train encode --out "$work" --quiet
fi
per_step() { # loss.csv -> seconds per step over steps 11..30
    awk -F, 'NR==11{a=$5} NR==31{b=$5} END{printf "%.3f", (b-a)/20}' "$1"
}
rm -rf "$work/work-dit" "$work/transformer"
"$sora" train dit --out "$work" --dit-steps 30 --quiet >/dev/null
echo "DiT step (batch 8): $(per_step "$work/work-dit/loss.csv") s"
rm -rf "$work/work-dit" "$work/transformer"
vae=$(mktemp -d)
"$sora" train vae --out "$vae" --vae-steps 30 --quiet >/dev/null
echo "VAE step (batch 4): $(per_step "$vae/work-vae/loss.csv") s"
rm -rf "$vae"
