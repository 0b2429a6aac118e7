#!/usr/bin/env bash
# Rebuilds the bundled model from nothing into DIR (default: train-out/; copy it to weights/
# when it is done): trains the VAE, encodes the synthetic dataset, fine-tunes the decoder,
# trains the DiT together with the text encoder, fine-tunes the decoder on the DiT's
# predictions, and exports a model directory in the `--model DIR` layout.
#
# One `sora train all`: the DiT 14,000 steps on one cosine schedule, the text encoder training
# with it from step 0 (--dit-train-text; until v10 it stayed frozen for 16,000 steps and was
# fine-tuned with the DiT after), object tokens weighted 11x with the weighted set grown by one
# latent position (--dit-object-weight 10 --dit-object-dilate 1, the recipe defaults), then the
# VAE decoder fine-tuned 600 steps to draw that DiT's guided predictions as the rendered clips.
# Runs on another core count differ in the last float bits (one batch shard per core).
# About 2 hours on 2 cores (session 19: 7,034 s as run, 1 h 57 min: VAE, encode and decoder
# stages 9 min, the DiT with the text encoder 6,063 s at 0.41-0.455 s/step, the decoder on the
# DiT 445 s).
# Interrupt with Ctrl-C at any time; run again with the same DIR to resume.
#
#   scripts/train-bundled.sh [DIR]            (SORA_BIN=path/to/sora to skip the build)
set -euo pipefail
# Bash reads a script while it runs it, so an edit to this file (a checkout update) during the
# two-hour run would make it execute garbage from the new offsets (session 18 lost a segment to
# that). The recipe is one function, parsed whole before it starts.
main() {
    cd "$(dirname "$0")/.."
    out="${1:-train-out}"
    if [[ -f $out/transformer/diffusion_pytorch_model.safetensors && ! -d $out/work-dit/ckpt ]]; then
        echo "$out already holds a model but no DiT training checkpoint (work-dit/ckpt);" \
            "give an empty or earlier training directory" >&2
        exit 2
    fi
    # SORA_BIN: a sora binary to run instead of building target/release/sora (so that rebuilding
    # the checkout while the recipe runs cannot change the binary under it).
    if [[ -n ${SORA_BIN:-} ]]; then
        sora=$SORA_BIN
    else
        cargo build --release --locked
        sora=target/release/sora
    fi
    "$sora" train all --out "$out" --dit-steps 14000 --dit-train-text \
        --dit-object-weight 10 --dit-object-dilate 1
    echo "done: $out is a model directory (sora gen --model $out); training files not shipped:" \
        "$out/work-* $out/latents.safetensors $out/captions.json" >&2
}
main "$@"
exit
