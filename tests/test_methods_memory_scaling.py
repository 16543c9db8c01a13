"""Memory grows with the feature map, not its square: no distillation method forms an H·W × H·W tensor.

Every op of a method's forward and backward (on the real outputs of two tiny zoo models) is watched with a
``TorchDispatchMode`` at two input sizes, the second twice the side of the first: the largest tensor any op
returns may grow like the map (×4), not like its square (×16). A P×P attention, SDPA's math fallback or a
non-local block in its direct form (HW × HW/4, the official CanKD code) grow ×16; the first test checks that
the probe sees that.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdcli.bench.speed import SpeedOptions, build_models, make_batch, speed_methods
from kdcli.methods import build
from kdcli.methods.cankd import nonlocal_aggregate

PAIRS = {"detection": ("shapes-r34-fcos", "shapes-r18-fcos"), "segmentation": ("shapes-r18-deeplabv3",
                                                                              "shapes-r18-deeplabv3")}
SIZES = (128, 256)  # P3 (stride 8): 16×16 and 32×32 positions
GROWTH = 5.0  # ×4 for a map; ×16 for anything P×P


class LargestOutput(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func))
        return out


def _cases() -> list[tuple[str, str]]:
    return [(task, m) for task in PAIRS for m in speed_methods(task)]


def largest(fn) -> int:  # type: ignore[no-untyped-def]
    watch = LargestOutput()
    with watch:
        fn()
    return watch.largest[0]


@pytest.mark.parametrize("direct,quadratic", [(True, True), (False, False)])
def test_probe_sees_a_p_by_p_tensor(direct: bool, quadratic: bool) -> None:
    def run(side: int) -> int:
        theta = torch.randn(2, 8, side * side)
        phi = torch.randn(2, 8, side * side // 4)
        return largest(lambda: nonlocal_aggregate(theta, phi, phi.clone(), direct=direct))

    growth = run(64) / run(32)
    assert (growth > 12) if quadratic else (growth < GROWTH), growth


@pytest.fixture(scope="module")
def outputs() -> dict[tuple[str, int], tuple]:
    res = {}
    for size in SIZES:
        for task, (teacher, student) in PAIRS.items():
            torch.manual_seed(0)
            opts = SpeedOptions(teacher=teacher, student=student, size=size, batch=2)
            s_model, t_model = build_models(opts, torch.device("cpu"))
            batch = make_batch(s_model, 2, size, torch.device("cpu"))
            with torch.no_grad():
                t_out = t_model(batch, need=None, losses=False)
            s_out = s_model(batch)
            # the method's graph only: the student's outputs become leaves
            s_out.taps = {k: v.detach().requires_grad_() for k, v in s_out.taps.items()}
            s_out.extras = {k: (v.detach().requires_grad_() if isinstance(v, torch.Tensor)
                                and v.is_floating_point() else v) for k, v in s_out.extras.items()}
            res[task, size] = (s_model, t_model, batch, s_out, t_out)
    return res


@pytest.mark.parametrize("task,name", _cases())
def test_no_method_grows_with_the_square_of_the_map(outputs: dict[tuple[str, int], tuple], task: str,
                                                    name: str) -> None:
    sizes = []
    for size in SIZES:
        s_model, t_model, batch, s_out, t_out = outputs[task, size]
        torch.manual_seed(0)
        method = build(name, s_model.tap_info, t_model.tap_info, task)
        leaves = list(s_out.taps.values()) + [q for q in method.parameters() if q.requires_grad]
        grads: list = []

        def step() -> None:
            loss = sum(method(s_out, t_out, batch.targets).values())  # noqa: B023
            grads.extend(torch.autograd.grad(loss, leaves, allow_unused=True))  # noqa: B023

        sizes.append(largest(step))
        assert any(g is not None and g.abs().sum() > 0 for g in grads)  # the backward ran
    assert sizes[1] / sizes[0] < GROWTH, (name, sizes)


def test_probe_catches_acam_on_sdpa_math_fallback(outputs: dict[tuple[str, int], tuple]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sizes = []
    for size in SIZES:
        s_model, t_model, batch, s_out, t_out = outputs["detection", size]
        method = build("acam", s_model.tap_info, t_model.tap_info, "detection")
        with sdpa_kernel(SDPBackend.MATH):  # the fallback that forms the N×P×P attention
            sizes.append(largest(lambda: sum(method(s_out, t_out, batch.targets).values())))  # noqa: B023
    assert sizes[1] / sizes[0] > 12, sizes
