"""Maths of the acam method (ACAM-KD, reconstructed; docs/methods/acam.md).

There is no official code, so these are self-consistency checks (closed forms, limiting cases) plus an
independent float64 re-statement of every equation (explicit softmax, the full N×M×C×P masked error,
Dice by loops over pairs). References never call the module's own helpers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdcli.methods as methods
from kdcli.errors import ConfigError
from kdcli.methods.acam import ACAM, dice_diversity, fused_attention
from kdcli.models.taps import ModelOutput, TapInfo


def infos(stride: int = 8, **channels: int) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, stride, "logits" if "logits" in n else "feature") for n, c in channels.items()}


def fpn_infos(c: int) -> dict[str, TapInfo]:
    return {f"p{k}": TapInfo(f"p{k}", c, 2**k) for k in range(3, 8)}


def out(**taps: Tensor) -> ModelOutput:
    return ModelOutput(taps=dict(taps))


def make(task: str, student: dict, teacher: dict, **overrides: object) -> ACAM:
    return ACAM(student, teacher, task, **ACAM.resolve_hparams(task, overrides))


def seg(cs: int = 5, ct: int = 5, **overrides: object) -> ACAM:
    return make("segmentation", infos(seg_logits=cs), infos(seg_logits=ct), **overrides).double()


def feats(shape_s: tuple[int, ...], shape_t: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(shape_s, generator=g, dtype=torch.float64) * 2 + 1
    ft = torch.randn(shape_t, generator=g, dtype=torch.float64) * 1.5 - 0.5
    return fs, ft


def randomise(m: ACAM, seed: int, std: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def conv1x1(x: Tensor, conv: torch.nn.Conv2d) -> Tensor:
    w = conv.weight.view(conv.out_channels, conv.in_channels)
    return torch.einsum("oc,nchw->nohw", w, x) + conv.bias.view(1, -1, 1, 1)


def align_by_hand(x: Tensor, align: torch.nn.Module) -> Tensor:
    return x if isinstance(align, torch.nn.Identity) else conv1x1(x, align)


def dice_by_hand(x: Tensor) -> float:
    """MasKD's pairwise Dice with explicit loops over images and ordered pairs."""
    n, m, _ = x.shape
    vals = []
    for b in range(n):
        for i, j in itertools.permutations(range(m), 2):
            xi, xj = x[b, i], x[b, j]
            vals.append(2 * (xi * xj).sum() / ((xi * xi).sum() + 1e-12 + (xj * xj).sum() + 1e-12))
    return float(sum(vals) / len(vals))


def acam_by_hand(m: ACAM, tap: str, fs: Tensor, ft: Tensor) -> tuple[float, float]:
    """(masked key, div key) from the equations of docs/methods/acam.md, written out with the full N×M×C×P tensor."""
    b = m.blocks[tap]
    s_al = align_by_hand(fs, b.align)
    if s_al.shape[-2:] != ft.shape[-2:]:
        s_al = F.interpolate(s_al, size=ft.shape[-2:], mode="bilinear", align_corners=False)
    s_in = s_al if m.kv_input == "aligned" else fs
    n, c, h, w = ft.shape
    p = h * w
    if m.mask_input == "teacher":
        src = ft.flatten(2)
    else:
        q_in, kv_in = (ft, s_in) if m.query_source == "teacher" else (s_in, ft)
        q = conv1x1(q_in, b.q).flatten(2)  # (N, C_q, P)
        k = conv1x1(kv_in, b.k).flatten(2)
        v = conv1x1(kv_in, b.v).flatten(2)  # (N, C, P)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(q.shape[1]), dim=-1)  # (N, P_q, P_k)
        src = (a @ v.transpose(1, 2)).transpose(1, 2)  # (N, C, P)
    ms = torch.sigmoid(torch.einsum("mc,ncp->nmp", b.spatial_units, src))
    units = b.channel_units if b.channel_units.dim() == 2 else b.channel_units.view(-1, 1)
    mc = torch.sigmoid(units[None] * src.mean(-1)[:, None, :])  # (N, M, C)
    delta = (ft - s_al).flatten(2)  # (N, C, P)
    eps = m.mask_eps
    ls = ((ms[:, :, None, :] * delta[:, None]) ** 2).sum((2, 3)) / (c * (ms.sum(-1) + eps))
    lc = ((mc[:, :, :, None] * delta[:, None]) ** 2).sum((2, 3)) / (p * (mc.sum(-1) + eps))
    masked = m.alpha * (ls.mean() + lc.mean())
    return float(masked.detach()), m.lambda_div * (dice_by_hand(ms.detach()) + dice_by_hand(mc.detach()))


# --------------------------------------------------------------------------------- Dice
def test_dice_equal_disjoint_and_hand_values() -> None:
    g = torch.Generator().manual_seed(0)
    one = torch.rand(2, 1, 7, generator=g, dtype=torch.float64) + 0.1
    equal = one.expand(2, 4, 7).clone()
    assert dice_diversity(equal).item() == pytest.approx(1.0, rel=1e-9)
    assert dice_diversity(equal, "global").item() == pytest.approx(3.0, rel=1e-9)  # M − 1
    disjoint = torch.tensor([[[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 2.0, 0.3]]], dtype=torch.float64)
    assert dice_diversity(disjoint).item() == 0.0
    assert dice_diversity(disjoint, "global").item() == 0.0
    # two masks: ⟨x1, x2⟩ = 1, ‖x1‖² = ‖x2‖² = 2 → 2·1 / 4
    two = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]], dtype=torch.float64)
    assert dice_diversity(two).item() == pytest.approx(0.5, rel=1e-11)
    # three masks: pairs (1,2) 2·1/4, (1,3) 2·1/3, (2,3) 0 → mean 7/18; global 2·(2·2)/(2·5) = 0.8
    three = torch.tensor([[[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]], dtype=torch.float64)
    assert dice_diversity(three).item() == pytest.approx(7 / 18, rel=1e-11)
    assert dice_diversity(three, "global").item() == pytest.approx(0.8, rel=1e-11)
    # batch mean of per-image values
    batch = torch.cat([two, torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]], dtype=torch.float64)])
    assert dice_diversity(batch).item() == pytest.approx((0.5 + 0.0) / 2, rel=1e-11)
    rand = torch.rand(3, 5, 9, generator=g, dtype=torch.float64)
    assert dice_diversity(rand).item() == pytest.approx(dice_by_hand(rand), rel=1e-11)
    # identical masks are a stationary point: Dice's gradient vanishes there and grows with the masks'
    # differences, so masks initialised together (units ~ N(0, 0.01²)) separate slowly
    same = equal.clone().requires_grad_()
    dice_diversity(same).backward()
    assert same.grad.abs().max().item() < 1e-12
    near = (equal + 1e-3 * torch.randn(equal.shape, generator=g, dtype=torch.float64)).requires_grad_()
    dice_diversity(near).backward()
    assert near.grad.abs().max().item() > 1e-6


# --------------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_zero_selection_units_give_half_masks_and_closed_form(task: str) -> None:
    if task == "segmentation":
        s_info, t_info = infos(seg_logits=5), infos(seg_logits=5)
        fs, ft = feats((2, 5, 6, 7), (2, 5, 6, 7), 1)
        taps = {"seg_logits": (fs, ft)}
    else:
        s_info, t_info = infos(p3=4, p4=4), infos(p3=6, p4=6)
        fs3, ft3 = feats((2, 4, 8, 8), (2, 6, 8, 8), 2)
        fs4, ft4 = feats((2, 4, 4, 4), (2, 6, 4, 4), 3)
        taps = {"p3": (fs3, ft3), "p4": (fs4, ft4)}
    s_out = out(**{k: v[0] for k, v in taps.items()})
    t_out = out(**{k: v[1] for k, v in taps.items()})
    for eps, rel in ((0.0, 1e-12), (1e-6, 1e-6)):
        for alpha, lam, power, form in ((1.0, 1.0, 2, "pairwise"), (3.0, 0.5, 1, "global")):
            m = make(task, s_info, t_info, mask_eps=eps, alpha=alpha, lambda_div=lam, mask_power=power,
                     div_form=form).double()
            randomise(m, 4)
            with torch.no_grad():
                for b in m.blocks.values():
                    b.spatial_units.zero_()
                    b.channel_units.zero_()
            losses = m(s_out, t_out)
            stats = m.last_stats
            for tap, (fs_, ft_) in taps.items():
                b = m.blocks[tap]
                m_s, m_c = b.masks(torch.randn_like(ft_) * 100)
                assert bool((m_s == 0.5).all()) and bool((m_c == 0.5).all())
                mse = ((ft_ - align_by_hand(fs_, b.align)) ** 2).mean().item()
                # masks 0.5 ⇒ L^c = L^s = ½·mean(Δ²) (mask squared); mask_power=1 ⇒ mean(Δ²) each
                each = 0.5 * mse if power == 2 else mse
                assert losses[f"acam.{tap}"].item() == pytest.approx(alpha * 2 * each, rel=rel)
                # identical masks: pairwise Dice 1, global M − 1, on both mask groups
                d = 1.0 if form == "pairwise" else m.num_masks - 1.0
                assert losses[f"acam.{tap}.div"].item() == pytest.approx(lam * 2 * d, rel=1e-9)
                assert stats[f"{tap}.spatial_mean"] == 0.5 and stats[f"{tap}.channel_mean"] == 0.5
                assert stats[f"{tap}.spatial_entropy"] == pytest.approx(1.0, rel=1e-6)
                assert stats[f"{tap}.channel_dice"] == pytest.approx(1.0, rel=1e-9)
                assert stats[f"{tap}.spatial_ratio"] == pytest.approx(each / mse, rel=1e-5)


def test_identical_features_zero_masked_loss_and_query_modes_coincide() -> None:
    # with F^T = f_align(F^S) (and W_q = W_k) teacher- and student-query modes coincide
    mt = seg(6, 6, query_source="teacher", align="always")
    randomise(mt, 5)
    with torch.no_grad():
        mt.blocks["seg_logits"].align.weight.copy_(torch.eye(6, dtype=torch.float64).view(6, 6, 1, 1))
        mt.blocks["seg_logits"].align.bias.zero_()
        mt.blocks["seg_logits"].k.load_state_dict(mt.blocks["seg_logits"].q.state_dict())
    ms = seg(6, 6, query_source="student", align="always")
    ms.load_state_dict(mt.state_dict())
    f = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    lt = mt(out(seg_logits=f), out(seg_logits=f.detach().clone()))
    ls = ms(out(seg_logits=f), out(seg_logits=f.detach().clone()))
    # Δ = 0: the masked terms vanish exactly, and so does their gradient (to the student and the masks)
    assert lt["acam.seg_logits"].item() == 0.0
    grads = torch.autograd.grad(lt["acam.seg_logits"], [f, *mt.parameters()], allow_unused=True)
    assert all(gr is None or gr.abs().max().item() == 0.0 for gr in grads)
    # only the diversity term is left, and it is identical in both query modes
    assert lt["acam.seg_logits.div"].item() > 0
    assert ls["acam.seg_logits.div"].item() == pytest.approx(lt["acam.seg_logits.div"].item(), rel=1e-12)
    assert ls["acam.seg_logits"].item() == 0.0
    b = mt.blocks["seg_logits"]
    torch.testing.assert_close(b.fuse(f, f), ms.blocks["seg_logits"].fuse(f, f), rtol=0, atol=0)
    for key, value in mt.last_stats.items():
        assert ms.last_stats[key] == pytest.approx(value, rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------------- attention
def test_fused_attention_equals_explicit_softmax() -> None:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    k = torch.randn(2, 3, 5, generator=g, dtype=torch.float64) * 2
    v = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    logits = torch.einsum("ndi,ndj->nij", q, k) / math.sqrt(3)
    a = logits.exp() / logits.exp().sum(-1, keepdim=True)  # softmax over the key positions
    want = torch.einsum("nij,ncj->nci", a, v)
    torch.testing.assert_close(fused_attention(q, k, v), want, rtol=1e-12, atol=1e-12)

    m = seg(5, 5)
    randomise(m, 7)
    b = m.blocks["seg_logits"]
    t, s = feats((2, 5, 3, 4), (2, 5, 3, 4), 8)
    qq, kk, vv = conv1x1(t, b.q).flatten(2), conv1x1(s, b.k).flatten(2), conv1x1(s, b.v).flatten(2)
    assert qq.shape[1] == 2  # C_q = ⌊5/2⌋
    lg = torch.einsum("ndi,ndj->nij", qq, kk) / math.sqrt(2)
    a = torch.softmax(lg, -1)
    want = torch.einsum("nij,ncj->nci", a, vv).view(2, 5, 3, 4)
    torch.testing.assert_close(b.fuse(t, s), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_goes_through_sdpa_and_never_holds_a_p_by_p_matrix(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segmentation shape that matters (C = 19 logits, C_q = 9) at P = 32·32: SDPA is called, and nothing
    the forward keeps for backward has P² elements — SDPA's math fallback would save the N×P×P attention."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args: object, **kwargs: object) -> Tensor:
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = make("segmentation", infos(seg_logits=19), infos(seg_logits=19)).to(dtype)
    fs = torch.randn(2, 19, 32, 32, dtype=dtype, requires_grad=True)
    ft = torch.randn(2, 19, 32, 32, dtype=dtype)
    p = 32 * 32
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = m(out(seg_logits=fs), out(seg_logits=ft))
    assert calls and max(saved) < p * p, (len(calls), max(saved), p * p)
    sum(losses.values()).backward()
    assert torch.isfinite(fs.grad).all() and fs.grad.abs().sum() > 0
    assert m.blocks["seg_logits"].q.weight.grad.abs().sum() > 0  # the backward ran through the fused kernel


@pytest.mark.parametrize(
    "cs,hw_s,opts",
    [
        (3, (3, 4), {}),
        (3, (6, 8), {"query_source": "student", "channel_units": "vector"}),
        (6, (6, 8), {"kv_input": "raw", "div_form": "pairwise"}),
        (3, (6, 8), {"mask_input": "teacher", "mask_power": 2}),
    ],
)
def test_loss_equals_hand_reference(cs: int, hw_s: tuple[int, int], opts: dict) -> None:
    m = seg(cs, 6, alpha=1.5, lambda_div=0.7, **opts)
    randomise(m, 9, std=0.4)
    fs, ft = feats((2, cs, *hw_s), (2, 6, 6, 8), 10)
    losses = m(out(seg_logits=fs), out(seg_logits=ft))
    masked, div = acam_by_hand(m, "seg_logits", fs, ft)
    assert losses["acam.seg_logits"].item() == pytest.approx(masked, rel=1e-10)
    assert losses["acam.seg_logits.div"].item() == pytest.approx(div, rel=1e-10)


# --------------------------------------------------------------------------------- gradients
def mask_params(m: ACAM, tap: str) -> dict[str, Tensor]:
    b = m.blocks[tap]
    return {"m_s": b.spatial_units, "m_c": b.channel_units, "W_q": b.q.weight, "W_k": b.k.weight,
            "W_v": b.v.weight}


def test_mask_grad_detach_stops_masked_loss_gradient_into_masks() -> None:
    fs, ft = feats((2, 4, 5, 5), (2, 6, 5, 5), 11)
    fs.requires_grad_()
    grads = {}
    for mode in ("full", "detach", "detach_mass"):
        m = seg(4, 6, mask_grad=mode)
        randomise(m, 12, std=0.3)
        losses = m(out(seg_logits=fs), out(seg_logits=ft))
        mp = mask_params(m, "seg_logits")
        keys = [*mp, "align", "student"]
        tensors = [*mp.values(), m.blocks["seg_logits"].align.weight, fs]
        g = dict(zip(keys, torch.autograd.grad(losses["acam.seg_logits"], tensors, retain_graph=True,
                                               allow_unused=True), strict=True))
        grads[mode] = (g, losses["acam.seg_logits"].item())
        assert g["align"].abs().sum() > 0 and g["student"].abs().sum() > 0
        if mode == "detach":
            assert all(g[k] is None for k in mp)  # the masked loss does not reach the masks
            # ... while the diversity loss still trains them
            gd = torch.autograd.grad(losses["acam.seg_logits.div"], list(mp.values()))
            assert gd[0].abs().sum() > 0 and gd[1].abs().sum() > 0 and gd[2].abs().sum() > 0
        else:
            for k in ("m_s", "m_c", "W_q", "W_v"):
                assert g[k] is not None and g[k].abs().sum() > 0, (mode, k)
    # detach_mass: same value, different mask gradient (the normaliser no longer pushes)
    assert grads["detach_mass"][1] == pytest.approx(grads["full"][1], rel=1e-14)
    assert grads["detach"][1] == pytest.approx(grads["full"][1], rel=1e-14)
    assert not torch.allclose(grads["detach_mass"][0]["m_s"], grads["full"][0]["m_s"])


@pytest.mark.parametrize("query_source", ["teacher", "student"])
def test_gradients_reach_student_and_every_learnable_part(query_source: str) -> None:
    m = make("detection", infos(p3=4, p4=4), infos(p3=6, p4=6), query_source=query_source).double()
    fs = {k: torch.randn(2, 4, h, h, dtype=torch.float64, requires_grad=True) for k, h in (("p3", 6), ("p4", 3))}
    ft = {k: torch.randn(2, 6, h, h, dtype=torch.float64, requires_grad=True) for k, h in (("p3", 6), ("p4", 3))}
    losses = m(out(**fs), out(**ft))
    assert set(losses) == {"acam.p3", "acam.p3.div", "acam.p4", "acam.p4.div"}
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        if name.endswith("k.bias"):
            # b_k adds Qᵀb_k to every logit of a softmax row: it cancels, its gradient is 0 up to round-off
            assert p.grad.abs().max().item() < 1e-10, name
        else:
            assert p.grad.abs().sum().item() > 0, name
    for k in fs:
        assert fs[k].grad.abs().sum() > 0
        assert ft[k].grad is None  # the teacher is detached


def test_finite_under_bf16_autocast_with_large_activations() -> None:
    m = make("detection", infos(p3=8, p4=8), infos(p3=16, p4=16))
    fs = {k: (torch.randn(2, 8, h, h + 1) * 3000).bfloat16().requires_grad_() for k, h in (("p3", 8), ("p4", 4))}
    ft = {k: (torch.randn(2, 16, h, h + 1) * 3000).bfloat16() for k, h in (("p3", 8), ("p4", 4))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(out(**fs), out(**ft))
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    assert all(math.isfinite(v) for v in m.last_stats.values())
    sum(losses.values()).backward()
    for k in fs:
        assert torch.isfinite(fs[k].grad.float()).all() and fs[k].grad.float().abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


# --------------------------------------------------------------------------------- build and presets
def test_build_detection_and_segmentation() -> None:
    ms = methods.build("acam", fpn_infos(256), fpn_infos(256), "detection")
    m = ms.methods["acam"]
    assert m.needs == ("p3", "p4", "p5", "p6", "p7")  # all neck outputs
    b = m.blocks["p3"]
    assert b.q.out_channels == b.k.out_channels == 128 and b.v.out_channels == 256
    assert b.spatial_units.shape == (6, 256) and b.channel_units.shape == (6,)
    assert isinstance(b.align, torch.nn.Conv2d) and b.align.bias is not None  # always applied
    assert (m.alpha, m.lambda_div, m.query_source, m.mask_grad) == (1.0, 1.0, "teacher", "full")

    small = methods.build("acam", fpn_infos(4), fpn_infos(8), "detection", {"taps": "fpn:2"})
    fs = {f"p{k}": torch.randn(1, 4, 16 >> (k - 3), 16 >> (k - 3)) for k in range(3, 8)}
    ft = {f"p{k}": torch.randn(1, 8, 16 >> (k - 3), 16 >> (k - 3)) for k in range(3, 8)}
    assert set(small(out(**fs), out(**ft))) == {"acam.p3", "acam.p3.div", "acam.p4", "acam.p4.div"}

    ms = methods.build("acam", infos(seg_logits=19), infos(seg_logits=19), "segmentation",
                       {"mask_grad": "detach", "num_masks": "4"})
    m = ms.methods["acam"]
    assert m.needs == ("seg_logits",) and m.mask_grad == "detach" and m.num_masks == 4
    assert m.blocks["seg_logits"].q.out_channels == 9  # ⌊19/2⌋
    assert make("segmentation", infos(seg_logits=19), infos(seg_logits=19)).num_masks == 19
    s = torch.randn(2, 19, 4, 8)
    losses = ms(out(seg_logits=s), out(seg_logits=torch.randn(2, 19, 8, 16)))
    assert set(losses) == {"acam.seg_logits", "acam.seg_logits.div"}
    assert all(torch.isfinite(v) for v in losses.values())


def test_segmentation_compares_logits_without_align_when_classes_match() -> None:
    # A2: MasKD's segmentation loss compares the logits as they are; a random 1×1 conv in between lets the
    # student's logits drift to a channel mix of the teacher's (the measured collapse)
    m = seg(5, 5)
    assert isinstance(m.blocks["seg_logits"].align, torch.nn.Identity)
    assert not any("align" in name for name, _ in m.named_parameters())
    assert isinstance(seg(4, 5).blocks["seg_logits"].align, torch.nn.Conv2d)  # other class counts: adapted
    assert isinstance(seg(5, 5, align="always").blocks["seg_logits"].align, torch.nn.Conv2d)
    det = make("detection", infos(p3=6), infos(p3=6), taps="p3")
    assert isinstance(det.blocks["p3"].align, torch.nn.Conv2d)  # detection: f_align even for equal channels
    assert isinstance(make("detection", infos(p3=6), infos(p3=6), taps="p3", align="auto").blocks["p3"].align,
                      torch.nn.Identity)
    # the masked term is zero exactly where the student's own logits equal the teacher's
    randomise(m, 13)
    ft = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    assert m(out(seg_logits=ft.clone()), out(seg_logits=ft))["acam.seg_logits"].item() == 0.0
    mixed = torch.einsum("oc,nchw->nohw", torch.randn(5, 5, dtype=torch.float64), ft)
    assert m(out(seg_logits=mixed), out(seg_logits=ft))["acam.seg_logits"].item() > 0.1


@pytest.mark.parametrize(
    "overrides",
    [{"query_source": "both"}, {"mask_grad": "none"}, {"div_on": "x"}, {"mask_power": "3"}, {"num_masks": "0"},
     {"kv_input": "raw"}, {"align": "never"}],
)
def test_bad_options_raise_config_error(overrides: dict) -> None:
    with pytest.raises(ConfigError):
        methods.build("acam", infos(seg_logits=4), infos(seg_logits=6), "segmentation", overrides)


def test_attention_precision_amp_runs_the_attention_in_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Default: under bf16 autocast the attention stays float32 and the loss equals the autocast-free one
    bit for bit. ``attention_precision=amp``: SDPA gets bf16 Q, K, V, and the loss moves only by bf16
    round-off (and is the float32 loss exactly without autocast)."""
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: Tensor, *args: object, **kwargs: object) -> Tensor:
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    fs, ft = (x.float() for x in feats((2, 16, 6, 8), (2, 16, 6, 8), 21))
    values = {}
    for prec in ("float32", "amp"):
        m = make("detection", infos(p3=16), infos(p3=16), taps="p3", attention_precision=prec)
        randomise(m, 22, std=0.3)
        plain = sum(m(out(p3=fs), out(p3=ft)).values())
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            values[prec] = sum(m(out(p3=fs), out(p3=ft)).values())
        assert seen == [torch.float32 if prec == "float32" else torch.bfloat16]
        values[prec, "plain"] = plain
    assert values["float32"].item() == values["float32", "plain"].item()
    assert values["amp", "plain"].item() == values["float32", "plain"].item()  # same parameters, no autocast
    assert values["amp"].item() != values["float32"].item()
    assert values["amp"].item() == pytest.approx(values["float32"].item(), rel=2e-2)
    with pytest.raises(ConfigError, match="attention_precision"):
        make("detection", infos(p3=16), infos(p3=16), taps="p3", attention_precision="fp8")
