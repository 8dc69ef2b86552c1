"""The `pcgpt` command: generate, inspect, train, eval, serve.

Parsing imports neither torch nor the server (pcgpt/cli_args.py): `pcgpt --help` and a mistyped
flag answer at once, and each command imports what it needs when it runs.
"""

import argparse
import json
import os
import sys

from pcgpt import cli_args


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


DEFAULT_MAX_TOKENS = 100


def generation_length(args, info, prompt_ids) -> int:
    """Checks the request against the model, as the server does, before the weights load: the
    number of tokens to generate."""
    if args.settle_steps is not None:
        if info.model_type != "pc" and args.settle_steps > 0:
            raise ValueError(f"--settle-steps {args.settle_steps}: {args.model} is a baseline ({info.model_type}) "
                             f"model, which has no settling; only pc models take it")
        limit = getattr(info.config, "max_settle_steps", 0)
        if info.model_type == "pc" and args.settle_steps > limit:
            raise ValueError(f"--settle-steps {args.settle_steps}: this model allows at most {limit}")
    context = info.config.block_size
    room = context - len(prompt_ids)
    if room <= 0:
        raise ValueError(f"--prompt: {len(prompt_ids)} tokens, which leaves no room in the context length {context}")
    if args.max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if args.max_tokens > room:
        raise ValueError(f"--max-tokens {args.max_tokens}: the prompt's {len(prompt_ids)} tokens leave room for "
                         f"at most {room} in the context length {context}")
    return args.max_tokens


def cmd_generate(args) -> int:
    from pcgpt.model.checkpoint import read_checkpoint_info
    from pcgpt.model.generate import generate
    from pcgpt.model.sampling import SamplingParams
    from pcgpt.model.tokenizer import IncrementalDetokenizer, TokenizerError
    # checked before the weights load and before anything reaches stdout, so a mistake fails fast
    # and never leaves half an output behind
    info = read_checkpoint_info(args.model, meta_path=args.meta)
    try:
        prompt_ids = info.tokenizer.encode(args.prompt)
    except TokenizerError as e:
        raise ValueError(f"--prompt: {e}") from None
    max_tokens = generation_length(args, info, prompt_ids)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            min_p=args.min_p, seed=args.seed)
    params.validate()
    model, tokenizer, _ = _load(args)
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
    if "val_loss" in info:
        print(f"validation loss   {info['val_loss']:.4f} nats/token ({info['eval'].get('split', 'val')})")
    for key in ("training", "eval"):
        if key in info:
            print(f"{key:<18}{json.dumps(info[key], default=str)}")
    return 0


def _env(name, default):
    """Every serve flag can come from the environment (PCGPT_PORT=...), for containers."""
    return os.environ.get("PCGPT_" + name.upper(), default)


EPILOG = ("Examples (in a checkout, after make install):\n"
          "  .venv/bin/pcgpt serve\n"
          "  .venv/bin/pcgpt generate --model pcgpt/checkpoints/shakespeare-char --prompt ROMEO: --temperature 0.8\n"
          "  .venv/bin/pcgpt inspect pcgpt/checkpoints/shakespeare-char-pc\n"
          "pcgpt COMMAND --help describes each command's flags.")


def build_parser() -> argparse.ArgumentParser:
    parser = cli_args.Parser(prog="pcgpt", description=__doc__.split("\n")[0], epilog=EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    # every subcommand gets the one-line errors and the help with defaults (cli_args.SubcommandParser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=cli_args.SubcommandParser)

    def model_args(p, positional=False, quantize=True):
        where = "checkpoint: a pcgpt directory, a nanoGPT ckpt.pt or a HuggingFace GPT-2 directory"
        if positional:
            p.add_argument("model", type=cli_args.existing_path, help=where)
        else:
            p.add_argument("--model", required=True, type=cli_args.existing_path, metavar="PATH", help=where)
        p.add_argument("--meta", type=cli_args.existing_file, metavar="PATH",
                       help="nanoGPT meta.pkl with the char vocabulary (default: the one beside the checkpoint)")
        p.add_argument("--device", default="auto", type=cli_args.device,
                       help="auto (CUDA when present), cpu, cuda or cuda:N")
        p.add_argument("--dtype", default="auto", choices=cli_args.DTYPES,
                       help="auto: float32 on CPU, bfloat16 on GPUs that have it")
        if quantize:
            from pcgpt.cli_quantize import quantize_args
            quantize_args(p)

    g = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout",
                       description="Generate text from a prompt in this process (no server): the prompt, then "
                                   "the generated text, streamed to stdout and nothing else. The checks the "
                                   "server makes (context, settle steps, vocabulary) come before the weights load.")
    model_args(g)
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    g.add_argument("--max-tokens", type=cli_args.nonnegative_int, default=None, metavar="N",
                   help=f"tokens to generate; prompt + max tokens must fit the context "
                        f"(default: {DEFAULT_MAX_TOKENS}, or what the context leaves)")
    g.add_argument("--temperature", type=cli_args.temperature, default=1.0, metavar="X",
                   help="0 = greedy, up to 100")
    g.add_argument("--top-k", type=cli_args.nonnegative_int, default=0, metavar="K",
                   help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=cli_args.top_p, default=1.0, metavar="P",
                   help="nucleus sampling: keep this probability mass, in (0, 1]")
    g.add_argument("--min-p", type=cli_args.unit_interval, default=0.0, metavar="P",
                   help="keep tokens with p >= min_p x the top probability, in [0, 1]")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="sampling seed (default: random)")
    g.add_argument("--settle-steps", type=cli_args.nonnegative_int, default=None, metavar="T",
                   help="pc models only: settling steps per token (default: the checkpoint's)")
    g.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="stop at the end-of-text token")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="print a checkpoint's type, config, size and costs (reads no weights)",
                       description="Print a checkpoint's model card, the one /v1/models answers: type, config, "
                                   "parameters, tokenizer, context, KV-cache bytes and forward FLOPs per token, "
                                   "validation loss and how it was trained. Reads no weights.")
    model_args(i, positional=True, quantize=False)
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    # train, eval and serve live in their own modules
    from pcgpt import cli_compare, cli_quantize, cli_serve, cli_train
    cli_train.register(sub, model_args, _env)
    cli_compare.register(sub, model_args, _env)
    cli_quantize.register(sub)
    cli_serve.register(sub, model_args, _env)
    return parser


def is_usage_error(e: Exception) -> bool:
    """A mistake in what the user gave (a value, a file, a checkpoint), answered with one line.
    The checkpoint's error class is looked up only if its module is loaded (it imports torch, and
    a mistake found before torch loads cannot be one)."""
    checkpoint = sys.modules.get("pcgpt.model.checkpoint")
    return isinstance(e, (ValueError, OSError)) or (checkpoint is not None and isinstance(e, checkpoint.CheckpointError))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # inference commands turn autograd off; a caller that runs main() in its own process (the
    # tests, a notebook) gets its mode back
    grad_before = sys.modules["torch"].is_grad_enabled() if "torch" in sys.modules else True
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not is_usage_error(e):
            raise
        print(f"pcgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:
            sys.modules["torch"].set_grad_enabled(grad_before)


if __name__ == "__main__":
    sys.exit(main())
