"""Maths of FGD (kdcli/methods/fgd.py) and of its box → level masks (kdcli/methods/boxes.py).

Expected values are worked out by hand in the comments, or computed by a per-box / per-image
restatement of the official formulas written here (loops, explicit square roots), never with the
code under test. Exact-value checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdcli.methods as methods
from kdcli.errors import ConfigError, MethodError
from kdcli.methods.boxes import background_mask, fgd_masks
from kdcli.methods.fgd import FGD, RECIPES
from kdcli.models.taps import ModelOutput, TapInfo

F64 = torch.float64


def fpn(channels: int = 4, levels: tuple[str, ...] = ("p3", "p4", "p5", "p6", "p7")) -> dict[str, TapInfo]:
    return {name: TapInfo(name, channels, 2 ** int(name[1]), "feature") for name in levels}


def make(student: dict, teacher: dict, **overrides: object) -> FGD:
    return FGD(student, teacher, "detection", **FGD.resolve_hparams("detection", overrides))


def out(taps: dict[str, Tensor], image_sizes: list[tuple[int, int]], input_shape: tuple[int, int]) -> ModelOutput:
    return ModelOutput(taps=taps, extras={"image_sizes": image_sizes, "input_shape": input_shape})


def targets(*boxes: list[list[float]]) -> list[dict[str, Tensor]]:
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]


def grid(rows: list[str], values: dict[str, float]) -> Tensor:
    """An H×W mask from strings: each character is a key of ``values`` ('.' = 0)."""
    return torch.tensor([[values.get(ch, 0.0) for ch in row] for row in rows], dtype=F64)


def loop_masks(boxes: list[Tensor], image_sizes: list[tuple[int, int]], h: int, w: int) -> tuple[Tensor, Tensor]:
    """The official box → level procedure, one image and one box at a time, with Python slicing."""
    fg = torch.zeros(len(boxes), h, w, dtype=F64)
    bg = torch.ones(len(boxes), h, w, dtype=F64)
    for i, (b, (ih, iw)) in enumerate(zip(boxes, image_sizes, strict=True)):
        for x1, y1, x2, y2 in b.tolist():
            x1, x2 = x1 / iw * w, x2 / iw * w
            y1, y2 = y1 / ih * h, y2 / ih * h
            wmin, wmax, hmin, hmax = math.floor(x1), math.ceil(x2), math.floor(y1), math.ceil(y2)
            # int32 tensors, as in the official code: the weight is computed in float32
            hh, ww = torch.tensor(hmax + 1 - hmin, dtype=torch.int32), torch.tensor(wmax + 1 - wmin, dtype=torch.int32)
            area = (1.0 / hh / ww).item()
            region = fg[i][hmin:hmax + 1, wmin:wmax + 1]
            fg[i][hmin:hmax + 1, wmin:wmax + 1] = torch.clamp(region, min=area)
        bg[i] = (fg[i] <= 0).to(F64)
        if bg[i].sum() > 0:
            bg[i] /= bg[i].sum()
    return fg, bg


# ----------------------------------------------------------------------------------- box masks
def test_masks_hand_made_8x8() -> None:
    # image 8×8 on an 8×8 level: the scaling is the identity.
    # A (1, 2, 3, 4): cols ⌊1⌋..⌈3⌉ = 1..3, rows ⌊2⌋..⌈4⌉ = 2..4 → 3×3 cells, a = 1/9
    # B (4.5, 0.2, 6.5, 1.5): cols 4..7, rows 0..2 → 3 rows × 4 cols = 12 cells, a = 1/12
    boxes = [torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.5, 0.2, 6.5, 1.5]], dtype=F64)]
    fg, bg = fgd_masks(boxes, (8, 8), image_sizes=[(8, 8)], dtype=F64)
    want = grid(["....bbbb",
                 "....bbbb",
                 ".aaabbbb",
                 ".aaa....",
                 ".aaa....",
                 "........",
                 "........",
                 "........"], {"a": 1 / 9, "b": 1 / 12})
    torch.testing.assert_close(fg[0], want, rtol=1e-7, atol=0)  # the weight is float32-computed
    # background: the 64 − 9 − 12 = 43 uncovered cells, each 1/43; sums to 1
    torch.testing.assert_close(bg[0], (want == 0).to(F64) / 43, rtol=1e-15, atol=0)
    assert bg[0].sum().item() == pytest.approx(1.0, abs=1e-14)


def test_masks_overlap_takes_the_max_in_any_order() -> None:
    # big (0, 0, 5, 5): rows/cols 0..5 → 36 cells, 1/36; small (2, 2, 3, 3): rows/cols 2..3 → 1/4
    big, small = [0.0, 0.0, 5.0, 5.0], [2.0, 2.0, 3.0, 3.0]
    for order in ([big, small], [small, big]):
        fg, bg = fgd_masks([torch.tensor(order, dtype=F64)], (8, 8), image_sizes=[(8, 8)], dtype=F64)
        want = grid(["bbbbbb..",
                     "bbbbbb..",
                     "bbssbb..",
                     "bbssbb..",
                     "bbbbbb..",
                     "bbbbbb..",
                     "........",
                     "........"], {"b": 1 / 36, "s": 1 / 4})
        torch.testing.assert_close(fg[0], want, rtol=1e-7, atol=0)
        torch.testing.assert_close(bg[0], (want == 0).to(F64) / 28, rtol=1e-15, atol=0)


def test_box_scaling_official_quirk_and_alternatives() -> None:
    # resized image 8 (h) × 6 (w), padded input 8×8, level 8×8 (stride 1).
    # official: x / 6 · 8 → box (3, 0, 6, 4) becomes x 4..8, y 0..4: cols 4..8 (5 counted, 4 inside
    # the map), rows 0..4 (5): a = 1/25, computed before clipping; 20 cells filled.
    boxes = [torch.tensor([[3.0, 0.0, 6.0, 4.0]], dtype=F64)]
    fg, _ = fgd_masks(boxes, (8, 8), image_sizes=[(8, 6)], dtype=F64)
    rows = ["....ssss"] * 5 + ["........"] * 3
    torch.testing.assert_close(fg[0], grid(rows, {"s": 1 / 25}), rtol=1e-7, atol=0)
    # padded-input frame (x / 8 · 8) and x / stride agree here: cols 3..6, rows 0..4 → 1/20
    want = grid(["...aaaa."] * 5 + ["........"] * 3, {"a": 1 / 20})
    for kw in ({"scaling": "input", "input_shape": (8, 8)}, {"scaling": "stride", "stride": 1}):
        fg, _ = fgd_masks(boxes, (8, 8), dtype=F64, **kw)
        torch.testing.assert_close(fg[0], want, rtol=1e-7, atol=0)
    # a level of stride 2 (4×4) of the same input: stride mode → x 1.5..3, y 0..2
    fg, _ = fgd_masks(boxes, (4, 4), scaling="stride", stride=2, dtype=F64)
    torch.testing.assert_close(fg[0], grid([".aaa"] * 3 + ["...."], {"a": 1 / 9}), rtol=1e-7, atol=0)


def test_masks_batch_equals_per_image_and_the_loop() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [(40, 56), (64, 48), (33, 64), (64, 64)]
    counts = [5, 0, 3, 7]
    boxes = []
    for (h, w), k in zip(sizes, counts, strict=True):
        xy = torch.rand(k, 2, generator=g, dtype=F64) * torch.tensor([w, h], dtype=F64)
        wh = torch.rand(k, 2, generator=g, dtype=F64) * 30
        b = torch.cat([xy, xy + wh], 1)
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        boxes.append(b)
    for hw in ((8, 8), (5, 7), (1, 1)):
        fg, bg = fgd_masks(boxes, hw, image_sizes=sizes, dtype=F64)
        for i in range(len(boxes)):
            fi, bi = fgd_masks([boxes[i]], hw, image_sizes=[sizes[i]], dtype=F64)
            assert torch.equal(fg[i], fi[0]) and torch.equal(bg[i], bi[0])
        lf, lb = loop_masks(boxes, sizes, *hw)
        torch.testing.assert_close(fg, lf, rtol=1e-7, atol=0)
        torch.testing.assert_close(bg, lb, rtol=1e-12, atol=0)
        assert fg[1].abs().sum() == 0  # the image without boxes


def test_no_boxes_is_background_only() -> None:
    empty = torch.zeros(0, 4)
    fg, bg = fgd_masks([empty, empty], (3, 5), image_sizes=[(30, 50), (30, 40)], dtype=F64)
    assert fg.abs().sum().item() == 0
    torch.testing.assert_close(bg, torch.full((2, 3, 5), 1 / 15, dtype=F64), rtol=1e-15, atol=0)
    fg, bg = fgd_masks([], (3, 5), image_sizes=[], dtype=F64)
    assert fg.shape == (0, 3, 5) and bg.shape == (0, 3, 5)


def test_box_covering_the_map_leaves_zero_background() -> None:
    fg, bg = fgd_masks([torch.tensor([[0.0, 0.0, 8.0, 8.0]])], (4, 4), image_sizes=[(8, 8)], dtype=F64)
    # rows/cols 0..4 counted (5 × 5 = 25), 4×4 inside the map
    torch.testing.assert_close(fg[0], torch.full((4, 4), 1 / 25, dtype=F64), rtol=1e-7, atol=0)
    assert bg.abs().sum().item() == 0 and torch.isfinite(bg).all()
    assert background_mask(torch.zeros(1, 2, 2)).sum().item() == pytest.approx(1.0)


def test_negative_coordinates_wrap_like_python_slices_or_clamp() -> None:
    # x1 = −1.5 → ⌊−1.5⌋ = −2: official slicing [−2:3] on 8 columns is [6:3] → empty
    b = [torch.tensor([[-1.5, 1.0, 2.0, 2.0]], dtype=F64)]
    fg, _ = fgd_masks(b, (8, 8), image_sizes=[(8, 8)], dtype=F64)
    lf, _ = loop_masks(b, [(8, 8)], 8, 8)
    torch.testing.assert_close(fg, lf)
    assert fg.abs().sum().item() == 0
    # clamped: cols 0..2, rows 1..2; the weight still counts 5 cols × 2 rows = 1/10
    fg, _ = fgd_masks(b, (8, 8), image_sizes=[(8, 8)], negative="clamp", dtype=F64)
    want = grid(["........", "aaa.....", "aaa....."] + ["........"] * 5, {"a": 1 / 10})
    torch.testing.assert_close(fg[0], want, rtol=1e-7, atol=0)


def test_bad_scaling_raises() -> None:
    with pytest.raises(ConfigError):
        fgd_masks([torch.zeros(1, 4)], (4, 4), scaling="nope")
    with pytest.raises(ConfigError):
        fgd_masks([torch.zeros(1, 4)], (4, 4), scaling="img_shape", image_sizes=None)


# ----------------------------------------------------------------------------------- FGD loss
ONE = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "lambda": 1.0}


def single(cs: int = 2, ct: int = 2, **overrides: object) -> FGD:
    return make(fpn(cs, ("p3",)), fpn(ct, ("p3",)), **{"taps": "p3", **overrides}).double()


def run(m: FGD, fs: Tensor, ft: Tensor, boxes: list[list[list[float]]], sizes: list[tuple[int, int]],
        input_shape: tuple[int, int] | None = None) -> dict[str, Tensor]:
    shape = input_shape or (ft.shape[-2] * 8, ft.shape[-1] * 8)
    losses = m(out({"p3": fs}, sizes, shape), out({"p3": ft}, sizes, shape), targets(*boxes))
    return {k.split(".")[-1]: v for k, v in losses.items()}


def perturb_last_convs(m: FGD, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for level in m.levels.values():
            for seq in (level.channel_add_conv_s, level.channel_add_conv_t):
                for p in seq[-1].parameters():
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def test_identical_features_which_terms_vanish() -> None:
    m = single(4, 4, **ONE)
    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 4, 6, 5, generator=g, dtype=F64) * 3
    boxes, sizes = [[[4.0, 4.0, 20.0, 30.0]], []], [(48, 40), (40, 40)]
    # F_S = F_T: (3)–(4) have (F_S − F_T)² = 0; (5) compares identical attention maps; at init the
    # last GcBlock convs are zero, so out_s = F_S = F_T = out_t and (8) is 0 too.
    losses = run(m, f, f.clone(), boxes, sizes)
    assert all(v.item() == 0.0 for v in losses.values()), losses
    # once the last convs have moved, the two GcBlocks (separate parameters: conv_mask_s ≠ conv_mask_t,
    # channel_add_conv_s ≠ channel_add_conv_t) add different contexts: the global term is > 0 while
    # the focal and attention terms stay exactly 0 (they have no learnable part)
    perturb_last_convs(m)
    losses = run(m, f, f.clone(), boxes, sizes)
    assert losses["fg"].item() == 0.0 and losses["bg"].item() == 0.0 and losses["at"].item() == 0.0
    assert losses["global"].item() > 1e-3
    # with the teacher branch copied into the student branch, the global term vanishes again
    level = m.levels["p3"]
    level.conv_mask_s.load_state_dict(level.conv_mask_t.state_dict())
    level.channel_add_conv_s.load_state_dict(level.channel_add_conv_t.state_dict())
    assert run(m, f, f.clone(), boxes, sizes)["global"].item() < 1e-24


def test_focal_and_attention_known_values_channel_attention() -> None:
    # N = 1, C = 2, 4×4 level, image 32×32 (stride 8), T = 0.5.
    # teacher: channel 0 ≡ 1, channel 1 ≡ 1 + T·ln 3: mean_c|F| is constant → S_t ≡ 1;
    # Cat_t = 2·softmax([1, 1 + T ln 3] / T) = 2·[1/4, 3/4] = [0.5, 1.5].
    m = single(**{**ONE, "gamma": 0.0, "lambda": 0.0})
    ft = torch.ones(1, 2, 4, 4, dtype=F64)
    ft[:, 1] += 0.5 * math.log(3)
    # student = teacher + [2, 0]: Σ_c Cat_t (F_S − F_T)² = 0.5 · 4 = 2 at every cell.
    fs = ft.clone()
    fs[:, 0] += 2
    # box (0, 0, 8, 8) px → (0, 0, 1, 1) cells: rows/cols 0..1, 4 cells of weight 1/4
    losses = run(m, fs, ft, [[[0.0, 0.0, 8.0, 8.0]]], [(32, 32)])
    assert losses["fg"].item() == pytest.approx(4 * 0.25 * 2, rel=1e-7)  # = 2
    assert losses["bg"].item() == pytest.approx(12 * (1 / 12) * 2, rel=1e-12)  # = 2
    # weights: α = 3, β = 0 isolate the foreground term (γ = λ = 0)
    m3 = single(alpha=3.0, beta=0.0, gamma=0.0, **{"lambda": 0.0})
    total = sum(run(m3, fs, ft, [[[0.0, 0.0, 8.0, 8.0]]], [(32, 32)]).values())
    assert total.item() == pytest.approx(6.0, rel=1e-7)
    # attention term with a zero student: S_s ≡ 1, Cat_s = [1, 1] → |1 − 0.5| + |1 − 1.5| = 1, spatial 0
    mg = single(alpha=0.0, beta=0.0, gamma=1.0, **{"lambda": 0.0})
    assert run(mg, torch.zeros_like(ft), ft, [[]], [(32, 32)])["at"].item() == pytest.approx(1.0, rel=1e-12)


def test_focal_and_attention_known_values_spatial_attention() -> None:
    # N = 1, C = 2, 2×2 level, image 2×2 (stride 1), T = 0.5. Teacher ≡ 1 plus T·ln 5 at cell (0, 0)
    # in both channels: Cat_t = [1, 1]; S_t = 4·softmax([ln 5, 0, 0, 0]) = 4·[5, 1, 1, 1]/8.
    m = single(**ONE)
    ft = torch.ones(1, 2, 2, 2, dtype=F64)
    ft[:, :, 0, 0] += 0.5 * math.log(5)
    fs = ft.clone()
    fs[:, 0] += 2  # Σ_c Cat_t (F_S − F_T)² = 4 everywhere
    # box (0, 0, 0, 0): the single cell (0, 0), weight 1 → L_fg = 1 · 2.5 · 4 = 10
    # background: 3 cells of 1/3, S_t = 0.5 → L_bg = 3 · (1/3) · 0.5 · 4 = 2
    losses = run(m, fs, ft, [[[0.0, 0.0, 0.0, 0.0]]], [(2, 2)], input_shape=(2, 2))
    assert losses["fg"].item() == pytest.approx(10.0, rel=1e-12)
    assert losses["bg"].item() == pytest.approx(2.0, rel=1e-12)
    # global at init: Σ (F_S − F_T)² / N = 4 cells · 4 = 16
    assert losses["global"].item() == pytest.approx(16.0, rel=1e-12)
    # attention, zero student: Cat equal; Σ_hw |1 − S_t| = 1.5 + 3 · 0.5 = 3
    zero = run(m, torch.zeros_like(ft), ft, [[[0.0, 0.0, 0.0, 0.0]]], [(2, 2)], input_shape=(2, 2))
    assert zero["at"].item() == pytest.approx(3.0, rel=1e-12)


def test_reductions_are_sums_over_the_batch_size() -> None:
    # two copies of the same image: every term is unchanged (Σ / N), not halved or doubled
    m = single(4, 4, **ONE)
    perturb_last_convs(m, 3)
    g = torch.Generator().manual_seed(4)
    fs = torch.randn(1, 4, 5, 6, generator=g, dtype=F64)
    ft = torch.randn(1, 4, 5, 6, generator=g, dtype=F64)
    box = [[3.0, 5.0, 20.0, 33.0]]
    one = run(m, fs, ft, [box], [(40, 48)])
    two = run(m, fs.repeat(2, 1, 1, 1), ft.repeat(2, 1, 1, 1), [box, box], [(40, 48)] * 2)
    for k in one:
        assert two[k].item() == pytest.approx(one[k].item(), rel=1e-12)


def reference_level(m: FGD, tap: str, fs: Tensor, ft: Tensor, fg: Tensor, bg: Tensor) -> Tensor:
    """Eq. (9) of one level restated with the official √-mask form and explicit GcBlocks."""
    lv = m.levels[tap]
    if lv.align is not None:
        fs = F.conv2d(fs, lv.align.weight, lv.align.bias)
    n, c, h, w = ft.shape
    T = m.temp

    def att(x: Tensor) -> tuple[Tensor, Tensor]:
        a = x.abs()
        sp = h * w * F.softmax((a.mean(1) / T).reshape(n, -1), dim=1).reshape(n, h, w)
        ch = c * F.softmax(a.mean(3).mean(2) / T, dim=1)
        return sp, ch

    st, ct = att(ft)
    ss, cs = att(fs)
    scale = torch.sqrt(st[:, None]) * torch.sqrt(ct[:, :, None, None])
    fg_loss = ((fs * scale * fg[:, None].sqrt() - ft * scale * fg[:, None].sqrt()) ** 2).sum() / n
    bg_loss = ((fs * scale * bg[:, None].sqrt() - ft * scale * bg[:, None].sqrt()) ** 2).sum() / n
    at_loss = (cs - ct).abs().sum() / n + (ss - st).abs().sum() / n

    def gc(x: Tensor, mask: torch.nn.Conv2d, seq: torch.nn.Sequential) -> Tensor:
        logits = F.conv2d(x, mask.weight, mask.bias).reshape(n, h * w)
        ctx = torch.einsum("nck,nk->nc", x.reshape(n, c, h * w), F.softmax(logits, dim=1))[:, :, None, None]
        y = F.conv2d(ctx, seq[0].weight, seq[0].bias)
        y = F.relu(F.layer_norm(y, y.shape[1:], seq[1].weight, seq[1].bias, eps=1e-5))
        return x + F.conv2d(y, seq[3].weight, seq[3].bias)

    glb = ((gc(fs, lv.conv_mask_s, lv.channel_add_conv_s) - gc(ft, lv.conv_mask_t, lv.channel_add_conv_t)) ** 2)
    return m.alpha * fg_loss + m.beta * bg_loss + m.gamma * at_loss + m.lambda_ * glb.sum() / n


def test_full_loss_and_gradients_match_the_restated_official_formulas() -> None:
    s_info, t_info = fpn(3, ("p3", "p4")), fpn(6, ("p3", "p4"))
    m = make(s_info, t_info, taps="p3,p4", alpha=0.7, beta=1.3, gamma=0.4, temp=0.8, **{"lambda": 0.9}).double()
    perturb_last_convs(m, 5)
    g = torch.Generator().manual_seed(6)
    sizes, input_shape = [(61, 80), (80, 47)], (80, 80)
    fs = {k: torch.randn(2, 3, 10 // (i + 1), 10 // (i + 1), generator=g, dtype=F64).requires_grad_()
          for i, k in enumerate(("p3", "p4"))}
    ft = {k: torch.randn(2, 6, 10 // (i + 1), 10 // (i + 1), generator=g, dtype=F64) * 2 for i, k in enumerate(fs)}
    boxes = [[[3.0, 4.5, 40.2, 30.0], [20.0, 20.0, 22.5, 61.0], [0.0, 0.0, 79.0, 60.0]], [[10.0, 50.0, 47.0, 80.0]]]
    losses = m(out(fs, sizes, input_shape), out(ft, sizes, input_shape), targets(*boxes))
    assert set(losses) == {f"fgd.{k}.{t}" for k in fs for t in ("fg", "bg", "at", "global")}
    total = sum(losses.values())
    want = 0
    for k in fs:
        h, w = ft[k].shape[-2:]
        fg, bg = loop_masks([torch.tensor(b, dtype=F64) for b in boxes], sizes, h, w)
        want = want + reference_level(m, k, fs[k], ft[k], fg, bg)
    assert total.item() == pytest.approx(want.item(), rel=1e-12)
    params = [*fs.values(), *m.parameters()]
    got = torch.autograd.grad(total, params)
    ref = torch.autograd.grad(want, params)
    scale = max(float(b.abs().max()) for b in ref)
    # atol: the conv_mask biases have a zero gradient (softmax shift invariance) seen as round-off
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * scale)


def test_gradients_reach_the_student_and_every_learnable_part() -> None:
    m = single(3, 4, **ONE)
    lv = m.levels["p3"]
    g = torch.Generator().manual_seed(7)
    fs = torch.randn(2, 3, 5, 5, generator=g, dtype=F64, requires_grad=True)
    ft = torch.randn(2, 4, 5, 5, generator=g, dtype=F64)
    args = ([[[0.0, 0.0, 16.0, 16.0]], []], [(40, 40), (40, 32)])
    sum(run(m, fs, ft, *args).values()).backward()
    assert fs.grad.abs().sum() > 0 and lv.align.weight.grad.abs().sum() > 0
    # at init the zero last convs block the GcBlocks upstream of them: exactly zero gradient there,
    # while the last convs themselves learn
    for mod in (lv.conv_mask_s, lv.conv_mask_t, lv.channel_add_conv_s[0], lv.channel_add_conv_t[0],
                lv.channel_add_conv_s[1], lv.channel_add_conv_t[1]):
        assert all(p.grad.abs().max().item() == 0.0 for p in mod.parameters())
    for seq in (lv.channel_add_conv_s, lv.channel_add_conv_t):
        assert seq[3].weight.grad.abs().sum() > 0 and seq[3].bias.grad.abs().sum() > 0
    m.zero_grad()
    perturb_last_convs(m, 8)
    sum(run(m, fs.detach(), ft, *args).values()).backward()
    for name, p in m.named_parameters():
        if name.endswith("conv_mask_s.bias") or name.endswith("conv_mask_t.bias"):
            # softmax_hw(z + b) = softmax_hw(z): the context does not depend on conv_mask's bias, whose
            # gradient is therefore 0 up to round-off (as in the official module: it never moves)
            assert p.grad.abs().max().item() < 1e-12, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_finite_under_bf16_autocast_with_large_activations() -> None:
    m = make(fpn(4, ("p3", "p4")), fpn(8, ("p3", "p4")), taps="p3,p4")
    perturb_last_convs(m, 9)
    fs = {k: (torch.randn(2, 4, 8 >> i, 8 >> i) * 3000).bfloat16().requires_grad_() for i, k in enumerate(("p3", "p4"))}
    ft = {k: (torch.randn(2, 8, 8 >> i, 8 >> i) * 3000).bfloat16() for i, k in enumerate(("p3", "p4"))}
    sizes = [(64, 64), (50, 64)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = m(out(fs, sizes, (64, 64)), out(ft, sizes, (64, 64)), targets([[4.0, 4.0, 30.0, 40.0]], []))
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    sum(losses.values()).backward()
    for t in fs.values():
        assert torch.isfinite(t.grad.float()).all() and t.grad.float().abs().sum() > 0


def test_images_without_boxes_and_missing_targets() -> None:
    m = single(**ONE)
    g = torch.Generator().manual_seed(10)
    fs = torch.randn(2, 2, 4, 4, generator=g, dtype=F64)
    ft = torch.randn(2, 2, 4, 4, generator=g, dtype=F64)
    both = run(m, fs, ft, [[], []], [(32, 32), (32, 32)])
    assert both["fg"].item() == 0.0 and both["bg"].item() > 0
    # the background of a box-free image is uniform, 1/(H·W): L_bg = Σ S_t Cat_t (ΔF)² / (16 N)
    from kdcli.methods.fgd import attention
    st, ct = attention(ft, 0.5)
    want = ((fs - ft) ** 2 * ct[:, :, None, None] * st[:, None]).sum() / 16 / 2
    assert both["bg"].item() == pytest.approx(want.item(), rel=1e-12)
    with pytest.raises(MethodError):
        m(out({"p3": fs}, [(32, 32)] * 2, (32, 32)), out({"p3": ft}, [(32, 32)] * 2, (32, 32)), None)
    with pytest.raises(MethodError):
        m(ModelOutput(taps={"p3": fs}), ModelOutput(taps={"p3": ft}), targets([], []))


# ----------------------------------------------------------------------------------- presets / build
def test_build_one_stage_preset() -> None:
    s, t = fpn(4), fpn(8)
    ms = methods.build("fgd", s, t, "detection")
    m = ms.methods["fgd"]
    assert ms.needs == ("p3", "p4", "p5", "p6", "p7") and m.recipe == "retinanet"
    assert (m.temp, m.alpha, m.beta, m.gamma, m.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert m.hp["alpha"] == 1e-3  # the values used are recorded for the run report
    assert type(ms).needs_targets_any.fget(ms) is True
    lv = m.levels["p3"]
    assert isinstance(lv.align, torch.nn.Conv2d) and lv.align.weight.shape == (8, 4, 1, 1)
    assert lv.conv_mask_s.weight.shape == (1, 8, 1, 1) and lv.channel_add_conv_t[0].out_channels == 4
    assert lv.conv_mask_t.bias.abs().sum() == 0 and lv.channel_add_conv_s[3].weight.abs().sum() == 0
    assert make(fpn(4), fpn(4)).levels["p3"].align is None
    with pytest.raises(MethodError):
        methods.build("fgd", {"c5": TapInfo("c5", 4, 8)}, {"c5": TapInfo("c5", 4, 8)}, "segmentation")


def test_build_two_stage_preset_and_recipes() -> None:
    s = fpn(4, ("p2", "p3", "p4", "p5", "p6"))
    m = methods.build("fgd", s, s, "detection").methods["fgd"]
    assert m.taps == ("p2", "p3", "p4", "p5") and m.recipe == "faster_rcnn"
    assert (m.alpha, m.beta, m.gamma, m.lambda_) == (5e-5, 2.5e-5, 5e-5, 5e-7)
    # a named recipe, an explicit weight wins over it
    m = methods.build("fgd", fpn(), fpn(), "detection", {"recipe": "fcos", "alpha": "2e-3"}).methods["fgd"]
    assert m.temp == 0.8 and m.alpha == 2e-3 and m.beta == RECIPES["fcos"]["beta"]
    with pytest.raises(ConfigError):
        methods.build("fgd", fpn(), fpn(), "detection", {"recipe": "nope"})
    with pytest.raises(ConfigError):
        methods.build("fgd", fpn(), fpn(), "detection", {"box_scaling": "nope"})


def test_load_official_key_layout() -> None:
    m = make(fpn(4, ("p3", "p4")), fpn(8, ("p3", "p4")), taps="p3,p4")
    src = make(fpn(4, ("p3", "p4")), fpn(8, ("p3", "p4")), taps="p3,p4")
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    keys = set(src.levels["p3"].state_dict())
    assert keys == {"align.weight", "align.bias", "conv_mask_s.weight", "conv_mask_s.bias", "conv_mask_t.weight",
                    "conv_mask_t.bias"} | {f"channel_add_conv_{b}.{i}.{p}" for b in "st" for i in (0, 1, 3)
                                           for p in ("weight", "bias")}
    official = {f"distill_losses.loss_fgd_fpn_{i}.{k}": v for i, tap in enumerate(("p3", "p4"))
                for k, v in src.levels[tap].state_dict().items()}
    m.load_official_distiller(official)
    for a, b in zip(m.state_dict().values(), src.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- official parity, per image
def official_level(lv, preds_s: Tensor, preds_t: Tensor, gt: list[Tensor], img_shapes: list[tuple[int, int]],
                   temp: float) -> dict[str, Tensor]:
    """One official ``FeatureLoss`` level (yzd-v/FGD), restated image by image and box by box: align, the
    two attentions (channel mean taken over H then W), the masks filled one box at a time with Python slices
    and ``torch.maximum``, the √-weighted sum-MSE, the L1 attention loss and the GcBlock relation loss with
    an explicit (C × HW) @ (HW × 1) context. Unweighted terms."""
    if lv.align is not None:
        preds_s = F.conv2d(preds_s, lv.align.weight, lv.align.bias)
    n, c, h, w = preds_s.shape

    def attention_of(x: Tensor) -> tuple[Tensor, Tensor]:
        v = x.abs()
        spatial = h * w * F.softmax((v.mean(dim=1, keepdim=True) / temp).view(n, -1), dim=1)
        channel = c * F.softmax(v.mean(dim=2).mean(dim=2) / temp, dim=1)
        return spatial.view(n, h, w), channel

    s_t, c_t = attention_of(preds_t)
    s_s, c_s = attention_of(preds_s)
    fg = torch.zeros_like(s_t)
    bg = torch.ones_like(s_t)
    for i in range(n):
        ih, iw = img_shapes[i]
        for x1, y1, x2, y2 in gt[i].tolist():
            c0, c1 = math.floor(x1 / iw * w), math.ceil(x2 / iw * w)
            r0, r1 = math.floor(y1 / ih * h), math.ceil(y2 / ih * h)
            # the weight is an int32 division in the official code, hence float32
            a = 1.0 / torch.tensor(r1 + 1 - r0, dtype=torch.int32) / torch.tensor(c1 + 1 - c0, dtype=torch.int32)
            fg[i, r0:r1 + 1, c0:c1 + 1] = torch.maximum(fg[i, r0:r1 + 1, c0:c1 + 1], a)
        bg[i] = (fg[i] <= 0).to(bg.dtype)
        if bg[i].sum() > 0:
            bg[i] = bg[i] / bg[i].sum()
    root = torch.sqrt(s_t)[:, None] * torch.sqrt(c_t)[:, :, None, None]
    terms = {}
    for key, mask in (("fg", fg), ("bg", bg)):
        m = torch.sqrt(mask)[:, None]
        terms[key] = ((preds_s * root * m - preds_t * root * m) ** 2).sum() / n
    terms["at"] = (c_s - c_t).abs().sum() / n + (s_s - s_t).abs().sum() / n

    def gc_out(x: Tensor, conv_mask: torch.nn.Conv2d, add: torch.nn.Sequential) -> Tensor:
        weights = F.softmax(F.conv2d(x, conv_mask.weight, conv_mask.bias).view(n, 1, h * w), dim=2)
        context = torch.matmul(x.view(n, 1, c, h * w), weights.unsqueeze(-1)).view(n, c, 1, 1)
        return x + add(context)

    out_s = gc_out(preds_s, lv.conv_mask_s, lv.channel_add_conv_s)
    out_t = gc_out(preds_t, lv.conv_mask_t, lv.channel_add_conv_t)
    terms["global"] = ((out_s - out_t) ** 2).sum() / n
    return terms


def test_loss_and_gradients_equal_the_official_per_image_computation() -> None:
    # 3 images of different unpadded sizes in a 64×96 padded batch; levels 8×12 and 4×6 (non-square, so a
    # row/column swap would show). Image 0: a big box, a box nested in it (the larger weight wins inside) and
    # one overlapping both partly; image 1: no box; image 2: a box touching its bottom-right border (stretched
    # past the map by the img_shape scaling) and a tiny one.
    sizes, input_shape = [(64, 80), (40, 96), (56, 72)], (64, 96)
    boxes = [[[4.0, 6.0, 60.0, 50.0], [20.5, 18.0, 30.0, 27.5], [50.0, 40.0, 79.0, 63.0]], [],
             [[40.0, 30.0, 72.0, 56.0], [3.2, 3.3, 4.1, 4.4]]]
    hw = {"p3": (8, 12), "p4": (4, 6)}
    m = make(fpn(3, tuple(hw)), fpn(6, tuple(hw)), taps="p3,p4", alpha=0.7, beta=1.3, gamma=0.4, temp=0.8,
             **{"lambda": 0.9}).double()
    g = torch.Generator().manual_seed(21)
    with torch.no_grad():  # every learnable part away from its initialisation (the GcBlocks active)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)
    fs = {k: torch.randn(3, 3, *v, generator=g, dtype=F64, requires_grad=True) for k, v in hw.items()}
    ft = {k: torch.randn(3, 6, *v, generator=g, dtype=F64) * 2 for k, v in hw.items()}
    got = m(out(fs, sizes, input_shape), out(ft, sizes, input_shape), targets(*boxes))
    gt = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    weights = {"fg": m.alpha, "bg": m.beta, "at": m.gamma, "global": m.lambda_}
    want: dict[str, Tensor] = {}
    for tap in hw:
        for key, value in official_level(m.levels[tap], fs[tap], ft[tap], gt, sizes, m.temp).items():
            want[f"fgd.{tap}.{key}"] = weights[key] * value
    assert set(got) == set(want)
    for key in want:
        assert got[key].item() == pytest.approx(want[key].item(), rel=1e-12, abs=1e-300), key
    assert all(want[f"fgd.{t}.fg"].item() > 0 and want[f"fgd.{t}.global"].item() > 0 for t in hw)
    params = [*fs.values(), *m.parameters()]
    g_got = torch.autograd.grad(sum(got.values()), params)
    g_want = torch.autograd.grad(sum(want.values()), params)
    scale = max(float(b.abs().max()) for b in g_want)
    # atol: the conv_mask biases' gradient is 0 (softmax shift invariance), seen as round-off on both sides
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13 * scale)


# ----------------------------------------------------------------------------------- recipe by detector family
@pytest.fixture(scope="module")
def zoo_taps() -> dict[str, dict[str, TapInfo]]:
    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    torch.manual_seed(0)
    return {name: build_model(get_spec(name)).tap_info
            for name in ("shapes-r18-fcos", "shapes-r18-retina", "r50-fasterrcnn", "mbv3-fasterrcnn")}


@pytest.mark.parametrize(
    "student,teacher,recipe,taps",
    [("shapes-r18-fcos", "shapes-r18-fcos", "fcos", ("p3", "p4", "p5", "p6", "p7")),
     ("shapes-r18-retina", "shapes-r18-retina", "retinanet", ("p3", "p4", "p5", "p6", "p7")),
     ("r50-fasterrcnn", "r50-fasterrcnn", "faster_rcnn", ("p2", "p3", "p4", "p5")),
     # the max-pool level is left out on any two-stage FPN; MobileNetV3's starts at P5
     ("mbv3-fasterrcnn", "mbv3-fasterrcnn", "faster_rcnn", ("p5a", "p5b")),
     # the student's family decides
     ("shapes-r18-fcos", "shapes-r18-retina", "fcos", ("p3", "p4", "p5", "p6", "p7"))],
)
def test_recipe_auto_follows_the_zoo_models_family(zoo_taps, student, teacher, recipe, taps) -> None:
    s, t = zoo_taps[student], zoo_taps[teacher]
    assert {i.family for i in s.values()} == {student.split("-")[-1].replace("retina", "retinanet")}
    m = methods.build("fgd", s, t, "detection").methods["fgd"]
    assert m.recipe == recipe and m.hp["recipe"] == recipe and m.taps == taps
    row = RECIPES[recipe]
    assert (m.temp, m.alpha, m.beta, m.gamma, m.lambda_) == tuple(row[k] for k in ("temp", "alpha", "beta", "gamma",
                                                                                  "lambda"))
    # an explicit recipe or weight still wins over the family
    m = methods.build("fgd", s, t, "detection", {"recipe": "retinanet", "beta": "1e-4"}).methods["fgd"]
    assert m.recipe == "retinanet" and m.temp == 0.5 and m.beta == 1e-4


def test_family_of_mask_rcnn_and_taps_without_family() -> None:
    from kdcli.models.detection import build_detector, detector_family
    from kdcli.zoo import get_spec

    assert detector_family(build_detector(get_spec("r50-maskrcnn"))) == "maskrcnn"  # a FasterRCNN subclass
    info = {k: TapInfo(k, 8, 2 ** int(k[1]), "feature", "maskrcnn") for k in ("p2", "p3", "p4", "p5", "p6")}
    m = methods.build("fgd", info, info, "detection").methods["fgd"]
    assert m.recipe == "faster_rcnn" and m.taps == ("p2", "p3", "p4", "p5")
    # hand-made taps without a family: the FPN heuristic (P2 first → two-stage), as before
    assert methods.build("fgd", fpn(), fpn(), "detection").methods["fgd"].recipe == "retinanet"
    two = fpn(4, ("p2", "p3", "p4", "p5", "p6"))
    assert methods.build("fgd", two, two, "detection").methods["fgd"].recipe == "faster_rcnn"
