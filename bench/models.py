"""The model pairs the benchmarks compare: ours and HuggingFace transformers' GPT2LMHeadModel with
identical weights (fp32, eval mode)."""

import tempfile

import torch

from bench.common import CHAR_CKPT
from pcgpt.model.checkpoint import HF_TRANSPOSED, load_for_inference


def gpt2_pair(seed: int = 0, dtype=torch.float32):
    """GPT-2 124M shape with random weights: built as HF GPT2LMHeadModel, saved with
    save_pretrained and loaded into ours through the HF-GPT-2 loader, so the weights are the same;
    both then in `dtype` (ours as `pcgpt serve --dtype` loads it)."""
    import transformers
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours, tokenizer, _ = load_for_inference(d, dtype=dtype)  # as `pcgpt serve` loads it
    hf = hf.to(dtype).requires_grad_(False)
    return ours, hf, tokenizer


def char_pair():
    """The shipped char baseline and an HF GPT2LMHeadModel holding the same weights: exact GELU,
    zero biases where ours has none (bias=False), Conv1D weights transposed."""
    import transformers
    ours, tokenizer, _ = load_for_inference(CHAR_CKPT)  # as `pcgpt serve` loads it
    c = ours.config
    hf_config = transformers.GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                        n_layer=c.n_layer, n_head=c.n_head,
                                        activation_function="gelu" if c.gelu_approximate == "none" else "gelu_new",
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours_sd = ours.state_dict()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            if name in ours_sd:
                src = ours_sd[name]
                p.copy_(src.t() if name.endswith(HF_TRANSPOSED) else src)
            elif name.endswith(".bias"):
                p.zero_()  # ours has bias=False: a zero bias is the same function
            elif name.endswith(".attn.bias") or name.endswith("masked_bias"):
                pass  # causal-mask buffers of older transformers
            else:
                raise KeyError(f"no counterpart for HF parameter {name}")
    hf.requires_grad_(False)
    return ours, hf, tokenizer


def check_logits(ours, hf, vocab: int, seq: int = 16) -> float:
    """Max |ours − HF| over the logits of a random sequence (sanity: the same function)."""
    x = torch.randint(0, vocab, (2, seq))
    with torch.no_grad():
        return float((ours(x)[..., :vocab] - hf(x).logits[..., :vocab]).abs().max())


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step must read: every parameter once (the tied
    embedding once, as the output head), except the position table, of which one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weight counted once
    wpe = model.transformer.wpe.weight
    return total - wpe.numel() * wpe.element_size() + wpe.shape[1] * wpe.element_size()
