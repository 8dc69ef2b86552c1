"""Quantized weights, applied at load as a module swap (gpt-fast's quantize.py pattern), with
torchao's quantized tensors and their ATen kernels.

  int8  weight-only, per output channel (symmetric int8, one fp32 scale per row): torchao's
        Int8Tensor; on CPU, calls of up to INT8PACK_MAX_ROWS rows take ATen's _weight_int8pack_mm.
  int8-dynamic  the same int8 weights (and checkpoint parts), activations quantized per call:
        on CPU FBGEMM's linear_dynamic (VNNI), on CUDA torchao's Int8DynamicActivationInt8Weight.
  int4  weight-only, group-wise (asymmetric 4-bit, a scale and a zero point per `group_size`
        inputs of a row): on CPU torchao's Int4OpaqueTensor, the layout ATen's
        _weight_int4pack_mm_for_cpu reads (group sizes 32, 64, 128); on CUDA torchao's
        Int4WeightOnlyConfig in its tile-packed layout (tinygemm; bf16 weights).

What is quantized: every nn.Linear of the blocks (attention and MLP projections; a PC model's
generators too) and the output head. GPT-2 ties the head to the token embedding; the head is
read whole every step (at GPT-2's shape a third of the weight bytes), the embedding a few rows,
so the tie is broken: the head holds the quantized copy and the embedding keeps the float table.
A Linear whose input width the group size does not divide stays float (`quantize` counts them).

QuantizedLinear keeps nn.Linear's interface (in/out features, weight, bias, state_dict names);
a call that builds a graph through its input (PC settling differentiates the energy with
respect to the states) takes F.linear over the dequantized weight, because the quantized
kernels have no backward. The model files know nothing of this; load_for_inference applies it.
"""

import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEMES = ("int8", "int8-dynamic", "int4")
INT4_GROUP_SIZES = (32, 64, 128)  # what _weight_int4pack_mm_for_cpu (and tinygemm on CUDA) take
DEFAULT_GROUP_SIZE = 32
# int8 on CPU: up to this many rows a call takes ATen's _weight_int8pack_mm, beyond it torchao's
# path (bench/quant_kernels.py measures both per rows)
INT8PACK_MAX_ROWS = 1


@dataclasses.dataclass(frozen=True)
class Quantization:
    """A weight format: scheme 'int8' or 'int4' (group_size: inputs per int4 scale)."""

    scheme: str
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"--quantize must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"--group-size for int4 must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                             f"got {self.group_size}")

    @property
    def name(self) -> str:
        return f"int4-g{self.group_size}" if self.scheme == "int4" else self.scheme

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, **({"group_size": self.group_size} if self.scheme == "int4" else {})}

    @classmethod
    def parse(cls, scheme: str | None, group_size: int | None = None) -> "Quantization | None":
        """From the command line's --quantize / --group-size (None: no quantization)."""
        if scheme in (None, "", "none"):
            if group_size is not None:
                raise ValueError("--group-size needs --quantize int4")
            return None
        if scheme != "int4" and group_size is not None:
            raise ValueError("--group-size applies to --quantize int4 only (int8 is per channel)")
        return cls(scheme, DEFAULT_GROUP_SIZE if group_size is None else group_size)


def _silence_torchao_import():
    """torchao's import logs that its CUDA-only extensions do not load on a CPU build, and warns
    about an enum torch now handles itself: noise on every CPU run."""
    import logging
    import warnings
    logging.getLogger("torchao").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            import torchao  # noqa: F401
            import torchao.quantization  # noqa: F401
            import torchao.prototype.quantization.int4  # noqa: F401
        finally:
            logging.disable(saved)


def quantize_parts(weight: torch.Tensor, quantization: Quantization) -> dict[str, torch.Tensor]:
    """The portable parts of `weight` (out, in) in this format, chosen by torchao's primitives;
    what a quantized checkpoint stores under the weight's name (`<name>.<part>`):
      int8  qdata int8 (out, in), scale fp32 (out, 1):            w = qdata * scale
      int4  qdata uint8 (out, in/2), two 4-bit values a byte, the even column in the low nibble;
            scale and zero fp32 (out, in/group_size):             w = (q - 8) * scale + zero
            (tinygemm's convention: the zero point is a float)"""
    _silence_torchao_import()
    w = weight.detach().float()
    if quantization.scheme in ("int8", "int8-dynamic"):
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow
        t = Int8Tensor.from_hp(w, PerRow())
        return {"qdata": t.qdata, "scale": t.scale.float().reshape(-1, 1)}
    from torchao.quantization.quant_primitives import (MappingType, _choose_qparams_affine_tinygemm,
                                                       _quantize_affine_tinygemm)
    block = [1, quantization.group_size]
    scale, zero = _choose_qparams_affine_tinygemm(w, MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6,
                                                  None, torch.float32)
    q = _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15).to(torch.uint8)
    return {"qdata": q[:, 0::2] | (q[:, 1::2] << 4),
            "scale": scale.reshape(w.shape[0], -1), "zero": zero.reshape(w.shape[0], -1)}


def part_shapes(out_features: int, in_features: int, quantization: Quantization) -> dict[str, tuple]:
    """The shapes quantize_parts gives for a weight (out, in)."""
    if quantization.scheme != "int4":
        return {"qdata": (out_features, in_features), "scale": (out_features, 1)}
    groups = in_features // quantization.group_size
    return {"qdata": (out_features, in_features // 2), "scale": (out_features, groups),
            "zero": (out_features, groups)}


def dequantize_parts(parts: dict, quantization: Quantization, dtype=torch.float32) -> torch.Tensor:
    if quantization.scheme != "int4":
        return (parts["qdata"].to(torch.float32) * parts["scale"]).to(dtype)
    q = _unpack_int4(parts["qdata"]).to(torch.float32)
    g = quantization.group_size
    scale = parts["scale"].repeat_interleave(g, dim=1)
    zero = parts["zero"].repeat_interleave(g, dim=1)
    return ((q - 8) * scale + zero).to(dtype)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def kernel_weight(parts: dict, quantization: Quantization, dtype: torch.dtype, device) -> torch.Tensor:
    """The torchao tensor F.linear dispatches to the quantized kernel, built from the parts."""
    _silence_torchao_import()
    parts = {k: v.to(device) for k, v in parts.items()}
    if quantization.scheme == "int8-dynamic":
        return _int8_dynamic_weight(parts, dtype, device)
    if quantization.scheme == "int8":
        from torchao.quantization import Int8Tensor
        qdata = parts["qdata"]
        return Int8Tensor(qdata, parts["scale"].to(torch.float32), [1, qdata.shape[1]], dtype)
    if torch.device(device).type != "cpu":
        # untested here (no GPU on the development machine): torchao's CUDA int4 (tinygemm, bf16)
        # has its own packing, made from the dequantized weight (the same groups: near-lossless)
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        holder = nn.Linear(1, 1, bias=False, device=device)
        holder.weight = nn.Parameter(dequantize_parts(parts, quantization, torch.bfloat16), requires_grad=False)
        quantize_(holder, Int4WeightOnlyConfig(group_size=quantization.group_size,
                                                int4_packing_format="tile_packed_to_4d", set_inductor_config=False))
        return holder.weight.data
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros
    q = _unpack_int4(parts["qdata"]).to(torch.int32)
    scale, zero = parts["scale"].to(dtype), parts["zero"].to(dtype)
    out_features = q.shape[0]
    pad = -out_features % 16  # the CPU packing takes rows in sixteens; the kernel's output is cut back
    if pad:
        q = F.pad(q, (0, 0, 0, pad), value=8)
        scale, zero = F.pad(scale, (0, 0, 0, pad)), F.pad(zero, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale, zero, dtype)
    return Int4OpaqueTensor(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, quantization.group_size],
                            shape=torch.Size([out_features, q.shape[1]]))


def _int8_dynamic_weight(parts: dict, dtype, device) -> torch.Tensor:
    """int8 weights x int8 activations quantized per call. On CUDA torchao's
    Int8DynamicActivationInt8WeightConfig tensor (untested here: no GPU). On CPU the int8
    weight-only tensor (what the graph-building path and the dtype checks see), and
    QuantizedLinear packs the same int8 weights for FBGEMM (_fbgemm): its VNNI kernel is the eager
    int8 x int8 matmul x86 has; torchao's eager CPU path for this config goes through
    torch._int_mm, slower than fp32 on the development machine (BENCHMARKS.md)."""
    from torchao.quantization import Int8Tensor
    qdata = parts["qdata"]
    if torch.device(device).type != "cpu":
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs
        return Int8Tensor(qdata, parts["scale"].float(), [1, qdata.shape[1]], dtype,
                          act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow()))
    return Int8Tensor(qdata, parts["scale"].float(), [1, qdata.shape[1]], dtype)


@functools.cache
def cpu_has_vnni() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def fbgemm_pack(parts: dict, bias: torch.Tensor | None):
    import warnings
    scale = parts["scale"].reshape(-1).double()
    with warnings.catch_warnings():  # torch marks its quantized dtypes deprecated; FBGEMM's packing takes them
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(parts["qdata"], scale,
                                                          torch.zeros_like(scale, dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(weight, None if bias is None else bias.float())


def quantizable(linear: nn.Linear, quantization: Quantization) -> bool:
    return quantization.scheme != "int4" or linear.in_features % quantization.group_size == 0


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose weight is a torchao quantized tensor (see the module docstring). It
    keeps the portable parts beside it (`parts`: what a quantized checkpoint stores, and what the
    graph-building path dequantizes); for int8 the kernel tensor shares them."""

    @classmethod
    def wrap(cls, linear: nn.Linear, quantization: Quantization, parts: dict | None = None,
             dtype: torch.dtype | None = None) -> "QuantizedLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.quantization = quantization
        device = linear.weight.device
        dtype = dtype or linear.weight.dtype
        parts = quantize_parts(linear.weight, quantization) if parts is None else parts
        module.weight = nn.Parameter(kernel_weight(parts, quantization, dtype, device), requires_grad=False)
        module.bias = linear.bias
        if quantization.scheme != "int4":
            parts = {"qdata": module.weight.qdata, "scale": module.weight.scale}
        if quantization.scheme == "int8-dynamic" and torch.device(device).type == "cpu":
            module.packed = fbgemm_pack(parts, linear.bias)  # a second int8 copy, in FBGEMM's layout
        module.parts = {k: v.to(device) for k, v in parts.items()}
        return module

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, dequantize_parts(self.parts, self.quantization, x.dtype), self.bias)
        if hasattr(self, "packed"):
            return self._fbgemm(x)
        if self.quantization.scheme == "int8" and x.device.type == "cpu" and x.numel() <= INT8PACK_MAX_ROWS * x.shape[-1]:
            return self._int8pack(x)
        return F.linear(x, self.weight, self.bias)

    def _fbgemm(self, x):
        # activations quantized per call, per tensor: 8 bits where the CPU has VNNI (its int8 dot
        # products accumulate in 32 bits), 7 elsewhere (AVX2's 16-bit pair sums could saturate)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float().contiguous(), self.packed,
                                               not cpu_has_vnni())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _int8pack(self, x):
        """ATen's int8 x float kernel: it reads the int8 weight once, where torchao's CPU path
        converts the whole weight to the activation dtype first; per shape, it pays for few rows."""
        scale = self.parts["scale"].view(-1)
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.parts["qdata"],
                                      scale if scale.dtype == x.dtype else scale.to(x.dtype))
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantization={self.quantization.name}"


@torch.no_grad()
def quantize(model: nn.Module, quantization: Quantization, keep_float: tuple[str, ...] = ()) -> dict:
    """Swaps the model's nn.Linear modules (blocks and head) for QuantizedLinear, in place, but
    those named in keep_float (e.g. 'lm_head', for measuring what the head's quantization costs).
    Returns counts: {'quantized': n, 'kept_float': m}."""
    quantized = kept = 0
    names = {m: n for n, m in model.named_modules()}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                if quantizable(child, quantization) and names[child] not in keep_float:
                    setattr(parent, name, QuantizedLinear.wrap(child, quantization))
                    quantized += 1
                else:
                    kept += 1
    model.quantization = quantization
    return {"quantized": quantized, "kept_float": kept}


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: quantized tensors by their parts (data, scales, zero
    points), shared Parameters once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p.data)
    return total


def tensor_bytes(t: torch.Tensor) -> int:
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    parts = list(names) + [n for n in getattr(t, "optional_tensor_data_names", []) if getattr(t, n, None) is not None]
    return sum(tensor_bytes(getattr(t, n)) for n in parts)


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a quantized checkpoint stores: the float tensors of the state_dict (at fp32) and,
    for each QuantizedLinear, its parts under `<name>.weight.<part>`."""
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    state = {}
    for name, module in model.named_modules():
        if name in quantized:
            for part, t in module.parts.items():
                state[f"{name}.weight.{part}"] = t.detach().cpu().contiguous()
    for key, t in model.state_dict().items():
        if key.removesuffix(".weight") in quantized and key.endswith(".weight"):
            continue
        state[key] = t.detach().to("cpu", torch.float32).contiguous()
    return state


def expected_quantized_state(model: nn.Module, quantization: Quantization) -> dict[str, torch.Tensor]:
    """Names and shapes (meta tensors) a quantized checkpoint of this float model holds."""
    expected = {}
    quantized = set()
    for name, module in model.named_modules():
        if type(module) is nn.Linear and quantizable(module, quantization):
            quantized.add(name)
            for part, shape in part_shapes(module.out_features, module.in_features, quantization).items():
                expected[f"{name}.weight.{part}"] = torch.empty(shape, device="meta")
    for key, t in model.state_dict().items():
        if not (key.endswith(".weight") and key.removesuffix(".weight") in quantized):
            expected[key] = t
    return expected


@torch.no_grad()
def load_quantized_state(model: nn.Module, state: dict, quantization: Quantization, device, dtype) -> None:
    """Fills a float model (on `device`, in `dtype`) from quantized_state's tensors: the float
    ones copied, each quantized Linear swapped for a QuantizedLinear built from its parts (packed
    for the kernel, not quantized again)."""
    quantized = {}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear and quantizable(child, quantization):
                quantized[child] = (parent, name)
    prefix = {m: n for n, m in model.named_modules()}
    for child, (parent, name) in quantized.items():
        key = prefix[child] + ".weight."
        parts = {k.removeprefix(key): v for k, v in state.items() if k.startswith(key)}
        child.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)  # unties, frees
        setattr(parent, name, QuantizedLinear.wrap(child, quantization, parts=parts, dtype=dtype))
    floats = {k: v for k, v in state.items() if not any(k.startswith(prefix[c] + ".weight.") for c in quantized)}
    missing, unexpected = model.load_state_dict(floats, strict=False)
    leftover = [k for k in missing if k.removesuffix(".weight") not in {prefix[c] for c in quantized}]
    if leftover or unexpected:
        raise ValueError(f"quantized state: missing {leftover[:5]}, unexpected {unexpected[:5]}")
    model.quantization = quantization


def served_weight_bytes(model: nn.Module, quantization: Quantization | None, dtype=torch.float32) -> int:
    """Bytes of weights a model holds when served in `dtype`, from shapes alone (a meta model
    works): float tensors at dtype, tied ones once; quantized weights by their parts."""
    size = torch.tensor([], dtype=dtype).element_size()
    if quantization is None:
        unique = {id(p): p for p in model.parameters()}.values()
        return sum(p.numel() * size for p in unique)
    total = 0
    for key, t in expected_quantized_state(model, quantization).items():
        part = key.rsplit(".", 1)[-1]
        if key.endswith((".weight.qdata", ".weight.scale", ".weight.zero")):
            total += t.numel() * (1 if part == "qdata" else 4)
        else:
            total += t.numel() * size
    return total
