#!/usr/bin/env bash
# Rebuilds the bundled model from nothing into DIR (default: train-out/; copy it to weights/
# when it is done): trains the VAE, encodes the synthetic dataset, fine-tunes the decoder,
# trains the DiT and exports a model directory in the `--model DIR` layout.
#
# It replays v7's DiT's three segments, all with object tokens weighted 11x and the
# weighted set grown by one latent position (--dit-object-weight 10 --dit-object-dilate 1, the
# recipe defaults); each later one resumes the previous checkpoint with the cosine schedule
# recomputed for the new total:
#   1. 7,000 steps (the recipe's first `train all`);
#   2. resumed to 11,000 steps (v6);
#   3. resumed to 16,000 steps (v7),
# then (session 15) the VAE decoder fine-tuned for 600 steps to draw that DiT's guided
# predictions as the rendered clips (only after the third segment: the first two skip it with
# --decoder-dit-steps 0), then (session 16, v9)
#   4. the 16,000-step DiT fine-tuned 2,500 steps at learning rate 3e-4 together with the text
#      encoder (--dit-train-text; fresh optimiser and schedule, in work-dit/ after the first
#      three segments' work-dit/ and transformer/ move to *-16000/).
# Same recipe, not bit-identical to weights/: the shipped VAE's first 300 steps ran an older
# loss (see weights/README.md), and float rounding depends on the number of batch shards.
# About 2 h 20 min on 2 cores, idle (session 18's run: VAE, encode and decoder stages 7.7 min;
# DiT 16,000 steps 114 min, 0.40 s/step idle; decoder on the DiT 600 steps 7.2 min; DiT with
# the text encoder 2,500 x 0.40 s/step).
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
    if [[ -f $out/transformer/diffusion_pytorch_model.safetensors && ! -d $out/work-dit/ckpt
        && ! -d $out/work-dit-16000 ]]; then
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
    w=(--dit-object-weight 10 --dit-object-dilate 1)
    # Segment markers live in work-dit/, which moves to work-dit-16000/ before segment 4.
    done_segment() { [[ -f $out/work-dit/segment-$1-done || -f $out/work-dit-16000/segment-$1-done ]]; }
    if ! done_segment 7000; then
        "$sora" train all --out "$out" --dit-steps 7000 "${w[@]}" --decoder-dit-steps 0
        touch "$out/work-dit/segment-7000-done"
    fi
    for steps in 11000 16000; do
        if ! done_segment "$steps"; then
            # The previous segment exported its DiT; remove it (its checkpoint stays in
            # work-dit/ckpt) so `train all` resumes the DiT instead of returning early.
            rm -rf "$out/transformer"
            last=()
            [[ $steps == 16000 ]] || last=(--decoder-dit-steps 0)
            "$sora" train all --out "$out" --dit-steps "$steps" "${w[@]}" "${last[@]}"
            touch "$out/work-dit/segment-$steps-done"
        fi
    done
    if ! done_segment text; then
        [[ -d $out/work-dit-16000 ]] || mv "$out/work-dit" "$out/work-dit-16000"
        [[ -d $out/transformer-16000 ]] || mv "$out/transformer" "$out/transformer-16000"
        "$sora" train dit --out "$out" \
            --dit-init "$out/transformer-16000/diffusion_pytorch_model.safetensors" \
            --dit-lr 3e-4 --dit-steps 2500 --dit-train-text "${w[@]}"
        touch "$out/work-dit/segment-text-done"
    fi
    echo "done: $out is a model directory (sora gen --model $out); training files not shipped:" \
        "$out/work-* $out/transformer-16000 $out/latents.safetensors $out/captions.json" >&2
}
main "$@"
exit
