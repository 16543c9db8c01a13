"""FitNet: parity with CIRKD's ``CriterionFitNet`` (winycg/CIRKD ``losses/fitnet.py``) and the regressor run
on the smaller grid of a heterogeneous pair (the same result as regressing first, to round-off).

The references are written here from the formulas (docs/methods/fitnet.md), in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.methods.fitnet import FitNet
from kdcli.models.taps import ModelOutput, TapInfo

F64 = torch.float64


def make(task: str, cs: int, ct: int, tap: str) -> FitNet:
    s, t = {tap: TapInfo(tap, cs, 8)}, {tap: TapInfo(tap, ct, 8)}
    return FitNet(s, t, task, **FitNet.resolve_hparams(task, {"taps": tap})).double()


def loss(m: FitNet, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
    (value,) = m(ModelOutput(taps={tap: fs}), ModelOutput(taps={tap: ft})).values()
    return value


@pytest.mark.parametrize("cs,ct", [(4, 6), (5, 5)])
def test_fitnet_equals_cirkd_criterion_with_gradients(cs: int, ct: int) -> None:
    # CIRKD: feat_S = Conv2d(s, t, 1, bias=False)(feat_S); ((feat_S − feat_T)²).mean(), scaled by λ = 10
    m = make("segmentation", cs, ct, "seg_feat")
    g = torch.Generator().manual_seed(1)
    fs = torch.randn(2, cs, 5, 7, generator=g, dtype=F64, requires_grad=True)
    ft = torch.randn(2, ct, 5, 7, generator=g, dtype=F64)
    conv = m.adapters["seg_feat"]
    assert conv.bias is None and conv.weight.shape == (ct, cs, 1, 1)
    got = loss(m, "seg_feat", fs, ft)
    want = 10.0 * ((F.conv2d(fs, conv.weight) - ft) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-13)
    for a, b in zip(torch.autograd.grad(got, [fs, conv.weight]), torch.autograd.grad(want, [fs, conv.weight]),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("student_hw,teacher_hw,regressed_at", [((8, 12), (4, 6), (4, 6)), ((3, 5), (6, 9), (3, 5))])
def test_fitnet_regresses_on_the_smaller_grid_with_the_same_result(student_hw, teacher_hw, regressed_at) -> None:
    m = make("detection", 4, 6, "p3")  # 1×1 regressor with bias
    conv = m.adapters["p3"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(6, generator=g, dtype=F64))
    fs = torch.randn(2, 4, *student_hw, generator=g, dtype=F64, requires_grad=True)
    ft = torch.randn(2, 6, *teacher_hw, generator=g, dtype=F64)
    seen: list[tuple[int, ...]] = []
    hook = conv.register_forward_hook(lambda mod, inp, outp: seen.append(tuple(inp[0].shape[-2:])))
    got = loss(m, "p3", fs, ft)
    hook.remove()
    assert seen == [regressed_at]
    # the definition: regress at the student's resolution, then resize to the teacher's (bilinear)
    up = F.interpolate(F.conv2d(fs, conv.weight, conv.bias), size=teacher_hw, mode="bilinear", align_corners=False)
    want = m.weight * ((up - ft) ** 2).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    params = [fs, conv.weight, conv.bias]
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
