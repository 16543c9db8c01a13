"""Maths of attention transfer (``at``): a value by hand, the normalisation's scale invariance, zero for
identical maps, and values and gradients against a float64 reference written from the equation
(Zagoruyko & Komodakis, ICLR 2017; szagoruyko/attention-transfer ``utils.at_loss``, β = 1000)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdcli.methods as methods
from kdcli.errors import ConfigError, MethodError
from kdcli.models.taps import ModelOutput, TapInfo


def infos(**channels: int) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, 2 ** int(n[1]) if n[0] == "p" else 32) for n, c in channels.items()}


def build(task: str = "segmentation", s: dict | None = None, t: dict | None = None, **sets: object):
    s = s or infos(c5=3)
    return methods.build("at", s, t or s, task, dict(sets)).double()


def reference(fs: Tensor, ft: Tensor, beta: float = 1000.0) -> Tensor:
    """The equation, spelled out: Q = Σ_c F² / C per position, q̂ = Q / sqrt(Σ_hw Q²) per image,
    L = β · Σ_{n,hw} (q̂_S − q̂_T)² / (N·H·W); the student's Q resized to the teacher's H×W first."""
    n, h, w = ft.shape[0], ft.shape[2], ft.shape[3]
    q_s = (fs * fs).sum(1, keepdim=True) / fs.shape[1]
    q_t = (ft * ft).sum(1, keepdim=True) / ft.shape[1]
    if q_s.shape[-2:] != q_t.shape[-2:]:
        q_s = F.interpolate(q_s, size=(h, w), mode="bilinear", align_corners=False)
    q_s, q_t = q_s.reshape(n, -1), q_t.reshape(n, -1)
    q_s = q_s / (q_s * q_s).sum(1, keepdim=True).sqrt()
    q_t = q_t / (q_t * q_t).sum(1, keepdim=True).sqrt()
    return beta * ((q_s - q_t) ** 2).sum() / (n * h * w)


def test_hand_computed_value() -> None:
    # teacher: Q_T = [1, 0] → q̂_T = [1, 0]; student (3 channels, no adapter needed): Q_S = [1, 1] →
    # q̂_S = [1/√2, 1/√2]; Σ (q̂_S − q̂_T)² = (1 − 1/√2)² + 1/2 = 2 − √2, mean over N·H·W = 2 positions
    ft = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    fs = torch.zeros(1, 3, 1, 2, dtype=torch.float64)
    fs[0, 0, 0, 0] = math.sqrt(3.0)
    fs[0, 1, 0, 1] = -math.sqrt(3.0)  # the sign does not matter: |F|^p
    m = build(s=infos(c5=3), t=infos(c5=2))
    got = m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft}))
    assert set(got) == {"at.c5"}
    assert got["at.c5"].item() == pytest.approx(1000.0 * (2.0 - math.sqrt(2.0)) / 2.0, rel=1e-12)


def test_invariant_to_a_positive_scale_of_either_map() -> None:
    g = torch.Generator().manual_seed(0)
    fs = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    m = build(s=infos(c5=3), t=infos(c5=4))

    def loss(a: Tensor, b: Tensor) -> float:
        return m(ModelOutput(taps={"c5": a}), ModelOutput(taps={"c5": b}))["at.c5"].item()

    base = loss(fs, ft)
    assert base > 1.0  # not trivially 0
    for k in (1e-3, 7.0, 1e4):
        assert loss(k * fs, ft) == pytest.approx(base, rel=1e-12)
        assert loss(fs, k * ft) == pytest.approx(base, rel=1e-12)
    # a scale per image is removed too (q̂ is normalised per image), a scale per position is not
    per_image = torch.tensor([0.5, 20.0], dtype=torch.float64).view(2, 1, 1, 1)
    assert loss(per_image * fs, ft) == pytest.approx(base, rel=1e-12)
    ramp = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).view(1, 1, 1, 6)
    assert loss(ramp * fs, ft) != pytest.approx(base, rel=1e-6)


def test_identical_maps_give_zero() -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = build()(ModelOutput(taps={"c5": x}), ModelOutput(taps={"c5": x.clone()}))["at.c5"]
    assert got.item() == 0.0


@pytest.mark.parametrize("student_hw", [(6, 8), (3, 4), (12, 16)])
def test_value_and_gradient_match_a_float64_reference(student_hw: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    taps = {"p3": (4, 5), "p4": (6, 8)}  # two taps: the loss of each is its own term
    s, t = infos(p3=3, p4=3), infos(p3=5, p4=5)
    m = methods.build("at", s, t, "detection", {"taps": "p3,p4"}).double()
    fs = {k: torch.randn(2, 3, *(student_hw if k == "p4" else hw), generator=g, dtype=torch.float64,
                         requires_grad=True) for k, hw in taps.items()}
    ft = {k: torch.randn(2, 5, *hw, generator=g, dtype=torch.float64, requires_grad=True) for k, hw in taps.items()}
    got = m(ModelOutput(taps=fs), ModelOutput(taps=ft))
    assert list(got) == ["at.p3", "at.p4"]
    for k in taps:
        want = reference(fs[k], ft[k].detach())
        assert got[f"at.{k}"].item() == pytest.approx(want.item(), rel=1e-12)
        (g_got,) = torch.autograd.grad(got[f"at.{k}"], fs[k], retain_graph=True)
        (g_want,) = torch.autograd.grad(want, fs[k])
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)
        assert g_got.abs().max() > 0
    sum(got.values()).backward()
    assert all(x.grad is None for x in ft.values())  # the teacher is detached


def test_presets_options_and_bad_input() -> None:
    cls = methods.get("at")  # found by auto-discovery
    assert cls.presets["detection"]["weight"] == 1000.0 and cls.presets["segmentation"]["taps"] == "c5"
    m = build(weight="10", p="4").methods["at"]
    assert m.weight == 10.0 and m.cfg.p == 4 and m.hp["p"] == 4
    with pytest.raises(ConfigError, match=r"--set p: .*>= 1"):
        build(p="0")
    with pytest.raises(ConfigError, match=r"--set wieght: 'at' has no such option \(did you mean weight\?"):
        build(wieght="3")
    with pytest.raises(MethodError, match="N, C, H, W"):
        build()(ModelOutput(taps={"c5": torch.randn(2, 3, 4)}), ModelOutput(taps={"c5": torch.randn(2, 3, 4)}))
    assert build().methods["at"].degenerate("c5", (1, 1)) and build().methods["at"].degenerate("c5", (2, 1)) is None
