"""Reference fixtures for the Wan transformer (diffusers `WanTransformer3DModel`), its 3D RoPE
tables and scaled-dot-product attention.

Writes
  tests/fixtures/wan-tiny/transformer/            config A, diffusers layout (save_pretrained)
  tests/fixtures/wan-tiny-native/wan2.1_t2v_tiny.safetensors
                                                  config B, native layout under `model.diffusion_model.`
  tests/fixtures/wan-tiny-native/transformer_config.json
  tests/fixtures/dit_a_io.safetensors, dit_b_io.safetensors   inputs and velocities
  tests/fixtures/attention_io.safetensors        q, k, v and torch SDPA output
  tests/fixtures/dit_a_padded_io.safetensors     config A with zero-padded text (as WanPipeline pads
                                                  to 512): pads of different lengths per batch item

Run from the repository root: python scripts/reference/ref_dit.py
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

# Config A = WanTransformerConfig::tiny() in src/models/wan/config.rs.
CONFIG_A = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
# Config B: other sizes, odd head count, different RoPE split (16 -> t 8, h 4, w 4).
CONFIG_B = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=6, out_channels=6,
    text_dim=24, freq_dim=16, ffn_dim=80, num_layers=3, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)

# diffusers -> native, the inverse of TRANSFORMER_KEYS_RENAME_DICT for a T2V model.
D2N = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn2", "cross_attn"),
    ("attn1", "self_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("proj_out", "head.head"),
    ("scale_shift_table", "modulation"),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
]


def to_native(key):
    if key == "scale_shift_table":
        return "head.modulation"
    for a, b in D2N:
        key = key.replace(a, b)
    return key


def randomize(model, seed):
    """Every parameter random and O(1)-preserving, so no weight is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def build(cfg, seed):
    torch.manual_seed(seed)
    m = WanTransformer3DModel(**cfg).eval()
    randomize(m, seed + 1)
    return m


def run(m, x, t, ctx):
    with torch.no_grad():
        return m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]


def rope_tables(m, x):
    cos, sin = m.rope(x)  # [1, N, 1, head_dim], interleaved-repeated
    return cos[0, :, 0, :].contiguous(), sin[0, :, 0, :].contiguous()


def main():
    torch.set_num_threads(2)
    os.makedirs(FIX, exist_ok=True)
    g = torch.Generator().manual_seed(1234)

    # Config A, diffusers layout.
    a = build(CONFIG_A, 10)
    a.save_pretrained(os.path.join(FIX, "wan-tiny", "transformer"), safe_serialization=True)
    xa = torch.randn(2, 4, 3, 4, 6, generator=g)
    ta = torch.tensor([937.0, 250.5])
    ctxa = torch.randn(2, 12, 32, generator=g)
    va = run(a, xa, ta, ctxa)
    ca, sa = rope_tables(a, xa)
    save_file(
        {"latents": xa, "timestep": ta, "context": ctxa, "velocity": va, "rope_cos": ca, "rope_sin": sa},
        os.path.join(FIX, "dit_a_io.safetensors"),
    )

    # Config B, native layout with the Comfy prefix, non-square latents, odd frame count.
    b = build(CONFIG_B, 20)
    sd = {k: v.contiguous() for k, v in b.state_dict().items()}
    native = {"model.diffusion_model." + to_native(k): v for k, v in sd.items()}
    back = convert_wan_transformer_to_diffusers(dict(native))
    assert set(back) == set(sd), sorted(set(back) ^ set(sd))
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    out_dir = os.path.join(FIX, "wan-tiny-native")
    os.makedirs(out_dir, exist_ok=True)
    save_file(native, os.path.join(out_dir, "wan2.1_t2v_tiny.safetensors"))
    with open(os.path.join(out_dir, "transformer_config.json"), "w") as f:
        json.dump({**dict(b.config), "patch_size": list(CONFIG_B["patch_size"])}, f, indent=2, default=list)
    xb = torch.randn(2, 6, 5, 6, 10, generator=g)
    tb = torch.tensor([999.0, 3.0])
    ctxb = torch.randn(2, 7, 24, generator=g)
    vb = run(b, xb, tb, ctxb)
    cb, sb = rope_tables(b, xb)
    save_file(
        {"latents": xb, "timestep": tb, "context": ctxb, "velocity": vb, "rope_cos": cb, "rope_sin": sb},
        os.path.join(FIX, "dit_b_io.safetensors"),
    )

    # Attention: long enough that the Rust block-wise path can be run with small blocks.
    q = torch.randn(1, 2, 300, 16, generator=g)
    k = torch.randn(1, 2, 257, 16, generator=g)
    v = torch.randn(1, 2, 257, 16, generator=g)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    save_file({"q": q, "k": k, "v": v, "out": o}, os.path.join(FIX, "attention_io.safetensors"))

    # Config A again with zero-padded context (own generator: the fixtures above stay as they
    # are): item 0 has 3 real rows of 40, item 1 has 17; the 40 - n pad rows are zeros.
    g2 = torch.Generator().manual_seed(4321)
    xp = torch.randn(2, 4, 3, 4, 6, generator=g2)
    tp = torch.tensor([812.0, 64.0])
    ctxp = torch.zeros(2, 40, 32)
    ctxp[0, :3] = torch.randn(3, 32, generator=g2)
    ctxp[1, :17] = torch.randn(17, 32, generator=g2)
    vp = run(a, xp, tp, ctxp)
    save_file(
        {"latents": xp, "timestep": tp, "context": ctxp, "velocity": vp},
        os.path.join(FIX, "dit_a_padded_io.safetensors"),
    )
    print("dit fixtures written", file=sys.stderr)


if __name__ == "__main__":
    main()
