"""Side-by-side: diffusers (PyTorch) and sora on the same random-weight Wan checkpoint, the same
settings, the same machine, in the same run, 2 threads each.

Builds a mid-sized Wan2.1-architecture checkpoint (DiT 512 wide × 4 layers, UMT5 512 × 4,
VAE base 32) in the diffusers layout, runs WanPipeline and `sora gen` on it with injected noise,
and prints sora/PyTorch ratios for the DiT step, the VAE decode, end to end, and peak memory,
plus the DiT step's GFLOP/s against the machine's best f32 GEMM: the fastest of PyTorch's (MKL),
numpy's (OpenBLAS) at 2048³ and sora's own (its `--dry-run` GEMM probe, 1024³). Which BLAS is
fastest depends on the host: on AMD EPYC hosts the PyPI wheel's MKL runs far below the
machine's peak (139 GFLOP/s against OpenBLAS's ~450 in session 14), on Intel Xeon hosts it
does not.

The two sides run in rounds (3 by default; PyTorch first in odd rounds, sora first in even
ones): these 2-core machines drift by 10-15% within minutes, so one run of each can land on
different sides of a drift. Every round's ratios are printed, then the median round's.
PyTorch runs warm after its first round (same process); sora runs as a fresh process each time.

  /opt/refvenv/bin/python scripts/bench/side_by_side.py [--sora target/release/sora] [--res 256x256] [--frames 17] [--steps 20] [--rounds 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")


def build(dirname):
    torch.manual_seed(0)
    sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
    from ref_umt5 import build_tokenizer  # the fixture tokenizer (word level)

    tok = build_tokenizer()
    tok.save_pretrained(os.path.join(dirname, "tokenizer"))
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=512, d_kv=64, num_heads=8, d_ff=1024, num_layers=4,
                                     feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)).eval()
    te.save_pretrained(os.path.join(dirname, "text_encoder"), safe_serialization=True)
    dit = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=64, in_channels=16,
                                out_channels=16, text_dim=512, freq_dim=256, ffn_dim=2048, num_layers=4,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    dit.save_pretrained(os.path.join(dirname, "transformer"), safe_serialization=True)
    vae = AutoencoderKLWan(base_dim=32, z_dim=16).eval()
    vae.save_pretrained(os.path.join(dirname, "vae"), safe_serialization=True)
    sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                    flow_shift=3.0, solver_order=2)
    sched.save_pretrained(os.path.join(dirname, "scheduler"))
    with open(os.path.join(dirname, "model_index.json"), "w") as f:
        json.dump({"_class_name": "WanPipeline"}, f)
    return tok, te, dit, vae, sched


NUMPY_GEMM = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
b = np.random.default_rng(1).standard_normal((2048, 2048), dtype=np.float32)
a @ b
best = min((lambda t: (a @ b, time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(2 * 2048**3 / best / 1e9)
"""


def gemm_gflops(lib="torch"):
    """Best of 5 f32 2048³ products in PyTorch (MKL) or numpy (OpenBLAS), 2 threads. numpy runs
    in a child process without the OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE these machines set
    (Haswell kernels: about a quarter of the AVX-512 rate)."""
    if lib != "torch":
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
        env["OPENBLAS_NUM_THREADS"] = "2"
        out = subprocess.run([sys.executable, "-c", NUMPY_GEMM], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def sora_gemm_gflops(sora, model):
    """sora's GEMM probe (1024³ through candle and the gemm crate), from `--dry-run`."""
    out = subprocess.run([sora, "gen", "--model", model, "--prompt", "x", "--threads", "2", "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("GEMM probe ")[1].split(" GFLOP/s")[0])


def median_time(f, reps=9):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def gemm_floor(tokens, d=512, ffn=2048, layers=4, heads=8):
    """The time of sora's guided DiT step if each of its matrix products ran at PyTorch's own speed
    for that shape (timed here) and nothing else took any time: projections, FFN and self-attention
    products; the text side (a few dozen keys) left out. sora runs the first block's self-attention
    half once for both passes, so that block's products have one pass's rows."""
    hd = d // heads
    both, one = 2 * tokens, tokens
    x = {r: torch.randn(r, max(d, ffn)) for r in (one, both)}
    w = {(k, n): torch.randn(k, n) for k, n in ((d, d), (d, ffn), (ffn, d))}
    def mm(rows, k, n):
        a, b = x[rows][:, :k].contiguous(), w[(k, n)]
        return median_time(lambda: a @ b)
    def attn(batch):
        q = torch.randn(batch, tokens, hd)
        kt = torch.randn(batch, hd, tokens)
        p = torch.randn(batch, tokens, tokens)
        return median_time(lambda: torch.bmm(q, kt)) + median_time(lambda: torch.bmm(p, q))
    proj_one, proj_both = mm(one, d, d), mm(both, d, d)
    ffn_both = mm(both, d, ffn) + mm(both, ffn, d)
    att_one, att_both = attn(heads), attn(2 * heads)
    first = 4 * proj_one + att_one + 2 * proj_both + ffn_both  # self q,k,v,o shared; cross q,o; FFN
    rest = 6 * proj_both + att_both + ffn_both
    return first + (layers - 1) * rest


def dit_flops(tokens, ctx, d=512, ffn=2048, layers=4):
    per = 2 * (6 * d * d + 2 * d * ffn) + 4 * d * (tokens + ctx)
    return tokens * layers * per


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sora", default=os.path.join(ROOT, "target", "release", "sora"))
    ap.add_argument("--res", default="256x256")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    w, h = map(int, args.res.split("x"))
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="sora-sbs-")
    model = os.path.join(work, "model")
    tok, te, dit, vae, sched = build(model)
    noise = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h // 8, w // 8, generator=torch.Generator().manual_seed(1))
    save_file({"latents": noise}, os.path.join(work, "noise.safetensors"))
    prompt, negative = "a red circle moving right on a black background", "blurry"

    # PyTorch: time the transformer calls and the VAE decode inside one pipeline run.
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, transformer=dit, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    dit_times, dec_times = [], []
    orig_fwd, orig_dec = dit.forward, vae.decode

    def timed_fwd(*a, **k):
        t = time.perf_counter()
        r = orig_fwd(*a, **k)
        dit_times.append(time.perf_counter() - t)
        return r

    def timed_dec(*a, **k):
        t = time.perf_counter()
        r = orig_dec(*a, **k)
        dec_times.append(time.perf_counter() - t)
        return r

    dit.forward, vae.decode = timed_fwd, timed_dec

    def run_torch():
        dit_times.clear()
        dec_times.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompt=prompt, negative_prompt=negative, height=h, width=w, num_frames=args.frames,
                 num_inference_steps=args.steps, guidance_scale=5.0, latents=noise.clone(), max_sequence_length=64,
                 output_type="np")
        total = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # A guided step = 2 transformer calls.
        return sum(dit_times) / args.steps, sum(dec_times), total, peak

    # sora: same checkpoint, same noise, 2 threads.
    with open(os.path.join(model, "sora.json"), "w") as f:
        json.dump({"name": "side-by-side", "defaults": {"steps": args.steps, "guidance": 5.0, "shift": 3.0, "sampler": "unipc",
                   "fps": 16, "width": w, "height": h, "frames": args.frames, "negative_prompt": negative, "text_len": 64}}, f)
    cmd = [args.sora, "gen", "--model", model, "--prompt", prompt, "--init-noise", os.path.join(work, "noise.safetensors"),
           "--threads", "2", "--json", "-o", os.path.join(work, "sora.mp4")]

    def run_sora():
        t0 = time.perf_counter()
        out = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, check=True)
        total = time.perf_counter() - t0
        res = json.loads(out.stdout.strip().splitlines()[-1])
        peak = int(out.stderr.strip().splitlines()[-1]) / 1024
        t = res["timings"]
        # The VAE's part (PyTorch's decode returns arrays; sora's decode stage also encodes
        # H.264 and muxes, reported apart as `write`).
        writes.append(t["write"])
        return t["denoise"] / args.steps, t["vae_decode"], total, peak

    writes = []
    names = ["DiT guided step (s)", "VAE decode (s)", "end to end (s)", "peak memory (MiB)"]
    rounds = []
    for r in range(args.rounds):
        # Alternate which side goes first, so a steady drift does not favour one side.
        if r % 2 == 0:
            t, s_ = run_torch(), run_sora()
        else:
            s_, t = run_sora(), run_torch()
        rounds.append((t, s_))
        print(f"round {r + 1}: " + ", ".join(f"{n.split(' (')[0]} {b / a:.2f}" for n, a, b in zip(names, t, s_)),
              flush=True)

    tokens = ((args.frames - 1) // 4 + 1) * (h // 16) * (w // 16)
    flops = 2 * dit_flops(tokens, 64)  # guided: two passes
    peaks = {"PyTorch/MKL 2048³": gemm_gflops("torch"), "numpy/OpenBLAS 2048³": gemm_gflops("numpy"),
             "sora 1024³": sora_gemm_gflops(args.sora, model)}
    best_lib = max(peaks, key=peaks.get)
    peak = peaks[best_lib]
    floor = gemm_floor(tokens)
    # The median round by its DiT-step ratio (so one round's figures are shown together; the
    # upper middle one for an even count).
    rounds.sort(key=lambda ts: ts[1][0] / ts[0][0])
    torch_r, sora_r = rounds[len(rounds) // 2]
    print(f"median round of {len(rounds)} (by the DiT step ratio):")
    print(f"{'':24}{'PyTorch':>10}{'sora':>10}{'sora/PyTorch':>14}")
    for name, a, b in zip(names, torch_r, sora_r):
        print(f"{name:24}{a:10.2f}{b:10.2f}{b / a:14.2f}")
    for i, name in enumerate(names):
        ratios = sorted(s_[i] / t[i] for t, s_ in rounds)
        print(f"  {name.split(' (')[0]}: ratios {ratios[0]:.2f} to {ratios[-1]:.2f} over the rounds")
    print("  (PyTorch's peak memory is its process's high-water mark up to that round; sora's is its own run's)")
    print(f"  (VAE decode: sora's decode stage minus the time inside its encoder calls and flush, "
          f"{min(writes):.2f}-{max(writes):.2f} s over the rounds, which count in its end to end only)")
    sora_step, torch_step = sora_r[0], torch_r[0]
    print(f"DiT step: {tokens} tokens, {flops / 1e9:.1f} GFLOP; sora {flops / sora_step / 1e9:.0f} GFLOP/s, "
          f"PyTorch {flops / torch_step / 1e9:.0f} GFLOP/s")
    print("f32 GEMM, 2 threads: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + " GFLOP/s; "
          f"sora's DiT step reaches {100 * flops / sora_step / 1e9 / peak:.0f}% of the best ({best_lib}), "
          f"PyTorch's {100 * flops / torch_step / 1e9 / peak:.0f}%")
    print(f"GEMM floor: {floor:.3f} s per guided step if every matrix product of sora's step ran at PyTorch's own "
          f"speed for its shape and nothing else took time; floor/PyTorch step {floor / torch_step:.2f}, "
          f"sora/floor {sora_step / floor:.2f}")


if __name__ == "__main__":
    main()
