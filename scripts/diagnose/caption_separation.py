# Usage: /opt/refvenv/bin/python scripts/diagnose/caption_separation.py [MODEL_DIR]
# How much shape a model's text encoder carries per colour: for every colour x direction x
# background, the distance (1 - cosine) between the caption embeddings (last hidden state,
# padding zeroed as the pipeline does, flattened) of the triangle or square caption and the
# same caption with "circle". Prints the closest pairs and the median per colour (session 16:
# red captions separate shapes least, and red shapes are the ones the DiT draws round).
import itertools, sys
import numpy as np, torch
from transformers import PreTrainedTokenizerFast, UMT5EncoderModel

M = sys.argv[1] if len(sys.argv) > 1 else "weights"
tok = PreTrainedTokenizerFast(tokenizer_file=M + "/tokenizer/tokenizer.json", eos_token="</s>",
                              pad_token="<pad>", unk_token="<unk>")
te = UMT5EncoderModel.from_pretrained(M + "/text_encoder").eval()


def emb(prompt):
    t = tok(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = te(t.input_ids, attention_mask=t.attention_mask).last_hidden_state[0].clone()
    h[int(t.attention_mask.sum()):] = 0
    return h.flatten().numpy()


def dist(a, b):
    return 1.0 - float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


COLS = ["red", "green", "blue", "yellow", "white", "purple", "orange", "cyan"]
rows = []
for c, d, b in itertools.product(COLS, ["left", "right", "up", "down"], ["black", "gray", "navy"]):
    e = {s: emb(f"a {c} {s} moving {d} on a {b} background") for s in ("circle", "square", "triangle")}
    rows.append((c, d, b, dist(e["triangle"], e["circle"]), dist(e["square"], e["circle"])))
for name, k in (("triangle-circle", 3), ("square-circle", 4)):
    print(f"closest {name} pairs:")
    for r in sorted(rows, key=lambda r: r[k])[:8]:
        print("  %-7s %-5s %-5s %.4f" % (r[0], r[1], r[2], r[k]))
print("median per colour: triangle-circle, square-circle")
for c in COLS:
    rr = [r for r in rows if r[0] == c]
    print("  %-7s %.4f %.4f" % (c, np.median([r[3] for r in rr]), np.median([r[4] for r in rr])))
