"""The `pcgpt` command: generate, inspect, train, eval, serve."""

import argparse
import json
import os
import sys


def _load(args):
    import torch
    from pcgpt.model.checkpoint import load_for_inference
    from pcgpt.model.device import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(getattr(args, "dtype", None), device)
    torch.set_grad_enabled(False)
    from pcgpt.model.quantize import Quantization
    quantization = Quantization.parse(getattr(args, "quantize", None), getattr(args, "group_size", None))
    return load_for_inference(args.model, meta_path=getattr(args, "meta", None), device=device, dtype=dtype,
                              quantization=quantization)


def cmd_generate(args) -> int:
    from pcgpt.model.generate import generate
    from pcgpt.model.sampling import SamplingParams
    from pcgpt.model.tokenizer import IncrementalDetokenizer
    model, tokenizer, _ = _load(args)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, seed=args.seed)
    params.validate()
    prompt_ids = tokenizer.encode(args.prompt)
    # checked before anything reaches stdout, so a failure never leaves half an output behind
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if len(prompt_ids) >= model.config.block_size:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens, which leaves no room in the context "
                         f"length {model.config.block_size}")
    max_tokens = min(args.max_tokens, model.config.block_size - len(prompt_ids))
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    detok = IncrementalDetokenizer(tokenizer)
    for token, _, _ in generate(model, prompt_ids, max_tokens, params, settle_steps=args.settle_steps,
                                eos_id=tokenizer.eos_id if args.stop_at_eos else None, vocab_size=tokenizer.vocab_size):
        out.write(detok.push(token))
        out.flush()
    out.write(detok.flush() + "\n")
    out.flush()
    return 0


def cmd_inspect(args) -> int:
    """Reads the checkpoint's config, tokenizer and tensor index, not its weights."""
    from pcgpt.model.card import describe
    from pcgpt.model.checkpoint import read_checkpoint_info
    from pcgpt.model.device import resolve_device, resolve_dtype
    info = describe(read_checkpoint_info(args.model, meta_path=args.meta),
                    dtype=resolve_dtype(args.dtype, resolve_device(args.device)))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"model type        {info['model_type']} ({info['format']} checkpoint at {args.model})")
    print("config            " + ", ".join(f"{k}={v}" for k, v in info["config"].items()))
    print(f"parameters        {info['parameters']:,} ({info['parameters_non_embedding']:,} without position embeddings)")
    print(f"tokenizer         {info['tokenizer']} ({info['vocab_size']} tokens)")
    print(f"context length    {info['context_length']}")
    print(f"weights           {info['weight_bytes']:,} bytes ({info['quantization'] or info['dtype']})")
    print(f"KV cache          {info['kv_cache_bytes_per_token']:,} bytes per token ({info['dtype']})")
    print(f"FLOPs per token   {info['flops_per_token']:,} (forward, attending to the full context)")
    for key in ("training", "eval"):
        if key in info:
            print(f"{key:<18}{json.dumps(info[key], default=str)}")
    return 0


def _env(name, default):
    """Every serve flag can come from the environment (PCGPT_PORT=...), for containers."""
    return os.environ.get("PCGPT_" + name.upper(), default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcgpt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p, positional=False, quantize=True):
        if positional:
            p.add_argument("model", help="checkpoint: pcgpt directory, nanoGPT ckpt.pt or HF GPT-2 directory")
        else:
            p.add_argument("--model", required=True, help="checkpoint: pcgpt directory, nanoGPT ckpt.pt or HF GPT-2 directory")
        p.add_argument("--meta", help="nanoGPT meta.pkl with the char vocabulary (default: beside the checkpoint)")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
        p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPUs that have it), float32, bfloat16, float16")
        if quantize:
            from pcgpt.cli_quantize import quantize_args
            quantize_args(p)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--settle-steps", type=int, default=None, help="PC models: settling steps per token (default: the checkpoint's)")
    g.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="print a checkpoint's type, config, size and costs")
    model_args(i, positional=True, quantize=False)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    # train, eval and serve live in their own modules
    from pcgpt import cli_quantize, cli_serve, cli_train
    cli_train.register(sub, model_args, _env)
    cli_quantize.register(sub)
    cli_serve.register(sub, model_args, _env)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pcgpt.model.checkpoint import CheckpointError
    from pcgpt.model.tokenizer import TokenizerError
    try:
        return args.func(args)
    except (CheckpointError, TokenizerError, ValueError) as e:
        print(f"pcgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
