"""Reference fixtures for sora's UMT5 text encoder and its tokenizer.

Builds, offline and deterministically (CPU, float32, fixed seeds):

* ``tests/fixtures/wan-tiny/tokenizer/``: a tiny word-level tokenizer with T5 conventions
  (``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended), saved with ``save_pretrained`` so
  ``AutoTokenizer.from_pretrained`` (and diffusers' ``WanPipeline``) can load it;
* ``tests/fixtures/wan-tiny/text_encoder/``: a randomly initialised two-layer
  ``UMT5EncoderModel`` (d_model 32), saved as sharded safetensors with an index, like the real
  checkpoint;
* ``tests/fixtures/umt5_io.safetensors``: token ids, attention mask, ``last_hidden_state`` of a
  padded batch and of its first prompt alone, and transformers' relative-position bucket table;
* ``tests/fixtures/umt5_prompts.json``: the prompt strings and the max length.

Run from the repository root: ``/opt/refvenv/bin/python scripts/reference/ref_umt5.py``.
"""

import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOKENIZER_DIR = os.path.join(FIXTURES, "wan-tiny", "tokenizer")
ENCODER_DIR = os.path.join(FIXTURES, "wan-tiny", "text_encoder")
IO_PATH = os.path.join(FIXTURES, "umt5_io.safetensors")
PROMPTS_PATH = os.path.join(FIXTURES, "umt5_prompts.json")

MAX_LEN = 16
PROMPTS = [
    # 9 words + "," + "." + </s> = 12 tokens: padded to 16. "zebra" is out of vocabulary.
    "A red cube, moving left on a zebra background.",
    # 22 tokens + </s>: truncated to 16 (15 words then </s>).
    "The small blue sphere and the big green cone rotate slowly while a yellow star jumps "
    "up and down over the white floor",
]

WORDS = """
a an the and or of on in over under with while to from at by is are
red green blue yellow white black orange purple pink gray brown
cube sphere cone circle square triangle star ball box cylinder
moving moves move rotate rotating spin spinning jump jumps bounce bouncing fall falling slide
left right up down forward backward around slowly quickly fast slow
small big large tiny tall bright dark shiny
background floor sky wall water light shadow scene camera video
cat dog bird fish car tree house sun moon
""".split()
PUNCTUATION = [",", ".", "!", "?"]


def build_tokenizer():
    """A WordLevel tokenizer with T5 conventions, wrapped for transformers."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS + PUNCTUATION:
        assert w not in vocab, w
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )
    return fast


def build_encoder(vocab_size):
    """A tiny UMT5 encoder with every parameter re-randomised so activations are O(1)."""
    torch.manual_seed(0)
    cfg = UMT5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=64,
        num_layers=2,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = UMT5EncoderModel(cfg).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("relative_attention_bias.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("SelfAttention.q.weight"):
                # T5 folds 1/sqrt(d_kv) into q: keep the scores O(1) so the bias matters.
                std = (cfg.d_model * cfg.d_kv) ** -0.5
                p.copy_(std * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[1]
                p.copy_(fan_in**-0.5 * torch.randn(p.shape, generator=gen))
    return model


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    # 1. Tokenizer.
    shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)
    os.makedirs(TOKENIZER_DIR)
    build_tokenizer().save_pretrained(TOKENIZER_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    batch = tokenizer(
        PROMPTS,
        padding="max_length",
        max_length=MAX_LEN,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    assert input_ids.shape == (2, MAX_LEN)
    assert (input_ids == tokenizer.unk_token_id).any(), "no out-of-vocabulary token"
    assert input_ids[1, -1].item() == tokenizer.eos_token_id, "truncation dropped </s>"
    single = tokenizer(PROMPTS[0], add_special_tokens=True, return_tensors="pt").input_ids
    n0 = int(attention_mask[0].sum())
    assert torch.equal(single[0], input_ids[0, :n0])

    # 2. Encoder.
    shutil.rmtree(ENCODER_DIR, ignore_errors=True)
    model = build_encoder(len(tokenizer))
    model.save_pretrained(ENCODER_DIR, safe_serialization=True, max_shard_size="40KB")
    assert os.path.exists(os.path.join(ENCODER_DIR, "model.safetensors.index.json")), "not sharded"
    model = UMT5EncoderModel.from_pretrained(ENCODER_DIR).eval()

    # 3. Outputs.
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden_single = model(input_ids=single).last_hidden_state
        attn = model.encoder.block[0].layer[0].SelfAttention
        rel = torch.arange(-300, 301, dtype=torch.long)
        buckets = attn._relative_position_bucket(rel)
    assert torch.allclose(hidden[0, :n0], hidden_single[0], atol=1e-5)

    save_file(
        {
            "input_ids": input_ids.to(torch.int64).contiguous(),
            "attention_mask": attention_mask.to(torch.int64).contiguous(),
            "last_hidden_state": hidden.float().contiguous(),
            "single_input_ids": single.to(torch.int64).contiguous(),
            "single_last_hidden_state": hidden_single.float().contiguous(),
            "relative_positions": rel.contiguous(),
            "relative_buckets": buckets.to(torch.int64).contiguous(),
        },
        IO_PATH,
    )
    with open(PROMPTS_PATH, "w") as f:
        json.dump({"prompts": PROMPTS, "max_length": MAX_LEN}, f, indent=2)
        f.write("\n")

    total = 0
    for d in (TOKENIZER_DIR, ENCODER_DIR):
        for name in sorted(os.listdir(d)):
            size = os.path.getsize(os.path.join(d, name))
            total += size
            print(f"{os.path.relpath(os.path.join(d, name), ROOT)}: {size} B")
    for p in (IO_PATH, PROMPTS_PATH):
        size = os.path.getsize(p)
        total += size
        print(f"{os.path.relpath(p, ROOT)}: {size} B")
    print(f"total {total} B; vocab {len(tokenizer)}; ids {input_ids.tolist()}")
    print(f"last_hidden_state max |x| {hidden.abs().max().item():.3f}, std {hidden.std().item():.3f}")
    assert math.isfinite(hidden.abs().max().item())


if __name__ == "__main__":
    main()
