"""Fake quantization and quantization-sensitivity statistics (docs/low_bit_and_qat.md, C and D).

Pure torch. :func:`quantize_groups` / :func:`dequantize_groups` implement the symmetric round-to-nearest
weight formats of the QAT callback (int8, int4, fp8 e4m3, one scale per group of ``group_size`` entries
along the last dimension); :func:`fake_quantize` is their round trip and :func:`fake_quantize_ste` adds the
straight-through estimator. :func:`mmr`, :func:`kurtosis` and :func:`layer_error_decomposition` are the
outlier and layer-error statistics of Vlassis et al., "Beyond Outliers: A Study of Optimizers Under
Quantization", arXiv 2509.23500 (the A/B/C split of the layer error is our construction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_optim.monitors.modes import eval_mode

__all__ = [
    "LayerError",
    "QuantizedTensor",
    "check_quant_format",
    "quantize_groups",
    "dequantize_groups",
    "fake_quantize",
    "fake_quantize_ste",
    "mmr",
    "kurtosis",
    "linear_modules",
    "layer_error_decomposition",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
Format = Literal["int", "fp8"]


def check_quant_format(bits: int, fmt: str, group_size: int | None) -> None:
    """Raise ``ValueError`` naming the argument unless (bits, fmt, group_size) is a supported format."""
    if fmt not in ("int", "fp8"):
        raise ValueError(f"Invalid fmt: {fmt!r}; allowed values are 'int' and 'fp8'.")
    if isinstance(bits, bool) or bits not in (8, 4):
        raise ValueError(f"Invalid bits: {bits!r}; allowed values are 8 and 4.")
    if fmt == "fp8" and bits != 8:
        raise ValueError(f"Invalid bits: {bits!r}; fmt='fp8' requires bits=8.")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"Invalid group_size: {group_size!r}; must be None or an integer >= 1.")


class QuantizedTensor(NamedTuple):
    """Codes and per-group scales of a tensor quantized by :func:`quantize_groups`.

    ``codes`` has the tensor's shape: int8 integers in [-q_max, q_max] for ``fmt="int"`` (int4 codes are
    stored one per int8), ``torch.float8_e4m3fn`` values for ``fmt="fp8"``. ``scales`` (float32) has shape
    ``(*shape[:-1], ceil(shape[-1] / group_size))``; the value is ``codes * scale`` of its group.
    """

    codes: Tensor
    scales: Tensor
    group_size: int
    bits: int
    fmt: str

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_groups(self).to(dtype)


def _grouped(x: Tensor, group_size: int) -> Tensor:
    """``x`` (float32) as ``(rows, n_groups, group_size)``, the last group zero-padded (padding never changes
    a group's absmax)."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    pad = (-n) % group_size
    if pad:
        rows = nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, group_size)


def _group_size(x: Tensor, group_size: int | None) -> int:
    n = x.shape[-1] if x.dim() else 1
    return n if group_size is None or group_size >= n else group_size


@torch.no_grad()
def quantize_groups(x: Tensor, bits: int = 8, fmt: Format = "int", group_size: int | None = None) -> QuantizedTensor:
    r"""Symmetric round-to-nearest quantization in groups of ``group_size`` contiguous entries of the last dim.

    Per group, :math:`\alpha = \max|x|`. int, b bits: :math:`q_{max} = 2^{b-1} - 1`, :math:`s = \alpha/q_{max}`,
    :math:`q = \mathrm{clamp}(\mathrm{round\_half\_even}(x/s), -q_{max}, q_{max})`. fp8: :math:`s = \alpha/448`,
    :math:`q = \mathrm{float8\_e4m3fn}(x/s)` (round to nearest even). An all-zero group gets s = 0 and
    q = 0. ``group_size=None`` or ``>= shape[-1]``: one group per row; the last group may be shorter.
    Math in float32.
    """
    check_quant_format(bits, fmt, group_size)
    if x.dim() == 0:
        x = x.reshape(1)
    g = _group_size(x, group_size)
    n = x.shape[-1]
    groups = _grouped(x.detach().float(), g)
    alpha = groups.abs().amax(dim=-1, keepdim=True)
    q_max = float(2 ** (bits - 1) - 1) if fmt == "int" else FP8_MAX
    scale = alpha / q_max
    # a zero scale (all-zero group) divides by 1 instead: the entries are ~0, so q = 0 without NaN
    y = groups / torch.where(scale > 0, scale, torch.ones_like(scale))
    if fmt == "int":
        codes = y.round().clamp_(-q_max, q_max).to(torch.int8)  # torch.round rounds half to even
    else:
        codes = y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    codes = codes.reshape(codes.shape[0], -1)[:, :n].reshape(x.shape)
    return QuantizedTensor(codes, scale.reshape(*x.shape[:-1], -1), g, bits, fmt)


def dequantize_groups(q: QuantizedTensor) -> Tensor:
    """``codes * scale`` per group, in float32 (the inverse of :func:`quantize_groups` up to rounding)."""
    n = q.codes.shape[-1]
    values = _grouped(q.codes.float(), q.group_size) * q.scales.reshape(-1, q.scales.shape[-1], 1)
    return values.reshape(values.shape[0], -1)[:, :n].reshape(q.codes.shape)


@torch.no_grad()
def fake_quantize(x: Tensor, bits: int = 8, fmt: Format = "int", group_size: int | None = None) -> Tensor:
    """The quantize-dequantize round trip of :func:`quantize_groups`, cast back to ``x.dtype`` (no gradient).

    Example (one group): ``w = (0.6, -1.0, 0.25, 0.1)``: int8 gives ``(76, -127, 32, 13) / 127``, int4
    ``(4, -7, 2, 1) / 7``, fp8 ``(256, -448, 112, 44) / 448``.
    """
    if x.numel() == 0:
        check_quant_format(bits, fmt, group_size)
        return x.clone()
    return dequantize_groups(quantize_groups(x, bits, fmt, group_size)).reshape(x.shape).to(x.dtype)


def fake_quantize_ste(x: Tensor, bits: int = 8, fmt: Format = "int", group_size: int | None = None) -> Tensor:
    r""":func:`fake_quantize` with the straight-through estimator: :math:`x + (\hat x - x)` with the
    difference detached, so the forward value is :math:`\hat x` and :math:`\partial L/\partial x =
    \partial L/\partial \hat x`."""
    # (x̂ - x.detach()) equals (x̂ - x).detach() without recording the subtraction in the graph
    return x + (fake_quantize(x, bits, fmt, group_size) - x.detach())


def _stat_dtype(x: Tensor) -> Tensor:
    # Statistics of half-precision tensors in float32; float64 stays float64.
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).reshape(-1)


def mmr(x: Tensor, reference: Literal["mean", "median"] = "mean") -> Tensor:
    """Max-to-mean ratio ``max|x| / mean|x|`` (``reference="median"``: ``max|x| / median|x|``), 0-dim.

    Beyond Outliers (arXiv 2509.23500) defines MMR as max-to-mean in its abstract; a secondary source reads
    max-to-median, so both are offered. MMR(1, -1, 2, -4) = 2.
    """
    if reference not in ("mean", "median"):
        raise ValueError(f"Invalid reference: {reference!r}; allowed values are 'mean' and 'median'.")
    a = _stat_dtype(x).abs()
    if reference == "mean":
        return a.amax() / a.mean()
    # the median of an even count is the mean of the two middle values (torch.median returns the lower)
    n = a.numel()
    median = (a.kthvalue((n + 1) // 2).values + a.kthvalue(n // 2 + 1).values) / 2
    return a.amax() / median


def kurtosis(x: Tensor) -> Tensor:
    """Pearson kurtosis ``mean((x - mu)^4) / mean((x - mu)^2)^2`` over all entries (not excess: Gaussian ~ 3)."""
    v = _stat_dtype(x)
    d2 = (v - v.mean()).square()
    return d2.square().mean() / d2.mean().square()


class LayerError(NamedTuple):
    """Relative output error of one module under weight quantization and its split (0-dim tensors).

    ``R = ||h~ - h|| / ||h||``; ``A``, ``B``, ``C`` are ``||A||, ||B||, ||C||`` over ``||h||`` with
    ``A = f(x~) - f(x)`` (error arriving from earlier layers), ``B = f~(x) - f(x)`` (the layer's own
    quantization error) and ``C = h~ - h - A - B`` (their interaction); Frobenius norms over the batch.
    """

    R: Tensor
    A: Tensor
    B: Tensor
    C: Tensor


def linear_modules(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by qualified name, except names starting with a prefix in ``exclude``."""
    prefixes = tuple(exclude)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not (prefixes and name.startswith(prefixes))
    }


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _capture(model: nn.Module, inputs: Any, targets: dict[str, nn.Module]) -> dict[str, tuple[Tensor, Tensor]]:
    """One forward of ``model``; the first input and the output of each target's first call."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            seen.setdefault(name, (args[0].detach(), output.detach()))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in targets.items()]
    try:
        _call(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def _decompose(
    model: nn.Module,
    inputs: Any,
    quantize_weight: Callable[[Tensor], Tensor],
    targets: dict[str, nn.Module],
) -> tuple[dict[str, LayerError], dict[str, Tensor]]:
    """:func:`layer_error_decomposition` plus the clean input of each target (for activation statistics)."""
    with eval_mode(model):  # no dropout: both passes must see the same function
        clean = _capture(model, inputs, targets)
        # modules the forward does not call (e.g. MultiheadAttention's out_proj, used through its weight)
        # have no input to measure: left out
        targets = {name: m for name, m in targets.items() if name in clean}
        saved = {name: m.weight.detach().clone() for name, m in targets.items()}
        try:
            for m in targets.values():
                m.weight.copy_(quantize_weight(m.weight.detach()))
            quant = _capture(model, inputs, targets)
            own = {name: m(clean[name][0]) for name, m in targets.items()}  # f~(x)
        finally:  # the weights are always restored, bit for bit, in their own storage
            for name, m in targets.items():
                m.weight.copy_(saved[name])
        incoming = {name: m(quant[name][0]) for name, m in targets.items()}  # f(x~)
    errors = {}
    for name in targets:
        h, h_q = (_stat_dtype(t) for t in (clean[name][1], quant[name][1]))
        a = _stat_dtype(incoming[name]) - h
        b = _stat_dtype(own[name]) - h
        c = h_q - h - a - b
        norm = torch.linalg.vector_norm(h)
        errors[name] = LayerError(*(torch.linalg.vector_norm(t) / norm for t in (h_q - h, a, b, c)))
    return errors, {name: clean[name][0] for name in targets}


def layer_error_decomposition(
    model: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    quantize_weight: Callable[[Tensor], Tensor] | None = None,
    modules: Iterable[str] | None = None,
) -> dict[str, LayerError]:
    r"""Relative output error of each target module when every target's weight is quantized, split in three.

    Pass 1 runs ``model(inputs)`` (``model(*inputs)`` for a tuple/list) with forward hooks recording each
    target's input x and output h; pass 2 does the same with every target weight replaced by
    ``quantize_weight(W)`` (temporarily, under ``no_grad``; always restored), recording x~, h~. With f the
    module at clean and f~ at quantized weights: ``A = f(x~) - f(x)``, ``B = f~(x) - f(x)``,
    ``C = h~ - h - A - B``; for a Linear ``A = (x~ - x)W^T``, ``B = x(W~ - W)^T``, ``C = (x~ - x)(W~ - W)^T``.
    Returns :class:`LayerError` ``(R, A, B, C)`` relative to ``||h||`` per module name.

    ``quantize_weight`` defaults to 4-bit symmetric per-row round-to-nearest (the PTQ setting of Beyond
    Outliers, arXiv 2509.23500); ``modules`` (qualified names) defaults to every ``nn.Linear``. The model
    runs in eval mode (restored afterwards); a module called several times is measured at its first call,
    one the forward never calls is left out of the result.
    Cost: about 4 forwards of ``inputs``.
    """
    if quantize_weight is None:
        def quantize_weight(w: Tensor) -> Tensor:
            return fake_quantize(w, bits=4, fmt="int", group_size=None)
    if modules is None:
        targets: dict[str, nn.Module] = dict(linear_modules(model))
    else:
        targets = {name: model.get_submodule(name) for name in modules}
    for name, module in targets.items():
        if not isinstance(getattr(module, "weight", None), Tensor):
            raise ValueError(f"module {name!r} has no weight tensor to quantize")
    return _decompose(model, inputs, quantize_weight, targets)[0]
