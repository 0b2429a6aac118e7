#!/usr/bin/env bash
# Rebuilds the bundled model from nothing into DIR (default: train-out/; copy it to weights/
# when it is done): trains the VAE, encodes the synthetic dataset, fine-tunes the decoder,
# trains the DiT and exports a model directory in the `--model DIR` layout.
#
# It replays the shipped DiT's (v7) three segments, all with object tokens weighted 11x and the
# weighted set grown by one latent position (--dit-object-weight 10 --dit-object-dilate 1, the
# recipe defaults); each later one resumes the previous checkpoint with the cosine schedule
# recomputed for the new total:
#   1. 7,000 steps (the recipe's first `train all`);
#   2. resumed to 11,000 steps (v6);
#   3. resumed to 16,000 steps (v7),
# then (session 15) the last stage, the VAE decoder fine-tuned for 600 steps to draw the final
# DiT's guided predictions as the rendered clips (only after the last segment: the first two
# skip it with --decoder-dit-steps 0).
# Same recipe, not bit-identical to weights/: the shipped VAE's first 300 steps ran an older
# loss (see weights/README.md), and float rounding depends on the number of batch shards.
# About 2 h 17 min on 2 cores (VAE stages ~23 min incl. encode ~4 min; DiT 16,000 x ~0.34 s/step;
# decoder on the DiT 600 x ~2.45 s/step).
# Interrupt with Ctrl-C at any time; run again with the same DIR to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-train-out}"
if [[ -f $out/transformer/diffusion_pytorch_model.safetensors && ! -d $out/work-dit/ckpt ]]; then
    echo "$out already holds a model but no DiT training checkpoint (work-dit/ckpt);" \
        "give an empty or earlier training directory" >&2
    exit 2
fi
cargo build --release --locked
sora=target/release/sora
w=(--dit-object-weight 10 --dit-object-dilate 1)
if [[ ! -f $out/work-dit/segment-7000-done ]]; then
    "$sora" train all --out "$out" --dit-steps 7000 "${w[@]}" --decoder-dit-steps 0
    touch "$out/work-dit/segment-7000-done"
fi
for steps in 11000 16000; do
    if [[ ! -f $out/work-dit/segment-$steps-done ]]; then
        # The previous segment exported its DiT; remove it (its checkpoint stays in
        # work-dit/ckpt) so `train all` resumes the DiT instead of returning early.
        rm -rf "$out/transformer"
        last=()
        [[ $steps == 16000 ]] || last=(--decoder-dit-steps 0)
        "$sora" train all --out "$out" --dit-steps "$steps" "${w[@]}" "${last[@]}"
        touch "$out/work-dit/segment-$steps-done"
    fi
done
echo "done: $out is a model directory (sora gen --model $out); training files not shipped:" \
    "$out/work-* $out/latents.safetensors $out/captions.json" >&2
