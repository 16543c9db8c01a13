"""Every registered method trains for a few steps on shapes-sized inputs, for both tasks and two
detector families, and its losses move the student (gradients reach it)."""

from __future__ import annotations

import copy

import pytest
import torch

from kdcli.methods import available, build
from kdcli.models import build_model
from kdcli.zoo import get_spec

pytestmark = pytest.mark.slow  # end-to-end: `make test-slow` (CI) runs these


PAIRS = {
    "fcos": ("shapes-r34-fcos", "shapes-r18-fcos"),
    "retinanet": ("shapes-r34-retina", "shapes-r18-retina"),
    "segmentation": ("shapes-r18-deeplabv3", "shapes-mbv3-lraspp"),
}
_MODELS: dict[str, tuple] = {}


def _pair(family: str):
    if family not in _MODELS:
        torch.manual_seed(0)
        t_name, s_name = PAIRS[family]
        teacher = build_model(get_spec(t_name)).eval().requires_grad_(False)
        student = build_model(get_spec(s_name)).train()
        _MODELS[family] = (teacher, student)
    return _MODELS[family]


def _batch(student, size: int = 64):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(2)]
    if student.task == "detection":
        boxes = torch.tensor([[4.0, 6.0, 40.0, 44.0], [30.0, 30.0, 60.0, 58.0]])
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}, empty]
        return student.preprocess(images, targets)
    mask = torch.zeros(2, size, size, dtype=torch.long)
    mask[:, 10:30, 10:30] = 2
    mask[:, :2] = 255
    return student.preprocess(torch.stack(images), mask)


def _cases():
    out = []
    for name, cls in available().items():
        if not cls.needs_teacher:
            continue
        for family in ("fcos", "retinanet", "segmentation"):
            task = "segmentation" if family == "segmentation" else "detection"
            if task in cls.tasks and task in cls.presets:
                out.append((name, family))
    return out


@pytest.mark.parametrize("name,family", _cases())
def test_method_trains_a_few_steps(name: str, family: str):
    teacher, pristine = _pair(family)
    student = copy.deepcopy(pristine)  # each method starts from the same untouched student
    method = build(name, student.tap_info, teacher.tap_info, student.task)
    params = [p for p in student.parameters()] + list(method.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    batch = _batch(student)
    before = [p.detach().clone() for p in student.parameters()]
    for _ in range(2):
        out = student(batch)
        with torch.no_grad():
            t_out = teacher(batch, need=set(method.needs), losses=False)
        kd = method(out, t_out, batch.targets)
        assert kd and all(torch.isfinite(v) for v in kd.values()), kd
        opt.zero_grad()
        # the distillation terms alone must reach the student
        sum(kd.values()).backward(retain_graph=True)
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert any(float(g.abs().sum()) > 0 for g in grads), f"{name}: no gradient reaches the student"
        sum(out.losses.values()).backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True))
