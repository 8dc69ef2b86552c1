"""`pcgpt quantize SRC DST`: a quantized pcgpt checkpoint (pcgpt.model.quantize), and the
--quantize / --group-size flags that generate, eval and serve share."""

import json


# what each scheme does, and what it buys on a CPU (BENCHMARKS.md, "CPU: pcgpt vs llama.cpp")
QUANTIZE_HELP = ("int8: per-channel weights (saves memory; on CPU often slower than fp32); int8-dynamic: int8 "
                 "weights and activations (the fast CPU path); int4: group-wise weights (saves memory; on CPU "
                 "much slower)")


def quantize_args(p) -> None:
    p.add_argument("--quantize", choices=["int8", "int8-dynamic", "int4"], default=None,
                   help=f"quantize the weights at load. {QUANTIZE_HELP}")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4: inputs per scale and zero point (32, 64 or 128; default 32)")


def register(sub) -> None:
    q = sub.add_parser("quantize", help="write a quantized pcgpt checkpoint (loads without quantizing again)")
    q.add_argument("src", help="checkpoint: pcgpt directory, nanoGPT ckpt.pt or HF GPT-2 directory")
    q.add_argument("dst", help="directory to write (config.json + model.safetensors)")
    q.add_argument("--meta", help="nanoGPT meta.pkl with the char vocabulary (default: beside the checkpoint)")
    quantize_args(q)
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args) -> int:
    import torch
    with torch.no_grad():  # not set_grad_enabled(False): main() may run inside a longer-lived process
        return _quantize(args)


def _quantize(args) -> int:
    from pcgpt.model.checkpoint import load_checkpoint, save_quantized
    from pcgpt.model.quantize import Quantization, quantize, weight_bytes
    quantization = Quantization.parse(args.quantize, args.group_size)
    if quantization is None:
        raise ValueError("--quantize is required (int8 or int4)")
    model, tokenizer, metadata = load_checkpoint(args.src, meta_path=args.meta)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"{args.src} is already quantized ({model.quantization.name})")
    float_bytes = weight_bytes(model)
    counts = quantize(model, quantization)
    keep = {k: v for k, v in metadata.items() if k not in ("format", "path", "model_type", "saved_at", "eval")}  # eval: the float model's
    keep["quantized_from"] = str(args.src)
    save_quantized(args.dst, model, tokenizer, keep)
    print(json.dumps({"dst": str(args.dst), "quantization": quantization.name, **counts,
                      "float_weight_bytes": float_bytes, "weight_bytes": weight_bytes(model)}))
    return 0
