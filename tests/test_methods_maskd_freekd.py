"""Maths of the maskd and freekd methods.

References are written out here (the official materialised N×T×C×H×W forms, hand-computed Haar
coefficients), never taken from the modules under test. Exact-value checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdcli.methods as methods
from kdcli.errors import MethodError
from kdcli.methods.freekd import FreeKD, haar_dwt, haar_idwt, masked_l1
from kdcli.methods.maskd import MasKD, dice_coeff, masked_sq_error
from kdcli.models.taps import ModelOutput, TapInfo

FPN = {"p3": 8, "p4": 16}


def fpn_infos(c: int = 4) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, s, "feature") for n, s in FPN.items()}


def seg_infos(c: int = 3) -> dict[str, TapInfo]:
    return {"seg_logits": TapInfo("seg_logits", c, 8, "logits")}


def make(cls: type, task: str, student: dict, teacher: dict, **overrides: object):
    return cls(student, teacher, task, **cls.resolve_hparams(task, overrides))


def identity_align(m: nn.Module) -> None:
    with torch.no_grad():
        for conv in m.align.values():
            conv.weight.copy_(torch.eye(conv.out_channels, conv.in_channels)[:, :, None, None])
            conv.bias.zero_()


def out(**taps: Tensor) -> ModelOutput:
    return ModelOutput(taps=dict(taps))


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------ MasKD
def official_maskd_level(mask: Tensor, fs: Tensor, ft: Tensor, probs: Tensor | None, eps: float) -> Tensor:
    """The official per-level reduction, with the N×T×C×H×W masked features materialised."""
    ms = fs.unsqueeze(1) * mask.unsqueeze(2)
    mt = ft.unsqueeze(1) * mask.unsqueeze(2)
    loss = ((ms - mt) ** 2).sum((3, 4)) / (mask.sum((2, 3)).unsqueeze(-1) + eps)
    if probs is not None:
        loss = (loss.mean(-1) * probs).sum(-1)
    return loss.mean()


def test_maskd_identical_features_give_zero() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos()).double()
    identity_align(m)
    f = {n: rand(2, 4, 5, 6, seed=i, scale=3.0) for i, n in enumerate(FPN)}
    losses = m(out(**f), out(**f))
    assert set(losses) == {"maskd.p3", "maskd.p4"}
    for v in losses.values():
        assert v.item() == 0.0


def test_maskd_hand_value_tokens_zero() -> None:
    # tokens 0 → every mask is σ(0) = ½; Δ = [1, 3] on a 1×2 map:
    # ℓ = Σ ¼Δ² / Σ ½ = (¼·10)/(1) = 2.5; detection: prob softmax over T=1 is 1 → 7 · 2.5
    s, t = {"p3": TapInfo("p3", 1, 8)}, {"p3": TapInfo("p3", 1, 8)}
    m = make(MasKD, "detection", s, t, taps="p3", num_tokens=1).double()
    identity_align(m)
    with torch.no_grad():
        m.mask_modules["p3"].mask_token.zero_()
    ft = torch.tensor([[[[0.5, -2.0]]]], dtype=torch.float64)
    fs = ft + torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    assert m(out(p3=fs), out(p3=ft))["maskd.p3"].item() == pytest.approx(7 * 2.5, abs=1e-12)
    # segmentation: 0.5 · mean ℓ with ε = 1e-5 in the denominator, weight 1
    seg = make(MasKD, "segmentation", seg_infos(1), seg_infos(1), num_tokens=1).double()
    with torch.no_grad():
        seg.mask_modules["seg_logits"].mask_token.zero_()
    val = seg(out(seg_logits=fs), out(seg_logits=ft))["maskd.seg_logits"].item()
    assert val == pytest.approx(0.5 * 2.5 / (1 + 1e-5), abs=1e-12)


def test_maskd_matches_official_reduction_random() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos(), taps="p3").double()
    fs, ft = rand(2, 4, 5, 3, seed=1), rand(2, 4, 5, 3, seed=2)
    got = m(out(p3=fs), out(p3=ft))["maskd.p3"]
    mm = m.mask_modules["p3"]
    fsa = m.align["p3"](fs)
    mask = torch.sigmoid(torch.einsum("tc,nchw->nthw", mm.mask_token, ft))
    probs = mm.prob(ft).flatten(1).softmax(1)
    ref = 7.0 * official_maskd_level(mask, fsa, ft, probs, 0.0)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    assert torch.allclose(masked_sq_error(mask, fsa, ft).mean(), official_maskd_level(mask, fsa, ft, None, 0.0))


def test_dice_coeff_hand_values() -> None:
    disjoint = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    same = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]], dtype=torch.float64)
    assert dice_coeff(disjoint).item() == 0.0
    assert dice_coeff(same).item() == pytest.approx(1.0, abs=1e-10)
    # [1,1] vs [1,0]: 2·1 / (2 + 1) = 2/3 for both ordered pairs
    half = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    assert dice_coeff(half).item() == pytest.approx(2 / 3, abs=1e-10)


def test_maskd_stage1_masked_feature() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos(), taps="p3").double()
    mm = m.mask_modules["p3"]
    x = rand(2, 4, 3, 3, seed=3)
    feat, dice = mm.forward_train(x)
    mask = mm.forward_mask(x)
    probs = mm.forward_prob(x)
    ref = (x.unsqueeze(1) * mask.unsqueeze(2) * probs[:, :, None, None, None]).sum(1)
    assert torch.allclose(feat, ref, rtol=1e-12)
    assert torch.allclose(dice, dice_coeff(mask.flatten(2)))


def test_maskd_custom_mask_switches_at_warmup_and_resumes() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos(), taps="p3", custom_mask_warmup=2).double()
    fs, ft = rand(1, 4, 3, 3, seed=4), rand(1, 4, 3, 3, seed=5)
    mm = m.mask_modules["p3"]
    fsa = m.align["p3"](fs).detach()
    mask_t = mm.forward_mask(ft)
    probs = mm.forward_prob(ft)
    plain = 7.0 * official_maskd_level(mask_t, fsa, ft, probs, 0.0)
    custom = 7.0 * official_maskd_level(mask_t * mm.forward_mask(fsa), fsa, ft, probs, 0.0)
    m.train()
    for it in range(4):
        assert int(m.iteration) == it
        got = m(out(p3=fs), out(p3=ft))["maskd.p3"]
        assert torch.allclose(got, custom if it >= 2 else plain, rtol=1e-12)
    m.eval()
    m(out(p3=fs), out(p3=ft))
    assert int(m.iteration) == 4  # eval does not advance the schedule
    fresh = make(MasKD, "detection", fpn_infos(), fpn_infos(), taps="p3", custom_mask_warmup=2).double()
    assert not fresh.custom_mask_active
    fresh.load_state_dict(m.state_dict())
    assert int(fresh.iteration) == 4 and fresh.custom_mask_active
    assert torch.allclose(fresh(out(p3=fs), out(p3=ft))["maskd.p3"], custom, rtol=1e-12)


def test_maskd_gradients_reach_student_and_learnable_parts() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos(), train_masks=True)
    fs = {n: torch.randn(2, 4, 4, 4, requires_grad=True) for n in FPN}
    ft = {n: torch.randn(2, 4, 4, 4) for n in FPN}
    sum(m(out(**fs), out(**ft)).values()).backward()
    for v in fs.values():
        assert v.grad is not None and v.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    frozen = make(MasKD, "detection", fpn_infos(), fpn_infos())
    assert all(not p.requires_grad for p in frozen.mask_modules.parameters())
    assert all(p.requires_grad for p in frozen.align.parameters())


def test_maskd_load_official_mapping() -> None:
    m = make(MasKD, "detection", fpn_infos(), fpn_infos())
    sd = {f"distiller.losses.loss_maskd_fpn.mask_modules.{i}.mask_token": torch.full((6, 4), float(i)) for i in (0, 1)}
    sd["distiller.losses.loss_maskd_fpn.mask_modules.1.prob.2.bias"] = torch.arange(6.0)
    align = {"align_modules.component_0.1.bias": torch.ones(4)}
    m.load_official(sd, align)
    assert torch.equal(m.mask_modules["p4"].mask_token, torch.ones(6, 4))
    assert torch.equal(m.mask_modules["p3"].mask_token, torch.zeros(6, 4))
    assert torch.equal(m.mask_modules["p4"].prob[2].bias, torch.arange(6.0))
    assert torch.equal(m.align["p4"].bias, torch.ones(4))


# ----------------------------------------------------------------------------------- FreeKD
def test_haar_2x2_by_hand() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    low, (d1,) = haar_dwt(x, 1)
    assert low.flatten().tolist() == [5.0]
    # pytorch_wavelets order: (lo W, hi H), (hi W, lo H), (hi W, hi H)
    assert d1.flatten().tolist() == [-2.0, -1.0, 0.0]


def test_haar_odd_size_zero_pads_at_the_end() -> None:
    x = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64)  # 1×3 → padded to 2×4
    low, (d1,) = haar_dwt(x, 1)
    assert low.flatten().tolist() == [1.5, 1.5]
    assert d1.shape == (1, 1, 3, 1, 2)
    assert d1[0, 0, :, 0, 0].tolist() == [1.5, -0.5, -0.5]
    assert d1[0, 0, :, 0, 1].tolist() == [1.5, 1.5, 1.5]


def test_haar_is_orthonormal_and_invertible() -> None:
    x = rand(2, 3, 8, 8, seed=6)
    low, details = haar_dwt(x, 3)
    assert [tuple(d.shape[-2:]) for d in details] == [(4, 4), (2, 2), (1, 1)]
    energy = low.pow(2).sum() + sum(d.pow(2).sum() for d in details)
    assert torch.allclose(energy, x.pow(2).sum(), rtol=1e-12)
    assert torch.allclose(haar_idwt(low, details), x, atol=1e-12)


def test_masked_l1_matches_official_form() -> None:
    mask = torch.sigmoid(rand(2, 6, 3, 5, seed=7))
    bs, bt = rand(2, 4, 3, 3, 5, seed=8), rand(2, 4, 3, 3, 5, seed=9)
    m6 = mask.unsqueeze(2).unsqueeze(2)
    ref = F.l1_loss(bs.unsqueeze(1) * m6, bt.unsqueeze(1) * m6)
    assert torch.allclose(masked_l1(mask, bs, bt), ref, rtol=1e-12)


def test_freekd_identical_features_give_zero() -> None:
    m = make(FreeKD, "detection", fpn_infos(), fpn_infos()).double()
    identity_align(m)
    f = {n: rand(2, 4, 7, 6, seed=i, scale=3.0) for i, n in enumerate(FPN)}
    losses = m(out(**f), out(**f))
    assert set(losses) == {"freekd.p3", "freekd.p4", "freekd.mse.p3", "freekd.mse.p4"}
    assert all(v.item() == 0.0 for v in losses.values())


def test_freekd_hand_value() -> None:
    # teacher 0 → every band sum is 0 → masks σ(0) = ½ whatever the prompts.
    # Δ = [[1, 0], [0, 0]]: level 1 details (½, ½, ½), LL ½; level 2 on the zero-padded 1×1 LL:
    # details ¼ each, LL ¼; level 3: ⅛ each. L_freq = ½·(½ + ¼ + ⅛) = 0.4375; MSE = 5 · ¼.
    s = {"p3": TapInfo("p3", 1, 8)}
    m = make(FreeKD, "detection", s, s, taps="p3").double()
    identity_align(m)
    ft = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    fs = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    losses = m(out(p3=fs), out(p3=ft))
    assert losses["freekd.p3"].item() == pytest.approx(0.4375, abs=1e-12)
    assert losses["freekd.mse.p3"].item() == pytest.approx(1.25, abs=1e-12)


def test_freekd_matches_official_form_random() -> None:
    m = make(FreeKD, "detection", fpn_infos(), fpn_infos(), taps="p3").double()
    with torch.no_grad():
        m.mask_modules["p3"].mask_token.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    fs, ft = rand(2, 4, 9, 6, seed=10), rand(2, 4, 9, 6, seed=11)
    got = m(out(p3=fs), out(p3=ft))["freekd.p3"]
    fsa = m.align["p3"](fs)
    _, bt = haar_dwt(ft, 3)
    _, bs = haar_dwt(fsa, 3)
    ref = torch.zeros((), dtype=torch.float64)
    for j in range(3):
        tok = m.mask_modules["p3"].mask_token[j + 1]
        mask = torch.sigmoid(torch.einsum("tc,nchw->nthw", tok, bt[j].sum(2)))
        m6 = mask.unsqueeze(2).unsqueeze(2)
        ref = ref + F.l1_loss(bs[j].unsqueeze(1) * m6, bt[j].unsqueeze(1) * m6)
    assert torch.allclose(got, ref, rtol=1e-12)


def test_freekd_gradients_reach_student_align_and_prompts() -> None:
    m = make(FreeKD, "detection", fpn_infos(), fpn_infos(), train_prompts=True)
    fs = {n: torch.randn(2, 4, 8, 8, requires_grad=True) for n in FPN}
    ft = {n: torch.randn(2, 4, 8, 8) for n in FPN}
    sum(m(out(**fs), out(**ft)).values()).backward()
    for v in fs.values():
        assert v.grad is not None and v.grad.abs().sum() > 0
    for tap in FPN:
        assert m.align[tap].weight.grad.abs().sum() > 0
        g = m.mask_modules[tap].mask_token.grad
        assert g[1:].abs().sum() > 0 and g[0].abs().sum() == 0  # low-pass prompt unused (official)
    frozen = make(FreeKD, "detection", fpn_infos(), fpn_infos())
    assert all(not p.requires_grad for p in frozen.mask_modules.parameters())


# ------------------------------------------------------------------------------------ both
@pytest.mark.parametrize("cls", [MasKD, FreeKD])
def test_finite_float32_under_bf16_autocast_large(cls: type) -> None:
    m = make(cls, "detection", fpn_infos(8), fpn_infos(8))
    fs = {n: (torch.randn(2, 8, 8, 8) * 1e3).requires_grad_() for n in FPN}
    ft = {n: torch.randn(2, 8, 8, 8) * 1e3 for n in FPN}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(out(**{k: v.bfloat16() for k, v in fs.items()}), out(**{k: v.bfloat16() for k, v in ft.items()}))
    total = sum(losses.values())
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in fs.values())


def test_build_per_task_and_unsupported() -> None:
    ms = methods.build("maskd", fpn_infos(), fpn_infos(), "detection")
    assert ms.methods["maskd"].taps == ("p3", "p4") and ms.methods["maskd"].weight == 7.0
    ms = methods.build("maskd", seg_infos(), seg_infos(), "segmentation")
    m = ms.methods["maskd"]
    assert m.taps == ("seg_logits",) and not m.weight_mask and len(m.align) == 0
    assert m.mask_modules["seg_logits"].mask_token.shape == (8, 3)
    ms = methods.build("freekd", fpn_infos(), fpn_infos(), "detection", {"mse_weight": "2"})
    assert ms.methods["freekd"].mse_weight == 2.0
    assert ms.methods["freekd"].mask_modules["p3"].mask_token.shape == (4, 6, 4)
    with pytest.raises(MethodError):
        methods.build("freekd", seg_infos(), seg_infos(), "segmentation")
