"""The method registry: unknown names, ``+`` combinations, option overrides coerced by type and refused
when unknown, ambiguous or out of their choices, and a missing tap."""

from __future__ import annotations

import pytest
import torch
from method_helpers import infos, make, out  # tests/ is on sys.path (pytest prepends it)

import kdcli.methods as methods
from kdcli.errors import ConfigError, MethodError
from kdcli.methods.kd import KD


def test_get_unknown_method_lists_names() -> None:
    with pytest.raises(MethodError) as err:
        methods.get("nope")
    for name in ("kd", "fitnet", "cankd"):
        assert name in str(err.value)


def test_build_combines_and_coerces_overrides() -> None:
    s = infos(seg_logits=5, seg_feat=8)
    t = infos(seg_logits=5, seg_feat=8)
    ms = methods.build("kd+fitnet", s, t, "segmentation", {"kd.tau": "2", "fitnet.weight": "3"})
    assert set(ms.methods) == {"kd", "fitnet"}
    assert ms.methods["kd"].tau == 2.0 and isinstance(ms.methods["kd"].hp["tau"], float)
    assert ms.methods["fitnet"].weight == 3.0
    assert set(ms.needs) == {"seg_logits", "seg_feat"}
    g = torch.Generator().manual_seed(0)
    so = out(seg_logits=torch.randn(2, 5, 4, 4, generator=g), seg_feat=torch.randn(2, 8, 4, 4, generator=g))
    to = out(seg_logits=torch.randn(2, 5, 4, 4, generator=g), seg_feat=torch.randn(2, 8, 4, 4, generator=g))
    assert set(ms(so, to)) == {"kd.seg_logits", "fitnet.seg_feat"}


def test_bool_override_is_coerced() -> None:
    hp = KD.resolve_hparams("segmentation", {"ignore_index_mask": "yes"})
    assert hp["ignore_index_mask"] is True


@pytest.mark.parametrize(
    "overrides",
    [{"nope": "1"}, {"tau": "abc"}],
)
def test_bad_overrides_raise_config_error(overrides: dict) -> None:
    s = infos(seg_logits=5)
    with pytest.raises(ConfigError):
        methods.build("kd", s, s, "segmentation", overrides)


def test_unprefixed_override_with_two_methods_is_ambiguous() -> None:
    s = infos(seg_logits=5, seg_feat=8)
    with pytest.raises(ConfigError):
        methods.build("kd+fitnet", s, s, "segmentation", {"weight": "2"})


def test_missing_tap_raises_method_error() -> None:
    with pytest.raises(MethodError, match="seg_feat"):
        methods.build("fitnet", infos(seg_logits=5), infos(seg_logits=5), "segmentation")


def test_bad_choice_raises_config_error() -> None:
    s = infos(cls_logits=3)
    with pytest.raises(ConfigError):
        make(KD, "detection", s, s, mode="nope")
