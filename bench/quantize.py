"""Quantization quality: what int8 and int4 weights cost against fp32.

  char models (the shipped baseline, and the PC model at its default settle steps): validation
      loss (nats/char, the first --max-tokens characters of tinyshakespeare's last 10%) and its
      rise over fp32; greedy agreement with fp32 over the first 200 new tokens of 8 prompts
      (the fraction of positions with the same token, and where the first difference falls).
  GPT-2 124M shape (bench.models: random HF weights): max |Δlogit| and top-1 agreement with fp32
      over 2 x 128 random tokens.
  Each quantization also with the output head kept float ('+head fp32'): what the head costs.

  python -m bench.quantize [--max-tokens N] [--out bench/results/quantize.json]
"""

import argparse
import json
import time

import torch

from bench.common import CHAR_CKPT, CHAR_PC_CKPT, ROOT, RESULTS, machine, set_threads
from pcgpt.model.checkpoint import load_checkpoint
from pcgpt.model.formats import to_inference_format
from pcgpt.model.evaluate import evaluate
from pcgpt.model.generate import generate
from pcgpt.model.quantize import Quantization, quantize, weight_bytes
from pcgpt.model.sampling import SamplingParams

DATA = ROOT / "data" / "tinyshakespeare" / "input.txt"
PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\n", "KING RICHARD III:\n", "To be, or not", "The king ",
           "MENENIUS:\nWhat ", "O, "]
VARIANTS = [(None, ()), (Quantization("int8"), ()), (Quantization("int8"), ("lm_head",)), (Quantization("int8-dynamic"), ()), (Quantization("int8-dynamic"), ("lm_head",)),
            (Quantization("int4", 32), ()), (Quantization("int4", 32), ("lm_head",)), (Quantization("int4", 128), ())]


def variant_name(q, keep):
    return "fp32" if q is None else q.name + (" +head fp32" if keep else "")


def load(path, q, keep):
    """As load_for_inference(path, quantization=q) loads it, with the Linears in `keep` left float."""
    model, tokenizer, _ = load_checkpoint(path)
    model.requires_grad_(False)
    if q is not None:
        quantize(model, q, keep_float=keep)
    to_inference_format(model)
    return model, tokenizer


@torch.no_grad()
def greedy(model, tokenizer, n=200):
    return [[t for t, _, _ in generate(model, tokenizer.encode(p), n, SamplingParams(temperature=0.0),
                                       vocab_size=tokenizer.vocab_size)] for p in PROMPTS]


def agreement(ref, got):
    same = sum(a == b for r, g in zip(ref, got) for a, b in zip(r, g))
    total = sum(len(r) for r in ref)
    first = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got)]
    return {"greedy_agreement": same / total, "first_difference_median": sorted(first)[len(first) // 2],
            "first_difference_min": min(first)}


def char_rows(path, max_tokens, variants):
    rows, ref_loss, ref_tokens = [], None, None
    for q, keep in [VARIANTS[0]] + variants:
        model, tokenizer = load(path, q, keep)
        steps = [model.config.default_settle_steps] if model.model_type == "pc" else [0]
        t = time.perf_counter()
        report = evaluate(model, tokenizer, str(DATA), settle_steps=steps, max_tokens=max_tokens, name=str(path))
        loss = report["results"][0]["loss"]
        tokens = greedy(model, tokenizer)
        row = {"model": path.name, "variant": variant_name(q, keep), "settle_steps": steps[0], "val_loss": loss,
               "weight_bytes": weight_bytes(model), "seconds": time.perf_counter() - t}
        if q is None:
            ref_loss, ref_tokens = loss, tokens
        else:
            row["delta_loss"] = loss - ref_loss
            row.update(agreement(ref_tokens, tokens))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


@torch.no_grad()
def gpt2_rows(variants):
    from bench.models import gpt2_pair
    ref, hf, _ = gpt2_pair()
    del hf
    x = torch.randint(0, 50257, (2, 128), generator=torch.Generator().manual_seed(0))
    a = ref(x)
    rows = []
    for q, keep in variants:
        model = type(ref)(ref.config)
        model.load_state_dict(ref.state_dict())
        model.eval().requires_grad_(False)
        quantize(model, q, keep_float=keep)
        b = model(x)
        rows.append({"model": "gpt2-124M (random weights)", "variant": variant_name(q, keep),
                     "max_abs_dlogit": float((a - b).abs().max()), "mean_abs_dlogit": float((a - b).abs().mean()),
                     "logit_std": float(a.std()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                     "weight_bytes": weight_bytes(model), "fp32_weight_bytes": weight_bytes(ref)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--variants", help="comma-separated names (default: all), e.g. int8,int4-g32 +head fp32")
    p.add_argument("--models", default="char,gpt2", help="char (both shipped models), gpt2, or both")
    p.add_argument("--out", default=str(RESULTS / "quantize.json"))
    args = p.parse_args(argv)
    variants = [v for v in VARIANTS[1:] if args.variants is None or variant_name(*v) in args.variants.split(",")]
    threads = set_threads()
    result = {"machine": machine(), "threads": threads, "max_tokens": args.max_tokens,
              "command": "python -m bench.quantize" + (f" --max-tokens {args.max_tokens}" if args.max_tokens != 20000 else ""),
              "char": (char_rows(CHAR_CKPT, args.max_tokens, variants) + char_rows(CHAR_PC_CKPT, args.max_tokens, variants)
                       if "char" in args.models else []),
              "gpt2": gpt2_rows(variants) if "gpt2" in args.models else []}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
