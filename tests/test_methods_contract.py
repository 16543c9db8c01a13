"""The method contract: typed options (Config dataclasses, kdcli.hparams), the hooks every method and the
method set have, and the default per-tap loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kdcli.methods as methods
from kdcli import catalog, hparams
from kdcli.errors import ConfigError, MethodError
from kdcli.hparams import opt
from kdcli.methods.base import Method
from kdcli.models.taps import ModelOutput, TapInfo


def infos(**channels: int) -> dict[str, TapInfo]:
    return {n: TapInfo(n, c, 8) for n, c in channels.items()}


# ------------------------------------------------------------------------------------ conversion by type
@pytest.mark.parametrize("value,kind,want", [
    ("yes", "bool", True), ("off", "bool", False), (True, "bool", True),
    ("3", "int", 3), (3, "int", 3),
    ("2", "float", 2.0), (2, "float", 2.0), ("1e-3", "float", 1e-3),
    ("x", "str", "x"),
    ("b", 'Literal["a", "b"]', "b"),
    ("1,2, 4", "tuple[int, ...]", (1, 2, 4)), ([1, 2], "tuple[int, ...]", (1, 2)),
    ("none", "float | None", None), ("0.5", "float | None", 0.5), (None, "float | None", None),
    ("p3,p4", "str | tuple[str, ...]", "p3,p4"), (["c5"], "str | tuple[str, ...]", ("c5",)),
])
def test_values_convert_by_the_field_type(value: Any, kind: str, want: Any) -> None:
    got = hparams.convert(value, kind)
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value,kind", [
    ("maybe", "bool"), (1, "bool"), ("2.5", "int"), (True, "int"), (2.0, "int"), ("warm", "float"),
    (True, "float"), ("nan", "float"), (3, "str"), ("c", 'Literal["a", "b"]'), ("1,x", "tuple[int, ...]"),
    ("x", "float | None"),
])
def test_values_of_the_wrong_type_are_refused(value: Any, kind: str) -> None:
    with pytest.raises(ValueError):
        hparams.convert(value, kind)


# ------------------------------------------------------------------------------------ --set and presets
def test_set_errors_name_the_method_and_the_key_on_one_line() -> None:
    s = infos(c5=4, seg_logits=3)
    with pytest.raises(ConfigError) as err:
        methods.build("cwd", s, s, "segmentation", {"tua": "2"})
    msg = str(err.value)
    assert msg.startswith("--set tua: 'cwd' has no such option (did you mean tau?") and "\n" not in msg
    with pytest.raises(ConfigError, match=r"^--set mgd\.lambda_mgd: cannot read 'half' as float \(option of "
                                          r"method 'mgd'\)$"):
        methods.build("cwd+mgd", s, s, "segmentation", {"mgd.lambda_mgd": "half"})
    with pytest.raises(ConfigError, match=r"^--set cwd\.channel_norm: 'both' is not one of student, teacher"):
        methods.build("cwd+mgd", s, s, "segmentation", {"cwd.channel_norm": "both"})


def test_resolved_options_are_typed_and_complete() -> None:
    hp = methods.get("samkd").resolve_hparams("detection", {"grids": "1,2", "sld_weight": "0"})
    assert hp["grids"] == (1, 2) and hp["sld_weight"] == 0.0 and isinstance(hp["sld_weight"], float)
    # an option only one task's preset names gets the Config's default on the other (the value the
    # method used before as its fallback), and can be set there too
    kd = methods.get("kd").resolve_hparams("detection", {"ignore_index": "3"})
    assert kd["ignore_index"] == 3 and kd["ignore_index_mask"] is False
    m = methods.build("kd", infos(cls_logits=3), infos(cls_logits=3), "detection", {"tau": "2"}).methods["kd"]
    assert m.cfg.tau == 2.0 and m.hp["tau"] == 2.0 and set(m.hp) == set(hparams.options(type(m).Config))


def test_every_option_has_a_type_a_default_and_help() -> None:
    for name, cls in methods.available().items():
        opts = hparams.options(cls.Config)
        assert "taps" in opts, name
        for o in opts.values():
            assert o.help and hparams.convert(o.default, o.kind) == o.default, (name, o)
        for preset in cls.presets.values():
            assert set(preset) <= set(opts), name


def test_a_preset_that_does_not_fit_its_config_fails_at_registration() -> None:
    class Bad(Method):
        name = "bad-preset"

        @dataclass
        class Config:
            taps: str = opt("c5", "taps")
            tau: float = opt(1.0, "temperature")

        presets = {"segmentation": {"taps": "c5", "tau": "hot"}}

    with pytest.raises(ConfigError, match=r"Bad.presets\['segmentation'\]: tau: cannot read 'hot' as float"):
        methods.register(Bad)
    Bad.presets = {"segmentation": {"taps": "c5", "temp": 1.0}}
    with pytest.raises(ConfigError, match="temp: 'bad-preset' has no such option"):
        methods.register(Bad)
    assert "bad-preset" not in methods.available()


def test_the_cheap_checks_read_the_same_options_without_the_registry() -> None:
    src = catalog._from_source()  # the Config classes read from the source with ast
    registry = {n: hparams.options(c.Config) for n, c in methods.available().items()}
    assert {n: i.options for n, i in src.items()} == registry
    assert src["fgd"].options["lambda"].attr == "lambda_"
    catalog.check_sets("cwd+mgd", {"cwd.tau": "2", "mgd.draw_order": "forward"})
    for sets, needle in [({"cwd.tua": "2"}, "--set cwd.tua: 'cwd' has no such option (did you mean tau?"),
                         ({"mgd.draw_order": "up"}, "--set mgd.draw_order: 'up' is not one of reverse, forward")]:
        with pytest.raises(ConfigError) as err:
            catalog.check_sets("cwd+mgd", sets)
        assert str(err.value).startswith(needle)


# ------------------------------------------------------------------------------------ hooks
class Probe(Method):
    """A minimal method on the default per-tap loop: loss = w · mean(F_S − F_T)²."""

    name = "probe"

    @dataclass
    class Config:
        taps: str = opt("c5", "taps")
        weight: float = opt(2.0, "weight")

    presets = {"segmentation": {"taps": "c5", "weight": 2.0}}
    seen: list[tuple[torch.dtype, torch.dtype, bool]]

    def tap_loss(self, tap: str, fs: Tensor, ft: Tensor) -> Tensor:
        self.seen = [*getattr(self, "seen", []), (fs.dtype, ft.dtype, ft.requires_grad)]
        return self.weight * (fs - ft).pow(2).mean()

    @property
    def last_stats(self) -> dict[str, float]:
        return {"c5.calls": float(len(getattr(self, "seen", [])))}


def test_the_default_loop_checks_upcasts_detaches_and_names() -> None:
    m = Probe(infos(c5=2), infos(c5=2), "segmentation", **Probe.presets["segmentation"])
    fs = torch.tensor([[[[1.0]], [[2.0]]]], dtype=torch.bfloat16, requires_grad=True)
    ft = torch.zeros(1, 2, 1, 1, dtype=torch.bfloat16, requires_grad=True)
    got = m(ModelOutput(taps={"c5": fs}), ModelOutput(taps={"c5": ft}))
    assert list(got) == ["probe.c5"] and got["probe.c5"].dtype == torch.float32
    assert got["probe.c5"].item() == 2.0 * (1 + 4) / 2
    assert m.seen == [(torch.float32, torch.float32, False)]
    with pytest.raises(MethodError, match="method 'probe': tap 'c5' needs two"):
        m(ModelOutput(taps={"c5": torch.zeros(2, 2, 1, 1)}), ModelOutput(taps={"c5": torch.zeros(3, 2, 1, 1)}))


def test_a_method_without_forward_or_tap_loss_says_so() -> None:
    class Empty(Probe):
        name = "empty"
        tap_loss = Method.tap_loss  # type: ignore[assignment]

    m = Empty(infos(c5=2), infos(c5=2), "segmentation", taps="c5")
    with pytest.raises(NotImplementedError, match="'empty' implements neither forward nor tap_loss"):
        m(ModelOutput(taps={"c5": torch.zeros(1, 2, 1, 1)}), ModelOutput(taps={"c5": torch.zeros(1, 2, 1, 1)}))


def test_every_hook_has_a_default_and_the_set_delegates() -> None:
    s = infos(c5=2, seg_logits=3)
    plain = methods.build("cwd", s, s, "segmentation").methods["cwd"]
    assert plain.last_stats == {} and plain.teacher_note == "" and not plain.binds_student
    assert plain.internals(ModelOutput(), ModelOutput()) == {} and plain.schedule() == 1.0
    # bind_student shows only where binds_student is true, while the engine still asks hasattr()
    plain.bind_student(nn.Linear(1, 1))  # the default binds nothing
    assert methods.get("pskd").binds_student

    probe = Probe(s, s, "segmentation", **Probe.presets["segmentation"])
    ms = methods.MethodSet({"probe": probe, "cwd": plain}, "segmentation")
    ms(ModelOutput(taps={"c5": torch.ones(1, 2, 2, 2), "seg_logits": torch.ones(1, 3, 2, 2)}),
       ModelOutput(taps={"c5": torch.zeros(1, 2, 2, 2), "seg_logits": torch.zeros(1, 3, 2, 2)}))
    assert ms.last_stats == {"probe.c5.calls": 1.0}
    assert ms.degenerate_terms({"seg_logits": (1, 1), "c5": (1, 1)}) == {"cwd.seg_logits": plain.degenerate("", (1, 1))}
    assert ms.degenerate_terms({"seg_logits": (2, 2)}) == {}
    assert ms.schedules() == {"probe": 1.0, "cwd": 1.0}
    assert ms.student_binders() == [] and ms.teacher_notes == {}

    solo = methods.build("pskd+mcmi", s, s, "segmentation")
    assert solo.student_binders() == ["pskd"] and set(solo.teacher_notes) == {"mcmi"}
    student = nn.Conv2d(3, 3, 1)
    calls: list[str] = []
    solo.methods["pskd"].bind_student = lambda m: calls.append("pskd")  # type: ignore[method-assign]
    solo.methods["mcmi"].bind_student = lambda m: calls.append("mcmi")  # type: ignore[method-assign]
    solo.bind_student(student)
    assert calls == ["pskd"]


def test_literal_choices_reach_kdcli_methods_table() -> None:
    kind = catalog.methods()["cwd"].options["channel_norm"].kind
    assert hparams.describe(kind) == "one of student, teacher"
