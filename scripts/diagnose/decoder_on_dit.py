# Usage: /opt/refvenv/bin/python scripts/diagnose/decoder_on_dit.py TRAIN_DIR OUT_DIR [STEPS] [SIGMA_MAX] [FRAC_TRUE]
# Experiment (session 11), not part of the recipe: fine-tune the VAE decoder of `weights/` on what
# it is fed at generation time. Each sample: a training latent of TRAIN_DIR noised to σ ~ U(0.1,
# SIGMA_MAX) (or, with probability FRAC_TRUE, left clean), the DiT's guided x0 prediction from it
# (at the bundled model's guidance, read from weights/sora.json: 6 when session 11 ran it, 3
# since session 12), decoded by the trainable decoder; loss L1 + L2 against the
# frozen original decoder's reconstruction of the clean latent. Writes a copy of weights/ with the
# new decoder to OUT_DIR (loadable by `sora gen/eval --model OUT_DIR`). 0.75 s/step on 2 cores.
import copy, json, os, shutil, sys, time, numpy as np, torch
from safetensors.torch import load_file
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import load

TRAIN, OUT = sys.argv[1], sys.argv[2]
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 400
SMAX = float(sys.argv[4]) if len(sys.argv) > 4 else 0.6
FRAC_TRUE = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
torch.manual_seed(0)
np.random.seed(0)
pipe, _ = load("weights")
vae = pipe.vae
mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
d0 = copy.deepcopy(vae).eval()
L = list(load_file(TRAIN + "/latents.safetensors").values())[0]
caps = json.load(open(TRAIN + "/captions.json"))["captions"]
G = json.load(open("weights/sora.json"))["defaults"]["guidance"]
enc = lambda p: pipe.encode_prompt(p, None, do_classifier_free_guidance=False, max_sequence_length=16)[0]
with torch.no_grad():
    empty = enc("")
for p in list(pipe.transformer.parameters()) + list(vae.parameters()):
    p.requires_grad_(False)
params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
for p in params:
    p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
B, t0 = 2, time.time()
for step in range(STEPS):
    idx = torch.randint(0, L.shape[0], (B,))
    x0 = L[idx]
    with torch.no_grad():
        pe = torch.cat([enc(caps[i][np.random.randint(len(caps[i]))]) for i in idx.tolist()])
        s = ((0.1 + (SMAX - 0.1) * torch.rand(B)) * (torch.rand(B) >= FRAC_TRUE)).view(B, 1, 1, 1, 1)
        xs = (1 - s) * x0 + s * torch.randn_like(x0)
        t = s.view(B) * 1000
        vc = pipe.transformer(hidden_states=xs, timestep=t, encoder_hidden_states=pe, return_dict=False)[0]
        vu = pipe.transformer(hidden_states=xs, timestep=t, encoder_hidden_states=empty.expand(B, -1, -1), return_dict=False)[0]
        xh = xs - s * (vu + G * (vc - vu))
        target = d0.decode(x0 * std + mean, return_dict=False)[0].clamp(-1, 1)
    out = vae.decode(xh * std + mean, return_dict=False)[0]
    loss = (out - target).abs().mean() + ((out - target) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 50 == 0:
        print(step, round(loss.item(), 4), f"{time.time() - t0:.0f} s", flush=True)
shutil.rmtree(OUT, ignore_errors=True)
shutil.copytree("weights", OUT)
vae.save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)
print("wrote", OUT)
