"""CPU weight formats, applied at load as module swaps (gpt-fast's quantize.py pattern).

Each format replaces modules of a model built by gpt.py / pc.py with subclasses that compute the
same function from the same Parameters (names, shapes, values, state_dict and the wte / lm_head
tie unchanged) in a form a CPU kernel reads faster. The model files know nothing of them; serving
applies them through `to_inference_format` (checkpoint.load_for_inference). Training keeps the
plain modules.
"""

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcgpt.model.hugepages import empty_on_huge_pages


class RowsLinear(nn.Linear):
    """An fp32 nn.Linear whose weight is stored [in, out] (a transposed view of a contiguous
    [in, out] copy; the Parameter and its [out, in] shape are unchanged), on transparent huge
    pages where Linux offers them (hugepages.py): the layout BLAS streams fastest for the few rows
    of a decode step (HF's Conv1D keeps GPT-2 so), with fewer TLB misses over a weight stream that
    is read end to end every step. F.linear takes the transposed view as it is."""

    @classmethod
    def wrap(cls, linear: nn.Linear, huge_pages: bool = True) -> "RowsLinear":
        module = _same_parameters(cls, linear)
        with torch.no_grad():
            weight = linear.weight.data
            shape = (weight.shape[1], weight.shape[0])
            stored = empty_on_huge_pages(shape, weight.dtype) if huge_pages else torch.empty(shape, dtype=weight.dtype)
            module.weight.data = stored.copy_(weight.t()).t()
        return module


def onednn_bf16_available() -> bool:
    """oneDNN with native bf16 on this CPU (AVX512-BF16 or AMX): where prepacked bf16 pays."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PrepackedLinear(nn.Linear):
    """An nn.Linear for CPU inference: the same weight and bias Parameters plus a copy of the
    weight prepacked in oneDNN's blocked layout, which its kernels (AMX / AVX512-BF16 for bf16,
    AVX512 / AVX2 for fp32) read at close to memory speed on every thread, where ATen's fp32 GEMM
    with a few rows streams a large weight on one (the copy costs the weight's bytes again;
    extra_weight_bytes counts it). Calls that build a graph through the input (PC settling
    differentiates through the blocks) take F.linear: the prepacked kernel has no backward."""

    # the batch size oneDNN packs for: any batch runs on either packing; these ran fastest over
    # batches 1-16 of a decode step (bf16 does not care)
    BATCH_HINT = {torch.float32: 16, torch.bfloat16: 1}

    @classmethod
    def wrap(cls, linear: nn.Linear) -> "PrepackedLinear":
        module = _same_parameters(cls, linear)
        weight = linear.weight.detach().contiguous()
        module.packed = torch.ops.mkldnn._reorder_linear_weight(weight, cls.BATCH_HINT.get(weight.dtype, 1))
        module.extra_weight_bytes = linear.weight.numel() * linear.weight.element_size()
        return module

    def forward(self, x):
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# Below this size a weight stays in cache between steps and oneDNN's per-call set-up costs more
# than the stream it speeds up (the char models' Linears); above it, prepacked fp32 pays.
PREPACK_MIN_BYTES = 1 << 20


def fp32_by_size(linear: nn.Linear) -> nn.Linear:
    """The fp32 format of one Linear, chosen by its weight's size: prepacked for oneDNN where the
    weight is large and oneDNN is there, stored [in, out] (RowsLinear) otherwise."""
    if torch.backends.mkldnn.is_available() and linear.weight.nbytes >= PREPACK_MIN_BYTES:
        return PrepackedLinear.wrap(linear)
    return RowsLinear.wrap(linear)


def _same_parameters(cls, linear: nn.Linear):
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.in_features, module.out_features = linear.in_features, linear.out_features
    module.weight, module.bias = linear.weight, linear.bias
    return module


def swap_modules(model: nn.Module, kind: type, make) -> int:
    """Replaces every child of exactly type `kind` by make(child); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is kind:
                setattr(parent, name, make(child))
                n += 1
    return n


def default_formats(model: nn.Module) -> tuple[str, ...]:
    """The formats that pay for this model's device and dtype (BENCHMARKS.md)."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return ()
    if weight.dtype == torch.float32:
        return ("fp32_by_size",)
    if weight.dtype == torch.bfloat16 and onednn_bf16_available():
        return ("prepacked",)
    return ()


FORMATS = {
    "rows": (nn.Linear, RowsLinear.wrap),
    "rows_plain": (nn.Linear, lambda m: RowsLinear.wrap(m, huge_pages=False)),
    "prepacked": (nn.Linear, PrepackedLinear.wrap),
    "fp32_by_size": (nn.Linear, fp32_by_size),
}


def inference_kernels(weight: torch.Tensor):
    """The context an inference step of a model with this weight runs in: for fp32 on a CPU, the
    ops PyTorch would hand to oneDNN (exact GELU and its backward among them) run on ATen's own
    kernels, because at a decode step's sizes oneDNN's per-call set-up costs more than the
    arithmetic. bf16 keeps oneDNN: its graph-building calls (PC settling) take F.linear, which has
    no fast bf16 kernel without it. The switch is process-wide while the context lasts, so callers
    hold it for one step, not for a whole run: other models in the process (HF's in the
    benchmarks) keep PyTorch's defaults between steps."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return contextlib.nullcontext()
    return _onednn_dispatch_off()


@contextlib.contextmanager
def _onednn_dispatch_off():
    # torch.backends.mkldnn.flags() would also reset oneDNN's TF32 and determinism settings
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def plain_view(module: nn.Module) -> nn.Module:
    """A second module tree over the same Parameters and buffers in which every weight format is
    a plain nn.Linear again (what torch.compile's own kernels start from); `module` is unchanged."""
    if isinstance(module, nn.Linear) and type(module) is not nn.Linear:
        return _same_parameters(nn.Linear, module)
    view = copy.copy(module)
    view._modules = {name: None if child is None else plain_view(child) for name, child in module._modules.items()}
    return view


@torch.no_grad()
def to_inference_format(model: nn.Module, formats: tuple[str, ...] | None = None) -> nn.Module:
    """Applies `formats` (default: default_formats(model)) in place; returns the model."""
    for name in default_formats(model) if formats is None else formats:
        kind, make = FORMATS[name]
        swap_modules(model, kind, make)
    return model
