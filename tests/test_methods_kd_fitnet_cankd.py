"""Maths of the kd, fitnet and cankd methods (the registry: tests/test_methods_registry.py).

References are computed by hand here (explicit formulas, torch.nn.functional ops), never with the
modules under test. Exact-value checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import infos, make, one, out  # tests/ is on sys.path (pytest prepends it)
from torch import Tensor

from kdcli.errors import MethodError
from kdcli.methods.cankd import CanKD, nonlocal_aggregate
from kdcli.methods.fitnet import FitNet
from kdcli.methods.kd import KD

# KL(Bern(0.75) ‖ Bern(0.5)) = KL([0.75, 0.25] ‖ [0.5, 0.5]), by hand
KL_34_12 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


def in_by_hand(x: Tensor, eps: float = 1e-5) -> Tensor:
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


# --------------------------------------------------------------------------------- kd
def seg_kd(**overrides: object) -> KD:
    return make(KD, "segmentation", infos(seg_logits=2), infos(seg_logits=2), **overrides).double()


def test_kd_identical_logits_is_zero() -> None:
    z = torch.randn(2, 5, 6, 6, dtype=torch.float64) * 5
    m = make(KD, "segmentation", infos(seg_logits=5), infos(seg_logits=5), tau=3.0)
    assert one(m(out(seg_logits=z), out(seg_logits=z.clone()))).abs().item() < 1e-12
    zd = torch.randn(2, 7, 3, dtype=torch.float64) * 5
    md = make(KD, "detection", infos(cls_logits=3), infos(cls_logits=3), tau=2.0)
    assert one(md(out(cls_logits=zd), out(cls_logits=zd.clone()))).abs().item() < 1e-12


def test_kd_softmax_known_value() -> None:
    # one pixel, two classes: p_t = softmax([ln 3, 0]) = [0.75, 0.25], p_s = [0.5, 0.5]
    s = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    loss = one(seg_kd()(out(seg_logits=s), out(seg_logits=t)))
    assert loss.item() == pytest.approx(KL_34_12, rel=1e-12)
    assert one(seg_kd(weight=3.0)(out(seg_logits=s), out(seg_logits=t))).item() == pytest.approx(
        3 * KL_34_12, rel=1e-12
    )


def test_kd_tau_squared_scaling() -> None:
    # τ = 2 on [ln 9, 0] gives the same distributions as τ = 1 on [ln 3, 0]: loss × τ² = 4
    s = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([math.log(9.0), 0.0], dtype=torch.float64).view(1, 2, 1, 1)
    loss = one(seg_kd(tau=2.0)(out(seg_logits=s), out(seg_logits=t)))
    assert loss.item() == pytest.approx(4 * KL_34_12, rel=1e-12)
    # in general: L_τ(s, t) = τ² · L_1(s/τ, t/τ)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) * 4
    t = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64) * 4
    lt = one(seg_kd(tau=4.0)(out(seg_logits=s), out(seg_logits=t)))
    l1 = one(seg_kd(tau=1.0)(out(seg_logits=s / 4), out(seg_logits=t / 4)))
    assert lt.item() == pytest.approx(16 * l1.item(), rel=1e-10)


def test_kd_mean_over_pixels_and_reductions() -> None:
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    per_pixel = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)
    m = make(KD, "segmentation", infos(seg_logits=4), infos(seg_logits=4))
    assert one(m(out(seg_logits=s), out(seg_logits=t))).item() == pytest.approx(
        per_pixel.sum().item() / (2 * 3 * 5), rel=1e-12
    )
    m = make(KD, "segmentation", infos(seg_logits=4), infos(seg_logits=4), class_reduction="mean",
             sample_reduction="sum")
    assert one(m(out(seg_logits=s), out(seg_logits=t))).item() == pytest.approx(
        per_pixel.sum().item() / 4, rel=1e-12
    )


def test_kd_ignore_pixels_excluded() -> None:
    g = torch.Generator().manual_seed(3)
    k = 4
    s = torch.randn(2, k, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, k, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (2, 4, 4), generator=g)
    labels[0, :2, :] = 255
    labels[1, 3, 1:] = 255
    # labels at input resolution (2× the logits), constant on 2×2 blocks
    targets = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    m = make(KD, "segmentation", infos(seg_logits=k), infos(seg_logits=k), ignore_index_mask=True)
    masked = one(m(out(seg_logits=s), out(seg_logits=t), targets))

    valid = labels != 255
    sv = s.permute(0, 2, 3, 1)[valid].T[None, :, :, None]  # (1, K, P, 1): the valid pixels alone
    tv = t.permute(0, 2, 3, 1)[valid].T[None, :, :, None]
    plain = make(KD, "segmentation", infos(seg_logits=k), infos(seg_logits=k))
    alone = one(plain(out(seg_logits=sv), out(seg_logits=tv)))
    assert masked.item() == pytest.approx(alone.item(), rel=1e-12)
    everything = one(plain(out(seg_logits=s), out(seg_logits=t), targets))  # mask off: all pixels
    assert everything.item() != pytest.approx(masked.item(), rel=1e-6)
    all_ignored = torch.full_like(targets, 255)
    assert one(m(out(seg_logits=s), out(seg_logits=t), all_ignored)).item() == 0.0


def test_kd_resizes_smaller_logits_to_larger() -> None:
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    m = make(KD, "segmentation", infos(seg_logits=3), infos(seg_logits=3))
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    got = one(m(out(seg_logits=s), out(seg_logits=t)))
    want = one(m(out(seg_logits=up), out(seg_logits=t)))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


def test_kd_bernoulli_known_value() -> None:
    # location 0: p = σ(±ln 3) = 0.75 / 0.25 against q = 0.5 → KL_34_12 per class; location 1: equal
    s = torch.zeros(1, 2, 2, dtype=torch.float64)
    t = torch.tensor([[[math.log(3.0), -math.log(3.0)], [0.0, 0.0]]], dtype=torch.float64)
    det = infos(cls_logits=2)
    cases = {
        ("sum", "mean"): 2 * KL_34_12 / 2,
        ("mean", "mean"): KL_34_12 / 2,
        ("sum", "sum"): 2 * KL_34_12,
    }
    for (cr, sr), want in cases.items():
        m = make(KD, "detection", det, det, class_reduction=cr, sample_reduction=sr)
        assert one(m(out(cls_logits=s), out(cls_logits=t))).item() == pytest.approx(want, rel=1e-12)
    # τ = 2 on doubled logits: same Bernoullis, τ² = 4
    m = make(KD, "detection", det, det, tau=2.0)
    assert one(m(out(cls_logits=s), out(cls_logits=2 * t))).item() == pytest.approx(4 * KL_34_12, rel=1e-12)


@pytest.mark.parametrize("cr,sr,tau", [("sum", "mean", 1.0), ("mean", "sum", 2.0), ("mean", "mean", 8.0)])
def test_kd_bernoulli_total_equals_the_elementwise_form(monkeypatch: pytest.MonkeyPatch, cr: str, sr: str,
                                                        tau: float) -> None:
    """The detection preset's chunked loss (no element-wise graph) has the value and the gradient of the plain
    expression, in float64 to round-off, over chunk boundaries that do not divide the rows."""
    from kdcli.methods import _logits

    monkeypatch.setattr(_logits, "CHUNK_ELEMENTS", 7 * 5)  # 7 rows of 5 classes per chunk; 2·9 = 18 rows
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 9, 5, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(2, 9, 5, generator=g, dtype=torch.float64)
    want = _logits.bernoulli_kl(s, t, tau)  # the plain expression
    want = (want.sum(-1) if cr == "sum" else want.mean(-1))
    want = want.mean() if sr == "mean" else want.sum()
    (gw,) = torch.autograd.grad(want, s)
    got = _logits.bernoulli_kl_total(s, t, tau, cr, sr)
    (gg,) = torch.autograd.grad(got, s)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-14)
    # by hand: ∂KL/∂s = (σ(s/τ) − σ(t/τ)) / τ, times the reductions' factors
    k = (1 / 5 if cr == "mean" else 1.0) * (1 / 18 if sr == "mean" else 1.0)
    torch.testing.assert_close(gg, k * (torch.sigmoid(s / tau) - torch.sigmoid(t / tau)) / tau)


def test_kd_bernoulli_total_keeps_only_the_logits_for_backward() -> None:
    """Memory: the KD detection loss saves the two logit tensors for the backward pass and nothing the size of
    the logits besides (the element-wise form saved about a dozen float32 copies); bf16 logits stay bf16 and
    give the float32 result to bf16 rounding."""
    from kdcli.methods import _logits

    m = make(KD, "detection", infos(cls_logits=91), infos(cls_logits=91))
    s = torch.randn(2, 3000, 91, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 3000, 91, dtype=torch.bfloat16)
    saved: list[int] = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel() * x.element_size())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = one(m(out(cls_logits=s), out(cls_logits=t)))
    assert sum(saved) <= 2 * s.numel() * s.element_size()
    loss.backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16
    ref = _logits.bernoulli_kl(s.detach().float(), t.float(), 1.0).sum(-1).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    s32 = s.detach().float().requires_grad_()
    _logits.bernoulli_kl(s32, t.float(), 1.0).sum(-1).mean().backward()
    torch.testing.assert_close(s.grad.float(), s32.grad, rtol=1e-2, atol=1e-8)


def test_kd_detection_shape_checks() -> None:
    with pytest.raises(MethodError, match="80.*91|91.*80"):
        KD(infos(cls_logits=80), infos(cls_logits=91), "detection", **KD.resolve_hparams("detection"))
    m = make(KD, "detection", infos(cls_logits=3), infos(cls_logits=3))
    with pytest.raises(MethodError, match=r"\(2, 10, 3\).*\(2, 12, 3\)"):
        m(out(cls_logits=torch.randn(2, 10, 3)), out(cls_logits=torch.randn(2, 12, 3)))


@pytest.mark.parametrize("task,tap,shape", [("segmentation", "seg_logits", (2, 4, 3, 3)),
                                            ("detection", "cls_logits", (2, 6, 4))])
def test_kd_gradient_reaches_student_only(task: str, tap: str, shape: tuple) -> None:
    c = shape[1] if task == "segmentation" else shape[2]
    m = make(KD, task, infos(**{tap: c}), infos(**{tap: c}))
    s = torch.randn(shape, requires_grad=True)
    t = torch.randn(shape, requires_grad=True)  # even a non-detached teacher gets no gradient
    one(m(out(**{tap: s}), out(**{tap: t}))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("task,tap,shape", [("segmentation", "seg_logits", (2, 4, 3, 3)),
                                            ("detection", "cls_logits", (2, 6, 4))])
def test_kd_finite_under_bf16_autocast(task: str, tap: str, shape: tuple) -> None:
    c = shape[1] if task == "segmentation" else shape[2]
    m = make(KD, task, infos(**{tap: c}), infos(**{tap: c}), tau=0.5)
    s = (torch.randn(shape) * 3000).bfloat16().requires_grad_()
    t = (torch.randn(shape) * 3000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = one(m(out(**{tap: s}), out(**{tap: t})))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()


# --------------------------------------------------------------------------------- fitnet
def test_fitnet_identity_adapter_equal_features_is_zero() -> None:
    m = make(FitNet, "segmentation", infos(seg_feat=8), infos(seg_feat=8)).double()
    adapter = m.adapters["seg_feat"]
    assert adapter.bias is None  # CIRKD: bias-free, applied even with equal channels
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(8, dtype=torch.float64).view(8, 8, 1, 1))
    f = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    assert one(m(out(seg_feat=f), out(seg_feat=f.clone()))).item() == 0.0


def test_fitnet_known_value() -> None:
    g = torch.Generator().manual_seed(5)
    m = make(FitNet, "segmentation", infos(seg_feat=4), infos(seg_feat=6)).double()
    w = m.adapters["seg_feat"].weight.detach().view(6, 4)
    fs = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 6, 5, 3, generator=g, dtype=torch.float64)
    want = 10.0 * ((torch.einsum("oc,nchw->nohw", w, fs) - ft) ** 2).mean()
    assert one(m(out(seg_feat=fs), out(seg_feat=ft))).item() == pytest.approx(want.item(), rel=1e-12)
    # a hand-set adapter: 2·I on ones vs zeros → (2 − 0)² = 4, × λ = 10
    m = make(FitNet, "segmentation", infos(seg_feat=3), infos(seg_feat=3)).double()
    with torch.no_grad():
        m.adapters["seg_feat"].weight.copy_(2 * torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1))
    loss = one(m(out(seg_feat=torch.ones(1, 3, 2, 2, dtype=torch.float64)),
                 out(seg_feat=torch.zeros(1, 3, 2, 2, dtype=torch.float64))))
    assert loss.item() == pytest.approx(40.0, rel=1e-12)


def test_fitnet_detection_levels_bias_and_resize() -> None:
    fpn = infos(p3=4, p4=4, p5=4)
    m = make(FitNet, "detection", fpn, fpn).double()
    assert m.needs == ("p3", "p4", "p5") and all(a.bias is not None for a in m.adapters.values())
    g = torch.Generator().manual_seed(6)
    fs = {k: torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for k in fpn}
    ft = {k: torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for k in fpn}
    losses = m(out(**fs), out(**ft))
    assert set(losses) == {"fitnet.p3", "fitnet.p4", "fitnet.p5"}
    a = m.adapters["p4"]
    up = F.interpolate(F.conv2d(fs["p4"], a.weight, a.bias), size=(8, 8), mode="bilinear",
                       align_corners=False)
    want = m.weight * ((up - ft["p4"]) ** 2).mean()
    assert losses["fitnet.p4"].item() == pytest.approx(want.item(), rel=1e-12)


def test_fitnet_no_adapter_when_not_always_and_equal() -> None:
    m = make(FitNet, "detection", infos(p3=4), infos(p3=4), adapter_always=False)
    assert "p3" not in m.adapters
    m = make(FitNet, "detection", infos(p3=4), infos(p3=8), adapter_always=False)
    assert "p3" in m.adapters


# --------------------------------------------------------------------------------- cankd
def cankd(cs: int = 8, ct: int = 8, task: str = "segmentation", **overrides: object) -> CanKD:
    return make(CanKD, task, infos(c5=cs), infos(c5=ct), **overrides).double()


def cankd_by_hand(m: CanKD, fs: Tensor, ft: Tensor, eps: float = 1e-5) -> Tensor:
    """Eqs. (1)–(4) with the HW × N_k matrix formed explicitly and BN (train mode) by hand."""
    b = m.blocks["c5"]
    th = F.conv2d(fs, b.theta.weight, b.theta.bias)
    ph = F.max_pool2d(F.conv2d(ft, b.phi[0].weight, b.phi[0].bias), kernel_size=2, stride=2)
    gg = F.max_pool2d(F.conv2d(ft, b.g[0].weight, b.g[0].bias), kernel_size=2, stride=2)
    n, ci, h, w = th.shape
    nk = (h // 2) * (w // 2)
    f = th.flatten(2).transpose(1, 2) @ ph.flatten(2) / nk  # (N, HW, N_k)
    y = (f @ gg.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(n, ci, h, w)
    wy = F.conv2d(y, b.W[0].weight, b.W[0].bias)
    mu = wy.mean(dim=(0, 2, 3), keepdim=True)
    var = ((wy - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    bn = (wy - mu) / torch.sqrt(var + eps) * b.W[1].weight.view(1, -1, 1, 1) + b.W[1].bias.view(1, -1, 1, 1)
    zs = bn + fs
    return m.weight * 0.5 * ((in_by_hand(zs) - in_by_hand(ft)) ** 2).mean()


def feats(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
    ft = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 - 3
    return fs, ft


def test_cankd_at_init_is_half_weighted_in_mse() -> None:
    m = cankd()
    fs, ft = feats((2, 8, 8, 8), 7)
    want = 0.5 * 10.0 * ((in_by_hand(fs) - in_by_hand(ft)) ** 2).mean()
    assert one(m(out(c5=fs), out(c5=ft))).item() == pytest.approx(want.item(), rel=1e-10)


def test_cankd_identical_features_at_init_is_zero() -> None:
    m = cankd()
    f = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert one(m(out(c5=f), out(c5=f.clone()))).item() < 1e-20


def test_nonlocal_reassociation_equals_direct_form() -> None:
    g = torch.Generator().manual_seed(8)
    theta = torch.randn(2, 4, 63, generator=g, dtype=torch.float64)
    phi = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    gg = torch.randn(2, 4, 12, generator=g, dtype=torch.float64)
    direct = nonlocal_aggregate(theta, phi, gg, direct=True)
    torch.testing.assert_close(nonlocal_aggregate(theta, phi, gg), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_cankd_attention_active_matches_direct_form(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)  # seeded: with unseeded convs the "attention changes the loss" margin was flaky (~1%)
    m = cankd()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # γ ≠ 0 switches the attention path on
        m.blocks["c5"].W[1].weight.copy_(torch.randn(8, generator=g, dtype=torch.float64))
        m.blocks["c5"].W[1].bias.copy_(torch.randn(8, generator=g, dtype=torch.float64) * 0.5)
    fs, ft = feats((2, 8, *hw), 9)
    got = one(m(out(c5=fs), out(c5=ft)))
    want = cankd_by_hand(m, fs, ft)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    at_init = 0.5 * 10.0 * ((in_by_hand(fs) - in_by_hand(ft)) ** 2).mean()
    assert abs(got.item() - at_init.item()) > 1e-3  # the attention path really changes the loss


def test_cankd_gradient_flow_at_init_and_after() -> None:
    m = cankd()
    b = m.blocks["c5"]
    fs, ft = feats((2, 8, 8, 8), 10)
    fs.requires_grad_()
    one(m(out(c5=fs), out(c5=ft))).backward()
    # γ = 0 blocks everything upstream of BN: θ, φ, g and W's conv get exactly zero gradient
    for mod in (b.theta, b.phi[0], b.g[0], b.W[0]):
        assert mod.weight.grad is not None and mod.weight.grad.abs().max().item() == 0.0
        assert mod.bias.grad.abs().max().item() == 0.0
    # ... while the BN affine parameters do learn (∂L/∂β = Σ ∂L/∂Z, ∂L/∂γ = Σ ∂L/∂Z · x̂)
    assert b.W[1].weight.grad.abs().sum() > 0 and b.W[1].bias.grad.abs().sum() > 0
    assert fs.grad.abs().sum() > 0

    m.zero_grad()
    with torch.no_grad():
        b.W[1].weight.fill_(0.3)
    one(m(out(c5=fs.detach()), out(c5=ft))).backward()
    for mod in (b.theta, b.phi[0], b.g[0], b.W[0]):
        assert mod.weight.grad.abs().sum() > 0


def test_cankd_odd_sizes_and_tiny_maps() -> None:
    m = cankd()
    fs, ft = feats((2, 8, 7, 9), 11)
    assert m.blocks["c5"].phi(ft).shape[-2:] == (3, 4)  # N_k = ⌊7/2⌋·⌊9/2⌋ = 12
    assert torch.isfinite(one(m(out(c5=fs), out(c5=ft))))
    for hw in ((1, 1), (1, 5)):  # N_k = 0: attention skipped, loss still defined
        fs, ft = feats((2, 8, *hw), 12)
        assert torch.isfinite(one(m(out(c5=fs), out(c5=ft))))


def test_cankd_connector_only_when_channels_differ() -> None:
    assert len(cankd(8, 8).connectors) == 0
    m = cankd(4, 8)
    conv = m.connectors["c5"]
    assert isinstance(conv, torch.nn.Conv2d) and conv.weight.shape == (8, 4, 1, 1)
    assert conv.bias is not None and conv.bias.abs().sum().item() == 0.0
    assert m.blocks["c5"].theta.in_channels == 8 and m.blocks["c5"].theta.out_channels == 4
    fs, _ = feats((2, 4, 6, 6), 13)
    _, ft = feats((2, 8, 6, 6), 13)
    want = 0.5 * 10.0 * ((in_by_hand(F.conv2d(fs, conv.weight, conv.bias)) - in_by_hand(ft)) ** 2).mean()
    assert one(m(out(c5=fs), out(c5=ft))).item() == pytest.approx(want.item(), rel=1e-10)


def test_cankd_detection_preset_takes_four_finest_levels() -> None:
    fpn = infos(p3=4, p4=4, p5=4, p6=4, p7=4)
    m = make(CanKD, "detection", fpn, fpn)
    assert m.needs == ("p3", "p4", "p5", "p6") and m.weight == 10.0
    assert m.blocks["p3"].theta.out_channels == 2
    fs = {k: torch.randn(2, 4, 16 >> i, 16 >> i) for i, k in enumerate(fpn)}
    ft = {k: torch.randn(2, 4, 16 >> i, 16 >> i) for i, k in enumerate(fpn)}
    assert set(m(out(**fs), out(**ft))) == {"cankd.p3", "cankd.p4", "cankd.p5", "cankd.p6"}


def test_cankd_finite_under_bf16_autocast_and_student_gets_gradient() -> None:
    m = make(CanKD, "segmentation", infos(c5=4), infos(c5=8))
    with torch.no_grad():
        m.blocks["c5"].W[1].weight.fill_(0.5)
    fs = (torch.randn(2, 4, 7, 9) * 50).bfloat16().requires_grad_()
    ft = (torch.randn(2, 8, 7, 9) * 50).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = one(m(out(c5=fs), out(c5=ft)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(fs.grad.float()).all() and fs.grad.float().abs().sum() > 0


def test_cankd_load_official_key_layout() -> None:
    m = cankd()
    src = cankd().blocks["c5"]
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    official = {}
    for key, value in src.state_dict().items():
        head = "non_local_att.att." if key.startswith(("theta.", "phi.")) else "non_local_att."
        official[head + key] = value
    m.load_official("c5", official)
    for key, value in src.state_dict().items():
        torch.testing.assert_close(m.blocks["c5"].state_dict()[key], value)
