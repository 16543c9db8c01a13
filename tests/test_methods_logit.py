"""Maths of the logit methods kd (modes/reductions), dkd, nkd, uskd and bckd.

References are written here, never with the modules under test: explicit formulas, and float64
re-statements of the official code in its own structure (mdistiller ``dkd_loss``, cls_KD
``NKDLoss``/``USKDLoss``, LD's per-level ``KnowledgeDistillationKLDivLoss``, BCKD's ``novel_kd_loss`` +
mmdet ``GIoULoss``), compared on loss values and gradients. Dense-head checks run on real
RetinaNet/FCOS outputs (zoo shapes models built without weights) with torchvision's own assignment.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli import api
from kdcli.config import RunConfig
from kdcli.errors import ConfigError, MethodError
from kdcli.methods import build
from kdcli.methods.bckd import BCKD
from kdcli.methods.dkd import DKD
from kdcli.methods.kd import KD
from kdcli.methods.nkd import NKD
from kdcli.methods.uskd import USKD, zipf_labels
from kdcli.models import build_model
from kdcli.models.taps import ModelOutput, TapInfo
from kdcli.zoo import get_spec


def infos(**channels: int) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, 0 if n == "cls_logits" else 8, "logits" if "logits" in n else "feature")
            for n, c in channels.items()}


def make(cls: type, task: str, student: dict, teacher: dict | None = None, **overrides: object):
    return cls(student, teacher if teacher is not None else student, task, **cls.resolve_hparams(task, overrides))


def one(losses: dict[str, Tensor]) -> Tensor:
    assert len(losses) == 1, losses
    return next(iter(losses.values()))


def rand(*shape: int, seed: int, scale: float = 3.0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def labels_for(n: int, c: int, seed: int) -> Tensor:
    y = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))
    y[0], y[-1] = 0, c - 1  # both ends of the class range
    return y


def as_map(z: Tensor) -> Tensor:
    """(N, C) rows → an (N, C, 1, 1) logit map: one pixel per sample."""
    return z[:, :, None, None]


def seg(cls: type, c: int, **hp: object):
    return make(cls, "segmentation", infos(seg_logits=c), **hp).double()


def seg_loss(m, zs: Tensor, zt: Tensor, y: Tensor) -> Tensor:
    return one(m(ModelOutput(taps={"seg_logits": as_map(zs)}), ModelOutput(taps={"seg_logits": as_map(zt)}),
                 y[:, None, None]))


# ------------------------------------------------------------------ by-hand pieces (column removal)
def by_hand(zs: Tensor, zt: Tensor, y: Tensor, tau: float) -> dict[str, Tensor]:
    """TCKD, NCKD (no τ²), teacher non-target entropy, p_t,y — from softmaxes with the column removed."""
    n, c = zs.shape
    keep = torch.ones(n, c, dtype=torch.bool).scatter_(1, y[:, None], False)
    ps, pt = F.softmax(zs / tau, 1), F.softmax(zt / tau, 1)
    bs = torch.stack([ps.gather(1, y[:, None])[:, 0], 1 - ps.gather(1, y[:, None])[:, 0]], 1)
    bt = torch.stack([pt.gather(1, y[:, None])[:, 0], 1 - pt.gather(1, y[:, None])[:, 0]], 1)
    hs = F.softmax(zs[keep].view(n, c - 1) / tau, 1)
    ht = F.softmax(zt[keep].view(n, c - 1) / tau, 1)
    return {
        "tckd": (bt * (bt.log() - bs.log())).sum(1),
        "nckd": (ht * (ht.log() - hs.log())).sum(1),
        "h_nt": -(ht * ht.log()).sum(1),
        "pty": bt[:, 0],
        "kd": (pt * (pt.log() - ps.log())).sum(1),
    }


# ------------------------------------------------------------------ official re-statements (float64)
def mdistiller_dkd(ls: Tensor, lt: Tensor, target: Tensor, alpha: float, beta: float, temperature: float) -> Tensor:
    """mdistiller ``dkd_loss``: masks, cat, log of softmax, summed KL ÷ batch, −1000 masking."""
    gt_mask = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t: Tensor) -> Tensor:
        return torch.cat([(t * gt_mask).sum(1, keepdim=True), (t * other_mask).sum(1, keepdim=True)], 1)

    pred_s = cat_mask(F.softmax(ls / temperature, 1))
    pred_t = cat_mask(F.softmax(lt / temperature, 1))
    tckd = F.kl_div(torch.log(pred_s), pred_t, reduction="sum") * temperature**2 / target.shape[0]
    pt2 = F.softmax(lt / temperature - 1000.0 * gt_mask, 1)
    lps2 = F.log_softmax(ls / temperature - 1000.0 * gt_mask, 1)
    nckd = F.kl_div(lps2, pt2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def clskd_nkd(logit_s: Tensor, logit_t: Tensor, gt_label: Tensor, temp: float, gamma: float) -> Tensor:
    """cls_KD ``NKDLoss.forward`` (fixed version: the target column is removed)."""
    label = gt_label.view(len(gt_label), 1)
    n, _ = logit_s.shape
    s_t = torch.gather(F.log_softmax(logit_s, 1), 1, label)
    t_t = torch.gather(F.softmax(logit_t, 1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    s_i = F.log_softmax(logit_s[mask].reshape(n, -1) / temp, 1)
    t_i = F.softmax(logit_t[mask].reshape(n, -1) / temp, 1)
    return loss_t - gamma * temp**2 * (t_i * s_i).sum(1).mean()


def clskd_uskd(fea: Tensor, logit_s: Tensor, gt_label: Tensor, fc: nn.Linear, alpha: float, beta: float, mu: float,
               prob_rank: bool = False) -> Tensor:
    """cls_KD ``USKDLoss.forward`` for hard labels (``prob_rank``: probabilities in the rank instead)."""
    label = gt_label.view(len(gt_label), 1)
    value = torch.ones_like(label)
    n, c = logit_s.shape
    s_t = torch.gather(F.softmax(logit_s, 1), 1, label)
    p_t = s_t**2
    p_t = (p_t + value - p_t.mean(0, True)).detach()
    s_i = F.log_softmax(logit_s, 1)
    s_t = torch.gather(s_i, 1, label)
    loss_t = -(p_t * s_t).sum(1).mean()
    target = torch.zeros_like(logit_s).scatter_(1, label, 0.9) + 0.1 * torch.ones_like(logit_s) / c
    w_fc = fc(fea)
    loss_weak = -(mu * target * F.log_softmax(w_fc, 1)).sum(1).mean()
    w_i = F.softmax(w_fc, 1)
    w_t = torch.gather(w_i, 1, label)
    own, own_t = (F.softmax(logit_s, 1), torch.gather(F.softmax(logit_s, 1), 1, label)) if prob_rank else (s_i, s_t)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + own / (1 - own_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    zipf = 1 / torch.arange(1, c + 1, dtype=logit_s.dtype)
    z_i = torch.gather(zipf.repeat(n, 1), 1, torch.argsort(rank))
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    ns_i = F.log_softmax(logit_s[mask].reshape(n, -1), 1)
    nz_i = z_i[mask].reshape(n, -1)
    nz_i = (nz_i / nz_i.sum(1, keepdim=True)).detach()
    loss_non = -(nz_i * ns_i).sum(1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


def mmdet_giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdet ``giou_loss`` (``bbox_overlaps(mode='giou', is_aligned=True)``, clamps at eps)."""
    area1 = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area2 = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    wh = (torch.min(pred[:, 2:], target[:, 2:]) - torch.max(pred[:, :2], target[:, :2])).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    union = (area1 + area2 - overlap).clamp(min=eps)
    ewh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0)
    enclose = (ewh[:, 0] * ewh[:, 1]).clamp(min=eps)
    return 1 - (overlap / union - (enclose - union) / enclose)


# ================================================================== identities
@pytest.mark.parametrize("c,tau", [(10, 1.0), (81, 4.0), (10, 4.0)])
def test_kd_is_tckd_plus_weighted_nckd(c: int, tau: float) -> None:
    zs, zt, y = rand(8, c, seed=1), rand(8, c, seed=2), labels_for(8, c, 3)
    h = by_hand(zs, zt, y, tau)
    kd = seg_loss(seg(KD, c, tau=tau, sample_reduction="sum"), zs, zt, y)
    assert kd.item() == pytest.approx((tau**2 * h["kd"]).sum().item(), rel=1e-10)
    assert kd.item() == pytest.approx((tau**2 * (h["tckd"] + (1 - h["pty"]) * h["nckd"])).sum().item(), rel=1e-10)
    # DKD with α = 1, β = 0 is τ²·TCKD; with α = 0, β = 1 it is τ²·NCKD (mean over samples)
    assert seg_loss(seg(DKD, c, tau=tau, alpha=1.0, beta=0.0), zs, zt, y).item() == pytest.approx(
        tau**2 * h["tckd"].mean().item(), rel=1e-10)
    assert seg_loss(seg(DKD, c, tau=tau, alpha=0.0, beta=1.0), zs, zt, y).item() == pytest.approx(
        tau**2 * h["nckd"].mean().item(), rel=1e-10)


@pytest.mark.parametrize("c,tau,gamma", [(10, 1.0, 1.5), (81, 3.0, 3.5)])
def test_nkd_nontarget_is_gamma_nckd_plus_teacher_entropy(c: int, tau: float, gamma: float) -> None:
    zs, zt, y = rand(8, c, seed=4), rand(8, c, seed=5), labels_for(8, c, 6)
    h = by_hand(zs, zt, y, tau)
    target = -(F.softmax(zt, 1).gather(1, y[:, None])[:, 0] * F.log_softmax(zs, 1).gather(1, y[:, None])[:, 0])
    ce = seg_loss(seg(NKD, c, tau=tau, gamma=gamma), zs, zt, y)
    kl = seg_loss(seg(NKD, c, tau=tau, gamma=gamma, form="kl"), zs, zt, y)
    assert kl.item() == pytest.approx((target + gamma * tau**2 * h["nckd"]).mean().item(), rel=1e-10)
    assert ce.item() == pytest.approx((target + gamma * tau**2 * (h["nckd"] + h["h_nt"])).mean().item(), rel=1e-10)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dkd_and_nkd_with_identical_logits(tau: float) -> None:
    z, y = rand(8, 10, seed=7), labels_for(8, 10, 8)
    zs = z.clone().requires_grad_()
    dkd = seg_loss(seg(DKD, 10, tau=tau, beta=8.0), zs, z, y)
    assert abs(dkd.item()) < 1e-12
    dkd.backward()
    assert zs.grad.abs().max().item() < 1e-12  # a minimum: zero gradient too
    h = by_hand(z, z, y, tau)
    p1 = F.softmax(z, 1).gather(1, y[:, None])[:, 0]
    own_ce = -(p1 * p1.log())  # NKD's target term is a CE: −p_y log p_y, not 0
    nkd_ce = seg_loss(seg(NKD, 10, tau=tau, gamma=1.5), z, z, y)
    nkd_kl = seg_loss(seg(NKD, 10, tau=tau, gamma=1.5, form="kl"), z, z, y)
    assert nkd_kl.item() == pytest.approx(own_ce.mean().item(), rel=1e-10)
    assert nkd_ce.item() == pytest.approx((own_ce + 1.5 * tau**2 * h["h_nt"]).mean().item(), rel=1e-10)


# ================================================================== official code, loss and gradients
@pytest.mark.parametrize("c,tau,alpha,beta", [(10, 4.0, 1.0, 8.0), (81, 1.0, 1.0, 0.5), (100, 4.0, 1.0, 2.0)])
def test_dkd_matches_mdistiller(c: int, tau: float, alpha: float, beta: float) -> None:
    zs, zt, y = rand(8, c, seed=10), rand(8, c, seed=11), labels_for(8, c, 12)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ref = mdistiller_dkd(a, zt, y, alpha, beta, tau)
    got = seg_loss(seg(DKD, c, tau=tau, alpha=alpha, beta=beta), b, zt, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    ref.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)
    # mmrazor's DKDLoss sums over the batch (size_average=False overrides reduction='mean')
    s = seg_loss(seg(DKD, c, tau=tau, alpha=alpha, beta=beta, sample_reduction="sum"), zs, zt, y)
    assert s.item() == pytest.approx(8 * ref.item(), rel=1e-10)


def test_dkd_warmup_follows_mdistiller_epochs() -> None:
    zs, zt, y = rand(4, 10, seed=13), rand(4, 10, seed=14), labels_for(4, 10, 15)
    m = seg(DKD, 10, warmup=4)
    full = mdistiller_dkd(zs, zt, y, 1.0, 0.5, 1.0)
    for epoch in range(6):  # mdistiller counts epochs from 1: min(epoch / WARMUP, 1)
        m.set_progress(epoch, 3, 6, 10)
        assert seg_loss(m, zs, zt, y).item() == pytest.approx(min((epoch + 1) / 4, 1.0) * full.item(), rel=1e-10)
    m = seg(DKD, 10, warmup=0)
    m.set_progress(0, 0, 6, 10)
    assert seg_loss(m, zs, zt, y).item() == pytest.approx(full.item(), rel=1e-10)
    with pytest.raises(ConfigError, match="warmup"):
        seg(DKD, 10, warmup=-1)


@pytest.mark.parametrize("c,tau,gamma", [(10, 1.0, 1.5), (100, 3.0, 3.5), (81, 1.0, 1.0)])
def test_nkd_matches_cls_kd(c: int, tau: float, gamma: float) -> None:
    zs, zt, y = rand(8, c, seed=20), rand(8, c, seed=21), labels_for(8, c, 22)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    ref = clskd_nkd(a, zt, y, tau, gamma)
    got = seg_loss(seg(NKD, c, tau=tau, gamma=gamma), b, zt, y)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    ref.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)


def uskd_seg(c: int, d: int, **hp: object) -> USKD:
    return make(USKD, "segmentation", infos(seg_logits=c, c4=d), **hp).double()


@pytest.mark.parametrize("c,rank", [(10, "official"), (100, "official"), (10, "prob"), (100, "prob")])
def test_uskd_matches_cls_kd(c: int, rank: str) -> None:
    n, d = 8, 6
    zs, f, y = rand(n, c, seed=30), rand(n, d, seed=31, scale=1.0), labels_for(n, c, 32)
    m = uskd_seg(c, d, alpha=1.0, beta=0.1, mu=0.1, rank=rank)
    fc = nn.Linear(d, c).double()
    with torch.no_grad():
        fc.weight.copy_(rand(c, d, seed=33, scale=0.5))
        fc.bias.copy_(rand(c, seed=34, scale=0.5))
        m.weak.weight.copy_(fc.weight[:, :, None, None])
        m.weak.bias.copy_(fc.bias)
    a, b = zs.clone().requires_grad_(), zs.clone().requires_grad_()
    fa, fb = f.clone().requires_grad_(), f.clone().requires_grad_()
    ref = clskd_uskd(fa, a, y, fc, 1.0, 0.1, 0.1, prob_rank=rank == "prob")
    got = one(m(ModelOutput(taps={"seg_logits": as_map(b), "c4": as_map(fb)}), None, y[:, None, None]))
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    ref.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fb.grad, fa.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.weak.weight.grad[:, :, 0, 0], fc.weight.grad, rtol=1e-9, atol=1e-12)


def test_uskd_zipf_labels_sum_to_one_and_follow_the_rank() -> None:
    n, k = 16, 12
    z, weak, y = rand(n, k, seed=40), rand(n, k, seed=41), labels_for(n, k, 42)
    for rank in ("official", "prob"):
        zhat = zipf_labels(z, weak, y, rank)
        torch.testing.assert_close(zhat.sum(1), torch.ones(n, dtype=torch.float64))
        assert (zhat.gather(1, y[:, None]) == 0).all()
        log_p = F.log_softmax(z, 1)
        own = log_p if rank == "official" else log_p.exp()
        w = F.softmax(weak, 1)
        for i in range(n):  # by hand, one row at a time: sort the scores, weight 1/(rank+1)
            yi = int(y[i])
            score = w[i] / (1 - w[i, yi] + 1e-6) + own[i] / (1 - own[i, yi] + 1e-6)
            order = sorted(range(k), key=lambda c, s=score: -float(s[c]))
            want = torch.zeros(k, dtype=torch.float64)
            for r, cls in enumerate(order):
                want[cls] = 0.0 if cls == yi else 1.0 / (r + 1)
            torch.testing.assert_close(zhat[i], want / want.sum())
    # the two readings order the classes differently (spec pitfall 1)
    assert (zipf_labels(z, weak, y, "official") - zipf_labels(z, weak, y, "prob")).abs().sum() > 0.1


# ================================================================== ignore index (segmentation)
def test_target_dependent_losses_drop_ignored_pixels() -> None:
    g = torch.Generator().manual_seed(50)
    c, d = 5, 3
    zs, zt = rand(2, c, 4, 4, seed=51), rand(2, c, 4, 4, seed=52)
    feat = rand(2, d, 4, 4, seed=53, scale=1.0)
    labels = torch.randint(0, c, (2, 4, 4), generator=g)
    labels[0, :2] = 255
    labels[1, 3, 1:] = 255
    targets = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)  # input resolution: 2× the logits
    valid = labels != 255

    def gather(x: Tensor) -> Tensor:  # the valid pixels alone, as a (1, C, P, 1) map
        return x.permute(0, 2, 3, 1)[valid].T[None, :, :, None]

    cases = [seg(DKD, c, beta=2.0), seg(NKD, c, tau=2.0), seg(KD, c, ignore_index_mask=True), uskd_seg(c, d)]
    for m in cases:
        s_leaf = zs.clone().requires_grad_()
        s_out = ModelOutput(taps={"seg_logits": s_leaf, "c4": feat})
        t_out = ModelOutput(taps={"seg_logits": zt})
        masked = one(m(s_out, t_out, targets))
        alone = one(m(ModelOutput(taps={"seg_logits": gather(zs), "c4": gather(feat)}),
                      ModelOutput(taps={"seg_logits": gather(zt)}), labels[valid][None, :, None]))
        assert masked.item() == pytest.approx(alone.item(), rel=1e-10), m.name
        masked.backward()
        assert (s_leaf.grad.permute(0, 2, 3, 1)[~valid] == 0).all(), m.name  # no gradient at 255 pixels
        assert s_leaf.grad.permute(0, 2, 3, 1)[valid].abs().sum() > 0, m.name
        nothing = one(m(s_out, t_out, torch.full_like(targets, 255)))
        assert nothing.item() == 0.0, m.name


# ================================================================== real RetinaNet / FCOS heads
_MODELS: dict[str, tuple] = {}
PAIRS = {"retinanet": ("shapes-r34-retina", "shapes-r18-retina"), "fcos": ("shapes-r34-fcos", "shapes-r18-fcos")}


def _pair(family: str):
    if family not in _MODELS:
        torch.manual_seed(0)
        t_name, s_name = PAIRS[family]
        _MODELS[family] = (build_model(get_spec(t_name)).eval(), build_model(get_spec(s_name)).train())
    return _MODELS[family]


def _det_batch(model, size: int = 96):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(3)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 90.0, 80.0], [10.0, 12.0, 26.0, 30.0]]),
         "labels": torch.tensor([1, 2, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
        {"boxes": torch.tensor([[50.0, 8.0, 94.0, 40.0]]), "labels": torch.tensor([2])},
    ]
    return model.preprocess(images, targets)


def torchvision_assignment(model, batch) -> tuple[ModelOutput, Tensor]:
    """The student's output and the matched indices torchvision's own compute_loss used."""
    head = model.net.head
    seen: dict[str, Tensor] = {}
    original = head.compute_loss

    def spy(targets, head_outputs, anchors, matched_idxs):
        seen["m"] = torch.stack(matched_idxs)
        return original(targets, head_outputs, anchors, matched_idxs)

    head.compute_loss = spy
    try:
        out = model(batch)
    finally:
        del head.compute_loss
    return out, seen["m"]


@pytest.fixture(scope="module", params=["retinanet", "fcos"])
def head_case(request):
    """(family, student output with float64 leaves, teacher output, targets, torchvision's assignment)."""
    teacher, student = _pair(request.param)
    batch = _det_batch(student)
    with torch.no_grad():
        s_raw, matched = torchvision_assignment(student, batch)
        t_raw = teacher(batch, need={"cls_logits", "head"}, losses=False)
    g = torch.Generator().manual_seed(1)
    # untrained heads start from the same prior: spread the teacher so that every term is far from 0
    zt = t_raw.taps["cls_logits"].double() + 2 * torch.randn(t_raw.taps["cls_logits"].shape, generator=g,
                                                             dtype=torch.float64)
    rt = t_raw.extras["head"]["bbox_regression"].double()
    rt = rt + 0.3 * torch.randn(rt.shape, generator=g, dtype=torch.float64).abs()
    t = ModelOutput(taps={"cls_logits": zt}, extras={"head": {"bbox_regression": rt}})
    return request.param, s_raw, t, batch.targets, matched, student


def leaves(s_raw: ModelOutput) -> tuple[ModelOutput, Tensor, Tensor]:
    zs = s_raw.taps["cls_logits"].detach().double().requires_grad_()
    rs = s_raw.extras["head"]["bbox_regression"].detach().double().requires_grad_()
    extras = dict(s_raw.extras)
    extras["head"] = {"bbox_regression": rs}
    return ModelOutput(taps={"cls_logits": zs}, extras=extras), zs, rs


def test_match_locations_is_torchvisions_assignment(head_case) -> None:
    family, s_raw, _, targets, matched, _ = head_case
    got = s_raw.extras["match"](targets)
    assert torch.equal(got, matched)
    assert (matched >= 0).sum() > 0 and (matched[1] == -1).all()  # positives; the empty image has none
    if family == "retinanet":
        assert (matched == -2).any()  # IoU in [0.4, 0.5): ignored


def test_decoded_boxes_are_torchvisions(head_case) -> None:
    family, s_raw, _, _, _, student = head_case
    reg = s_raw.extras["head"]["bbox_regression"]
    boxes = s_raw.extras["decode"](reg)
    coder = student.net.box_coder
    for i, a in enumerate(s_raw.extras["anchors"]):  # one image at a time, the coder's own call
        want = coder.decode(reg[i], a) if family == "fcos" else coder.decode_single(reg[i], a)
        torch.testing.assert_close(boxes[i], want)


def level_slices(s: ModelOutput) -> list[slice]:
    out, start = [], 0
    for n in s.extras["num_anchors_per_level"]:
        out.append(slice(start, start + n))
        start += n
    return out


def gt_labels(matched: Tensor, targets: list[dict]) -> Tensor:
    lab = torch.zeros_like(matched)
    for i, t in enumerate(targets):
        pos = matched[i] >= 0
        lab[i, pos] = t["labels"][matched[i, pos]]
    return lab


def test_kd_positives_mode_is_lds_main_kd(head_case) -> None:
    # LD: per level, KL(softmax) at the positives, mean over classes × T², ÷ that level's positives; Σ levels
    _, s_raw, t, targets, matched, _ = head_case
    s, zs, _ = leaves(s_raw)
    tau = 8.0
    ref_s = zs.detach().clone().requires_grad_()
    ref = zs.new_zeros(())
    for sl in level_slices(s):
        pos = matched[:, sl] >= 0
        if pos.sum() == 0:
            continue
        a, b = ref_s[:, sl][pos][:, 1:], t.taps["cls_logits"][:, sl][pos][:, 1:]  # torchvision's column 0 out
        kd = F.kl_div(F.log_softmax(a / tau, 1), F.softmax(b / tau, 1), reduction="none").mean(1) * tau * tau
        ref = ref + kd.sum() / pos.sum()
    m = make(KD, "detection", infos(cls_logits=zs.shape[-1]), mode="positives", class_reduction="mean",
             sample_reduction="level", tau=tau, weight=10.0)
    got = one(m(s, t, targets))
    # 1e-12: LD's mmdet 2.10 divides by the level's positives without mmdet's later "+ float32 eps"
    assert got.item() == pytest.approx(10 * ref.item(), rel=1e-12)
    got.backward()
    (10 * ref).backward()
    torch.testing.assert_close(zs.grad, ref_s.grad, rtol=1e-9, atol=1e-12)
    assert (zs.grad[matched < 0] == 0).all()  # unmatched locations: no term at all


def test_kd_bernoulli_mode_drops_ignored_and_divides_by_positives(head_case) -> None:
    _, s_raw, t, targets, matched, _ = head_case
    s, zs, _ = leaves(s_raw)
    zt = t.taps["cls_logits"]
    p, q = torch.sigmoid(zt), torch.sigmoid(zs.detach())
    per = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).sum(-1)
    # mmdet: every image counts ≥ 1 positive (image 1 has none) and weight_reduce_loss adds float32 eps
    avg_factor = float((matched >= 0).sum(1).clamp(min=1).sum())
    want = (per * (matched != -2)).sum() / (avg_factor + torch.finfo(torch.float32).eps)
    m = make(KD, "detection", infos(cls_logits=zs.shape[-1]), drop_ignored=True, sample_reduction="avg_factor")
    got = one(m(s, t, targets))
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    assert (zs.grad[matched == -2] == 0).all() and zs.grad[matched == -1].abs().sum() > 0


@pytest.mark.parametrize("name", ["dkd", "nkd"])
def test_dkd_nkd_at_positive_locations_match_official(head_case, name: str) -> None:
    _, s_raw, t, targets, matched, _ = head_case
    s, zs, _ = leaves(s_raw)
    pos = matched >= 0
    labels = gt_labels(matched, targets)[pos] - 1  # torchvision class y → column y−1 (background 0 dropped)
    ref_s = zs.detach().clone().requires_grad_()
    a, b = ref_s[pos][:, 1:], t.taps["cls_logits"][pos][:, 1:]
    ref = mdistiller_dkd(a, b, labels, 1.0, 0.25, 1.0) if name == "dkd" else clskd_nkd(a, b, labels, 1.0, 1.5)
    m = make(DKD if name == "dkd" else NKD, "detection", infos(cls_logits=zs.shape[-1]))
    got = one(m(s, t, targets))
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    got.backward()
    ref.backward()
    torch.testing.assert_close(zs.grad, ref_s.grad, rtol=1e-9, atol=1e-12)
    assert (zs.grad[~pos] == 0).all()


@pytest.mark.parametrize("beta", [1.0, 2.0, 0.5])
def test_bckd_chunked_binary_kd_equals_the_elementwise_form(monkeypatch: pytest.MonkeyPatch, beta: float) -> None:
    """BCKD's chunked binary KD (no element-wise graph) has the value and gradient of
    ``(binary_kd(z_s, z_t, β).sum(-1) * v).sum()`` in float64, over chunks that do not divide the rows, for the
    preset's β = 1 and others (the modulating factor's own gradient); a zero gap gives a finite gradient."""
    from kdcli.methods import _logits, bckd

    monkeypatch.setattr(_logits, "CHUNK_ELEMENTS", 4 * 6)  # 4 rows of 6 classes per chunk; 7 rows per sample
    g = torch.Generator().manual_seed(1)
    zs = (2 * torch.randn(2, 7, 6, generator=g, dtype=torch.float64)).requires_grad_()
    zt = 2 * torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    zt[0, 0, 0] = zs[0, 0, 0].detach()  # gap 0 at one element
    v = (torch.rand(2, 7, generator=g) > 0.3).double()
    ref_s = zs.detach().clone().requires_grad_()
    want = (bckd.binary_kd(ref_s, zt, beta).sum(-1) * v).sum()
    got = bckd.binary_kd_total(zs, zt, v, beta)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    got.backward()
    want.backward()
    assert torch.isfinite(zs.grad).all()
    keep = torch.ones_like(zs, dtype=torch.bool)
    keep[0, 0, 0] = beta >= 1  # below 1 autograd's gap^(β−1) at gap 0 is inf·0 = nan; ours is 0
    torch.testing.assert_close(zs.grad[keep], ref_s.grad[keep], rtol=1e-10, atol=1e-14)
    assert (zs.grad[v == 0] == 0).all()


def test_bckd_matches_official_per_level_code(head_case) -> None:
    family, s_raw, t, targets, matched, student = head_case
    s, zs, rs = leaves(s_raw)
    zt, rt = t.taps["cls_logits"], t.extras["head"]["bbox_regression"]
    coder = student.net.box_coder
    anchors = [a.double() for a in s.extras["anchors"]]

    def decode(reg: Tensor) -> Tensor:
        return torch.stack([coder.decode(r, a) if family == "fcos" else coder.decode_single(r, a)
                            for r, a in zip(reg, anchors, strict=True)])

    ref_z, ref_r = zs.detach().clone().requires_grad_(), rs.detach().clone().requires_grad_()
    bs, bt = decode(ref_r), decode(rt)
    # LDHead.get_targets: Σ_images max(#pos, 1) (image 1 has none); weight_reduce_loss: ÷ (avg_factor + eps)
    num_total = max(float(sum(max(int(n), 1) for n in (matched >= 0).sum(1))), 1.0)
    divisor = num_total + torch.finfo(torch.float32).eps
    loss_kd = loss_box = zs.new_zeros(())
    for sl in level_slices(s):  # LDHead.loss_single: one FPN level at a time
        if (matched[:, sl] >= 0).sum() == 0:
            continue  # the official "this level has positives" branch
        c = zs.shape[-1]
        pred, soft = ref_z[:, sl].reshape(-1, c), zt[:, sl].reshape(-1, c)
        label_w = (matched[:, sl] != -2).reshape(-1).double()
        target, score = soft.sigmoid(), pred.sigmoid()
        kd = (F.binary_cross_entropy_with_logits(pred, target, reduction="none") * (target - score).abs()).sum(1)
        loss_kd = loss_kd + (kd * label_w).sum() / divisor
        w = (soft.sigmoid() - pred.detach().sigmoid()).abs().max(1)[0] * label_w
        giou = mmdet_giou_loss(bs[:, sl].reshape(-1, 4), bt[:, sl].reshape(-1, 4))
        loss_box = loss_box + 4.0 * (giou * w).sum() / divisor
    m = make(BCKD, "detection", infos(cls_logits=zs.shape[-1]))
    got = m(s, t, targets)
    assert got["bckd.cls_logits"].item() == pytest.approx(loss_kd.item(), rel=1e-12)
    assert got["bckd.boxes"].item() == pytest.approx(loss_box.item(), rel=1e-12)
    sum(got.values()).backward()
    (loss_kd + loss_box).backward()
    torch.testing.assert_close(zs.grad, ref_z.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(rs.grad, ref_r.grad, rtol=1e-10, atol=1e-14)
    assert (zs.grad[matched == -2] == 0).all() and zs.grad[matched == -1].abs().sum() > 0


def test_uskd_on_a_sigmoid_head_uses_positives_and_fpn_weak_head(head_case) -> None:
    family, s_raw, _, targets, matched, student = head_case
    m = make(USKD, "detection", student.tap_info).double()
    assert m.feat_taps == tuple(n for n in ("p3", "p4", "p5", "p6", "p7") if n in student.tap_info)
    s, zs, _ = leaves(s_raw)
    s.taps.update({n: s_raw.taps[n].detach().double() for n in m.feat_taps})
    loss = one(m(s, None, targets))
    loss.backward()
    pos = matched >= 0
    assert (zs.grad[~pos] == 0).all() and zs.grad[pos].abs().sum() > 0
    assert m.weak.weight.grad.abs().sum() > 0
    # by hand: the weak logits laid out like cls_logits (level, y, x, anchor), positives, official loss
    a = zs.shape[1] // sum(s_raw.taps[n].shape[-1] * s_raw.taps[n].shape[-2] for n in m.feat_taps)
    fc = nn.Linear(m.weak.in_channels, m.weak.out_channels).double()
    with torch.no_grad():
        fc.weight.copy_(m.weak.weight[:, :, 0, 0])
        fc.bias.copy_(m.weak.bias)
    feats = torch.cat([s.taps[n].flatten(2).transpose(1, 2) for n in m.feat_taps], 1).repeat_interleave(a, 1)
    labels = gt_labels(matched, targets)[pos] - 1
    ref = clskd_uskd(feats[pos], zs.detach()[pos][:, 1:], labels, fc, 1.0, 0.1, 0.005)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)


# ================================================================== configuration errors
def test_bad_options_are_named() -> None:
    s = infos(cls_logits=5)
    with pytest.raises(ConfigError, match="mode"):
        make(KD, "detection", s, mode="lol")
    with pytest.raises(ConfigError, match="sample_reduction"):
        make(KD, "segmentation", infos(seg_logits=4), sample_reduction="level")
    with pytest.raises(ConfigError, match="rank"):
        make(USKD, "segmentation", infos(seg_logits=4, c4=8), rank="nope")
    with pytest.raises(MethodError, match="feat_taps"):
        make(USKD, "segmentation", infos(seg_logits=4, c5=8))
    with pytest.raises(MethodError, match="extras\\['match'\\]"):  # positives need the student's assignment
        make(DKD, "detection", s)(ModelOutput(taps={"cls_logits": torch.randn(1, 6, 5)}),
                                  ModelOutput(taps={"cls_logits": torch.randn(1, 6, 5)}), None)
    with pytest.raises(MethodError, match="4 classes.*5|5 classes.*4"):
        make(NKD, "segmentation", infos(seg_logits=5), infos(seg_logits=4))


# ================================================================== bf16 autocast
def _synthetic_det(zs: Tensor, zt: Tensor) -> tuple[ModelOutput, ModelOutput, list]:
    n, length, _ = zs.shape
    matched = torch.full((n, length), -1, dtype=torch.long)
    matched[:, ::3] = 0
    matched[:, 1::7] = -2
    reg_s = (torch.randn(n, length, 4) * 3000).bfloat16().requires_grad_()
    reg_t = (torch.randn(n, length, 4) * 3000).bfloat16()
    anchors = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(length, 4)

    def decode(reg: Tensor) -> Tensor:  # ltrb around the anchor centre, clamped like a real head's exp
        return torch.cat([4 - reg[..., :2].float().clamp(0, 1e4), 4 + reg[..., 2:].float().clamp(0, 1e4)], -1) \
            + anchors * 0

    extras = {"match": lambda targets: matched, "decode": decode, "num_anchors_per_level": [9, length - 9],
              "head": {"bbox_regression": reg_s}}
    targets = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([2])} for _ in range(n)]
    return (ModelOutput(taps={"cls_logits": zs}, extras=extras),
            ModelOutput(taps={"cls_logits": zt}, extras={"head": {"bbox_regression": reg_t}}), targets)


BF16_CASES = [*((n, "segmentation") for n in ("kd", "dkd", "nkd", "uskd")),
              *((n, "detection") for n in ("kd", "dkd", "nkd", "uskd", "bckd", "kd-positives"))]


@pytest.mark.parametrize("name,task", BF16_CASES)
def test_finite_under_bf16_autocast(name: str, task: str) -> None:
    method, over = (("kd", {"mode": "positives", "tau": 0.5}) if name == "kd-positives" else (name, {}))
    g = torch.Generator().manual_seed(60)
    if task == "segmentation":
        zs = (torch.randn(2, 6, 4, 4, generator=g) * 3000).bfloat16().requires_grad_()
        zt = (torch.randn(2, 6, 4, 4, generator=g) * 3000).bfloat16()
        feat = (torch.randn(2, 5, 2, 2, generator=g) * 3000).bfloat16()
        s, t = ModelOutput(taps={"seg_logits": zs, "c4": feat}), ModelOutput(taps={"seg_logits": zt})
        targets = torch.randint(0, 6, (2, 8, 8), generator=g)
        targets[0, 0] = 255
        info = infos(seg_logits=6, c4=5)
    else:
        zs = (torch.randn(2, 12, 6, generator=g) * 3000).bfloat16().requires_grad_()
        zt = (torch.randn(2, 12, 6, generator=g) * 3000).bfloat16()
        s, t, targets = _synthetic_det(zs, zt)
        s.taps.update(p3=(torch.randn(2, 5, 3, 3, generator=g) * 3000).bfloat16(),
                      p4=(torch.randn(2, 5, 1, 3, generator=g) * 3000).bfloat16())
        info = {**infos(cls_logits=6), "p3": TapInfo("p3", 5, 8), "p4": TapInfo("p4", 5, 16)}
    m = build(method, info, info, task, over)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(s, None if method == "uskd" else t, targets)
    for k, v in losses.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), (k, v)
    sum(losses.values()).backward()
    assert torch.isfinite(zs.grad.float()).all() and zs.grad.float().abs().sum() > 0


# ================================================================== training
@pytest.mark.parametrize("family", ["fcos", "segmentation"])  # RetinaNet: see the head test above
def test_uskd_trains_a_few_steps_without_teacher(family: str) -> None:
    if family == "segmentation":
        torch.manual_seed(0)
        student = build_model(get_spec("shapes-mbv3-lraspp")).train()
        g = torch.Generator().manual_seed(0)
        mask = torch.zeros(2, 64, 64, dtype=torch.long)
        mask[:, 10:30, 10:30] = 2
        mask[:, :2] = 255
        batch = student.preprocess(torch.rand(2, 3, 64, 64, generator=g), mask)
    else:
        student = copy.deepcopy(_pair(family)[1])
        batch = _det_batch(student, 64)
    method = build("uskd", student.tap_info, student.tap_info, student.task)
    assert type(method.methods["uskd"]).needs_teacher is False
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=1e-3)
    before = [p.detach().clone() for p in student.parameters()]
    weak_before = method.methods["uskd"].weak.weight.detach().clone()
    for _ in range(2):
        out = student(batch)
        kd = method(out, method.teacher_forward(batch, set(method.needs)), batch.targets)
        assert kd and all(torch.isfinite(v) and v > 0 for v in kd.values()), kd
        opt.zero_grad()
        sum(kd.values()).backward(retain_graph=True)
        assert any(float(p.grad.abs().sum()) > 0 for p in student.parameters() if p.grad is not None)
        sum(out.losses.values()).backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True))
    assert not torch.equal(weak_before, method.methods["uskd"].weak.weight)


def test_uskd_run_without_teacher(tiny_shapes: Path, tmp_path: Path) -> None:
    cfg = RunConfig(data=f"coco:{tiny_shapes / 'coco'}", out=str(tmp_path / "uskd"), epochs=1, batch_size=4,
                    image_size=64, workers=0, optimizer="adamw", lr=1e-3, warmup_iters=2, bn_recal=2, device="cpu",
                    model="shapes-r18-fcos", method="uskd", max_train_images=4, max_val_images=2)
    folder, metrics = api.train(cfg, log=lambda s: None)
    rows = list(csv.DictReader(open(folder / "results.csv")))
    assert math.isfinite(float(rows[0]["loss/uskd.cls_logits"])) and 0.0 <= metrics["mAP"] <= 1.0
