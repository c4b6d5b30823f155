"""Fake quantization, MMR, kurtosis and the layer-error decomposition (low_bit_and_qat.md checks 6, 7, 9)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_optim.monitors import (
    dequantize_groups,
    fake_quantize,
    fake_quantize_ste,
    kurtosis,
    layer_error_decomposition,
    mmr,
    quantize_groups,
)

W = torch.tensor([0.6, -1.0, 0.25, 0.1])


@pytest.mark.parametrize(
    "bits, fmt, codes, expected",
    [
        (8, "int", [76, -127, 32, 13], [0.5984252, -1.0, 0.2519685, 0.1023622]),
        (4, "int", [4, -7, 2, 1], [0.5714286, -1.0, 0.2857143, 0.1428571]),
        (8, "fp8", [256, -448, 112, 44], [0.5714286, -1.0, 0.25, 0.0982143]),
    ],
)
def test_fake_quantize_one_group(bits: int, fmt: str, codes: list[int], expected: list[float]) -> None:
    q = quantize_groups(W, bits, fmt)
    assert q.codes.float().tolist() == codes
    if fmt == "fp8":
        assert q.codes.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(W / q.scales, torch.tensor([268.8, -448.0, 112.0, 44.8]))
    w_hat = fake_quantize(W, bits, fmt)
    torch.testing.assert_close(w_hat, torch.tensor(expected), rtol=0, atol=5e-8)
    # ŵ = s·q in fp32 exactly
    assert torch.equal(w_hat, q.codes.float() * q.scales)
    # float64 input: computed in fp32, returned in float64
    assert fake_quantize(W.double(), bits, fmt).dtype == torch.float64


def test_round_half_even_and_zero_group() -> None:
    # int4, α = 7 gives s = 1: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0
    x = torch.tensor([7.0, 2.5, 3.5, -0.5])
    assert quantize_groups(x, 4, "int").codes.tolist() == [7, 2, 4, 0]
    for bits, fmt in ((8, "int"), (4, "int"), (8, "fp8")):
        zeros = fake_quantize(torch.zeros(3, 5), bits, fmt, group_size=2)
        assert torch.equal(zeros, torch.zeros(3, 5)) and not zeros.isnan().any()
    mixed = torch.tensor([[0.0, 0.0, 1.0, -0.5]])
    out = fake_quantize(mixed, 8, "int", 2)
    assert torch.equal(out[0, :2], torch.zeros(2)) and torch.equal(out[:, 2:], fake_quantize(mixed[:, 2:], 8, "int"))


def test_groups_of_two_have_their_own_scale() -> None:
    x = torch.tensor([[0.6, -1.0, 0.25, 0.1, 3.0], [1.0, 0.5, 0.0, 0.0, -2.0]])
    q = quantize_groups(x, 8, "int", group_size=2)
    assert q.scales.shape == (2, 3)  # ceil(5 / 2) groups per row, the last one of size 1
    expected = torch.cat([fake_quantize(x[:, i : i + 2], 8, "int") for i in range(0, 5, 2)], dim=1)
    assert torch.equal(fake_quantize(x, 8, "int", 2), expected)
    assert torch.equal(dequantize_groups(q), expected)
    torch.testing.assert_close(q.scales[0], torch.tensor([1.0, 0.25, 3.0]) / 127)
    # G >= in_features and None both mean per row
    assert torch.equal(fake_quantize(x, 4, "int", 5), fake_quantize(x, 4, "int", None))
    assert torch.equal(fake_quantize(x, 4, "int", 64), fake_quantize(x, 4, "int", None))
    # 3-D input: groups along the last dim of every row
    x3 = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(x3, 4, "int", 4), fake_quantize(x3.reshape(6, 10), 4, "int", 4).reshape(2, 3, 10))


def test_bf16_input_is_cast_back() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = fake_quantize(x, 8, "fp8", 4)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quantize(x.float(), 8, "fp8", 4).bfloat16())


@pytest.mark.parametrize("bits, fmt", [(8, "int"), (4, "int"), (8, "fp8")])
def test_ste_gradient_equals_upstream(bits: int, fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=gen, requires_grad=True)
    c = torch.randn(5, 7, generator=gen)
    w_hat = fake_quantize_ste(w, bits, fmt, group_size=3)
    assert torch.equal(w_hat, fake_quantize(w, bits, fmt, 3))  # the forward value is exactly ŵ
    (c * w_hat).sum().backward()
    assert torch.equal(w.grad, c)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"bits": 4, "fmt": "fp8"}, "bits"),
        ({"bits": 2, "fmt": "int"}, "bits"),
        ({"bits": 8, "fmt": "nf4"}, "fmt"),
        ({"bits": 8, "fmt": "int", "group_size": 0}, "group_size"),
        ({"bits": 8, "fmt": "int", "group_size": 1.5}, "group_size"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        fake_quantize(W, **kwargs)
    with pytest.raises(ValueError, match="Invalid reference"):
        mmr(W, reference="max")


def test_mmr_and_kurtosis() -> None:
    x = torch.tensor([1.0, -1.0, 2.0, -4.0])
    assert float(mmr(x)) == pytest.approx(2.0, abs=1e-7)
    assert float(mmr(x, "median")) == pytest.approx(4.0 / 1.5, abs=1e-6)  # median of an even count: mean of the middle two
    assert float(kurtosis(x)) == pytest.approx(1.7619048, abs=1e-6)
    g = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    assert abs(float(kurtosis(g)) - 3.0) < 0.03


def _additive_model() -> tuple[nn.Module, dict[tuple[int, ...], torch.Tensor]]:
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[1].weight.copy_(torch.tensor([[1.0, 1.0]]))
    shifts = {(2, 2): torch.tensor([[0.1, 0.0], [0.0, 0.0]]), (1, 2): torch.tensor([[0.5, 0.0]])}
    return model, {k: v.double() for k, v in shifts.items()}


def test_decomposition_with_additive_quantizer() -> None:
    model, shifts = _additive_model()
    before = [p.detach().clone() for p in model.parameters()]
    errors = layer_error_decomposition(
        model, torch.tensor([[1.0, 2.0]], dtype=torch.float64), lambda w: w + shifts[tuple(w.shape)]
    )
    expected = {"0": (0.0447214, 0.0, 0.0447214, 0.0), "1": (0.2166667, 0.0333333, 0.1666667, 0.0166667)}
    assert set(errors) == set(expected)
    for name, values in expected.items():
        assert [float(v) for v in errors[name]] == pytest.approx(values, abs=1e-7)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # weights restored


def test_decomposition_sums_to_the_output_error() -> None:
    """Random 3-layer MLP, 4-bit quantizer: the Linear closed forms A = (x~ - x)W^T, B = x(W~ - W)^T,
    C = (x~ - x)(W~ - W)^T sum to h~ - h (to 1e-6) and match the reported norms; modes are restored."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(32, 8)
    names = ["0", "3", "5"]
    errors = layer_error_decomposition(model, x, modules=names)  # default quantizer: 4-bit per row
    assert model.training and model[2].training

    quantized = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n in names:
            quantized.get_submodule(n).weight.copy_(fake_quantize(model.get_submodule(n).weight, 4, "int", None))
    clean, noisy = _io(model.eval(), x, names), _io(quantized, x, names)
    for n in names:
        w, w_q = model.get_submodule(n).weight.detach(), quantized.get_submodule(n).weight.detach()
        (x_c, h), (x_q, h_q) = clean[n], noisy[n]
        a, b, c = (x_q - x_c) @ w.T, x_c @ (w_q - w).T, (x_q - x_c) @ (w_q - w).T
        torch.testing.assert_close(a + b + c, h_q - h, rtol=0, atol=1e-6)
        norm = h.norm()
        for got, want in zip(errors[n], (h_q - h, a, b, c)):
            assert float(got) == pytest.approx(float(want.norm() / norm), rel=1e-4, abs=1e-6)
    assert float(errors["0"].A) == 0.0  # nothing arrives before the first layer
    assert all(float(errors[n].B) > 0 for n in names)


def test_modules_not_called_are_left_out() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj is used through its weight
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    errors = layer_error_decomposition(Attention(), torch.randn(2, 5, 8))
    assert list(errors) == ["head"]


def _io(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.update({n: (i[0], o)}))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen
