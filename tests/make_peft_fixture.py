#!/usr/bin/env python3
"""Builds tests/fixtures/peft_gpt2_tiny/: LoRA adapters written by Hugging Face peft itself
(save_pretrained) over the tiny GPT-2 of tests/fixtures/hf_gpt2_tiny, and for each the
fp32 logits peft gives for a fixed token sequence, with the adapter and after
merge_and_unload(), in expected_logits.json.

Both lora_A and lora_B are drawn at random (peft's init makes B zero, which would hide
every mapping mistake), rounded to the dtype the adapter is saved in, so that the
logits are those of exactly the stored values. The adapters (folder: what it exercises):
  .                  target_modules ["c_attn", "c_proj"] (c_proj: attention and MLP), F32
  bf16_rslora_layer  ["c_fc", "attn.c_proj"], layers_to_transform [1], use_rslora, BF16
  f16_regex          a regex string, F16
  all_linear         "all-linear", which peft saves as the list of full module paths
Needs torch, transformers and peft: python3 tests/make_peft_fixture.py [OUT_DIR]
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "fixtures", "hf_gpt2_tiny")
TOKENS = [15496, 11, 995, 0, 318, 257, 1332, 286, 262, 50256, 1110, 13]
KEEP = 32  # vocabulary columns stored per position

VARIANTS = [
    (".", dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8), torch.float32),
    ("bf16_rslora_layer", dict(target_modules=["c_fc", "attn.c_proj"], layers_to_transform=[1], r=2,
                               lora_alpha=3, use_rslora=True), torch.bfloat16),
    ("f16_regex", dict(target_modules=r".*\.h\.0\.attn\.c_attn|.*\.mlp\.c_proj", r=3, lora_alpha=6), torch.float16),
    ("all_linear", dict(target_modules="all-linear", r=2, lora_alpha=2), torch.float32),
]


def logits_record(model):
    with torch.no_grad():
        logits = model(torch.tensor([TOKENS])).logits[0].float()
    return {
        "logits": [[float(x) for x in row[:KEEP]] for row in logits],
        "argmax": [int(i) for i in logits.argmax(-1)],
        "logsumexp": [float(x) for x in torch.logsumexp(logits.double(), -1)],
    }


def build(out, seed, kwargs, dtype):
    torch.manual_seed(seed)
    base = GPT2LMHeadModel.from_pretrained(BASE, dtype=torch.float32).eval()
    base.name_or_path = "tests/fixtures/hf_gpt2_tiny"  # recorded by peft: not this machine's absolute path
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **kwargs)).eval()
    lora = [p for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name]
    with torch.no_grad():
        for p in lora:  # B random too; values exact in the saved dtype
            p.copy_((0.2 * torch.randn_like(p)).to(dtype).float())
    record = {"tokens": TOKENS, "columns": KEEP, "adapter": logits_record(model)}
    for p in lora:
        p.data = p.data.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    os.remove(os.path.join(out, "README.md"))  # peft's model card template: no data
    for p in lora:
        p.data = p.data.float()
    record["merged"] = logits_record(model.merge_and_unload())
    with open(os.path.join(out, "expected_logits.json"), "w") as f:
        json.dump(record, f)
        f.write("\n")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "fixtures", "peft_gpt2_tiny")
    for i, (sub, kwargs, dtype) in enumerate(VARIANTS):
        build(os.path.normpath(os.path.join(root, sub)), 100 + i, kwargs, dtype)


if __name__ == "__main__":
    main()
