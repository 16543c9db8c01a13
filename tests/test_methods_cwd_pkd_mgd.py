"""Maths of the cwd, pkd and mgd methods.

References are computed by hand here (explicit formulas, torch.nn.functional ops), never with the
modules under test. Exact-value checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from method_helpers import make, one, out  # tests/ is on sys.path (pytest prepends it)
from torch import Tensor

import kdcli.methods as methods
from kdcli.errors import ConfigError, MethodError
from kdcli.methods.cwd import CWD
from kdcli.methods.mgd import MGD
from kdcli.methods.pkd import PKD
from kdcli.models.taps import TapInfo

# KL([0.75, 0.25] ‖ [0.5, 0.5]), by hand
KL_34_12 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
FPN = ("p3", "p4", "p5", "p6", "p7")


def infos(**channels: int) -> dict[str, TapInfo]:
    out: dict[str, TapInfo] = {}
    for name, c in channels.items():
        stride = 2 ** int(name[1]) if name[0] == "p" else 8
        out[name] = TapInfo(name, c, stride, "logits" if "logits" in name else "feature")
    return out


def rnd(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


# --------------------------------------------------------------------------------- registry / presets
@pytest.mark.parametrize("name", ["cwd", "pkd", "mgd"])
def test_builds_for_both_tasks_with_presets(name: str) -> None:
    fpn = infos(**{k: 4 for k in FPN})
    det = methods.build(name, fpn, fpn, "detection").methods[name]
    seg_s, seg_t = infos(c5=4, seg_feat=4, seg_logits=3), infos(c5=8, seg_feat=8, seg_logits=3)
    seg = methods.build(name, seg_s, seg_t, "segmentation").methods[name]
    want_det = {"cwd": FPN, "pkd": FPN[:4], "mgd": FPN}[name]
    want_seg = {"cwd": ("seg_logits",), "pkd": ("c5",), "mgd": ("c5",)}[name]
    assert det.needs == want_det and seg.needs == want_seg
    for key in type(det).presets["detection"]:  # every hyper-parameter is in the preset
        assert key in det.hp and key in type(det).presets["segmentation"]
    # runs end to end on both
    fs = {k: torch.randn(2, 4, 16 >> i, 16 >> i) for i, k in enumerate(FPN)}
    ft = {k: torch.randn(2, 4, 16 >> i, 16 >> i) for i, k in enumerate(FPN)}
    assert set(det(out(**fs), out(**ft))) == {f"{name}.{k}" for k in want_det}
    so = out(c5=torch.randn(2, 4, 4, 4), seg_logits=torch.randn(2, 3, 8, 8))
    to = out(c5=torch.randn(2, 8, 4, 4), seg_logits=torch.randn(2, 3, 8, 8))
    assert all(torch.isfinite(v) for v in seg(so, to).values())


def test_official_preset_values() -> None:
    assert CWD.presets["detection"]["tau"] == 1.0 and CWD.presets["detection"]["weight"] == 10.0
    assert CWD.presets["segmentation"]["tau"] == 4.0 and CWD.presets["segmentation"]["weight"] == 3.0
    assert PKD.presets["detection"]["weight"] == 10.0 and PKD.presets["detection"]["taps"] == "fpn:4"
    assert MGD.presets["detection"]["alpha_mgd"] == 2e-5 and MGD.presets["detection"]["lambda_mgd"] == 0.65
    assert MGD.presets["segmentation"]["lambda_mgd"] == 0.75


def test_overrides_are_coerced_and_checked() -> None:
    s = infos(c5=4, seg_logits=3)
    ms = methods.build("cwd+mgd", s, s, "segmentation", {"cwd.tau": "2", "mgd.lambda_mgd": "0.5"})
    assert ms.methods["cwd"].tau == 2.0 and ms.methods["mgd"].lam == 0.5
    with pytest.raises(ConfigError):
        methods.build("cwd", s, s, "segmentation", {"channel_norm": "nope"})
    with pytest.raises(ConfigError):
        methods.build("mgd", s, s, "segmentation", {"lambda_mgd": "1.5"})
    with pytest.raises(ConfigError):
        methods.build("mgd", s, s, "segmentation", {"draw_order": "sideways"})


@pytest.mark.parametrize("cls", [CWD, PKD, MGD])
def test_rejects_non_maps(cls: type) -> None:
    m = make(cls, "segmentation", infos(c5=3, seg_logits=3), infos(c5=3, seg_logits=3), taps="c5")
    with pytest.raises(MethodError, match="N, C, H, W"):
        m(out(c5=torch.randn(2, 3, 4)), out(c5=torch.randn(2, 3, 4)))


# --------------------------------------------------------------------------------- cwd
def cwd_by_hand(s: Tensor, t: Tensor, tau: float, w: float, c_norm: int | None = None) -> Tensor:
    n, c = s.shape[:2]
    ps = torch.softmax(s.flatten(2) / tau, dim=-1)
    pt = torch.softmax(t.flatten(2) / tau, dim=-1)
    kl = (pt * (torch.log(pt) - torch.log(ps))).sum()
    return w * tau**2 * kl / (n * (c_norm or c))


def seg_cwd(c: int = 2, **overrides: object) -> CWD:
    return make(CWD, "segmentation", infos(seg_logits=c), infos(seg_logits=c), **overrides)


def test_cwd_identical_maps_is_zero() -> None:
    z = rnd(2, 5, 6, 6, seed=0, scale=5)
    assert one(seg_cwd(5)(out(seg_logits=z), out(seg_logits=z.clone()))).abs().item() < 1e-12
    fpn = infos(p3=4, p4=4)
    f = {k: rnd(2, 4, 5, 5, seed=i) for i, k in enumerate(fpn)}
    losses = make(CWD, "detection", fpn, fpn)(out(**f), out(**{k: v.clone() for k, v in f.items()}))
    assert all(v.abs().item() < 1e-12 for v in losses.values())


def test_cwd_known_value_one_channel_two_positions() -> None:
    # (1, 1, 1, 2): p_T = softmax([ln 3, 0]) = [0.75, 0.25], p_S = [0.5, 0.5]; N·C = 1
    s = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    t = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    loss = one(seg_cwd(1, tau=1.0, weight=1.0)(out(seg_logits=s), out(seg_logits=t)))
    assert loss.item() == pytest.approx(KL_34_12, rel=1e-12)
    # the segmentation preset: w = 3, τ = 4 — τ = 4 on [4 ln 3, 0] gives the same distributions
    loss = one(seg_cwd(1)(out(seg_logits=s), out(seg_logits=4 * t)))
    assert loss.item() == pytest.approx(3 * 16 * KL_34_12, rel=1e-12)


def test_cwd_known_value_two_channels_sum_over_positions_mean_over_channels() -> None:
    # (1, 2, 2, 2): channel 0 p_T = [1/2, 1/6, 1/6, 1/6] vs uniform p_S; channel 1 identical
    s = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    t = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    t[0, 0, 0, 0] = math.log(3.0)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 3 * (1 / 6) * math.log((1 / 6) / 0.25)
    fpn = infos(p3=2)
    loss = one(make(CWD, "detection", fpn, fpn)(out(p3=s), out(p3=t)))  # preset: τ = 1, w = 10
    assert loss.item() == pytest.approx(10 * kl0 / 2, rel=1e-12)


def test_cwd_tau_squared_scaling() -> None:
    s = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    t = torch.tensor([math.log(9.0), 0.0], dtype=torch.float64).view(1, 1, 1, 2)
    loss = one(seg_cwd(1, tau=2.0, weight=1.0)(out(seg_logits=s), out(seg_logits=t)))
    assert loss.item() == pytest.approx(4 * KL_34_12, rel=1e-12)
    # in general L_τ(s, t) = τ² · L_1(s/τ, t/τ)
    s, t = rnd(2, 3, 4, 5, seed=1, scale=4), rnd(2, 3, 4, 5, seed=2, scale=4)
    lt = one(seg_cwd(3, tau=4.0)(out(seg_logits=s), out(seg_logits=t)))
    l1 = one(seg_cwd(3, tau=1.0)(out(seg_logits=s / 4), out(seg_logits=t / 4)))
    assert lt.item() == pytest.approx(16 * l1.item(), rel=1e-10)


def test_cwd_random_value_and_per_sample_reduction() -> None:
    s, t = rnd(2, 3, 4, 5, seed=3, scale=2), rnd(2, 3, 4, 5, seed=4, scale=2)
    m = seg_cwd(3)
    loss = one(m(out(seg_logits=s), out(seg_logits=t)))
    assert loss.item() == pytest.approx(cwd_by_hand(s, t, 4.0, 3.0).item(), rel=1e-12)
    # ÷ N·C: duplicating every sample leaves the loss unchanged
    loss2 = one(m(out(seg_logits=torch.cat([s, s])), out(seg_logits=torch.cat([t, t]))))
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)


def test_cwd_adapter_bias_per_task_and_student_channel_quirk() -> None:
    det = make(CWD, "detection", infos(p3=3), infos(p3=5)).double()
    seg = make(CWD, "segmentation", infos(c5=3), infos(c5=5), taps="c5").double()
    assert det.adapters["p3"].bias is not None  # pppppM align conv
    assert seg.adapters["c5"].bias is None  # CIRKD conv
    assert len(make(CWD, "detection", infos(p3=4), infos(p3=4)).adapters) == 0
    s, t = rnd(2, 3, 4, 4, seed=5), rnd(2, 5, 4, 4, seed=6)
    a = det.adapters["p3"]
    mapped = F.conv2d(s, a.weight, a.bias)
    loss = one(det(out(p3=s), out(p3=t)))
    assert loss.item() == pytest.approx(cwd_by_hand(mapped, t, 1.0, 10.0, c_norm=3).item(), rel=1e-12)
    det_t = make(CWD, "detection", infos(p3=3), infos(p3=5), channel_norm="teacher").double()
    det_t.load_state_dict(det.state_dict())
    assert one(det_t(out(p3=s), out(p3=t))).item() == pytest.approx(loss.item() * 3 / 5, rel=1e-12)


def test_cwd_logits_with_different_classes_refused() -> None:
    with pytest.raises(MethodError, match="classes"):
        make(CWD, "segmentation", infos(seg_logits=3), infos(seg_logits=5))


def test_cwd_resizes_student_to_teacher() -> None:
    s, t = rnd(1, 3, 4, 4, seed=7), rnd(1, 3, 8, 8, seed=8)
    m = seg_cwd(3)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    got = one(m(out(seg_logits=s), out(seg_logits=t)))
    assert got.item() == pytest.approx(cwd_by_hand(up, t, 4.0, 3.0).item(), rel=1e-12)


def test_cwd_gradients_reach_student_and_adapter_not_teacher() -> None:
    m = make(CWD, "detection", infos(p3=3), infos(p3=5))
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, requires_grad=True)
    one(m(out(p3=s), out(p3=t))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert t.grad is None


# --------------------------------------------------------------------------------- pkd
def seg_pkd(cs: int = 3, ct: int = 3, **overrides: object) -> PKD:
    return make(PKD, "segmentation", infos(c5=cs), infos(c5=ct), **overrides).double()


def pkd_by_hand(s: Tensor, t: Tensor, w: float) -> Tensor:
    """mmrazor's recipe written out: (C, N·H·W) rows, unbiased std + 1e-6, ½ · mean square."""
    def norm(x: Tensor) -> Tensor:
        rows = x.transpose(0, 1).reshape(x.shape[1], -1)
        rows = (rows - rows.mean(1, keepdim=True)) / (rows.std(1, keepdim=True) + 1e-6)
        return rows

    return w * ((norm(s) - norm(t)) ** 2).mean() / 2


def test_pkd_identical_maps_is_zero() -> None:
    f = rnd(2, 3, 5, 5, seed=10, scale=3, shift=2)
    assert one(seg_pkd()(out(c5=f), out(c5=f.clone()))).item() < 1e-20


def test_pkd_known_value() -> None:
    # one channel, values [0, 1, 2] vs [2, 1, 0]: mean 1, unbiased σ 1 → [−1, 0, 1]/(1 + 1e-6) and its
    # negative; ½ · mean([−2, 0, 2]²)/(1 + 1e-6)² = 4/3/(1 + 1e-6)²
    s = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64).view(1, 1, 1, 3)
    t = s.flip(-1)
    want = 4 / 3 / (1 + 1e-6) ** 2
    assert one(seg_pkd(1, 1, weight=1.0)(out(c5=s), out(c5=t))).item() == pytest.approx(want, rel=1e-12)
    assert one(seg_pkd(1, 1)(out(c5=s), out(c5=t))).item() == pytest.approx(10 * want, rel=1e-12)


def test_pkd_matches_official_recipe_and_batch_statistics() -> None:
    s, t = rnd(2, 3, 4, 5, seed=11, scale=2, shift=1), rnd(2, 3, 4, 5, seed=12, scale=0.5, shift=-3)
    loss = one(seg_pkd()(out(c5=s), out(c5=t)))
    assert loss.item() == pytest.approx(pkd_by_hand(s, t, 10.0).item(), rel=1e-12)
    # statistics over the whole batch, not per sample: sample 0 alone gives a different value
    alone = one(seg_pkd()(out(c5=s[:1]), out(c5=t[:1])))
    assert alone.item() != pytest.approx(pkd_by_hand(s, t, 10.0).item(), rel=1e-3)


def test_pkd_is_one_minus_pearson() -> None:
    s, t = rnd(2, 3, 6, 6, seed=13, scale=4), rnd(2, 3, 6, 6, seed=14, scale=4)
    s = s + 0.7 * t  # some correlation
    m = (2 * 6 * 6)
    xs, xt = s.transpose(0, 1).reshape(3, -1), t.transpose(0, 1).reshape(3, -1)
    xs, xt = xs - xs.mean(1, keepdim=True), xt - xt.mean(1, keepdim=True)
    r = (xs * xt).sum(1) / (xs.norm(dim=1) * xt.norm(dim=1))
    want = (m - 1) / m * (1 - r).mean()
    assert one(seg_pkd(weight=1.0)(out(c5=s), out(c5=t))).item() == pytest.approx(want.item(), rel=1e-5)


def test_pkd_invariant_to_per_channel_affine_student() -> None:
    s, t = rnd(2, 4, 5, 5, seed=15, scale=5), rnd(2, 4, 5, 5, seed=16, scale=5)
    scale = torch.tensor([0.5, 1.0, 3.0, 7.0], dtype=torch.float64).view(1, 4, 1, 1)
    shift = torch.tensor([-4.0, 0.0, 2.5, 100.0], dtype=torch.float64).view(1, 4, 1, 1)
    m = seg_pkd(4, 4)
    base = one(m(out(c5=s), out(c5=t))).item()
    moved = one(m(out(c5=s * scale + shift), out(c5=t))).item()
    assert moved == pytest.approx(base, rel=1e-6, abs=1e-6)
    assert base > 1.0  # a real loss, not a trivially small one


def test_pkd_resize_direction() -> None:
    s, t = rnd(1, 3, 4, 4, seed=17), rnd(1, 3, 8, 8, seed=18)
    up = F.interpolate(s, size=(8, 8), mode="bilinear", align_corners=False)
    assert one(seg_pkd()(out(c5=s), out(c5=t))).item() == pytest.approx(
        pkd_by_hand(up, t, 10.0).item(), rel=1e-12
    )
    down = F.interpolate(t, size=(4, 4), mode="bilinear", align_corners=False)
    assert one(seg_pkd(resize_stu=False)(out(c5=s), out(c5=t))).item() == pytest.approx(
        pkd_by_hand(s, down, 10.0).item(), rel=1e-12
    )


def test_pkd_connector_only_when_channels_differ_and_its_bias_is_irrelevant() -> None:
    assert len(seg_pkd(3, 3).connectors) == 0
    m = seg_pkd(2, 4)
    conv = m.connectors["c5"]
    assert conv.weight.shape == (4, 2, 1, 1) and conv.bias.abs().sum().item() == 0.0  # kaiming, zero bias
    s, t = rnd(2, 2, 4, 4, seed=19), rnd(2, 4, 4, 4, seed=20)
    loss = one(m(out(c5=s), out(c5=t)))
    assert loss.item() == pytest.approx(pkd_by_hand(F.conv2d(s, conv.weight), t, 10.0).item(), rel=1e-12)
    with torch.no_grad():
        conv.bias.normal_()
    assert one(m(out(c5=s), out(c5=t))).item() == pytest.approx(loss.item(), rel=1e-9)


def test_pkd_gradients_reach_student_and_connector() -> None:
    m = make(PKD, "segmentation", infos(c5=2), infos(c5=4))
    s = torch.randn(2, 2, 4, 4, requires_grad=True)
    t = torch.randn(2, 4, 4, 4, requires_grad=True)
    one(m(out(c5=s), out(c5=t))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert m.connectors["c5"].weight.grad.abs().sum() > 0
    assert t.grad is None


def test_pkd_single_value_channel_is_zero_not_nan() -> None:
    loss = one(seg_pkd()(out(c5=rnd(1, 3, 1, 1, seed=21)), out(c5=rnd(1, 3, 1, 1, seed=22))))
    assert loss.item() == 0.0


# --------------------------------------------------------------------------------- mgd
def seg_mgd(cs: int = 3, ct: int = 3, **overrides: object) -> MGD:
    return make(MGD, "segmentation", infos(c5=cs), infos(c5=ct), **overrides).double()


def make_identity_like(m: MGD, tap: str, bias1: float = 0.0) -> None:
    """Both generator convs = identity at the kernel centre; G(x) = ReLU(x + b1) for the 1st bias b1."""
    gen = m.blocks[tap].generation
    c = gen[0].in_channels
    with torch.no_grad():
        for conv in (gen[0], gen[2]):
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = torch.eye(c, dtype=conv.weight.dtype)
            conv.bias.zero_()
        gen[0].bias.fill_(bias1)


def test_mgd_identity_generator_all_ones_and_all_zeros_masks() -> None:
    m = seg_mgd()
    make_identity_like(m, "c5", bias1=0.5)
    s = rnd(2, 3, 4, 4, seed=30).abs()  # ≥ 0: the ReLU passes S + 0.5 unchanged
    t = rnd(2, 3, 4, 4, seed=31)
    ones, zeros = torch.ones(2, 1, 4, 4, dtype=torch.float64), torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    alpha = 2e-5
    got = m.loss_tap("c5", s, t, ones)
    assert got.item() == pytest.approx(alpha * ((s + 0.5 - t) ** 2).sum().item() / 2, rel=1e-12)
    got = m.loss_tap("c5", s, t, zeros)  # everything masked: G(0) = 0.5 everywhere
    assert got.item() == pytest.approx(alpha * ((0.5 - t) ** 2).sum().item() / 2, rel=1e-12)
    # the same through forward(masks=...)
    assert one(m(out(c5=s), out(c5=t), masks={"c5": zeros})).item() == pytest.approx(got.item(), rel=1e-12)


def test_mgd_mask_matches_official_formula_and_ratio() -> None:
    m = seg_mgd(lambda_mgd=0.65)
    like = torch.zeros(4, 3, 32, 32)
    m.generator = torch.Generator().manual_seed(5)
    mask = m.draw_mask(like)
    u = torch.rand((4, 1, 32, 32), generator=torch.Generator().manual_seed(5))
    want = torch.where(u > 1 - 0.65, 0, 1).float()
    assert mask.shape == (4, 1, 32, 32) and torch.equal(mask, want)
    assert abs((mask == 0).float().mean().item() - 0.65) < 0.03
    # generator None → the global CPU RNG, as the official code
    m.generator = None
    torch.manual_seed(5)
    assert torch.equal(m.draw_mask(like), want)
    mc = seg_mgd(mask_on_channel=True)
    assert mc.draw_mask(like).shape == (4, 3, 1, 1)


def test_mgd_seeded_generator_is_reproducible() -> None:
    m = seg_mgd()
    s, t = rnd(2, 3, 6, 6, seed=32), rnd(2, 3, 6, 6, seed=33)

    def run(seed: int) -> float:
        m.generator = torch.Generator().manual_seed(seed)
        return one(m(out(c5=s), out(c5=t))).item()

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_mgd_draw_order_coarsest_first_by_default() -> None:
    fpn = infos(p3=2, p4=2)
    m = make(MGD, "detection", fpn, fpn).double()
    fs = {"p3": rnd(1, 2, 4, 4, seed=34), "p4": rnd(1, 2, 2, 2, seed=35)}
    ft = {"p3": rnd(1, 2, 4, 4, seed=36), "p4": rnd(1, 2, 2, 2, seed=37)}
    m.generator = torch.Generator().manual_seed(9)
    got = m(out(**fs), out(**ft))
    assert list(got) == ["mgd.p3", "mgd.p4"]  # reported in tap order
    g = torch.Generator().manual_seed(9)
    m4 = torch.where(torch.rand((1, 1, 2, 2), generator=g) > 0.35, 0.0, 1.0).double()  # p4 drawn first
    m3 = torch.where(torch.rand((1, 1, 4, 4), generator=g) > 0.35, 0.0, 1.0).double()
    assert got["mgd.p4"].item() == pytest.approx(m.loss_tap("p4", fs["p4"], ft["p4"], m4).item(), rel=1e-12)
    assert got["mgd.p3"].item() == pytest.approx(m.loss_tap("p3", fs["p3"], ft["p3"], m3).item(), rel=1e-12)


def test_mgd_sum_over_n_reduction_per_sample() -> None:
    m = seg_mgd(2, 3)
    s, t = rnd(2, 2, 5, 5, seed=38), rnd(2, 3, 5, 5, seed=39)
    mask = (rnd(2, 1, 5, 5, seed=40) > 0).double()
    loss = m.loss_tap("c5", s, t, mask)
    doubled = m.loss_tap("c5", torch.cat([s, s]), torch.cat([t, t]), torch.cat([mask, mask]))
    assert doubled.item() == pytest.approx(loss.item(), rel=1e-12)
    # sum over C·H·W (not mean): by hand with the block's own convs
    b = m.blocks["c5"]
    x = F.conv2d(s, b.align.weight, b.align.bias) * mask
    g = F.conv2d(F.relu(F.conv2d(x, b.generation[0].weight, b.generation[0].bias, padding=1)),
                 b.generation[2].weight, b.generation[2].bias, padding=1)
    assert loss.item() == pytest.approx(2e-5 * ((g - t) ** 2).sum().item() / 2, rel=1e-12)


def test_mgd_gradients_reach_student_and_every_learnable_part() -> None:
    m = make(MGD, "segmentation", infos(c5=2), infos(c5=4))
    m.generator = torch.Generator().manual_seed(0)
    s = torch.randn(2, 2, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, requires_grad=True)
    one(m(out(c5=s), out(c5=t))).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    names = {n for n, _ in m.named_parameters()}
    assert names == {f"blocks.c5.{k}" for k in ("align.weight", "align.bias", "generation.0.weight",
                                                "generation.0.bias", "generation.2.weight", "generation.2.bias")}
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert t.grad is None
    assert seg_mgd(3, 3).blocks["c5"].align is None  # no align with equal channels


def test_mgd_load_official_key_layout() -> None:
    m = seg_mgd(2, 4)
    src = seg_mgd(2, 4).blocks["c5"]
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    official = {f"distill_losses.loss_mgd_fea.{k}": v for k, v in src.state_dict().items()}
    m.load_official("c5", official)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(m.blocks["c5"].state_dict()[k], v)
    m2 = seg_mgd(2, 4)
    m2.load_official("c5", src.state_dict())  # bare FeatureLoss / MGDConncetor keys
    torch.testing.assert_close(m2.blocks["c5"].generation[2].weight, src.generation[2].weight)


# --------------------------------------------------------------------------------- bf16 autocast
@pytest.mark.parametrize("cls", [CWD, PKD, MGD])
def test_finite_under_bf16_autocast_with_large_activations(cls: type) -> None:
    m = make(cls, "segmentation", infos(c5=2, seg_logits=3), infos(c5=4, seg_logits=3), taps="c5")
    if cls is MGD:
        m.generator = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 2, 5, 7) * 3000).bfloat16().requires_grad_()
    t = (torch.randn(2, 4, 5, 7) * 3000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = one(m(out(c5=s), out(c5=t)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad.float().abs().sum() > 0


def test_cwd_logits_finite_under_bf16_autocast_small_tau() -> None:
    m = seg_cwd(3, tau=0.5)
    s = (torch.randn(2, 3, 6, 6) * 3000).bfloat16().requires_grad_()
    t = (torch.randn(2, 3, 6, 6) * 3000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = one(m(out(seg_logits=s), out(seg_logits=t)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()
