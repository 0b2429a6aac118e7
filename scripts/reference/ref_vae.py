"""Reference fixtures for the Wan2.1 VAE (diffusers `AutoencoderKLWan`) and its causal conv3d.

Writes
  tests/fixtures/conv3d.safetensors              `WanCausalConv3d` cases: inputs, weights, outputs
  tests/fixtures/wan-tiny/vae/                   config A, diffusers layout (save_pretrained)
  tests/fixtures/vae_a_io.safetensors            config A: video -> encode, latent -> decode
  tests/fixtures/wan-tiny-native/wan_2.1_vae.safetensors
                                                 config B, native (original Wan / Comfy) layout
  tests/fixtures/wan-tiny-native/vae_config.json config B, diffusers-style config
  tests/fixtures/vae_b_io.safetensors            config B: video -> encode, latent -> decode

Weights are re-randomised (gamma ~ 1 +- 0.2, conv weights ~ N(0, 1) / sqrt(fan_in), biases ~ 0.1 N(0, 1))
and rounded to float16 for storage; every reference output is computed in float32 from those
rounded weights, so a float32 implementation must match to float32 rounding.

Run from the repository root: /opt/refvenv/bin/python scripts/reference/ref_vae.py
"""

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

# Config A = WanVaeConfig::tiny() in src/models/wan/config.rs (z_dim 4 = the tiny DiT's in_channels).
CONFIG_A = dict(
    base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[0.1, -0.2, 0.3, -0.4], latents_std=[1.5, 0.8, 1.2, 2.0],
)
# Config B: other widths (6/12/24/12: a decoder shortcut in up_blocks.1, odd z_dim), the temporal
# downsamples in stages 0 and 2. Still 4 stages x 2 res blocks with dim_mult [a, 2a, 4a, *], the
# structure `convert_wan_vae_to_diffusers` hard-codes.
CONFIG_B = dict(
    base_dim=6, z_dim=5, dim_mult=[1, 2, 4, 2], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[True, False, True], dropout=0.0,
    latents_mean=[0.05, -0.3, 0.2, 0.6, -0.1], latents_std=[1.1, 0.7, 1.9, 1.3, 0.9],
)

RES_D2N = [(".norm1.", ".residual.0."), (".conv1.", ".residual.2."), (".norm2.", ".residual.3."),
           (".conv2.", ".residual.6."), (".conv_shortcut.", ".shortcut.")]


def res_to_native(rest):
    """Renames the tail of a residual-block key (`norm1.gamma` -> `residual.0.gamma`)."""
    rest = "." + rest
    for d, n in RES_D2N:
        if rest.startswith(d):
            return (n + rest[len(d):])[1:]
    raise KeyError(rest)


def diffusers_to_native(key, num_res_blocks):
    """diffusers AutoencoderKLWan key -> original Wan VAE key (the inverse of the diffusers converter)."""
    fixed = {
        "quant_conv": "conv1", "post_quant_conv": "conv2",
        "encoder.conv_in": "encoder.conv1", "decoder.conv_in": "decoder.conv1",
        "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
        "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2",
    }
    module, param = key.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{param}"
    parts = key.split(".")
    side = parts[0]
    if parts[1] == "mid_block":
        kind, i = parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * i}.{res_to_native(rest)}"
    if parts[1] == "down_blocks":
        i, rest = parts[2], ".".join(parts[3:])
        if rest.startswith("resample.") or rest.startswith("time_conv."):
            return f"encoder.downsamples.{i}.{rest}"
        return f"encoder.downsamples.{i}.{res_to_native(rest)}"
    if parts[1] == "up_blocks":
        s = int(parts[2])
        base = s * (num_res_blocks + 2)
        if parts[3] == "resnets":
            return f"decoder.upsamples.{base + int(parts[4])}.{res_to_native('.'.join(parts[5:]))}"
        if parts[3] == "upsamplers":
            return f"decoder.upsamples.{base + num_res_blocks + 1}.{'.'.join(parts[5:])}"
    raise KeyError(key)


def randomize(model, gen):
    """Re-randomises every parameter so nothing is trivially 0/1, then rounds to float16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                v = 1.0 + 0.2 * (2.0 * torch.rand(p.shape, generator=gen) - 1.0)
            elif p.dim() > 1:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=gen) / fan_in**0.5
            else:
                v = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(v.half().float())


def contiguous(sd):
    return {k: v.detach().contiguous() for k, v in sd.items()}


def conv3d_cases():
    gen = torch.Generator().manual_seed(1)
    out = {}

    def conv(cin, cout, k, stride=1, padding=0):
        c = WanCausalConv3d(cin, cout, k, stride=stride, padding=padding)
        with torch.no_grad():
            fan_in = c.weight[0].numel()
            c.weight.copy_(torch.randn(c.weight.shape, generator=gen) / fan_in**0.5)
            c.bias.copy_(0.1 * torch.randn(c.bias.shape, generator=gen))
        return c

    def put(prefix, c, **tensors):
        out[f"{prefix}.weight"] = c.weight.detach().clone()
        out[f"{prefix}.bias"] = c.bias.detach().clone()
        for k, v in tensors.items():
            out[f"{prefix}.{k}"] = v.detach().clone().contiguous()

    with torch.no_grad():
        x = torch.randn(1, 3, 5, 6, 7, generator=gen)
        plain = conv(3, 5, 3, padding=1)
        y = plain(x)
        put("plain", plain, x=x, y=y)
        for n in (1, 2):
            cache = torch.randn(1, 3, n, 6, 7, generator=gen)
            put(f"cache{n}", plain, x=x, cache=cache, y=plain(x, cache))
        # The causal convention spelled out with plain conv3d: 2 zero frames in front, none behind.
        manual = F.conv3d(F.pad(x, (1, 1, 1, 1, 2, 0)), plain.weight, plain.bias)
        assert torch.equal(manual, y), "WanCausalConv3d is not front-padded conv3d"
        out["manual.y"] = manual.contiguous()
        # WanResample downsample3d time_conv: kernel (3,1,1), stride (2,1,1), no padding.
        xt = torch.randn(1, 4, 5, 3, 4, generator=gen)
        tconv = conv(4, 4, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        put("tstride", tconv, x=xt, y=tconv(xt))
        # 1x1x1 (conv_shortcut, quant_conv).
        x1 = torch.randn(2, 4, 3, 5, 6, generator=gen)
        one = conv(4, 6, 1)
        put("one", one, x=x1, y=one(x1))
    save_file(out, os.path.join(FIX, "conv3d.safetensors"))


def build(config, seed):
    torch.manual_seed(seed)
    model = AutoencoderKLWan(**config).eval()
    randomize(model, torch.Generator().manual_seed(seed))
    return model


def run(model, video, latent):
    with torch.no_grad():
        dist = model.encode(video).latent_dist
        decoded = model.decode(latent).sample
    return dist.mean, dist.logvar, decoded


def clamp_fraction(t):
    return (t.abs() >= 1.0).float().mean().item()


def pipeline_denormalize(model, z):
    """WanPipeline: `latents / (1 / std) + mean` in float32."""
    zd = model.config.z_dim
    mean = torch.tensor(model.config.latents_mean).view(1, zd, 1, 1, 1).to(z.dtype)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, zd, 1, 1, 1).to(z.dtype)
    return z / inv_std + mean


def pipeline_normalize(model, mu):
    """WanVideoToVideoPipeline: `(latents - mean) * (1 / std)` in float32."""
    zd = model.config.z_dim
    mean = torch.tensor(model.config.latents_mean).view(1, zd, 1, 1, 1).to(mu.dtype)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, zd, 1, 1, 1).to(mu.dtype)
    return (mu - mean) * inv_std


def config_a():
    model = build(CONFIG_A, 10)
    gen = torch.Generator().manual_seed(11)
    video = 2.0 * torch.rand(1, 3, 9, 32, 48, generator=gen) - 1.0
    latent = torch.randn(1, 4, 3, 4, 6, generator=gen)
    mean, logvar, decoded = run(model, video, latent)
    print(f"A: mean {tuple(mean.shape)} |max| {mean.abs().max():.3f}; decode {tuple(decoded.shape)} "
          f"clamped {100 * clamp_fraction(decoded):.1f}%")
    sd = contiguous(model.state_dict())
    native = {diffusers_to_native(k, CONFIG_A["num_res_blocks"]): v for k, v in sd.items()}
    assert convert_wan_vae_to_diffusers(native).keys() == sd.keys(), "key map differs from diffusers'"
    model.half().save_pretrained(os.path.join(FIX, "wan-tiny", "vae"), safe_serialization=True)
    io = dict(video=video, mean=mean, logvar=logvar, latent=latent, decoded=decoded,
              denormalized=pipeline_denormalize(model, latent),
              normalized=pipeline_normalize(model, mean))
    save_file(contiguous(io), os.path.join(FIX, "vae_a_io.safetensors"))


def config_b():
    model = build(CONFIG_B, 20)
    gen = torch.Generator().manual_seed(21)
    video = 2.0 * torch.rand(1, 3, 5, 24, 40, generator=gen) - 1.0
    latent = torch.randn(1, 5, 5, 3, 5, generator=gen)
    mean, logvar, decoded = run(model, video, latent)
    print(f"B: mean {tuple(mean.shape)} |max| {mean.abs().max():.3f}; decode {tuple(decoded.shape)} "
          f"clamped {100 * clamp_fraction(decoded):.1f}%")
    sd = {k: v.half() for k, v in contiguous(model.state_dict()).items()}
    native = {diffusers_to_native(k, CONFIG_B["num_res_blocks"]): v for k, v in sd.items()}
    assert len(native) == len(sd), "the inverse key map is not injective"
    back = convert_wan_vae_to_diffusers(dict(native))
    assert sorted(back) == sorted(sd), sorted(set(back) ^ set(sd))
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    out_dir = os.path.join(FIX, "wan-tiny-native")
    os.makedirs(out_dir, exist_ok=True)
    save_file(native, os.path.join(out_dir, "wan_2.1_vae.safetensors"))
    with open(os.path.join(out_dir, "vae_config.json"), "w") as f:
        json.dump(json.loads(model.to_json_string()), f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(contiguous(dict(video=video, mean=mean, logvar=logvar, latent=latent, decoded=decoded)),
              os.path.join(FIX, "vae_b_io.safetensors"))


def real_param_count():
    """Parameters of the full Wan2.1 AutoencoderKLWan (default config), for the Rust constant."""
    with torch.device("meta"):
        model = AutoencoderKLWan()
    return sum(p.numel() for p in model.parameters())


def main():
    torch.set_grad_enabled(False)
    os.makedirs(FIX, exist_ok=True)
    conv3d_cases()
    config_a()
    config_b()
    print(f"Wan2.1 VAE parameters: {real_param_count()}")


if __name__ == "__main__":
    main()
