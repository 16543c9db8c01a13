"""PS-KD (snapshot teacher), HARD (learned augmentations) and MCMI (teacher objective): the maths, the
state that must resume with a run, and a few real training steps on the shapes data for both tasks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from kdcli import api
from kdcli.augment.hard import HardAugment, frozen_bn_stats, stability
from kdcli.augment.ops import Bounds, apply, mix, squash
from kdcli.config import RunConfig, apply_objective_and_augment
from kdcli.errors import ConfigError
from kdcli.methods import build
from kdcli.methods.mcmi import cmi
from kdcli.methods.pskd import alpha_schedule, location_targets, normalise_like_task, soft_focal, soft_target_ce
from kdcli.models import build_model
from kdcli.models.base import Batch
from kdcli.models.taps import ModelOutput, TapInfo
from kdcli.zoo import get_spec

SEG_INFO = {"seg_logits": TapInfo("seg_logits", 4, 8, "logits")}


# ----------------------------------------------------------------------------------------- PS-KD
def test_pskd_alpha_schedule_is_the_official_linear_one():
    # official main.py: alpha_t = alpha_T * (epoch + 1) / end_epoch, epoch 0-based
    assert [alpha_schedule(t, 4, 0.8) for t in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert alpha_schedule(299, 300, 0.8) == pytest.approx(0.8)
    m = build("pskd", SEG_INFO, SEG_INFO, "segmentation").methods["pskd"]
    m.set_progress(2, 0, 4, 10)
    assert m.alpha() == 0.0  # no snapshot yet: ground truth only (the official epoch 0)


def _seg_student() -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_spec("shapes-mbv3-lraspp")).train()


def test_pskd_snapshot_is_taken_at_epoch_end_frozen_and_resumes():
    student = _seg_student()
    info = student.tap_info
    m = build("pskd", info, info, "segmentation").methods["pskd"]
    m.bind_student(student)
    assert m.snapshot is not None and not any(p.requires_grad for p in m.snapshot.parameters())
    assert not [p for p in m.parameters() if p.requires_grad]  # nothing for the student's optimiser
    with torch.no_grad():  # the student trains on: its weights move away from the copy made at bind time
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.on_epoch_end(student, 0)
    s_state, snap_state = student.state_dict(), m.snapshot.state_dict()
    assert set(s_state) == set(snap_state)
    for k in s_state:
        torch.testing.assert_close(snap_state[k], s_state[k], rtol=0, atol=0, msg=k)
    m.train()
    assert not m.snapshot.training  # the teacher stays in eval mode
    with torch.no_grad():  # a copy, not an alias: later student updates leave it alone
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(m.snapshot.parameters()))
    # the engine re-estimates BN statistics after on_epoch_end: the snapshot takes them before the next step
    bn = next(mod for mod in student.modules() if isinstance(mod, nn.BatchNorm2d))
    name = next(n for n, mod in student.named_modules() if mod is bn)
    with torch.no_grad():
        bn.running_mean.add_(3.0)
    m.set_progress(1, 0, 4, 10)
    assert torch.equal(dict(m.snapshot.named_buffers())[f"{name}.running_mean"], bn.running_mean)
    with torch.no_grad():  # once per snapshot: later training updates are not followed
        bn.running_mean.add_(1.0)
    m.set_progress(1, 1, 4, 10)
    assert not torch.equal(dict(m.snapshot.named_buffers())[f"{name}.running_mean"], bn.running_mean)
    assert m.alpha() == pytest.approx(0.4)
    batch = student.preprocess(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.long))
    with torch.no_grad():
        t_out = m.teacher_forward(batch, {"seg_logits"})
    assert t_out is not None and t_out.taps["seg_logits"].shape[1] == 4
    # resume: a fresh method bound to a fresh student gets the snapshot back from the saved tensors
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    fresh = build("pskd", info, info, "segmentation").methods["pskd"]
    fresh.bind_student(_seg_student())
    fresh.load_state_dict(saved)
    assert int(fresh.has_snapshot) == 1 and int(fresh.snapshot_epoch) == 1
    for k, v in m.snapshot.state_dict().items():
        torch.testing.assert_close(fresh.snapshot.state_dict()[k], v, rtol=0, atol=0)
    fresh.set_progress(1, 0, 4, 10)
    assert fresh.alpha() == pytest.approx(0.4)


def test_pskd_alpha0_is_plain_ce_and_the_term_completes_the_soft_target_ce():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 32, 32), generator=g)
    labels[:, :5] = 255
    up = F.interpolate(z, size=(32, 32), mode="bilinear", align_corners=False)
    up_t = F.interpolate(zt, size=(32, 32), mode="bilinear", align_corners=False)
    ce = F.cross_entropy(up, labels, ignore_index=255)
    valid = labels != 255
    by_hand = -F.log_softmax(up, 1).permute(0, 2, 3, 1)[valid].gather(1, labels[valid][:, None]).mean()
    torch.testing.assert_close(soft_target_ce(up, labels, F.softmax(up_t, 1), 0.0), ce)
    torch.testing.assert_close(ce, by_hand)
    # the method's term added to the model's CE gives PS-KD's soft-target CE (ignored pixels dropped)
    m = build("pskd", SEG_INFO, SEG_INFO, "segmentation").methods["pskd"]
    m.bind_student(nn.Linear(1, 1))
    m.has_snapshot.fill_(1)
    m.set_progress(1, 0, 4, 1)  # alpha = 0.4
    term = m(ModelOutput(taps={"seg_logits": z}), ModelOutput(taps={"seg_logits": zt}), labels)["pskd.seg_logits"]
    torch.testing.assert_close(ce + term, soft_target_ce(up, labels, F.softmax(up_t, 1), 0.4))
    # a snapshot that predicts the labels exactly adds nothing; ignored pixels do not matter
    onehot = F.one_hot(torch.where(valid, labels, 0), 4).permute(0, 3, 1, 2).double()
    torch.testing.assert_close(soft_target_ce(up, labels, onehot, 0.7), ce)
    junk = torch.where(valid[:, None], F.softmax(up_t, 1), torch.full_like(up_t, 9.0))
    torch.testing.assert_close(soft_target_ce(up, labels, junk, 0.4),
                               soft_target_ce(up, labels, F.softmax(up_t, 1), 0.4))
    m.has_snapshot.fill_(0)
    assert m(ModelOutput(taps={"seg_logits": z}), None, labels) == {}  # epoch 0: no term at all


@pytest.mark.parametrize("name", ["shapes-r18-retina", "shapes-r18-fcos"])
def test_pskd_soft_focal_reduces_to_torchvision_focal_loss(name: str):
    torch.manual_seed(0)
    det = build_model(get_spec(name)).train()
    boxes = torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 60.0, 58.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])},
               {"boxes": boxes[:1], "labels": torch.tensor([3])}]
    batch = det.preprocess([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], targets)
    out = det(batch)
    z = out.taps["cls_logits"].detach().double()
    matched, onehot = location_targets("pskd", out, batch.targets, z.shape[-1])
    fcos = "bbox_ctrness" in out.extras["head"]
    mine = normalise_like_task(soft_focal(z, onehot.double()), matched, fcos)
    torch.testing.assert_close(mine, out.losses["classification"].detach().double(), rtol=1e-5, atol=1e-7)
    # the term: classification + pskd = the soft-target focal loss, and 0 when the snapshot is the labels
    info = det.tap_info
    m = build("pskd", info, info, "detection").methods["pskd"]
    m.bind_student(nn.Linear(1, 1))
    m.has_snapshot.fill_(1)
    m.set_progress(3, 0, 4, 1)  # alpha = 0.8
    zs = out.taps["cls_logits"]
    agree = torch.where(onehot > 0, 30.0, -30.0)
    t_agree = ModelOutput(taps={"cls_logits": agree})
    term0 = m(out, t_agree, batch.targets)["pskd.cls_logits"]
    assert abs(float(term0.detach())) < 1e-6
    zt = torch.randn_like(zs)
    term = m(out, ModelOutput(taps={"cls_logits": zt}), batch.targets)["pskd.cls_logits"]
    q = 0.2 * onehot + 0.8 * torch.sigmoid(zt)
    soft = normalise_like_task(soft_focal(zs.float(), q), matched, fcos)
    torch.testing.assert_close(out.losses["classification"] + term, soft, rtol=1e-5, atol=1e-6)
    term.backward()
    assert det.net.head.classification_head.cls_logits.weight.grad is not None


# ----------------------------------------------------------------------------------------- HARD
def _batch(n: int = 2, size: int = 32, seg: bool = True, sizes=None) -> Batch:
    g = torch.Generator().manual_seed(1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = (torch.rand(n, 3, size, size, generator=g) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    sizes = sizes or [(size, size)] * n
    if seg:
        targets = torch.randint(0, 4, (n, size, size), generator=g)
    else:
        masks = torch.zeros(2, size, size, dtype=torch.uint8)
        masks[0, 6:44, 4:40] = 1
        masks[1, 30:58, 30:60] = 1
        targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 44.0], [50.0, 30.0, 62.0, 58.0]]),
                    "labels": torch.tensor([1, 2]), "masks": masks},
                   {"boxes": torch.tensor([[1.0, 2.0, 20.0, 30.0]]), "labels": torch.tensor([3]),
                    "masks": masks[:1].clone()}][:n]
    return Batch(images, sizes, sizes, targets)


def _values(n: int, **kw: float) -> torch.Tensor:
    names = ("rotate", "scale", "shift_x", "shift_y", "shear", "brightness", "contrast", "saturation")
    v = torch.zeros(n, 8)
    for k, x in kw.items():
        v[:, names.index(k)] = x
    return v


def test_hard_augmentor_is_bounded():
    b = Bounds()
    v = squash(torch.tensor([[1e6, -1e6, 50.0, -50.0, 1e3, 1e3, -1e3, 1e3]]), b)
    assert torch.all(v.abs() <= b.vector() + 1e-6)
    torch.testing.assert_close(v.abs(), b.vector()[None])  # saturated at the bounds, never beyond
    aug = HardAugment("segmentation", {"rotate": "10", "shift": "0.05"})
    aug.mu.fill_(100.0)
    vals = aug.values(16)
    assert vals[:, 0].abs().max() <= 10 + 1e-4 and vals[:, 2:4].abs().max() <= 0.05 + 1e-6
    assert not list(aug.parameters())  # buffers only: the student's optimiser can never see them
    assert {"mu", "log_sigma", "adam_m", "adam_v", "steps"} <= set(aug.state_dict())
    with pytest.raises(ConfigError, match="hard.nope"):
        HardAugment("segmentation", {"nope": "1"})
    with pytest.raises(ConfigError, match="hard.fraction"):
        HardAugment("segmentation", {"fraction": "2"})


def test_hard_identity_parameters_are_the_identity():
    seg = _batch(seg=True)
    out = apply(seg, _values(2))
    torch.testing.assert_close(out.images, seg.images, rtol=0, atol=1e-4)
    assert torch.equal(out.targets, seg.targets)
    det = _batch(seg=False, size=64, sizes=[(64, 64), (48, 64)])
    rows = (torch.arange(64) < 48).float().view(1, 1, 64, 1).expand(1, 1, 64, 64)
    det.images = det.images * torch.cat([torch.ones(1, 1, 64, 64), rows])  # image 2: 48 rows + padding
    out = apply(det, _values(2))
    for a, b in zip(out.targets, det.targets, strict=True):
        assert torch.equal(a["boxes"], b["boxes"])  # exactly, bit for bit
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
    torch.testing.assert_close(out.images, det.images, rtol=0, atol=1e-4)  # float round-off of the colour ops


def test_hard_known_shift_moves_images_boxes_and_masks_together():
    det = _batch(seg=False, size=64)
    out = apply(det, _values(2, shift_x=0.125), min_visible=0.3)  # 8 px to the right
    torch.testing.assert_close(out.images[..., 8:], det.images[..., :-8], rtol=0, atol=1e-4)
    assert torch.all(out.images[..., :8] == 0)
    t0 = out.targets[0]
    # box 1 moves by 8; box 2 (x 50..62) becomes 58..70, clipped to 58..64: 6/12 visible >= 0.3, kept
    assert torch.allclose(t0["boxes"], torch.tensor([[12.0, 6.0, 48.0, 44.0], [58.0, 30.0, 64.0, 58.0]]))
    assert torch.equal(t0["labels"], torch.tensor([1, 2]))
    assert torch.equal(t0["masks"][:, :, 8:], det.targets[0]["masks"][:, :, :-8])
    strict = apply(det, _values(2, shift_x=0.125), min_visible=0.6)
    assert torch.equal(strict.targets[0]["labels"], torch.tensor([1]))  # the half-visible box is dropped
    assert strict.targets[0]["masks"].shape[0] == 1
    seg = _batch(seg=True, size=32)
    out = apply(seg, _values(2, shift_y=-0.25))  # 8 px up
    assert torch.equal(out.targets[:, :-8], seg.targets[:, 8:])
    assert torch.all(out.targets[:, -8:] == 255)  # uncovered pixels are ignored, not background


def test_hard_rotation_of_a_box_is_the_hull_of_its_corners():
    det = _batch(n=1, seg=False, size=64)
    det.targets[0]["boxes"] = torch.tensor([[24.0, 28.0, 40.0, 36.0]])  # centred 16 x 8 box
    det.targets[0]["labels"] = torch.tensor([1])
    det.targets[0]["masks"] = det.targets[0]["masks"][:1]
    out = apply(det, _values(1, rotate=90.0))
    torch.testing.assert_close(out.targets[0]["boxes"], torch.tensor([[28.0, 24.0, 36.0, 40.0]]), rtol=0, atol=1e-4)
    out = apply(det, _values(1, scale=math.log(2.0)))
    torch.testing.assert_close(out.targets[0]["boxes"], torch.tensor([[16.0, 24.0, 48.0, 40.0]]), rtol=0, atol=1e-4)


def test_hard_geometry_is_float32_under_autocast():
    det = _batch(seg=False, size=64)
    vals = _values(2, rotate=7.0, scale=0.1, shift_x=0.03)
    ref = apply(det, vals).targets[0]["boxes"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = apply(det, vals).targets[0]["boxes"]
    assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_hard_mix_keeps_clean_samples_exactly():
    seg = _batch(n=4, seg=True)
    aug = HardAugment("segmentation", {"fraction": "0.5", "lr": "0"})
    aug.bind(nn.Identity(), nn.Identity(), None)
    out = aug.step(seg)
    chosen = out.meta["augmented"]
    assert int(chosen.sum()) == 2
    assert torch.equal(out.images[~chosen], seg.images[~chosen])
    assert torch.equal(out.targets[~chosen], seg.targets[~chosen])
    assert not torch.equal(out.images[chosen], seg.images[chosen])
    assert torch.equal(mix(seg, apply(seg, _values(4)), torch.zeros(4, dtype=torch.bool)).images, seg.images)


class _Toy(nn.Module):
    """A 1×1-conv 'segmenter' (optionally with a horizontal ramp: not shift-equivariant)."""

    task = "segmentation"
    tap_info: dict = {}

    def __init__(self, seed: int, ramp: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.ramp = ramp

    def forward(self, batch, need=None, losses=True):
        z = self.conv(batch.images)
        if self.ramp:
            ramp = torch.linspace(-1, 1, z.shape[-1])[None, None, None, :] * torch.arange(4.0)[:, None, None]
            z = z + self.ramp * ramp
        return ModelOutput(taps={"seg_logits": z})


class _PixelKL:
    """A stand-in distillation method: per-pixel KL(teacher ‖ student)."""

    needs = ("seg_logits",)

    def __call__(self, s, t, targets=None):
        lt, ls = F.log_softmax(t.taps["seg_logits"], 1), F.log_softmax(s.taps["seg_logits"], 1)
        return {"kl.seg_logits": (lt.exp() * (lt - ls)).sum(1).mean()}


def test_hard_teacher_stability_term():
    seg = _batch(n=2, size=32)
    theta = apply(seg, _values(2, shift_x=0.25)).theta  # an 8 px shift: exact resampling
    aug = apply(seg, _values(2, shift_x=0.25))
    lin, ramp = _Toy(0).eval(), _Toy(0, ramp=2.0).eval()
    x = Batch(aug.images, seg.image_sizes, seg.original_sizes)
    s_lin = stability("segmentation", lin(x).taps, lin(seg).taps, theta, aug.region)
    s_ramp = stability("segmentation", ramp(x).taps, ramp(seg).taps, theta, aug.region)
    assert float(s_lin.detach()) < 1e-6  # a shift-equivariant teacher is perfectly stable
    assert float(s_ramp.detach()) > 1e-2  # a position-dependent one is not


def test_hard_objective_gradient_matches_finite_differences():
    seg = _batch(n=2, size=32)
    seg.images = seg.images.double()
    teacher, student = _Toy(0).eval().double(), _Toy(1, ramp=1.0).double()
    aug = HardAugment("segmentation").double()
    aug.bind(student, teacher, _PixelKL())
    base = torch.full((8,), 0.3, dtype=torch.float64)
    zero = torch.zeros(2, 8, dtype=torch.float64)

    def objective(mu: torch.Tensor) -> torch.Tensor:
        # the disagreement only: S counts pixels of a thresholded valid mask, piecewise constant in μ
        return aug.objective(seg, aug.values(2, mu=mu, noise=zero))[0]

    mu = base.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(mu), mu)
    eye = torch.eye(8, dtype=torch.float64) * 1e-4
    with torch.no_grad():
        fd = torch.stack([(objective(base + e) - objective(base - e)) / 2e-4 for e in eye])
    torch.testing.assert_close(grad, fd, rtol=0.1, atol=3e-3)
    assert grad.abs().min() > 0  # every parameter (geometry and colour) reaches the objective


def test_hard_ascent_increases_disagreement_and_the_constraint_pulls_back():
    seg = _batch(n=4, size=32)
    teacher, student = _Toy(0).eval(), _Toy(1)
    # colour only: geometric moves of this toy bring in zero padding, where the two 1×1 convs agree,
    # so the disagreement has a kink (a local maximum) at "no move"; colour has a smooth landscape
    aug = HardAugment("segmentation", {"sigma": "0.05", "lr": "0.1", "stability": "0", "every": "1",
                                       "rotate": "0", "scale": "0", "shift": "0", "shear": "0"})
    aug.bind(student, teacher, _PixelKL())
    bn_before = student.bn.running_mean.clone()

    def gap() -> float:
        with torch.no_grad():
            return float(aug.objective(seg, aug.values(4, noise=torch.zeros(4, 8)))[0])

    before = gap()
    for _ in range(15):
        aug.ascent(seg)
    assert gap() > before * 1.05, (before, gap())
    assert torch.equal(student.bn.running_mean, bn_before)  # the ascent forward leaves BN statistics alone
    assert student.conv.weight.grad is None and aug.adam_t.item() == 15
    # student = teacher (no disagreement) and a position-dependent teacher: only −λ·S acts, and the
    # ascent shrinks the shift that makes the teacher unstable
    ramp = _Toy(0, ramp=2.0).eval()
    aug = HardAugment("segmentation", {"sigma": "0.05", "lr": "0.1", "stability": "1"})
    aug.bind(ramp, ramp, _PixelKL())
    aug.mu[2] = 1.0

    def stab() -> float:
        with torch.no_grad():
            return float(aug.objective(seg, aug.values(4, noise=torch.zeros(4, 8)))[1])

    s0 = stab()
    for _ in range(15):
        aug.ascent(seg)
    assert stab() < 0.5 * s0 and float(aug.mu[2]) < 1.0


def test_frozen_bn_stats_restores_counters():
    m = _Toy(0)
    m.bn.momentum = None  # cumulative average: the counter would change the statistics
    with frozen_bn_stats(m):
        m(_batch())
    assert int(m.bn.num_batches_tracked) == 0 and m.bn.momentum is None
    assert torch.equal(m.bn.running_mean, torch.zeros(4))


# ----------------------------------------------------------------------------------------- MCMI
def _mcmi(mode: str = "batch"):
    return build("mcmi", SEG_INFO, SEG_INFO, "segmentation", {"centroids": mode}).methods["mcmi"]


def test_mcmi_term_is_zero_when_outputs_equal_their_centroids():
    labels = torch.randint(0, 4, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = 255
    proto = torch.randn(4, 4, dtype=torch.float64)
    z = proto[labels.clamp(max=3)].permute(0, 3, 1, 2).clone()  # every pixel of a class: one output
    z[0, :, :2] = 50.0 * torch.randn(4, 2, 8, dtype=torch.float64)  # ignored pixels: anything
    for mode in ("batch", "epoch"):
        out = _mcmi(mode)(ModelOutput(taps={"seg_logits": z}), None, labels)
        # (the epoch mode's running sums are float32 buffers: zero up to float32 round-off)
        assert abs(float(out["mcmi.seg_logits"])) < (1e-12 if mode == "batch" else 1e-7)


def test_mcmi_value_gradient_sign_and_ignore():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    labels[:, :3] = 255
    m = _mcmi("batch")
    term = m(ModelOutput(taps={"seg_logits": z}), None, labels)["mcmi.seg_logits"]
    # by hand: Q_y = mean softmax over the valid pixels of class y; Î = mean KL(P ‖ Q_y); term = −0.15 Î
    valid = labels != 255
    p = F.softmax(z, 1).permute(0, 2, 3, 1)[valid].detach()
    y = labels[valid]
    q = torch.stack([p[y == c].mean(0) for c in range(4)])
    kl = (p * (p.log() - q[y].log())).sum(1).mean()
    torch.testing.assert_close(term, -0.15 * kl)
    # ignored pixels change nothing (neither the term nor the centroids)
    z2 = z.detach().clone()
    z2[:, :, :3] = 100.0
    torch.testing.assert_close(m(ModelOutput(taps={"seg_logits": z2}), None, labels)["mcmi.seg_logits"],
                               term.detach())
    # minimising the objective *increases* the CMI (Q fixed): one gradient step on the logits
    term.backward()
    z_new = (z - 5.0 * z.grad).detach()
    cent = q.clone()
    rows_old = z.detach().permute(0, 2, 3, 1)[valid]
    rows_new = z_new.permute(0, 2, 3, 1)[valid]
    assert float(cmi(rows_new, y, cent)) > float(cmi(rows_old, y, cent))


def test_mcmi_epoch_centroids_roll_over_and_resume():
    g = torch.Generator().manual_seed(0)
    m = _mcmi("epoch").train()
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float32)
    labels = torch.randint(0, 4, (2, 8, 8), generator=g)
    m(ModelOutput(taps={"seg_logits": z}), None, labels)
    p = F.softmax(z, 1).permute(0, 2, 3, 1).reshape(-1, 4)
    means = torch.stack([p[labels.reshape(-1) == c].mean(0) for c in range(4)])
    m.on_epoch_end(None, 0)
    torch.testing.assert_close(m.centroids, means)
    assert float(m.counts.sum()) == 0 and float(m.seen.sum()) == 2 * 8 * 8
    fresh = _mcmi("epoch")
    fresh.load_state_dict(m.state_dict())
    z2 = torch.randn(2, 4, 8, 8, generator=g)
    a = m(ModelOutput(taps={"seg_logits": z2}), None, labels)["mcmi.seg_logits"]
    b = fresh(ModelOutput(taps={"seg_logits": z2}), None, labels)["mcmi.seg_logits"]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, -0.15 * cmi(z2.permute(0, 2, 3, 1).reshape(-1, 4), labels.reshape(-1), means))


def test_attach_refuses_a_teacher_for_pskd_and_hard_without_one():
    from kdcli.engine.augment import attach_models

    with pytest.raises(ConfigError, match="without --teacher"):
        attach_models(build("pskd", SEG_INFO, SEG_INFO, "segmentation"), RunConfig(), nn.Linear(1, 1), nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="--augment hard: needs a teacher"):
        attach_models(build("mcmi", SEG_INFO, SEG_INFO, "segmentation"), RunConfig(augment="hard"),
                      nn.Linear(1, 1), None)


def test_objective_and_augment_options_map_to_methods():
    cfg = apply_objective_and_augment(RunConfig(model="m", objective="mcmi", method="pskd", set={"alpha_T": "0.5"}))
    assert cfg.method == "pskd+mcmi" and cfg.set == {"pskd.alpha_T": "0.5"}
    assert apply_objective_and_augment(cfg).method == "pskd+mcmi"  # idempotent (resume)
    cfg = apply_objective_and_augment(RunConfig(model="m", method="cwd", augment="hard",
                                                set={"hard.fraction": "0.25", "weight": "2"}))
    assert cfg.set == {"weight": "2"} and cfg.augment_set == {"fraction": "0.25"}
    with pytest.raises(ConfigError, match="--augment hard"):
        apply_objective_and_augment(RunConfig(model="m", method="cwd", set={"hard.fraction": "0.2"}))
    with pytest.raises(ConfigError, match="--objective"):
        apply_objective_and_augment(RunConfig(model="m", objective="mmi"))


# ----------------------------------------------------------------------------------------- training
def _cfg(root: Path, out: Path, task: str, **kw) -> RunConfig:
    if task == "segmentation":
        (root / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
        data, model = f"semantic:{root / 'cityscapes'}", "shapes-mbv3-lraspp"
    else:
        data, model = f"coco:{root / 'coco'}", "shapes-r18-fcos"
    # one step of two 64 px images per epoch, two validation images: the engine path, not the accuracy
    base = dict(model=model, data=data, out=str(out), epochs=1, batch_size=2, image_size=64, workers=0,
                optimizer="adamw", lr=1e-3, warmup_iters=2, bn_recal=1, device="cpu", max_train_images=2,
                max_val_images=2, eval_every=0)
    base.update(kw)
    return RunConfig(**base)


def _rows(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "results.csv")))


@pytest.fixture(scope="module")
def mcmi_teachers(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """`kdcli train --objective mcmi` for both tasks; the results are then used as teachers."""
    out = {}
    for task in ("detection", "segmentation"):
        folder = tmp_path_factory.mktemp("mcmi") / task
        api.train(_cfg(tiny_shapes, folder, task, objective="mcmi"), log=lambda s: None)
        out[task] = folder
    return out


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_train_objective_mcmi(mcmi_teachers: dict[str, Path], task: str):
    folder = mcmi_teachers[task]
    rows = _rows(folder)
    tap = "seg_logits" if task == "segmentation" else "cls_logits"
    assert float(rows[0][f"loss/mcmi.{tap}"]) < 0  # −λ·CMI: it is being maximised
    record = json.loads((folder / "config.json").read_text())
    assert record["config"]["method"] == "mcmi" and record["config"]["objective"] == "mcmi"


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_distill_pskd_without_teacher_uses_the_snapshot_after_resume(tiny_shapes: Path, tmp_path: Path, task: str):
    cfg = _cfg(tiny_shapes, tmp_path / "pskd", task, method="pskd", epochs=2)
    api.train(cfg, log=lambda s: None, stop_after=1)
    tensors = load_file(str(tmp_path / "pskd" / "weights" / "last.safetensors"))
    prefix = "method.methods.pskd."
    assert int(tensors[prefix + "has_snapshot"]) == 1
    # the snapshot holds the student's weights at the end of epoch 1 (BN statistics are refreshed later)
    weights = [k for k in tensors if k.startswith("net.") and "running" not in k and "num_batches" not in k]
    for k in weights[:: max(1, len(weights) // 20)]:
        torch.testing.assert_close(tensors[prefix + "snapshot." + k], tensors[k], rtol=0, atol=0)
    assert "loss/pskd." + ("seg_logits" if task == "segmentation" else "cls_logits") not in _rows(tmp_path / "pskd")[0]
    api.resume(tmp_path / "pskd", log=lambda s: None)
    rows = _rows(tmp_path / "pskd")
    key = "loss/pskd." + ("seg_logits" if task == "segmentation" else "cls_logits")
    assert len(rows) == 2 and rows[1][key] not in ("", None) and math.isfinite(float(rows[1][key]))


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_distill_with_augment_hard(mcmi_teachers: dict[str, Path], tiny_shapes: Path, tmp_path: Path, task: str):
    method = "cwd"
    cfg = _cfg(tiny_shapes, tmp_path / "hard", task, method=method, teacher=str(mcmi_teachers[task]),
               augment="hard", set={"hard.every": "1", "hard.fraction": "0.5"},
               # not this test's subject (and, at 64 px, the check's first teacher forward currently fixes the
               # detector's tap names from a 64 px input: p6a/p6b instead of p6/p7)
               skip_teacher_check=True)
    folder, _ = api.train(cfg, log=lambda s: None)
    tensors = load_file(str(folder / "weights" / "last.safetensors"))
    assert int(tensors["method.augment.adam_t"]) >= 1  # the augmentor took ascent steps, saved with the run
    assert not torch.equal(tensors["method.augment.mu"], torch.zeros(8))
    assert any(k.startswith("loss/cwd.") for k in _rows(folder)[0])
    record = json.loads((folder / "config.json").read_text())
    assert record["config"]["augment_set"] == {"every": "1", "fraction": "0.5"}


def test_cli_train_refuses_methods_that_need_a_teacher():
    from typer.testing import CliRunner

    from kdcli.cli import app

    res = CliRunner().invoke(app, ["train", "--model", "shapes-r18-fcos", "--method", "cwd"])
    assert res.exit_code != 0 and "needs a teacher" in str(res.exception)


def test_self_kd_methods_are_listed_as_such():
    from typer.testing import CliRunner

    from kdcli.cli import app

    res = CliRunner().invoke(app, ["methods"])
    assert res.exit_code == 0
    line = next(ln for ln in res.output.splitlines() if "│ pskd" in ln)
    assert "no (self-KD)" in line
    mcmi = res.output[res.output.index("│ mcmi"):res.output.index("│ mgd")]
    assert "no (teacher" in mcmi and "training:" in mcmi  # MCMI's note, wrapped in its column
    assert "loss" in mcmi and "parity-tested;" in mcmi and "dense mapping" in mcmi  # its evidence label
