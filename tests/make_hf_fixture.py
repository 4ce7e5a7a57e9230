#!/usr/bin/env python3
"""Builds tests/fixtures/hf_gpt2_tiny/: a tiny random transformers GPT2LMHeadModel saved
as F16 safetensors (so `quasar convert --from-hf` also exercises the F16 -> F32 path),
and expected_logits.json: its fp32 logits for a fixed token sequence.

The logits come from the F16-rounded weights upcast to F32, so Quasar's fp32 forward of
the converted checkpoint must match them to fp32 rounding, not to F16's.
Needs torch and transformers: python3 tests/make_hf_fixture.py [OUT_DIR]
"""
import json
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TOKENS = [15496, 11, 995, 0, 318, 257, 1332, 286, 262, 50256, 1110, 13]
KEEP = 64  # vocabulary columns stored per position


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "fixtures", "hf_gpt2_tiny")
    torch.manual_seed(1234)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=50257,
                     activation_function="gelu_new", layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(cfg).eval()
    # Random LayerNorm parameters and biases too (init leaves them 1 and 0), so a
    # mapping mistake in any tensor shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model = model.half()
    model.save_pretrained(out, safe_serialization=True)
    with torch.no_grad():
        logits = model.float()(torch.tensor([TOKENS])).logits[0]
    expected = {
        "tokens": TOKENS,
        "columns": KEEP,
        "logits": [[float(x) for x in row[:KEEP]] for row in logits],
        "argmax": [int(i) for i in logits.argmax(-1)],
        "logsumexp": [float(x) for x in torch.logsumexp(logits.double(), -1)],
    }
    with open(os.path.join(out, "expected_logits.json"), "w") as f:
        json.dump(expected, f)
        f.write("\n")


if __name__ == "__main__":
    main()
