"""A model's description, from its checkpoint's info (no weights): what `pcgpt inspect` prints,
what /v1/models answers and what the pcgpt_model info metric carries. One function, so the three
never disagree.

The numbers are those of the model as its config builds it (on the meta device: shapes, no memory):
  parameters                total parameters, as torch counts model.parameters(): the token
                            embedding, tied to the output head, counted once; the position table
                            and (PC models) the generators and precisions included
  parameters_non_embedding  the same without the position table (nanoGPT's convention)
  flops_per_token           forward FLOPs for one token attending to the full context
  kv_cache_bytes_per_token  K and V of every layer at the served dtype
  weight_bytes              the weights as served: float ones at the served dtype (tied once),
                            quantized ones (a quantized checkpoint) by their parts
"""

import torch

from pcgpt.model.checkpoint import CheckpointInfo, build_model


def describe(info: CheckpointInfo, dtype: torch.dtype = torch.float32) -> dict:
    model = build_model(info.model_type, info.config, device="meta")
    config = info.config
    parameters = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    card = {
        "model_type": info.model_type,
        "format": info.format,
        "config": config.to_dict(),
        "parameters": parameters,
        "parameters_non_embedding": parameters - model.transformer.wpe.weight.numel(),
        "tokenizer": info.tokenizer.name,
        "vocab_size": info.tokenizer.vocab_size,
        "context_length": config.block_size,
        "kv_cache_bytes_per_token": model.kv_bytes_per_token(dtype),
        "flops_per_token": model.flops_per_token(),
        "dtype": str(dtype).removeprefix("torch."),
    }
    card.update(_weights(model, info, dtype))
    if info.model_type == "pc":
        card["default_settle_steps"] = config.default_settle_steps
        card["max_settle_steps"] = config.max_settle_steps
    metadata = info.metadata
    if isinstance(metadata.get("eval"), dict) and "val_loss" in metadata["eval"]:
        card["val_loss"] = metadata["eval"]["val_loss"]
    card.update({k: metadata[k] for k in ("training", "eval") if k in metadata})
    return card


def _weights(model, info: CheckpointInfo, dtype) -> dict:
    from pcgpt.model.checkpoint import checkpoint_quantization
    from pcgpt.model.quantize import served_weight_bytes
    quantization = checkpoint_quantization(info.metadata, info.path)
    return {"quantization": quantization.name if quantization else None,
            "weight_bytes": served_weight_bytes(model, quantization, dtype)}
