"""Maths of samkd and dmkd (reconstructed from the abstract; docs/methods/dmkd.md, samkd.md).

No official code exists, so these check kdcli's templates: hand-computed values on tiny tensors with
fixed masks and identity generators, the attention-ranked masks on hand-made features, the fusion weights,
injectable randomness, gradient flow, bf16 autocast and building through the registry.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

import kdcli.methods as methods
from kdcli.errors import ConfigError
from kdcli.methods._grid import cell_index
from kdcli.methods.dmkd import DMKD, DualReconstruction, grid_reconstruction_losses, num_masked, ranked_keep_mask
from kdcli.methods.samkd import SAMKD, binary_kl
from kdcli.models.taps import ModelOutput, TapInfo


def infos(stride: int = 8, **channels: int) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, stride, "logits" if "logits" in n else "feature") for n, c in channels.items()}


def fpn_infos(c: int, levels: range = range(3, 5)) -> dict[str, TapInfo]:
    return {f"p{k}": TapInfo(f"p{k}", c, 2**k) for k in levels}


def out(**taps: Tensor) -> ModelOutput:
    return ModelOutput(taps=dict(taps))


def dmkd(cs: int = 2, ct: int = 2, **hp: object) -> DMKD:
    return DMKD(infos(c5=cs), infos(c5=ct), "segmentation", **DMKD.resolve_hparams("segmentation", hp)).double()


def samkd_seg(cs: int = 2, ct: int = 2, **hp: object) -> SAMKD:
    s, t = infos(seg_feat=cs, seg_logits=3), infos(seg_feat=ct, seg_logits=3)
    return SAMKD(s, t, "segmentation", **SAMKD.resolve_hparams("segmentation", hp)).double()


def identity_generators(block: torch.nn.Module) -> None:
    """G(x) = x for x ≥ 0: centre-tap identity kernels, zero bias."""
    with torch.no_grad():
        for gen in (block.gen_spatial, block.gen_channel):
            for conv in (gen[0], gen[2]):
                conv.weight.zero_()
                conv.bias.zero_()
                c = conv.weight.shape[0]
                conv.weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0


HOT = torch.tensor([[[[9.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)  # (1, 2, 2, 2)


# --------------------------------------------------------------------------------- ranked masks
def test_ranked_keep_mask_ties_groups_and_rounding() -> None:
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert ranked_keep_mask(s, 0.25).tolist() == [[0.0, 1.0, 1.0, 1.0]]  # tie 3/3: lower index first
    assert ranked_keep_mask(s, 0.5).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert ranked_keep_mask(s, 0.25, "bottom").tolist() == [[1.0, 0.0, 1.0, 1.0]]
    assert ranked_keep_mask(s, 0.0).tolist() == [[1.0] * 4] and ranked_keep_mask(s, 1.0).sum() == 0
    # groups {0, 1} and {2, 3}: the top ⌈0.5·2⌉ = 1 of each
    assert ranked_keep_mask(s, 0.5, group=torch.tensor([0, 0, 1, 1])).tolist() == [[0.0, 1.0, 0.0, 1.0]]
    assert ranked_keep_mask(s, 0.5, group=torch.tensor([1, 0, 1, 0])).tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert int(num_masked(0.65, 20)) == 13 and int(num_masked(0.65, 21)) == 14 and int(num_masked(0.3, 4)) == 2


def test_cell_index_partitions_like_adaptive_pooling_when_divisible() -> None:
    cell, n = cell_index(4, 4, 2)
    assert n == 4 and cell.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    cell, n = cell_index(2, 3, 4)  # grid clamped to the map: 2×3 cells of one position
    assert n == 6 and cell.tolist() == list(range(6))


# --------------------------------------------------------------------------------- DMKD
def test_dmkd_attention_masks_select_the_hot_spot_and_hot_channel() -> None:
    m = dmkd(ratio_spatial=0.25, ratio_channel=0.5)
    keep_s, keep_c = m.masks(HOT)
    assert keep_s.view(-1).tolist() == [0.0, 1.0, 1.0, 1.0]  # position (0, 0) has the largest mean|T|
    assert keep_c.view(-1).tolist() == [0.0, 1.0]  # channel 0 has the largest mean|T|
    keep_s, keep_c = dmkd(ratio_spatial=0.25, ratio_channel=0.5, mask_select="bottom").masks(HOT)
    assert keep_s.view(-1).tolist() == [1.0, 0.0, 1.0, 1.0] and keep_c.view(-1).tolist() == [1.0, 0.0]


def test_dmkd_hand_values_with_identity_generators() -> None:
    m = dmkd(alpha=1.0, ratio_spatial=0.25, ratio_channel=0.5)
    identity_generators(m.blocks["c5"])
    ones, zeros = (torch.ones(1, 1, 2, 2), torch.ones(1, 2, 1, 1)), (torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 1, 1))
    # identical features, masks all ones, w = (½, ½): R = T ⇒ loss 0 (what the equations imply)
    assert m.loss_tap("c5", HOT, HOT, ones).item() == 0.0
    # masks all zeros: R = 0 ⇒ Σ T² / N = 81 + 7 = 88
    assert m.loss_tap("c5", HOT, HOT, zeros).item() == pytest.approx(88.0, rel=1e-12)
    # attention masks: R − T = −½(1−B^S)T − ½(1−B^C)T → 9², 3·0.5², 0.5² → 82
    losses = m(out(c5=HOT), out(c5=HOT))
    assert losses["dmkd.c5"].item() == pytest.approx(82.0, rel=1e-12)
    # batch of 2 identical images: sum / N keeps 82; α scales linearly
    m.alpha = 2e-5
    assert m.loss_tap("c5", HOT.repeat(2, 1, 1, 1), HOT.repeat(2, 1, 1, 1)).item() == pytest.approx(82 * 2e-5)
    st = m.last_stats
    assert st["c5.spatial_keep"] == 0.75 and st["c5.channel_keep"] == 0.5 and st["c5.w_spatial"] == 0.5


def test_dmkd_fusion_weights_normalised_and_trained() -> None:
    for fusion in ("softmax", "sigmoid"):
        m = dmkd(fusion=fusion)
        with torch.no_grad():
            m.blocks["c5"].theta.fill_(0.7)
        w = m.blocks["c5"].weights()
        assert w.sum().item() == pytest.approx(1.0, rel=1e-12) and (w > 0).all()
        fs = torch.randn(2, 2, 4, 4, dtype=torch.float64)
        loss = m(out(c5=fs), out(c5=torch.randn(2, 2, 4, 4, dtype=torch.float64)))["dmkd.c5"]
        (g,) = torch.autograd.grad(loss, [m.blocks["c5"].theta])
        assert g.abs().sum() > 0
        if fusion == "softmax":
            assert g.sum().item() == pytest.approx(0.0, abs=1e-12)  # softmax: invariant to a shift of θ
    assert torch.equal(dmkd(fusion="free").blocks["c5"].weights(), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_dmkd_seeded_random_masks() -> None:
    m = dmkd(mask_mode="random")
    fs, ft = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    vals = []
    for seed in (1, 1, 2):
        m.generator = torch.Generator().manual_seed(seed)
        vals.append(m(out(c5=fs), out(c5=ft))["dmkd.c5"].item())
    assert vals[0] == vals[1] and vals[0] != vals[2]
    # ρ = 0 (no masking) and w = (1, 0): MGD without masking (the template's degenerate check)
    m = dmkd(ratio_spatial=0.0, ratio_channel=0.0, fusion="free", alpha=1.0)
    with torch.no_grad():
        m.blocks["c5"].theta.copy_(torch.tensor([1.0, 0.0]))
    want = (m.blocks["c5"].gen_spatial(fs) - ft).pow(2).sum() / 2
    assert m(out(c5=fs), out(c5=ft))["dmkd.c5"].item() == pytest.approx(want.item(), rel=1e-12)


# --------------------------------------------------------------------------------- SAMKD
def cell_hot() -> Tensor:
    """(1, 2, 4, 4): a hot spot in every 2×2 cell; channel 0 dominates the top-left cell, channel 1 the others."""
    t = torch.ones(1, 2, 4, 4, dtype=torch.float64)
    t[0, 0, 0, 1] = 9.0  # top-left cell, position (0, 1)
    t[0, 1, 1, 3] = 9.0  # top-right cell, position (1, 3)
    t[0, 1, 2, 0] = 9.0  # bottom-left, (2, 0)
    t[0, 1, 3, 3] = 9.0  # bottom-right, (3, 3)
    return t


def test_samkd_grid_masks_pick_the_hot_spot_of_every_cell() -> None:
    m = samkd_seg(ratio_spatial=0.25, ratio_channel=0.5)
    keep_s, keep_c = m.grid_masks(cell_hot(), 2)
    zeroed = (keep_s[0, 0] == 0).nonzero().tolist()
    assert zeroed == [[0, 1], [1, 3], [2, 0], [3, 3]]
    # channel masks constant inside each cell; channel 0 zeroed in the top-left cell, channel 1 elsewhere
    c0, c1 = keep_c[0, 0], keep_c[0, 1]
    assert c0[:2, :2].eq(0).all() and c1[:2, :2].eq(1).all()
    assert c0[:, 2:].eq(1).all() and c0[2:].eq(1).all() and c1[:, 2:].eq(0).all() and c1[2:].eq(0).all()
    # g = 1 is the DMKD template: ⌈0.25·16⌉ = 4 global top positions (all four hot spots)
    keep_s1, keep_c1 = m.grid_masks(cell_hot(), 1)
    d = dmkd(ratio_spatial=0.25, ratio_channel=0.5)
    ds, dc = d.masks(cell_hot())
    assert torch.equal(keep_s1, ds) and torch.equal(keep_c1, dc.expand(1, 2, 4, 4))


def test_samkd_sfd_hand_values_and_grid_weights() -> None:
    t = cell_hot()
    zero_pair = (torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))
    one_pair = (torch.ones(1, 1, 4, 4), torch.ones(1, 2, 4, 4))
    for grid_weight, factor in (("mean", 1.0), ("sum", 2.0)):
        m = samkd_seg(alpha=1.0, grids=(1, 2), grid_weight=grid_weight)
        identity_generators(m.blocks["seg_feat"])
        assert m.sfd_tap("seg_feat", t, t, [one_pair, one_pair]).item() == 0.0  # identical ⇒ R = T ⇒ 0
        total = t.pow(2).sum().item()  # 4·81 + 28 = 352
        assert m.sfd_tap("seg_feat", t, t, [zero_pair, zero_pair]).item() == pytest.approx(factor * total)
        # one grid unmasked, the other fully masked: β_g weights the halves
        assert m.sfd_tap("seg_feat", t, t, [one_pair, zero_pair]).item() == pytest.approx(factor * total / 2)


def test_samkd_sld_regions_and_binary_kl_by_hand() -> None:
    m = samkd_seg(grids=(1, 2), sld_keep=0.25)
    ft = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    s_al = ft.clone()
    s_al[0, :, 2:, 2:] = 1.0  # discrepancy only in the bottom-right cell
    w = m.region_weights(s_al, ft)[0, 0]
    assert w[2:, 2:].eq(0.25).all() and w.sum().item() == pytest.approx(1.0) and w[:2].eq(0).all()
    # soft: weights proportional to the region scores → the same single region here
    m.sld_region = "soft"
    assert torch.equal(m.region_weights(s_al, ft)[0, 0], w)
    # identical features: no discrepancy → uniform weights
    assert m.region_weights(ft, ft).eq(1 / 16).all()
    # binary KL: p = σ(ln 3) = ¾ vs q = ½
    kl = binary_kl(torch.zeros(1, dtype=torch.float64), torch.tensor([math.log(3.0)], dtype=torch.float64), 1.0)
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-12)


def det_samkd(**hp: object) -> SAMKD:
    s = {**fpn_infos(3), "cls_logits": TapInfo("cls_logits", 2, 0, "logits")}
    t = {**fpn_infos(4), "cls_logits": TapInfo("cls_logits", 2, 0, "logits")}
    return SAMKD(s, t, "detection", **SAMKD.resolve_hparams("detection", hp)).double()


def test_samkd_detection_sld_slices_levels_like_torchvision() -> None:
    m = det_samkd(sld_keep=1.0)
    a, k = 2, 2
    fs = {"p3": torch.randn(1, 3, 4, 4, dtype=torch.float64), "p4": torch.randn(1, 3, 2, 2, dtype=torch.float64)}
    ft = {"p3": torch.randn(1, 4, 4, 4, dtype=torch.float64), "p4": torch.randn(1, 4, 2, 2, dtype=torch.float64)}
    # torchvision: per level (N, A·K, H, W) → (N, H, W, A, K) → (N, H·W·A, K), levels concatenated
    zt_lv = {lv: torch.zeros(1, h, h, a, k, dtype=torch.float64) for lv, h in (("p3", 4), ("p4", 2))}
    zt_lv["p4"][0, 1, 0, 1, 0] = math.log(3.0)  # one anchor/class of p4 disagrees with the student's zeros
    zt = torch.cat([v.reshape(1, -1, k) for v in zt_lv.values()], 1)
    zs = torch.zeros_like(zt)
    losses = m(out(**fs, cls_logits=zs), out(**ft, cls_logits=zt))
    assert set(losses) == {"samkd.p3", "samkd.p3.sld", "samkd.p4", "samkd.p4.sld"}
    assert losses["samkd.p3.sld"].item() == 0.0
    # κ = 1: uniform weights 1/4 on the 2×2 level → ¼ · KL(¾ ‖ ½)
    want = 0.25 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert losses["samkd.p4.sld"].item() == pytest.approx(want, rel=1e-12)
    # identical teacher/student logits: SLD is 0 whatever the features
    assert m(out(**fs, cls_logits=zt), out(**ft, cls_logits=zt))["samkd.p4.sld"].item() == 0.0


def test_samkd_seeded_random_masks() -> None:
    m = samkd_seg(mask_mode="random", sld_weight=0.0)
    fs, ft = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    vals = []
    for seed in (3, 3, 4):
        m.generator = torch.Generator().manual_seed(seed)
        vals.append(m(out(seg_feat=fs), out(seg_feat=ft))["samkd.seg_feat"].item())
    assert vals[0] == vals[1] and vals[0] != vals[2]


# --------------------------------------------------------------------------------- gradients, autocast, build
@pytest.mark.parametrize("which", ["dmkd", "samkd"])
def test_gradients_reach_student_and_every_learnable_part(which: str) -> None:
    if which == "dmkd":
        m = dmkd(3, 4)
        fs = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        ft = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        losses = m(out(c5=fs), out(c5=ft))
    else:
        m = samkd_seg(3, 4)
        fs = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        ft = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        zs = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
        losses = m(out(seg_feat=fs, seg_logits=zs), out(seg_feat=ft, seg_logits=torch.randn(2, 3, 5, 5).double()))
    sum(losses.values()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert fs.grad.abs().sum() > 0 and ft.grad is None
    if which == "samkd":
        assert zs.grad.abs().sum() > 0


@pytest.mark.parametrize("which", ["dmkd", "samkd"])
def test_finite_under_bf16_autocast_with_large_activations(which: str) -> None:
    if which == "dmkd":
        m = DMKD(fpn_infos(8), fpn_infos(16), "detection", **DMKD.resolve_hparams("detection"))
    else:
        s = {**fpn_infos(8), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
        t = {**fpn_infos(16), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
        m = SAMKD(s, t, "detection", **SAMKD.resolve_hparams("detection"))
    fs = {k: (torch.randn(2, 8, h, h + 1) * 3000).bfloat16().requires_grad_() for k, h in (("p3", 8), ("p4", 4))}
    ft = {k: (torch.randn(2, 16, h, h + 1) * 3000).bfloat16() for k, h in (("p3", 8), ("p4", 4))}
    n_loc = 8 * 9 + 4 * 5
    zs = (torch.randn(2, n_loc, 3) * 3000).bfloat16().requires_grad_()
    zt = (torch.randn(2, n_loc, 3) * 3000).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(out(**fs, cls_logits=zs), out(**ft, cls_logits=zt))
    assert len(losses) == (2 if which == "dmkd" else 4)
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    assert all(math.isfinite(v) for v in m.last_stats.values())
    sum(losses.values()).backward()
    for k in fs:
        assert torch.isfinite(fs[k].grad.float()).all() and fs[k].grad.float().abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_build_both_methods_for_both_tasks() -> None:
    det_s = {**fpn_infos(4, range(3, 8)), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    det_t = {**fpn_infos(8, range(3, 8)), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    seg_s, seg_t = infos(c5=4, seg_feat=4, seg_logits=3), infos(c5=8, seg_feat=8, seg_logits=3)
    m = methods.build("dmkd", det_s, det_t, "detection").methods["dmkd"]
    assert m.needs == ("p3", "p4", "p5", "p6", "p7") and m.alpha == 2e-5 and m.ratio_spatial == 0.65
    assert "reconstructed from the abstract" in m.paper
    m = methods.build("dmkd", seg_s, seg_t, "segmentation").methods["dmkd"]
    assert m.needs == ("c5",) and m.ratio_channel == 0.75
    m = methods.build("samkd", det_s, det_t, "detection", {"taps": "fpn:2", "grids": "1,2"}).methods["samkd"]
    assert m.taps == ("p3", "p4") and m.grids == (1, 2) and "cls_logits" in m.needs
    assert "reconstructed from the abstract" in m.paper
    m = methods.build("samkd", seg_s, seg_t, "segmentation").methods["samkd"]
    assert m.needs == ("seg_feat", "seg_logits") and m.grids == (1, 2, 4)
    losses = methods.build("samkd", seg_s, seg_t, "segmentation")(
        out(seg_feat=torch.randn(1, 4, 4, 4), seg_logits=torch.randn(1, 3, 4, 4)),
        out(seg_feat=torch.randn(1, 8, 8, 8), seg_logits=torch.randn(1, 3, 8, 8)),
    )
    assert set(losses) == {"samkd.seg_feat", "samkd.seg_feat.sld"} and all(torch.isfinite(v) for v in losses.values())
    m = methods.build("samkd", det_s, det_t, "detection", {"sld_weight": "0"}).methods["samkd"]
    assert "cls_logits" not in m.needs


@pytest.mark.parametrize(
    "name,overrides",
    [("dmkd", {"mask_select": "middle"}), ("dmkd", {"fusion": "conv"}), ("dmkd", {"ratio_spatial": "1.5"}),
     ("samkd", {"pyramid_mode": "x"}), ("samkd", {"grids": "0,2"}), ("samkd", {"sld_region": "x"})],
)
def test_bad_options_raise_config_error(name: str, overrides: dict) -> None:
    with pytest.raises(ConfigError):
        methods.build(name, infos(c5=4, seg_feat=4, seg_logits=3), infos(c5=4, seg_feat=4, seg_logits=3),
                      "segmentation", overrides)


# --------------------------------------------------------------------------------- restructured computation
# The methods compute every grid's masks with one ranking, every grid's reconstruction with one generator call
# (grids stacked along the batch) and the binary KL with two log-sigmoids. The references below restate the
# template one image, one cell and one grid at a time, with Python sorting, and must agree to round-off.
def ref_keep(scores: list[float], ratio: float, select: str) -> list[float]:
    """0 on the ⌈ρ·n⌉ highest (top) / lowest (bottom) scores, ties by index; 1 elsewhere."""
    k = math.ceil(ratio * len(scores) - 1e-6)
    sign = -1.0 if select == "top" else 1.0
    order = sorted(range(len(scores)), key=lambda i: (sign * scores[i], i))
    keep = [1.0] * len(scores)
    for i in order[:k]:
        keep[i] = 0.0
    return keep


def ref_cells(h: int, w: int, g: int) -> list[list[tuple[int, int]]]:
    """Positions of each cell of a g×g grid (clamped to the map), row-major cells, row-major positions."""
    gh, gw = min(g, h), min(g, w)
    cells: list[list[tuple[int, int]]] = [[] for _ in range(gh * gw)]
    for y in range(h):
        for x in range(w):
            cells[(y * gh // h) * gw + x * gw // w].append((y, x))
    return cells


def ref_masks(ft: Tensor, g: int, rs: float, rc: float, select: str) -> tuple[Tensor, Tensor]:
    n, c, h, w = ft.shape
    keep_s, keep_c = torch.ones(n, 1, h, w, dtype=ft.dtype), torch.ones(n, c, h, w, dtype=ft.dtype)
    a = ft.abs()
    for i in range(n):
        for cell in ref_cells(h, w, g):
            spatial = [a[i, :, y, x].mean().item() for y, x in cell]
            for (y, x), k in zip(cell, ref_keep(spatial, rs, select), strict=True):
                keep_s[i, 0, y, x] = k
            local = [sum(a[i, ch, y, x].item() for y, x in cell) / len(cell) for ch in range(c)]
            for ch, k in enumerate(ref_keep(local, rc, select)):
                for y, x in cell:
                    keep_c[i, ch, y, x] = k
    return keep_s, keep_c


def ref_binary_kl(zs: Tensor, zt: Tensor, tau: float) -> Tensor:
    """p log(p/q) + (1 − p) log((1 − p)/(1 − q)), every log as a log-sigmoid (accurate for large logits)."""
    a, b = zt / tau, zs / tau
    p = torch.sigmoid(a)
    ls = torch.nn.functional.logsigmoid
    return p * (ls(a) - ls(b)) + (1 - p) * (ls(-a) - ls(-b))


def ref_samkd(m: SAMKD, fs: dict[str, Tensor], ft: dict[str, Tensor], zs: Tensor, zt: Tensor) -> Tensor:
    """SFD (every grid, separate generator calls) + SLD (explicit regions, four-term binary KL)."""
    total = torch.zeros((), dtype=zs.dtype)
    start = 0
    for tap in m.taps:
        blk = m.blocks[tap]
        s_al, t = blk.align(fs[tap]), ft[tap]
        n, c, h, w = t.shape
        ws = blk.weights()
        for g in m.grids:
            ks, kc = ref_masks(t, g, m.ratio_spatial, m.ratio_channel, m.mask_select)
            r = ws[0] * blk.gen_spatial(s_al * ks) + ws[1] * blk.gen_channel(s_al * kc)
            total = total + m.alpha / len(m.grids) * ((r - t) ** 2).sum() / n
        # SLD regions: the finest grid's cells ranked by the mean discrepancy, top ⌈κ·R⌉ kept
        d = ((t - s_al.detach()) ** 2).mean(1)
        cells = ref_cells(h, w, max(m.grids))
        a = zs.shape[1] // sum(fs[k].shape[-2] * fs[k].shape[-1] for k in m.taps)
        zs_l = zs[:, start:start + h * w * a].reshape(n, h, w, a, -1)
        zt_l = zt[:, start:start + h * w * a].reshape(n, h, w, a, -1)
        start += h * w * a
        kl = ref_binary_kl(zs_l, zt_l, m.sld_tau).sum((3, 4))
        for i in range(n):
            score = [sum(d[i, y, x].item() for y, x in cell) / len(cell) for cell in cells]
            chosen = [1.0 - k for k in ref_keep(score, m.sld_keep, "top")]
            omega = torch.zeros(h, w, dtype=zs.dtype)
            for cell, u in zip(cells, chosen, strict=True):
                for y, x in cell:
                    omega[y, x] = u
            total = total + m.sld_weight * (omega / omega.sum() * kl[i]).sum() / n
    return total


@pytest.mark.parametrize("select", ["top", "bottom"])
def test_samkd_matches_a_per_grid_per_cell_reference(select: str) -> None:
    g = torch.Generator().manual_seed(11)
    sizes = {"p3": (7, 9), "p4": (3, 5)}  # grids of 2 and 4 do not divide these maps; 4 is clamped on p4
    s_info = {**{k: TapInfo(k, 3, 8) for k in sizes}, "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    t_info = {**{k: TapInfo(k, 5, 8) for k in sizes}, "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    m = SAMKD(s_info, t_info, "detection",
              **SAMKD.resolve_hparams("detection", {"taps": "p3,p4", "alpha": 0.3, "sld_keep": 0.4,
                                                    "mask_select": select})).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    fs = {k: torch.randn(2, 3, *hw, generator=g, dtype=torch.float64, requires_grad=True) for k, hw in sizes.items()}
    ft = {k: torch.randn(2, 5, *hw, generator=g, dtype=torch.float64) for k, hw in sizes.items()}
    locs = sum(h * w for h, w in sizes.values()) * 2  # two anchors per position
    zs = torch.randn(2, locs, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, locs, 3, generator=g, dtype=torch.float64) * 3
    got = sum(m(out(**fs, cls_logits=zs), out(**ft, cls_logits=zt)).values())
    want = ref_samkd(m, fs, ft, zs, zt)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    params = [*fs.values(), zs, *m.parameters()]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_dmkd_matches_separate_generator_calls() -> None:
    g = torch.Generator().manual_seed(12)
    m = dmkd(3, 5, alpha=0.7)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    fs = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    got = m(out(c5=fs), out(c5=ft))["dmkd.c5"]
    blk = m.blocks["c5"]
    s_al = blk.align(fs)
    ks, kc = ref_masks(ft, 1, m.ratio_spatial, m.ratio_channel, "top")
    ws = blk.weights()
    r = ws[0] * blk.gen_spatial(s_al * ks) + ws[1] * blk.gen_channel(s_al * kc)
    want = m.alpha * ((r - ft) ** 2).sum() / 2
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    params = [fs, *m.parameters()]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_binary_kl_two_term_form_equals_the_definition() -> None:
    g = torch.Generator().manual_seed(13)
    zs = torch.randn(500, generator=g, dtype=torch.float64) * 8
    zt = torch.randn(500, generator=g, dtype=torch.float64) * 8
    for tau in (1.0, 2.5):
        # |a|, |b| up to ~30: the rewritten form cancels terms of that size, hence an absolute tolerance
        torch.testing.assert_close(binary_kl(zs, zt, tau), ref_binary_kl(zs, zt, tau), rtol=1e-9, atol=1e-13)
    # known value: KL(σ(ln 3) ‖ σ(0)) = ¾ ln(3/2) + ¼ ln(1/2)
    kl = binary_kl(torch.zeros(1, dtype=torch.float64), torch.full((1,), math.log(3.0), dtype=torch.float64), 1.0)
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), rel=1e-14)


# --------------------------------------------------------------------------------- pyramid_mode=progressive
def test_samkd_progressive_schedule_follows_the_engine_progress() -> None:
    m = samkd_seg(alpha=1.0, grids=(1, 2, 4), pyramid_mode="progressive")
    assert m.active_grids() == ((1, 1.0),)  # before any step: the coarsest grid
    # (epoch, it, epochs, iters_per_epoch) → grid: 24 epochs switch at the epoch boundaries 8 and 16
    for when, grid in [((0, 0, 24, 100), 1), ((7, 99, 24, 100), 1), ((8, 0, 24, 100), 2), ((15, 99, 24, 100), 2),
                       ((16, 0, 24, 100), 4), ((23, 99, 24, 100), 4),
                       # 9 epochs: 3 + 3 + 3 (k/|G| = 1/3 exactly at epoch 3, despite round-off)
                       ((2, 9, 9, 10), 1), ((3, 0, 9, 10), 2), ((6, 0, 9, 10), 4),
                       # one epoch of three steps: progress 0, 1/3, 2/3 → every grid once
                       ((0, 0, 1, 3), 1), ((0, 1, 1, 3), 2), ((0, 2, 1, 3), 4)]:
        m.set_progress(*when)
        assert m.active_grids() == ((grid, 1.0),), when
    # joint mode ignores progress; a method set forwards the hook to its members
    seg = infos(seg_feat=4, seg_logits=3)
    ms = methods.build("samkd+dmkd", {**seg, "c5": seg["seg_feat"]}, {**seg, "c5": seg["seg_feat"]}, "segmentation",
                       {"samkd.pyramid_mode": "progressive"})
    ms.set_progress(8, 0, 24, 100)
    assert ms.methods["samkd"].active_grids() == ((2, 1.0),) and ms.methods["samkd"].epoch == 8
    joint = samkd_seg(grids=(1, 2, 4))
    joint.set_progress(23, 99, 24, 100)
    assert [g for g, _ in joint.active_grids()] == [1, 2, 4]


def test_samkd_progressive_distill_runs_through_every_grid(tiny_shapes, tmp_path) -> None:
    from safetensors.torch import save_file

    from kdcli.config import RunConfig
    from kdcli.engine.build import build_run
    from kdcli.engine.callbacks import standard
    from kdcli.engine.loop import fit
    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    # an (untrained) teacher written in the run-folder layout: model.json + weights/best.safetensors
    spec = get_spec("shapes-r18-fcos")
    teacher = tmp_path / "teacher"
    (teacher / "weights").mkdir(parents=True)
    (teacher / "model.json").write_text(json.dumps({"model": spec.to_dict()}))
    state = {k: v.contiguous() for k, v in build_model(spec).net.state_dict().items()}
    save_file(state, str(teacher / "weights" / "best.safetensors"))
    cfg = RunConfig(model="shapes-r18-fcos", out=str(tmp_path / "s"), teacher=str(teacher), method="samkd",
                    set={"pyramid_mode": "progressive", "taps": "p3,p4"}, data=f"coco:{tiny_shapes / 'coco'}",
                    epochs=1, batch_size=4, image_size=64, workers=0, optimizer="adamw", lr=1e-3, warmup_iters=1,
                    bn_recal=1, device="cpu")
    run = build_run(cfg, log=lambda s: None)
    run.callbacks = standard()  # results.csv, as kdcli.api wires it
    m = run.method.methods["samkd"]
    seen: list[tuple[float, int]] = []
    active = m.active_grids
    m.active_grids = lambda: (seen.append((m.progress, active()[0][0])), active())[1]  # type: ignore[method-assign]
    fit(run, progress=False)
    # 12 images, batch 4: three steps at progress 0, 1/3, 2/3 (each step asks once per tap: p3, p4)
    assert sorted(set(seen)) == [(0.0, 1), (1 / 3, 2), (2 / 3, 4)]
    header = (run.folder / "results.csv").read_text().splitlines()[0]
    assert "loss/samkd.p3" in header and "loss/samkd.p4.sld" in header


def test_samkd_generator_precision_amp_runs_generators_in_the_autocast_dtype() -> None:
    """``generator_precision=amp`` (default): under bf16 autocast the generators' convolutions see bf16 inputs while
    the reconstruction error stays float32; ``float32`` keeps them in float32; without autocast both are float32
    and identical. The two precisions agree to bf16 accuracy."""
    s = {**fpn_infos(8), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    t = {**fpn_infos(8), "cls_logits": TapInfo("cls_logits", 3, 0, "logits")}
    torch.manual_seed(0)
    fs = {k: torch.randn(2, 8, h, h) for k, h in (("p3", 8), ("p4", 4))}
    ft = {k: torch.randn(2, 8, h, h) for k, h in (("p3", 8), ("p4", 4))}
    zs, zt = torch.randn(2, 80, 3), torch.randn(2, 80, 3)
    seen: dict[str, set] = {}
    results: dict[tuple[str, bool], dict[str, Tensor]] = {}
    for precision in ("amp", "float32"):
        torch.manual_seed(1)
        m = SAMKD(s, t, "detection", **SAMKD.resolve_hparams("detection", {"generator_precision": precision}))
        assert m.generator_precision == precision
        dtypes: set = set()
        # the first convolutions run as modules; the second ones run fused (one F.conv2d) in the same autocast region
        hooks = [conv.register_forward_hook(lambda mod, inp, res, d=dtypes: d.add((inp[0].dtype, res.dtype)))
                 for blk in m.blocks.values() for conv in (blk.gen_spatial[0], blk.gen_channel[0])]
        for amp in (True, False):
            dtypes.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                losses = m(out(**fs, cls_logits=zs), out(**ft, cls_logits=zt))
            seen[f"{precision}-{amp}"] = set(dtypes)
            results[(precision, amp)] = {k: v.detach() for k, v in losses.items()}
            assert all(v.dtype == torch.float32 for v in losses.values())
        for h in hooks:
            h.remove()
    assert seen["amp-True"] == {(torch.bfloat16, torch.bfloat16)}
    assert seen["float32-True"] == seen["amp-False"] == seen["float32-False"] == {(torch.float32, torch.float32)}
    for k, v in results[("float32", False)].items():
        assert torch.equal(results[("amp", False)][k], v)  # no autocast: the option changes nothing
        assert results[("amp", True)][k].item() == pytest.approx(v.item(), rel=3e-2)  # bf16 rounding only
    with pytest.raises(ConfigError):
        methods.build("samkd", s, t, "detection", {"generator_precision": "fp8"})


# --------------------------------------------------------------------------------- the fused computations
def test_reconstruction_error_and_masked_inputs_have_exact_gradients() -> None:
    """The two hand-written backward passes (masked inputs, squared error) against finite differences, including
    a weight and a teacher that require gradients, one mask pair shared by three grids and a mask with batch 1."""
    g = torch.Generator().manual_seed(21)
    r = torch.randn(3, 2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: grid_reconstruction_losses(a, b, c), (r, ft, w))
    assert torch.autograd.gradcheck(lambda a, b: grid_reconstruction_losses(a, b), (r, ft))
    want = ((r - ft) ** 2 * w).flatten(1).sum(1) / 2
    torch.testing.assert_close(grid_reconstruction_losses(r, ft, w), want, rtol=1e-13, atol=0)

    blk = DualReconstruction(4, 4).double()
    keep_s = (torch.rand(1, 1, 1, 3, 5, generator=g) > 0.5).double()  # one spatial mask for every grid and image
    keep_c = (torch.rand(3, 2, 4, 3, 5, generator=g) > 0.5).double()
    s_al = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: blk.reconstruct(x, keep_s, keep_c), (s_al,))
    # and the values are those of separate generator calls, grid by grid
    got = blk.reconstruct(s_al, keep_s, keep_c)
    ws = blk.weights()
    for i in range(3):
        want_i = ws[0] * blk.gen_spatial(s_al * keep_s[0]) + ws[1] * blk.gen_channel(s_al * keep_c[i])
        torch.testing.assert_close(got[i], want_i, rtol=1e-12, atol=1e-14)


def test_samkd_levels_ranked_together_equal_level_by_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """level_masks / level_region_weights / sld_levels (all FPN levels at once) give what one call per level gives,
    ties included (integer-valued features tie often); sld_levels' chunked binary KL (chunks of 5 rows here,
    across level and sample boundaries) has the element-wise sld_tap's values and gradients."""
    from kdcli.methods import _logits

    monkeypatch.setattr(_logits, "CHUNK_ELEMENTS", 5 * 2)
    m = det_samkd(sld_keep=0.3)
    g = torch.Generator().manual_seed(22)
    fts = [torch.randint(0, 3, (2, 4, h, w), generator=g).double() for h, w in ((6, 5), (3, 3), (1, 2))]
    joint = m.level_masks(fts, (1, 2, 4))
    for ft, (ks, kc) in zip(fts, joint, strict=True):
        ks1, kc1 = m.level_masks([ft], (1, 2, 4))[0]
        assert torch.equal(ks, ks1) and torch.equal(kc, kc1)
        for i, grid in enumerate((1, 2, 4)):
            rs, rc = ref_masks(ft, grid, m.ratio_spatial, m.ratio_channel, "top")
            assert torch.equal(ks[i], rs) and torch.equal(kc[i], rc)
    pairs = [(torch.randint(0, 3, ft.shape, generator=g).double(), ft) for ft in fts]
    weights = m.level_region_weights(pairs)
    for (s_al, ft), w in zip(pairs, weights, strict=True):
        assert torch.equal(w, m.level_region_weights([(s_al, ft)])[0])
        assert w.sum((1, 2, 3)).sub(1).abs().max() < 1e-12
    # SLD over the whole cls_logits equals sld_tap on each level's slice (p3 and p4 are the head's levels here)
    s_out = out(p3=torch.zeros(2, 3, 6, 5), p4=torch.zeros(2, 3, 3, 3))
    zs = torch.randn(2, (30 + 9) * 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    zt = torch.randn(2, (30 + 9) * 2, 2, generator=g, dtype=torch.float64) * 3
    omega = {"p3": weights[0], "p4": weights[1]}
    joint = m.sld_levels(zs, zt, omega, s_out)
    ref = zs.detach().clone().requires_grad_()
    ones = {}
    for lv in ("p3", "p4"):
        ones[lv] = m.sld_tap(lv, m.level_logits(ref, lv, s_out), m.level_logits(zt, lv, s_out), omega[lv])
        assert joint[lv].item() == pytest.approx(ones[lv].item(), rel=1e-12)
    (joint["p3"] + 2 * joint["p4"]).backward()
    (ones["p3"] + 2 * ones["p4"]).backward()
    torch.testing.assert_close(zs.grad, ref.grad, rtol=1e-10, atol=1e-14)


def test_samkd_pyramid_cache_is_bounded() -> None:
    """Detection batches come in many padded sizes: the cell layouts kept per map size stay bounded."""
    from kdcli.methods.samkd import PYRAMID_CACHE

    m = det_samkd()
    for h in range(1, PYRAMID_CACHE + 10):
        m.pyramid(h, 3, (1, 2, 4), torch.device("cpu"))
    assert len(m._pyramids) == PYRAMID_CACHE
    assert (1, 3, (1, 2, 4), "cpu") not in m._pyramids  # the oldest went first
    assert (PYRAMID_CACHE + 9, 3, (1, 2, 4), "cpu") in m._pyramids
