"""Numerical parity of cwd, pkd, mgd, maskd, freekd and cankd with their official implementations.

Each ``official_*`` function below re-states one official loss in that code's own structure: the
same operations in the same order (materialised N×T×C×H×W masked features, ``view(-1, H·W)``
softmaxes, per-level Python loops, ``F.mse_loss(...) / 2``, the global-RNG mask draw …), the same
reductions and the same quirks. They were written for these tests from reading the official files
named in each docstring (commits in docs/methods/sources.md) and share no code with
kdcli. Both sides get identical float64 tensors, identical parameters (copied, for the learnable
modules through the methods' own ``load_official`` where they have one) and identical masks; the
losses and the gradients with respect to the student features and to **every** learnable parameter
must agree to float64 round-off (rtol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcli.methods.cankd import CanKD
from kdcli.methods.cwd import CWD
from kdcli.methods.freekd import FreeKD
from kdcli.methods.maskd import MasKD
from kdcli.methods.mgd import MGD
from kdcli.methods.pkd import PKD
from kdcli.models.taps import ModelOutput, TapInfo

RTOL = 1e-10


# ------------------------------------------------------------------------------------------ helpers
def infos(kind: str = "feature", **channels: int) -> dict[str, TapInfo]:
    out: dict[str, TapInfo] = {}
    for name, c in channels.items():
        stride = 2 ** int(name[1]) if name[0] == "p" else 8
        out[name] = TapInfo(name, c, stride, "logits" if "logits" in name else kind)
    return out


def make(cls: type, task: str, student: dict, teacher: dict, **overrides: object):
    return cls(student, teacher, task, **cls.resolve_hparams(task, overrides)).double()


def rnd(*shape: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def maps(shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    return {tap: rnd(*shape, seed=seed + i, scale=scale) for i, (tap, shape) in enumerate(shapes.items())}


def leaves(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.clone().requires_grad_() for k, v in d.items()}


def assert_close(got: Tensor, want: Tensor, what: str, floor: float = 0.0) -> None:
    """rtol 1e-10. The absolute tolerance scales with the reference (tiny-weight losses such as MGD's α = 2e-5
    are held to the same relative standard); ``floor`` admits the round-off of analytically zero gradients
    (e.g. a conv bias in front of a train-mode BN)."""
    atol = 1e-12 * float(want.detach().abs().max()) + floor + 1e-300
    torch.testing.assert_close(got, want, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def check(
    ours: Tensor,
    official: Tensor,
    our_leaves: list[Tensor],
    official_leaves: list[Tensor],
    names: list[str],
) -> None:
    """Loss values and the gradients of both losses with respect to matching leaves."""
    assert_close(ours, official, "loss")
    g_ours = torch.autograd.grad(ours, our_leaves, allow_unused=True)
    g_off = torch.autograd.grad(official, official_leaves, allow_unused=True)
    scale = max(float(b.abs().max()) for b in g_off if b is not None)
    assert scale > 0, "the official loss has no gradient at all"
    for name, a, b in zip(names, g_ours, g_off, strict=True):
        assert (a is None) == (b is None), f"{name}: gradient present on one side only"
        if a is not None:
            assert_close(a, b, f"grad {name}", floor=1e-13 * scale)


def total(losses: dict[str, Tensor]) -> Tensor:
    return torch.stack(list(losses.values())).sum()


def copied(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Independent leaf copies of our parameters for the official side."""
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


# ============================================================================================ CWD
def official_cwd_mmrazor(preds_s: Tensor, preds_t: Tensor, tau: float, loss_weight: float) -> Tensor:
    """open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py`` ``ChannelWiseDivergence.forward``."""
    assert preds_s.shape[-2:] == preds_t.shape[-2:]
    n, c, w, h = preds_s.shape  # (sic) the official code unpacks H and W swapped; only their product is used
    soft_t = F.softmax(preds_t.reshape(-1, w * h) / tau, dim=1)
    logsoftmax = nn.LogSoftmax(dim=1)
    loss = torch.sum(
        soft_t * logsoftmax(preds_t.reshape(-1, w * h) / tau) - soft_t * logsoftmax(preds_s.reshape(-1, w * h) / tau)
    ) * (tau**2)
    return loss_weight * loss / (c * n)


def official_cwd_pppppm(preds_s: Tensor, preds_t: Tensor, align: tuple[Tensor, Tensor] | None, tau: float,
                        weight: float) -> Tensor:
    """pppppM/mmdetection-distiller ``mmdet/distillation/losses/cwd.py`` (official CWD detection): N, C read
    **before** the align conv; cross-entropy −Σ p_T log p_S instead of the KL."""
    n, c, w, h = preds_s.shape
    if align is not None:
        preds_s = F.conv2d(preds_s, align[0], align[1])
    soft_t = F.softmax(preds_t.reshape(-1, w * h) / tau, dim=1)
    logsoftmax = nn.LogSoftmax(dim=1)
    loss = torch.sum(-soft_t * logsoftmax(preds_s.reshape(-1, w * h) / tau)) * (tau**2)
    return weight * loss / (c * n)


def official_cwd_cirkd(preds_s: Tensor, preds_t: Tensor, conv_w: Tensor, tau: float) -> Tensor:
    """winycg/CIRKD ``losses/cwd.py`` ``CriterionCWD(norm_type='channel', divergence='kl')``: n, c read before
    the bias-free 1×1 conv; ``KLDivLoss(sum)`` on ``log(softmax)``; ÷ n·c; × τ²."""
    n, c, h, w = preds_s.shape
    if preds_s.size(1) != preds_t.size(1):
        preds_s = F.conv2d(preds_s, conv_w)
    norm_s = (preds_s / tau).reshape(n, preds_s.shape[1], -1).softmax(dim=-1)
    norm_t = (preds_t.detach() / tau).reshape(n, preds_t.shape[1], -1).softmax(dim=-1)
    loss = nn.KLDivLoss(reduction="sum")(norm_s.log(), norm_t)
    loss = loss / (n * c)
    return loss * tau**2


def official_mgd_seg_logit_term(logit_s: Tensor, logit_t: Tensor) -> Tensor:
    """yzd-v/MGD ``seg/mmseg/distillation/distillers/segmentation_distiller.py``: the logit CWD term (τ 4, ×3)."""
    n, c, h, w = logit_s.shape
    soft_t = F.softmax(logit_t.reshape(-1, w * h) / 4, dim=1)
    logsoftmax = nn.LogSoftmax(dim=1)
    loss = torch.sum(soft_t * logsoftmax(logit_t.reshape(-1, w * h) / 4) - soft_t * logsoftmax(
        logit_s.reshape(-1, w * h) / 4)) * (4**2)
    return 3 * loss / (c * n)


FPN5 = {"p3": (2, 6, 16, 12), "p4": (2, 6, 8, 6), "p5": (2, 6, 4, 3), "p6": (2, 6, 2, 2), "p7": (2, 6, 1, 1)}


def test_cwd_detection_preset_equals_mmrazor_summed_over_five_levels() -> None:
    m = make(CWD, "detection", infos(p3=6, p4=6, p5=6, p6=6, p7=6), infos(p3=6, p4=6, p5=6, p6=6, p7=6))
    fs, ft = leaves(maps(FPN5, 1, scale=3.0)), maps(FPN5, 20, scale=3.0)
    ours = total(m(ModelOutput(taps=fs), ModelOutput(taps=ft)))
    fo = leaves({k: v.detach() for k, v in fs.items()})
    official = sum(official_cwd_mmrazor(fo[k], ft[k], tau=1.0, loss_weight=10.0) for k in FPN5)
    check(ours, official, list(fs.values()), list(fo.values()), list(fs))


def test_cwd_detection_adapter_equals_pppppm_gradient_and_differs_by_teacher_entropy() -> None:
    """pppppM's CE has the same gradient; its value exceeds the KL by w·τ²/(N·C_S)·Σ H(p_T)."""
    m = make(CWD, "detection", infos(p3=4), infos(p3=6), taps="p3", weight=5.0, tau=2.0)
    fs, ft = rnd(2, 4, 7, 5, seed=3, scale=2.0).requires_grad_(), rnd(2, 6, 7, 5, seed=4, scale=2.0)
    conv = m.adapters["p3"]
    ours = total(m(ModelOutput(taps={"p3": fs}), ModelOutput(taps={"p3": ft})))
    off = copied({"x": fs, "w": conv.weight, "b": conv.bias})
    official = official_cwd_pppppm(off["x"], ft, (off["w"], off["b"]), tau=2.0, weight=5.0)
    p_t = F.softmax(ft.reshape(-1, 35) / 2.0, dim=1)
    entropy_term = 5.0 * 4.0 * torch.sum(-p_t * p_t.log()) / (4 * 2)  # C = student channels (quirk)
    check(ours, official - entropy_term, [fs, conv.weight, conv.bias], list(off.values()), ["x", "align.w", "align.b"])


def test_cwd_segmentation_feature_adapter_equals_cirkd() -> None:
    m = make(CWD, "segmentation", infos(seg_feat=4), infos(seg_feat=6), taps="seg_feat")
    assert m.adapters["seg_feat"].bias is None  # CIRKD's conv has no bias
    fs, ft = rnd(2, 4, 6, 9, seed=5, scale=2.0).requires_grad_(), rnd(2, 6, 6, 9, seed=6, scale=2.0)
    conv = m.adapters["seg_feat"]
    ours = total(m(ModelOutput(taps={"seg_feat": fs}), ModelOutput(taps={"seg_feat": ft})))
    off = copied({"x": fs, "w": conv.weight})
    official = 3.0 * official_cwd_cirkd(off["x"], ft, off["w"], tau=4.0)  # × λ_cwd = 3 in the training script
    check(ours, official, [fs, conv.weight], list(off.values()), ["x", "conv.w"])


def test_cwd_segmentation_preset_is_mgd_official_logit_term() -> None:
    m = make(CWD, "segmentation", infos(seg_logits=5), infos(seg_logits=5))
    fs, ft = rnd(2, 5, 8, 16, seed=7, scale=4.0).requires_grad_(), rnd(2, 5, 8, 16, seed=8, scale=4.0)
    ours = total(m(ModelOutput(taps={"seg_logits": fs}), ModelOutput(taps={"seg_logits": ft})))
    fo = fs.detach().clone().requires_grad_()
    check(ours, official_mgd_seg_logit_term(fo, ft), [fs], [fo], ["x"])


def test_cwd_parity_catches_a_wrong_reduction() -> None:
    """The comparison is sharp: mmrazor's value divided by H·W as well (a 'mean' reduction) is rejected."""
    fs, ft = rnd(2, 3, 4, 4, seed=9), rnd(2, 3, 4, 4, seed=10)
    m = make(CWD, "detection", infos(p3=3), infos(p3=3), taps="p3")
    ours = total(m(ModelOutput(taps={"p3": fs}), ModelOutput(taps={"p3": ft})))
    with pytest.raises(AssertionError):
        assert_close(ours, official_cwd_mmrazor(fs, ft, 1.0, 10.0) / 16, "loss")


# ============================================================================================ PKD
def official_pkd_norm(feat: Tensor) -> Tensor:
    """mmrazor ``PKDLoss.norm``: per channel over (N, H, W), unbiased std, + 1e-6."""
    n, c, h, w = feat.shape
    feat = feat.permute(1, 0, 2, 3).reshape(c, -1)
    mean = feat.mean(dim=-1, keepdim=True)
    std = feat.std(dim=-1, keepdim=True)
    feat = (feat - mean) / (std + 1e-6)
    return feat.reshape(c, n, h, w).permute(1, 0, 2, 3)


def official_pkd(preds_s: list[Tensor], preds_t: list[Tensor], loss_weight: float, resize_stu: bool = True) -> Tensor:
    """open-mmlab/mmrazor ``mmrazor/models/losses/pkd_loss.py`` ``PKDLoss.forward`` over a tuple of levels."""
    loss = 0.0
    for pred_s, pred_t in zip(preds_s, preds_t, strict=True):
        size_s, size_t = pred_s.shape[2:], pred_t.shape[2:]
        if size_s[0] != size_t[0]:
            if resize_stu:
                pred_s = F.interpolate(pred_s, size_t, mode="bilinear")
            else:
                pred_t = F.interpolate(pred_t, size_s, mode="bilinear")
        assert pred_s.shape == pred_t.shape
        norm_s, norm_t = official_pkd_norm(pred_s), official_pkd_norm(pred_t)
        loss = loss + F.mse_loss(norm_s, norm_t) / 2
    return loss * loss_weight


FPN4 = {"p3": (2, 5, 12, 10), "p4": (2, 5, 6, 5), "p5": (2, 5, 3, 3), "p6": (2, 5, 2, 2)}


@pytest.mark.parametrize("resize_stu", [True, False])
def test_pkd_detection_preset_equals_mmrazor(resize_stu: bool) -> None:
    fpn5 = infos(p3=5, p4=5, p5=5, p6=5, p7=5)
    m = make(PKD, "detection", fpn5, fpn5, resize_stu=resize_stu)
    assert m.taps == ("p3", "p4", "p5", "p6")
    student_shapes = dict(FPN4, p4=(2, 5, 9, 7))  # p4: a student map of another size (both H and W differ)
    fs, ft = leaves(maps(student_shapes, 30, scale=2.0)), maps(FPN4, 40)
    ours = total(m(ModelOutput(taps=fs), ModelOutput(taps=ft)))
    fo = leaves({k: v.detach() for k, v in fs.items()})
    official = official_pkd(list(fo.values()), list(ft.values()), 10.0, resize_stu)
    check(ours, official, list(fs.values()), list(fo.values()), list(fs))


def test_pkd_connector_equals_conv_then_mmrazor() -> None:
    m = make(PKD, "segmentation", infos(c5=3), infos(c5=6))
    conv = m.connectors["c5"]
    fs, ft = rnd(2, 3, 5, 7, seed=50).requires_grad_(), rnd(2, 6, 5, 7, seed=51, shift=2.0)
    ours = total(m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft})))
    off = copied({"x": fs, "w": conv.weight, "b": conv.bias})
    official = official_pkd([F.conv2d(off["x"], off["w"], off["b"])], [ft], 10.0)
    check(ours, official, [fs, conv.weight, conv.bias], list(off.values()), ["x", "conn.w", "conn.b"])


# ============================================================================================ MGD
def official_mgd_feature_loss(
    preds_s: Tensor,
    preds_t: Tensor,
    p: dict[str, Tensor],
    alpha_mgd: float,
    lambda_mgd: float,
    mat: Tensor | None = None,
    mask_on_channel: bool = False,
) -> Tensor:
    """yzd-v/MGD ``det/mmdet/distillation/losses/mgd.py`` (= ``seg/...``) ``FeatureLoss.forward``; the mask is
    drawn from the global CPU RNG exactly there unless ``mat`` is given; ``mask_on_channel`` is mmrazor's
    ``MGDConnector`` variant (N, C, 1, 1)."""
    assert preds_s.shape[-2:] == preds_t.shape[-2:]
    if "align.weight" in p:
        preds_s = F.conv2d(preds_s, p["align.weight"], p["align.bias"])
    n, c, h, w = preds_t.shape
    if mat is None:
        mat = torch.rand((n, c, 1, 1) if mask_on_channel else (n, 1, h, w)).to(preds_s.device)
        mat = torch.where(mat > 1 - lambda_mgd, 0, 1).to(preds_s.device)
    masked_fea = torch.mul(preds_s, mat)
    hidden = F.relu(F.conv2d(masked_fea, p["generation.0.weight"], p["generation.0.bias"], padding=1))
    new_fea = F.conv2d(hidden, p["generation.2.weight"], p["generation.2.bias"], padding=1)
    return nn.MSELoss(reduction="sum")(new_fea, preds_t) / n * alpha_mgd


def mgd_params(m: MGD, tap: str) -> dict[str, Tensor]:
    return dict(m.blocks[tap].named_parameters())


def test_mgd_detection_equals_official_with_the_global_rng_in_config_order() -> None:
    """Same seed → same masks: the official distiller computes fpn_4 … fpn_0 (P7 first), ours too."""
    fpn5 = infos(p3=4, p4=4, p5=4, p6=4, p7=4)
    m = make(MGD, "detection", fpn5, fpn5)
    shapes = {k: (2, 4, *v[2:]) for k, v in FPN5.items()}
    fs, ft = leaves(maps(shapes, 60, scale=2.0)), maps(shapes, 70, scale=2.0)
    torch.manual_seed(1234)
    losses = m(ModelOutput(taps=fs), ModelOutput(taps=ft))
    ours = total(losses)
    fo = leaves({k: v.detach() for k, v in fs.items()})
    params = {tap: copied(mgd_params(m, tap)) for tap in shapes}
    torch.manual_seed(1234)
    per_level = {tap: official_mgd_feature_loss(fo[tap], ft[tap], params[tap], 2e-5, 0.65) for tap in reversed(FPN5)}
    for tap in shapes:  # per-level values too (a different draw order would swap the masks)
        assert_close(losses[f"mgd.{tap}"], per_level[tap], tap)
    official = sum(per_level.values())
    ours_leaves = list(fs.values()) + [p for tap in shapes for p in mgd_params(m, tap).values()]
    off_leaves = list(fo.values()) + [p for tap in shapes for p in params[tap].values()]
    names = list(fs) + [f"{tap}.{k}" for tap in shapes for k in params[tap]]
    check(ours, official, ours_leaves, off_leaves, names)


@pytest.mark.parametrize("mask_on_channel", [False, True])
def test_mgd_segmentation_align_and_injected_mask_equal_official(mask_on_channel: bool) -> None:
    m = make(MGD, "segmentation", infos(c5=3), infos(c5=5), mask_on_channel=mask_on_channel)
    assert set(mgd_params(m, "c5")) == {"align.weight", "align.bias", "generation.0.weight", "generation.0.bias",
                                        "generation.2.weight", "generation.2.bias"}
    fs, ft = rnd(2, 3, 6, 7, seed=80).requires_grad_(), rnd(2, 5, 6, 7, seed=81)
    g = torch.Generator().manual_seed(5)
    shape = (2, 5, 1, 1) if mask_on_channel else (2, 1, 6, 7)
    mat = torch.where(torch.rand(shape, generator=g) > 1 - 0.75, 0, 1)
    ours = total(m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft}), masks={"c5": mat}))
    off = copied({"x": fs, **mgd_params(m, "c5")})
    official = official_mgd_feature_loss(off["x"], ft, off, 2e-5, 0.75, mat=mat)
    ours_leaves = [fs, *mgd_params(m, "c5").values()]
    check(ours, official, ours_leaves, list(off.values()), ["x", *mgd_params(m, "c5")])


def test_mgd_parity_catches_a_mean_reduction_and_an_inverted_mask() -> None:
    m = make(MGD, "segmentation", infos(c5=4), infos(c5=4))
    fs, ft = rnd(2, 4, 5, 5, seed=90), rnd(2, 4, 5, 5, seed=91)
    mat = torch.where(torch.rand((2, 1, 5, 5), generator=torch.Generator().manual_seed(2)) > 0.25, 0, 1)
    ours = total(m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft}), masks={"c5": mat}))
    p = mgd_params(m, "c5")
    with pytest.raises(AssertionError):
        assert_close(ours, official_mgd_feature_loss(fs, ft, p, 2e-5, 0.75, mat=1 - mat), "inverted mask")
    with pytest.raises(AssertionError):
        assert_close(ours, official_mgd_feature_loss(fs, ft, p, 2e-5, 0.75, mat=mat) * 2 / 100, "mean")


# ========================================================================================== MasKD
def official_maskd_forward_mask(x: Tensor, mask_token: Tensor) -> Tensor:
    """hunto/MasKD ``MaskModule.forward_mask``."""
    n, c, h, w = x.shape
    token = mask_token.expand(n, -1, -1)  # [N, T, C]
    attn = token @ x.view(n, -1, h * w)
    return attn.sigmoid().view(n, -1, h, w)


def official_maskd_det(
    ys: list[Tensor], yt: list[Tensor], p: list[dict[str, Tensor]], loss_weight: float, custom: bool
) -> Tensor:
    """hunto/MasKD ``mmrazor/mmrazor/models/losses/maskd.py`` ``MasKDLoss.forward`` (weight_mask=True), after the
    distiller's per-level ``align_modules.component_0.{i}`` convs (``single_teacher.py``)."""
    ys = [F.conv2d(y, q["align.weight"], q["align.bias"]) for y, q in zip(ys, p, strict=True)]
    losses = []
    for y_s, y_t, q in zip(ys, yt, p, strict=True):
        mask = official_maskd_forward_mask(y_t, q["mask_token"])
        if custom:
            with torch.no_grad():
                mask_s = official_maskd_forward_mask(y_s, q["mask_token"])
            mask = mask * mask_s
        masked_y_s = y_s.unsqueeze(1) * mask.unsqueeze(2)  # [N, T, C, H, W]
        masked_y_t = y_t.unsqueeze(1) * mask.unsqueeze(2)
        loss = (masked_y_s - masked_y_t) ** 2
        loss = loss.sum((3, 4))  # [N, T, C]
        loss = loss / mask.sum((2, 3)).unsqueeze(-1)
        hidden = F.conv2d(y_t, q["prob.0.weight"], q["prob.0.bias"], padding=1)
        logits = F.conv2d(F.adaptive_avg_pool2d(hidden, 1), q["prob.2.weight"], q["prob.2.bias"])
        weights = logits.softmax(1).unsqueeze(2).flatten(1)  # [N, T]
        loss = (loss.mean(-1) * weights).sum(-1)
        losses.append(loss.mean())
    return loss_weight * sum(losses)


def official_maskd_seg(y_s: Tensor, y_t: Tensor, mask_token: Tensor) -> Tensor:
    """hunto/MasKD ``segmentation/losses/maskd.py`` ``MasKDLoss.forward`` (× λ_kd = 1 in ``train_maskd.py``)."""
    mask = official_maskd_forward_mask(y_t, mask_token)
    masked_y_s = y_s.unsqueeze(1) * mask.unsqueeze(2)
    masked_y_t = y_t.unsqueeze(1) * mask.unsqueeze(2)
    square_loss = ((masked_y_s - masked_y_t) ** 2).sum((3, 4))
    square_loss = square_loss / (mask.sum((2, 3)).unsqueeze(-1) + 1e-5)
    return square_loss.mean() * 0.5


def official_maskd_state(channels: int, tokens: int, levels: int, seed: int) -> tuple[dict, dict]:
    """An official-layout checkpoint (``distiller.losses.loss_maskd_fpn.mask_modules.{i}.*``) and align dict."""
    g = torch.Generator().manual_seed(seed)
    sd, align = {}, {}
    for i in range(levels):
        head = f"distiller.losses.loss_maskd_fpn.mask_modules.{i}."
        sd[head + "mask_token"] = torch.randn(tokens, channels, generator=g, dtype=torch.float64) * 0.4
        sd[head + "prob.0.weight"] = torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.3
        sd[head + "prob.0.bias"] = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
        sd[head + "prob.2.weight"] = torch.randn(tokens, channels, 1, 1, generator=g, dtype=torch.float64) * 0.5
        sd[head + "prob.2.bias"] = torch.randn(tokens, generator=g, dtype=torch.float64) * 0.1
        align[f"distiller.align_modules.component_0.{i}.weight"] = torch.randn(
            channels, channels, 1, 1, generator=g, dtype=torch.float64) * 0.5
        align[f"distiller.align_modules.component_0.{i}.bias"] = torch.randn(channels, generator=g, dtype=torch.float64)
    return sd, align


def maskd_params(m: MasKD, tap: str) -> dict[str, Tensor]:
    mm, al = m.mask_modules[tap], m.align[tap]
    return {"mask_token": mm.mask_token, **{f"prob.{k}": v for k, v in mm.prob.named_parameters()},
            "align.weight": al.weight, "align.bias": al.bias}


@pytest.mark.parametrize("custom", [False, True])
def test_maskd_detection_equals_official(custom: bool) -> None:
    fpn = infos(p3=5, p4=5, p5=5)
    m = make(MasKD, "detection", fpn, fpn, train_masks=True, custom_mask_warmup=3)
    sd, align = official_maskd_state(5, 6, 3, seed=100)
    m.load_official(sd, align)
    if custom:
        m.iteration.fill_(3)  # the official ``_iter >= custom_mask_warmup``
    shapes = {"p3": (2, 5, 8, 7), "p4": (2, 5, 4, 4), "p5": (2, 5, 2, 2)}
    fs, ft = leaves(maps(shapes, 110, scale=1.5)), maps(shapes, 120, scale=1.5)
    ours = total(m(ModelOutput(taps=fs), ModelOutput(taps=ft)))
    assert m.custom_mask_active == custom
    fo = leaves({k: v.detach() for k, v in fs.items()})
    params = [copied(maskd_params(m, tap)) for tap in shapes]
    official = official_maskd_det(list(fo.values()), list(ft.values()), params, 7.0, custom)
    ours_leaves = list(fs.values()) + [p for tap in shapes for p in maskd_params(m, tap).values()]
    off_leaves = list(fo.values()) + [p for q in params for p in q.values()]
    names = list(fs) + [f"{tap}.{k}" for tap in shapes for k in params[0]]
    check(ours, official, ours_leaves, off_leaves, names)


def test_maskd_segmentation_equals_official_with_the_bare_saved_mask_module() -> None:
    m = make(MasKD, "segmentation", infos(seg_logits=4), infos(seg_logits=4), train_masks=True)
    token = rnd(8, 4, seed=130, scale=0.5)
    m.load_official({"mask_token": token})  # what the CIRKD script's --pretrained-mask file holds
    assert torch.equal(m.mask_modules["seg_logits"].mask_token.detach(), token)
    fs, ft = rnd(2, 4, 6, 10, seed=131, scale=3.0).requires_grad_(), rnd(2, 4, 6, 10, seed=132, scale=3.0)
    ours = total(m(ModelOutput(taps={"seg_logits": fs}), ModelOutput(taps={"seg_logits": ft})))
    off = copied({"x": fs, "mask_token": m.mask_modules["seg_logits"].mask_token})
    official = official_maskd_seg(off["x"], ft, off["mask_token"])
    check(ours, official, [fs, m.mask_modules["seg_logits"].mask_token], list(off.values()), ["x", "mask_token"])


# ========================================================================================= FreeKD
HAAR_LO = (1 / math.sqrt(2), 1 / math.sqrt(2))  # pywt 'haar' dec_lo
HAAR_HI = (-1 / math.sqrt(2), 1 / math.sqrt(2))  # pywt 'haar' dec_hi


def official_afb1d_zero(x: Tensor, h0: Tensor, h1: Tensor, dim: int) -> Tensor:
    """pytorch_wavelets ``lowlevel.afb1d`` in mode 'zero': grouped strided conv with [lo, hi] per channel,
    one extra zero row/column at the end when the output size calls for it (odd input)."""
    c = x.shape[1]
    d = dim % 4
    stride = (2, 1) if d == 2 else (1, 2)
    n = x.shape[d]
    length = h0.numel()
    shape = [1, 1, 1, 1]
    shape[d] = length
    h = torch.cat([h0.reshape(shape), h1.reshape(shape)] * c, dim=0)
    outsize = (n + length - 1) // 2  # pywt.dwt_coeff_len(n, length, 'zero')
    p = 2 * (outsize - 1) - n + length
    if p % 2 == 1:
        x = F.pad(x, (0, 0, 0, 1) if d == 2 else (0, 1, 0, 0))
    pad = (p // 2, 0) if d == 2 else (0, p // 2)
    return F.conv2d(x, h, padding=pad, stride=stride, groups=c)


def official_dwt_haar(x: Tensor, levels: int = 3) -> tuple[Tensor, list[Tensor]]:
    """pytorch_wavelets ``DWTForward(J=3, wave='haar', mode='zero')``: rows (W) then columns (H) per level; the
    analysis filters are the reversed pywt decomposition filters (conv2d correlates)."""
    h0 = torch.tensor(HAAR_LO[::-1], dtype=x.dtype)
    h1 = torch.tensor(HAAR_HI[::-1], dtype=x.dtype)
    yh = []
    ll = x
    for _ in range(levels):
        lohi = official_afb1d_zero(ll, h0, h1, dim=3)
        y = official_afb1d_zero(lohi, h0, h1, dim=2)
        y = y.reshape(y.shape[0], -1, 4, y.shape[-2], y.shape[-1])
        ll = y[:, :, 0].contiguous()
        yh.append(y[:, :, 1:].contiguous())
    return ll, yh


def official_freekd_level(y_s: Tensor, y_t: Tensor, mask_token: Tensor) -> Tensor:
    """Gumpest/FreeKD ``mmrazor/models/losses/freekd.py`` ``FreeKDLoss.forward``, one level."""
    c_a, (c_h, c_v, c_d) = official_dwt_haar(y_t)
    c_a_s, (c_h_s, c_v_s, c_d_s) = official_dwt_haar(y_s)
    mask_h = official_maskd_forward_mask(c_h.sum(2), mask_token[1])
    out_h = c_h.unsqueeze(1) * mask_h.unsqueeze(2).unsqueeze(2)  # [N, T, C, 3, H, W]
    out_h_s = c_h_s.unsqueeze(1) * mask_h.unsqueeze(2).unsqueeze(2)
    mask_v = official_maskd_forward_mask(c_v.sum(2), mask_token[2])
    out_v = c_v.unsqueeze(1) * mask_v.unsqueeze(2).unsqueeze(2)
    out_v_s = c_v_s.unsqueeze(1) * mask_v.unsqueeze(2).unsqueeze(2)
    mask_d = official_maskd_forward_mask(c_d.sum(2), mask_token[3])
    out_d = c_d.unsqueeze(1) * mask_d.unsqueeze(2).unsqueeze(2)
    out_d_s = c_d_s.unsqueeze(1) * mask_d.unsqueeze(2).unsqueeze(2)
    return F.l1_loss(out_h_s, out_h) + F.l1_loss(out_v_s, out_v) + F.l1_loss(out_d_s, out_d)


def official_freekd(ys: list[Tensor], yt: list[Tensor], p: list[dict[str, Tensor]]) -> Tensor:
    """The RetinaNet config's two losses on the aligned neck outputs: ``FreeKDLoss`` (w 1) + ``MSELoss`` (w 5)."""
    ys = [F.conv2d(y, q["align.weight"], q["align.bias"]) for y, q in zip(ys, p, strict=True)]
    freq = 1.0 * sum(official_freekd_level(s, t, q["mask_token"]) for s, t, q in zip(ys, yt, p, strict=True))
    mse = 5.0 * sum(nn.MSELoss()(s, t) for s, t in zip(ys, yt, strict=True))
    return freq + mse


def test_freekd_equals_official_and_loads_a_checkpoint_with_filter_buffers() -> None:
    fpn = infos(p3=3, p4=3)
    m = make(FreeKD, "detection", fpn, fpn, train_prompts=True)
    g = torch.Generator().manual_seed(140)
    sd: dict[str, Tensor] = {}
    for i in range(2):
        head = f"distiller.losses.loss_maskd_fpn.mask_modules.{i}."
        sd[head + "mask_token"] = torch.randn(4, 6, 3, generator=g, dtype=torch.float64) * 0.7
        sd[head + "prob.2.bias"] = torch.randn(6, generator=g, dtype=torch.float64)
        # pytorch_wavelets registers its filters as persistent buffers: they sit in every official checkpoint
        for name in ("xfm.h0_col", "xfm.h1_col", "xfm.h0_row", "xfm.h1_row", "ixfm.g0_col", "ixfm.g1_row"):
            sd[head + name] = torch.randn(1, 1, 2, 1)
    sd["distiller.losses.loss_maskd_fpn.xfm.h0_col"] = torch.randn(1, 1, 2, 1)
    align = {f"align_modules.component_0.{i}.{k}": rnd(*s, seed=150 + i) for i in range(2)
             for k, s in (("weight", (3, 3, 1, 1)), ("bias", (3,)))}
    m.load_official(sd, align)
    assert torch.equal(m.mask_modules["p4"].mask_token.detach(), sd["distiller.losses.loss_maskd_fpn.mask_modules.1."
                                                                     "mask_token"])
    shapes = {"p3": (2, 3, 13, 10), "p4": (2, 3, 7, 5)}  # odd sizes: the zero padding of every DWT level
    fs, ft = leaves(maps(shapes, 160, scale=2.0)), maps(shapes, 170, scale=2.0)
    ours = total(m(ModelOutput(taps=fs), ModelOutput(taps=ft)))

    def params(tap: str) -> dict[str, Tensor]:
        return {"mask_token": m.mask_modules[tap].mask_token, "align.weight": m.align[tap].weight,
                "align.bias": m.align[tap].bias}

    fo = leaves({k: v.detach() for k, v in fs.items()})
    off = [copied(params(tap)) for tap in shapes]
    official = official_freekd(list(fo.values()), list(ft.values()), off)
    ours_leaves = list(fs.values()) + [p for tap in shapes for p in params(tap).values()]
    off_leaves = list(fo.values()) + [p for q in off for p in q.values()]
    names = list(fs) + [f"{tap}.{k}" for tap in shapes for k in off[0]]
    check(ours, official, ours_leaves, off_leaves, names)


def test_freekd_dwt_equals_the_conv_form() -> None:
    from kdcli.methods.freekd import haar_dwt

    x = rnd(2, 3, 11, 6, seed=180)
    low, details = haar_dwt(x, 3)
    want_low, want_details = official_dwt_haar(x)
    assert_close(low, want_low, "low-pass")
    for j, (a, b) in enumerate(zip(details, want_details, strict=True), start=1):
        assert_close(a, b, f"level {j}")


# ========================================================================================== CanKD
class OfficialAttentionMatrix(nn.Module):
    """tori-hotaru/CanKD ``nlkd_IN_loss.py`` ``attentionMatrix`` (dimension 2, sub_sample)."""

    def __init__(self, c: int, ci: int) -> None:
        super().__init__()
        self.inter_channels = ci
        self.theta = nn.Conv2d(c, ci, kernel_size=1, stride=1, padding=0)
        self.phi = nn.Sequential(nn.Conv2d(c, ci, kernel_size=1, stride=1, padding=0), nn.MaxPool2d(kernel_size=(2, 2)))

    def forward(self, y_s: Tensor, y_t: Tensor) -> Tensor:
        b = y_s.size(0)
        theta = self.theta(y_s).view(b, self.inter_channels, -1).permute(0, 2, 1)
        phi = self.phi(y_t).view(b, self.inter_channels, -1)
        f = torch.matmul(theta, phi)
        return f / f.size(-1)


class OfficialNonLocal(nn.Module):
    """``NonLocalAttention`` (bn_layer: W = conv + BN with γ = β = 0)."""

    def __init__(self, c: int, ci: int) -> None:
        super().__init__()
        self.inter_channels = ci
        self.att = OfficialAttentionMatrix(c, ci)
        self.g = nn.Sequential(nn.Conv2d(c, ci, kernel_size=1, stride=1, padding=0), nn.MaxPool2d(kernel_size=(2, 2)))
        self.W = nn.Sequential(nn.Conv2d(ci, c, kernel_size=1, stride=1, padding=0), nn.BatchNorm2d(c))
        nn.init.constant_(self.W[1].weight, 0)
        nn.init.constant_(self.W[1].bias, 0)

    def forward(self, y_s: Tensor, y_t: Tensor) -> tuple[Tensor, Tensor]:
        b = y_s.size(0)
        f_div_c = self.att(y_s, y_t)
        g_y_t = self.g(y_t).view(b, self.inter_channels, -1).permute(0, 2, 1)
        y = torch.matmul(f_div_c, g_y_t).permute(0, 2, 1).contiguous().view(b, self.inter_channels, *y_s.size()[2:])
        return self.W(y) + y_s, y_t


class OfficialNLKDIN(nn.Module):
    """``NLKD_IN_Loss``: non-local block, ``InstanceNorm2d(affine=False)``, ``F.mse_loss / 2 · loss_weight``."""

    def __init__(self, c: int, loss_weight: float) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.non_local_att = OfficialNonLocal(c, max(c // 2, 1))
        self.in_norm = nn.InstanceNorm2d(c, affine=False)

    def forward(self, s_feature: Tensor, t_feature: Tensor) -> Tensor:
        assert s_feature.shape == t_feature.shape
        z_s, z_t = self.non_local_att(s_feature, t_feature)
        return F.mse_loss(self.in_norm(z_s), self.in_norm(z_t)) / 2 * self.loss_weight


def randomised_official(c: int, seed: int) -> OfficialNLKDIN:
    torch.manual_seed(seed)
    off = OfficialNLKDIN(c, 10.0).double()
    with torch.no_grad():  # γ, β ≠ 0 so that θ, φ, g and W all shape the loss
        off.non_local_att.W[1].weight.normal_(0, 0.7)
        off.non_local_att.W[1].bias.normal_(0, 0.3)
        off.non_local_att.W[1].running_mean.normal_(0, 0.5)
        off.non_local_att.W[1].running_var.uniform_(0.5, 2.0)
    return off


OUR_TO_OFFICIAL = {"theta": "att.theta", "phi": "att.phi", "g": "g", "W": "W"}


def official_name(ours: str) -> str:
    head, _, rest = ours.partition(".")
    return f"{OUR_TO_OFFICIAL[head]}.{rest}"


@pytest.mark.parametrize("train", [True, False])
def test_cankd_detection_equals_official_loss_per_level(train: bool) -> None:
    fpn = infos(p3=6, p4=6, p5=6, p6=6, p7=6)
    m = make(CanKD, "detection", fpn, fpn)
    shapes = {"p3": (2, 6, 9, 8), "p4": (2, 6, 5, 4), "p5": (2, 6, 3, 2), "p6": (2, 6, 2, 2)}
    assert m.taps == tuple(shapes)
    officials = {tap: randomised_official(6, 200 + i) for i, tap in enumerate(shapes)}
    for tap, off in officials.items():
        m.load_official(tap, {f"non_local_att.{k}": v for k, v in off.non_local_att.state_dict().items()})
    m.train(train)
    for off in officials.values():
        off.train(train)
    fs, ft = leaves(maps(shapes, 210, scale=2.0)), maps(shapes, 220, scale=2.0)
    ours = total(m(ModelOutput(taps=fs), ModelOutput(taps=ft)))
    fo = leaves({k: v.detach() for k, v in fs.items()})
    official = sum(officials[tap](fo[tap], ft[tap]) for tap in shapes)
    ours_leaves, off_leaves, names = list(fs.values()), list(fo.values()), list(fs)
    for tap in shapes:
        offp = dict(officials[tap].non_local_att.named_parameters())
        for name, p in m.blocks[tap].named_parameters():
            ours_leaves.append(p)
            off_leaves.append(offp[official_name(name)])
            names.append(f"{tap}.{name}")
    assert len(names) == 4 + 4 * 10  # θ, φ, g, W-conv (weight, bias each) and BN γ, β per level
    check(ours, official, ours_leaves, off_leaves, names)
    if train:  # BN running statistics are updated identically
        for tap in shapes:
            torch.testing.assert_close(m.blocks[tap].W[1].running_mean, officials[tap].non_local_att.W[1].running_mean,
                                       rtol=RTOL, atol=1e-14)


def test_cankd_segmentation_connector_equals_official() -> None:
    m = make(CanKD, "segmentation", infos(c5=3), infos(c5=8))
    off = randomised_official(8, 230)
    prefix = "distiller.distill_losses.loss_nlkd.non_local_att."  # as in a whole mmrazor checkpoint
    m.load_official("c5", {prefix + k: v for k, v in off.non_local_att.state_dict().items()})
    conn = m.connectors["c5"]
    fs, ft = rnd(2, 3, 6, 6, seed=231).requires_grad_(), rnd(2, 8, 6, 6, seed=232, scale=3.0)
    ours = total(m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft})))
    c = copied({"x": fs, "w": conn.weight, "b": conn.bias})
    official = off(F.conv2d(c["x"], c["w"], c["b"]), ft)  # mmrazor ConvModuleConnector (no norm, no act)
    offp = dict(off.non_local_att.named_parameters())
    ours_leaves = [fs, conn.weight, conn.bias] + [p for _, p in m.blocks["c5"].named_parameters()]
    off_leaves = list(c.values()) + [offp[official_name(n)] for n, _ in m.blocks["c5"].named_parameters()]
    names = ["x", "conn.w", "conn.b"] + [n for n, _ in m.blocks["c5"].named_parameters()]
    check(ours, official, ours_leaves, off_leaves, names)
