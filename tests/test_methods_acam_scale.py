"""ACAM-KD's loss does not grow with the map size: its normalisers are per-element means.

Tiling both maps 2×2 repeats every position four times. The attention then averages over four copies of
each key with the same weights, so the fused map, the spatial masks and the pooled channel vector tile
too; the masked terms divide sums that grow 4× by mask masses (spatial) or a P (channel) that grow 4×, and
Dice's numerator and norms grow alike. So every ACAM term is unchanged, for any learned parameters. A
loss that grows with the input size therefore comes from larger features (mean Δ²), not from the
normaliser.
"""

from __future__ import annotations

import pytest
import torch

from kdcli.methods.acam import ACAM
from kdcli.models.taps import ModelOutput, TapInfo


def _acam(**overrides: object) -> ACAM:
    s = {"p3": TapInfo("p3", 4, 8), "p4": TapInfo("p4", 4, 16)}
    t = {"p3": TapInfo("p3", 6, 8), "p4": TapInfo("p4", 6, 16)}
    m = ACAM(s, t, "detection", **ACAM.resolve_hparams("detection", {"mask_eps": 0.0, **overrides})).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():  # learned-looking parameters: masks far from 0.5 and from each other
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)
    return m


@pytest.mark.parametrize("overrides", [{}, {"mask_power": 1}, {"query_source": "student"},
                                       {"mask_input": "teacher"}, {"div_form": "global"}])
def test_every_term_is_invariant_to_tiling_the_maps(overrides: dict) -> None:
    g = torch.Generator().manual_seed(1)
    s = {"p3": torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 3,
         "p4": torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) * 3}
    t = {"p3": torch.randn(2, 6, 5, 6, generator=g, dtype=torch.float64) * 2,
         "p4": torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64) * 2}
    m = _acam(**overrides)
    with torch.no_grad():
        small = m(ModelOutput(taps=s), ModelOutput(taps=t))
        big = m(ModelOutput(taps={k: v.repeat(1, 1, 2, 2) for k, v in s.items()}),
                ModelOutput(taps={k: v.repeat(1, 1, 2, 2) for k, v in t.items()}))
    assert set(small) == set(big) == {"acam.p3", "acam.p3.div", "acam.p4", "acam.p4.div"}
    for k in small:
        assert float(small[k]) > 0
        assert float(big[k]) == pytest.approx(float(small[k]), rel=1e-10), k


def test_loss_scales_with_the_square_of_the_features() -> None:
    """The other half of the diagnosis: scaling both maps by s scales the masked terms by s² once the masks
    are fixed (mask_input=teacher with zero units: masks 0.5), so feature magnitude sets the loss scale."""
    m = _acam(mask_input="teacher")
    with torch.no_grad():
        for b in m.blocks.values():
            b.spatial_units.zero_()
            b.channel_units.zero_()
            b.align.weight.copy_(torch.eye(6, 4, dtype=torch.float64)[:, :, None, None])
            b.align.bias.zero_()
    g = torch.Generator().manual_seed(2)
    s = {k: torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for k in ("p3", "p4")}
    t = {k: torch.randn(1, 6, 4, 4, generator=g, dtype=torch.float64) for k in ("p3", "p4")}
    with torch.no_grad():
        one = m(ModelOutput(taps=s), ModelOutput(taps=t))
        ten = m(ModelOutput(taps={k: 10 * v for k, v in s.items()}),
                ModelOutput(taps={k: 10 * v for k, v in t.items()}))
    assert float(ten["acam.p3"]) == pytest.approx(100 * float(one["acam.p3"]), rel=1e-10)
    delta = t["p3"] - torch.cat([s["p3"], s["p3"].new_zeros(1, 2, 4, 4)], 1)
    assert float(one["acam.p3"]) == pytest.approx(float((delta**2).mean()), rel=1e-10)  # ½ + ½ of mean(Δ²)


def test_collapsed_spatial_masks_are_reported_once_per_tap():
    from types import SimpleNamespace

    from kdcli.engine.monitor import MaskMonitor
    from kdcli.methods import MethodSet
    from kdcli.methods.acam import ACAM, COLLAPSED

    acam = ACAM.__new__(ACAM)  # the check reads only the columns and the name
    row = {"epoch": 2, "mask/acam.p3.spatial_mask.mean": 0.0003, "mask/acam.p4.spatial_mask.mean": COLLAPSED,
           "mask/acam.p3.channel_mask.mean": 0.001, "mask/cwd.p3.spatial_mask.mean": 0.0}
    warnings = acam.stat_warnings({k: v for k, v in row.items() if k.startswith("mask/")})
    # P3's spatial masks only: P4 sits at the threshold, channel masks and other methods' maps are not read
    assert list(warnings) == ["acam.p3.collapse"]
    assert "p3" in warnings["acam.p3.collapse"] and "0.0003" in warnings["acam.p3.collapse"]
    assert "mask_grad=detach" in warnings["acam.p3.collapse"]
    assert acam.stat_warnings({"mask/acam.p3.spatial_mask.mean": 0.4}) == {}

    lines: list[str] = []
    ms = MethodSet.__new__(MethodSet)
    ms.methods = {"acam": acam}
    run = SimpleNamespace(method=ms, log=lines.append)
    monitor = MaskMonitor()
    monitor.on_epoch_end(run, row)
    monitor.on_epoch_end(run, {**row, "mask/acam.p3.spatial_mask.mean": 0.0001})
    assert len(lines) == 1 and lines[0].startswith("warning: acam: the spatial masks at p3 have collapsed")
    MaskMonitor().on_epoch_end(SimpleNamespace(method=None, log=lines.append), row)
    assert len(lines) == 1
