"""Guards against silent failure, signals, DDP wrapping, and the speed options' validation."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdcli.config import RunConfig
from kdcli.engine.guards import GracefulStop, LossGuard
from kdcli.engine.result import StepResult, by_method
from kdcli.errors import ConfigError, TrainingError, UserInterrupt
from kdcli.models.taps import ModelOutput


def _r(task: dict[str, float], method_terms: dict[str, float]) -> StepResult:
    """A step's values: the model's losses and the method's output (``<method>.<term>`` keys)."""
    return StepResult.of(task, method_terms)


class _Methods:
    """Stands for a MethodSet: name -> object with ``needs``."""

    def __init__(self, **needs: tuple[str, ...]) -> None:
        self.methods = {k: type("M", (), {"needs": v, "taps": v})() for k, v in needs.items()}


def test_terms_are_grouped_by_method_and_tap():
    g = LossGuard(_Methods(acam=("p3", "p4"), freekd=("p3",), fgd=("p3",)))
    assert g.group("acam.p3") == g.group("acam.p3.div") == "acam.p3"
    assert g.group("freekd.mse.p3") == "freekd.p3" and g.group("fgd.p3.fg") == "fgd.p3"
    assert g.group("acam.other") == "acam"
    assert g.describe("acam.p3") == "method 'acam', tap 'p3'"


def test_nonfinite_and_zero_runs_stop_naming_method_and_tap():
    g = LossGuard(_Methods(kd=("cls_logits",)), zero_steps=3)
    with pytest.raises(TrainingError, match="non-finite loss in method 'kd', tap 'cls_logits'"):
        g.check(_r({"classification": 1.0}, {"kd.cls_logits": math.nan}))
    with pytest.raises(TrainingError, match="task loss 'classification'"):
        g.check(_r({"classification": math.inf}, {"kd.cls_logits": 1.0}))
    g.check(_r({"classification": 1.0}, {"kd.cls_logits": 0.0}))
    g.check(_r({"classification": 1.0}, {"kd.cls_logits": 0.0}))
    g.check(_r({"classification": 1.0}, {"kd.cls_logits": 0.5}))  # a non-zero step resets the count
    g.check(_r({"classification": 1.0}, {"kd.cls_logits": 0.0}))
    g.check(_r({"classification": 1.0}, {"kd.cls_logits": -0.0}))
    assert g.zero_run["kd.cls_logits"] == 2
    restored = LossGuard(_Methods(kd=("cls_logits",)), zero_steps=3)
    restored.load_state_dict(json.loads(json.dumps(g.state_dict())))  # the count survives a resume
    with pytest.raises(TrainingError, match=r"method 'kd', tap 'cls_logits'.* exactly 0 for 3 consecutive"):
        restored.check(_r({"classification": 1.0}, {"kd.cls_logits": 0.0}))
    off = LossGuard(_Methods(kd=("cls_logits",)), zero_steps=0)
    for _ in range(100):
        off.check(_r({}, {"kd.cls_logits": 0.0}))


class _Scheduled:
    """A method whose current weight factor is set by the test (a warm-up from 0)."""

    def __init__(self, taps: tuple[str, ...]) -> None:
        self.needs = self.taps = taps
        self.factor = 1.0

    def schedule(self) -> float:
        return self.factor


def test_degenerate_and_switched_off_terms_do_not_count_but_real_zeros_still_stop():
    dkd = _Scheduled(("seg_logits",))
    methods = _Methods(cwd=("p3", "p7"))
    methods.methods["dkd"] = dkd
    g = LossGuard(methods, zero_steps=3, exempt={"cwd.p7": "1x1 map"})
    for _ in range(10):  # cwd.p7 is 0 for any input (exempt); dkd is weighted 0 by its schedule
        dkd.factor = 0.0
        g.check(_r({"task": 1.0}, {"cwd.p3": 0.5, "cwd.p7": 0.0, "dkd.seg_logits": 0.0}))
    assert g.zero_run.get("cwd.p7", 0) == 0 and g.zero_run.get("dkd.seg_logits", 0) == 0
    dkd.factor = 0.5  # the warm-up ends: a zero now counts
    g.check(_r({"task": 1.0}, {"cwd.p3": 0.5, "cwd.p7": 0.0, "dkd.seg_logits": 0.0}))
    g.check(_r({"task": 1.0}, {"cwd.p3": 0.5, "cwd.p7": 0.0, "dkd.seg_logits": 0.0}))
    dkd.factor = 0.0  # a step switched off neither counts nor resets the run of zeros
    g.check(_r({"task": 1.0}, {"cwd.p3": 0.5, "cwd.p7": 0.0, "dkd.seg_logits": 0.0}))
    assert g.zero_run["dkd.seg_logits"] == 2
    dkd.factor = 1.0
    with pytest.raises(TrainingError, match=r"method 'dkd', tap 'seg_logits' has been exactly 0 for 3 consecutive"):
        g.check(_r({"task": 1.0}, {"cwd.p3": 0.5, "cwd.p7": 0.0, "dkd.seg_logits": 0.0}))
    # a non-degenerate tap of the same method that is 0 (a tap resolving to the wrong tensor) still stops
    g2 = LossGuard(_Methods(cwd=("p3", "p7")), zero_steps=2, exempt={"cwd.p7": "1x1 map"})
    g2.check(_r({}, {"cwd.p3": 0.0, "cwd.p7": 0.0}))
    with pytest.raises(TrainingError, match=r"method 'cwd', tap 'p3' has been exactly 0 for 2"):
        g2.check(_r({}, {"cwd.p3": 0.0, "cwd.p7": 0.0}))
    # exempt groups are left out of the gradient check: it ends once the other groups showed a gradient
    x = torch.randn(2, 4, requires_grad=True)
    tap = x * 2
    g2.inspect_gradients({"cwd": {"p3": tap.pow(2).mean(), "p7": (tap * 0).sum()}}, ModelOutput(taps={"p3": tap}))
    assert g2.grad_ok == {"cwd.p3"} and not g2.needs_grad_check()


def test_cwd_and_cankd_declare_a_one_by_one_map_and_its_term_is_zero_for_any_input():
    from types import SimpleNamespace

    from kdcli.engine.build import degenerate_terms, largest_maps
    from kdcli.methods import build
    from kdcli.models.taps import TapInfo

    info = {n: TapInfo(n, 8, s) for n, s in (("p3", 8), ("p6", 64), ("p7", 128))}
    fcos = SimpleNamespace(task="detection", spec=SimpleNamespace(preprocess={"min_size": 128, "max_size": 128}))
    maps = largest_maps(fcos, info)
    assert maps == {"p3": (16, 16), "p6": (2, 2), "p7": (1, 1)}  # the shapes demo's 128 px: P7 is 1x1
    fcos.spec.preprocess = {"min_size": 64, "max_size": 64}
    assert largest_maps(fcos, info)["p6"] == (1, 1)  # 64 px: P6 too
    fcos.spec.preprocess = {"min_size": 800, "max_size": 1333}
    assert largest_maps(fcos, info)["p7"] == (11, 11)  # COCO: never
    method = build("cwd+cankd", info, info, "detection", {"cwd.taps": "p3,p6,p7", "cankd.taps": "p3,p6,p7"})
    found = degenerate_terms(method, {"p3": (16, 16), "p6": (1, 2), "p7": (1, 1)})
    assert set(found) == {"cwd.p7", "cankd.p7"} and "softmax" in found["cwd.p7"]
    torch.manual_seed(0)
    for hw, zero in (((1, 1), True), ((1, 2), False)):
        fs, ft = torch.randn(2, 8, *hw, requires_grad=True), torch.randn(2, 8, *hw)
        s, t = ModelOutput(taps={"p3": fs, "p6": fs, "p7": fs}), ModelOutput(taps={"p3": ft, "p6": ft, "p7": ft})
        for m in method.methods.values():
            assert (float(m(s, t)[f"{m.name}.p7"].detach()) == 0.0) is zero, (m.name, hw)  # the declaration is true


def test_gradient_check_finds_a_loss_detached_from_the_student():
    g = LossGuard(_Methods(a=("p3",), b=("p3",), c=("p3",)), grad_steps=2)
    x = torch.randn(2, 4, requires_grad=True)
    adapter = torch.nn.Parameter(torch.ones(4))

    def step() -> tuple[dict[str, torch.Tensor], list[float]]:
        tap = x * 2  # a student tap: an intermediate tensor of the student's graph
        terms = {
            "task": tap.sum(),
            "a.p3": (tap * adapter).pow(2).mean(),  # reaches the student through the adapter
            "b.p3": (tap.detach() * adapter).pow(2).mean(),  # trains the adapter only: the silent failure
            "c.p3": (tap * 0).sum() * adapter.sum(),  # exactly zero: left to the zero guard
        }
        g.inspect_gradients(by_method({k: v for k, v in terms.items() if k != "task"}), ModelOutput(taps={"p3": tap}))
        result = _r({"task": float(terms["task"].detach())},
                    {k: float(v.detach()) for k, v in terms.items() if k != "task"})
        return terms, g.flags(result)

    terms, flags = step()
    assert g.grad_ok == {"a.p3"} and g.grad_misses == {"b.p3": 1} and flags == [0.0] * 4  # not yet
    terms, flags = step()  # a second non-zero step without gradient: flagged
    assert flags == [0.0, 0.0, 1.0, 0.0] and g.needs_grad_check()
    with pytest.raises(TrainingError, match="method 'b', tap 'p3' gives no gradient to the student"):
        g.check(_r({"task": 1.0}, {k: float(v.detach()) for k, v in terms.items() if k != "task"}),
                [k for k, f in zip(terms, flags, strict=True) if f])
    assert x.grad is None  # the check computes gradients of the taps only, accumulates nothing


def test_gradient_check_clears_a_group_once_it_has_a_gradient():
    """A random mask may cut every path on one step (MGD on a 1x1 map): one miss, then a gradient."""
    g = LossGuard(_Methods(m=("p7",)), grad_steps=2)
    x = torch.randn(3, requires_grad=True)
    for keep in (0.0, 1.0, 0.0, 0.0):
        tap = x * 1
        g.inspect_gradients({"m": {"p7": (tap * keep).sum() + 1.0}}, ModelOutput(taps={"p7": tap}))
        assert g.flags(_r({}, {"m.p7": 1.0})) == [0.0]
    assert g.grad_ok == {"m.p7"} and not g.needs_grad_check()


def test_graceful_stop_turns_signals_into_a_flag():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested == "SIGTERM"
        with pytest.raises(UserInterrupt):  # a second Ctrl-C means now
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


# -- end to end on a tiny segmentation distillation ------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    from kdcli.models import build_model
    from kdcli.zoo import get_spec

    out = tmp_path_factory.mktemp("guards") / "teacher"
    torch.manual_seed(123)
    spec = get_spec("shapes-mbv3-lraspp")
    out.mkdir()
    save_file({k: v.contiguous() for k, v in build_model(spec).net.state_dict().items()},
              str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": spec.to_dict()}))
    return out


def _cfg(tiny_shapes: Path, teacher: Path, out: Path, **kw) -> RunConfig:
    (tiny_shapes / "cityscapes" / "classes.txt").write_text("background\ncircle\nsquare\ntriangle\n")
    base = dict(model="shapes-mbv3-lraspp", teacher=str(teacher), method="kd+fitnet",
                data=f"semantic:{tiny_shapes / 'cityscapes'}", out=str(out), epochs=1, batch_size=2, image_size=64,
                max_train_images=4, max_val_images=2, workers=0, optimizer="adamw", lr=1e-3, warmup_iters=0,
                bn_recal=0, device="cpu", skip_teacher_check=True)
    base.update(kw)
    return RunConfig(**base)


def test_a_zero_distillation_loss_stops_the_run(tiny_shapes: Path, teacher: Path, tmp_path: Path):
    from kdcli import api

    cfg = _cfg(tiny_shapes, teacher, tmp_path / "z", method="kd", set={"weight": "0"}, zero_loss_steps=2)
    with pytest.raises(TrainingError, match=r"method 'kd', tap 'seg_logits' has been exactly 0 for 2 consecutive"):
        api.train(cfg, log=lambda s: None)


def test_a_one_by_one_cwd_tap_is_named_once_and_does_not_stop_the_run(tiny_shapes: Path, teacher: Path,
                                                                       tmp_path: Path):
    """CWD on c5 of a 16 px input (1x1 at stride 16) is 0 for any input: one warning before training,
    and the zero guard (K = 1 here) runs on; the other terms are still checked."""
    from kdcli import api

    logs: list[str] = []
    cfg = _cfg(tiny_shapes, teacher, tmp_path / "w", method="kd+cwd", set={"cwd.taps": "c5,c3"}, image_size=16,
               zero_loss_steps=1)
    api.train(cfg, log=logs.append)
    warned = [line for line in logs if line.startswith("warning:")]
    assert len(warned) == 1 and "method 'cwd', tap 'c5': the map is 1x1" in warned[0], warned
    assert "--set cwd.taps=c3" in warned[0]
    row = next(csv.DictReader(open(tmp_path / "w" / "results.csv")))
    assert float(row["loss/cwd.c5"]) == 0.0 and float(row["loss/cwd.c3"]) > 0 and float(row["loss/kd.seg_logits"]) > 0


def test_a_term_weighted_zero_by_its_schedule_does_not_count(tiny_shapes: Path, teacher: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """A warm-up from 0 (DKD's factor, 0 for the first epoch here): its zeros are not failures; once the
    factor is non-zero the term is checked again."""
    from kdcli import api
    from kdcli.methods.dkd import DKD

    monkeypatch.setattr(DKD, "schedule", lambda self: 0.0 if self.epoch == 0 else 1.0)
    cfg = _cfg(tiny_shapes, teacher, tmp_path / "d", method="dkd", epochs=2, zero_loss_steps=1)
    api.train(cfg, log=lambda s: None)  # 2 zero steps in epoch 0 with K = 1: no stop
    rows = list(csv.DictReader(open(tmp_path / "d" / "results.csv")))
    assert float(rows[0]["loss/dkd.seg_logits"]) == 0.0 and float(rows[1]["loss/dkd.seg_logits"]) > 0
    monkeypatch.setattr(DKD, "schedule", lambda self: 1.0)
    cfg = _cfg(tiny_shapes, teacher, tmp_path / "d0", method="dkd", set={"weight": "0"}, zero_loss_steps=1)
    with pytest.raises(TrainingError, match=r"method 'dkd', tap 'seg_logits' has been exactly 0 for 1"):
        api.train(cfg, log=lambda s: None)  # a static weight of 0 is not a schedule: it still stops


def test_a_loss_without_gradient_to_the_student_stops_the_run(tiny_shapes: Path, teacher: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    from kdcli.engine import guards
    from kdcli.engine.build import build_run
    from kdcli.engine.loop import fit

    run = build_run(_cfg(tiny_shapes, teacher, tmp_path / "g"), log=lambda s: None)
    fitnet = run.method.methods["fitnet"]
    real = fitnet.forward

    def from_a_copy(s: ModelOutput, t: ModelOutput, targets: object = None) -> dict:
        # what a hook-on-the-wrong-module bug looks like: the student's features, outside its graph
        return real(ModelOutput({k: v.detach() for k, v in s.taps.items()}, s.losses, s.extras), t, targets)

    fitnet.forward = from_a_copy
    monkeypatch.setattr(guards, "GRAD_CHECK_STEPS", 1)  # the run has 2 steps; the default waits for 20
    before = {k: v.detach().clone() for k, v in run.student.net.named_parameters()}
    with pytest.raises(TrainingError, match="method 'fitnet', tap 'seg_feat' gives no gradient to the student"):
        fit(run, progress=False)
    after = dict(run.student.net.named_parameters())
    assert all(torch.equal(before[k], after[k]) for k in before)  # stopped before the first update
    assert run.guard is not None and "kd.seg_logits" in run.guard.grad_ok  # kd itself was fine


def test_ddp_wrapping_changes_nothing_the_methods_see(tiny_shapes: Path, teacher: Path, tmp_path: Path):
    """One process in a gloo group: the student is wrapped in DDP exactly as under torchrun. Taps come from
    the student's forward, not from module names, so the ``module.`` prefix cannot touch them: the same
    loss terms, the same checkpoint keys, and hooks get the unwrapped TapModel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kdcli.engine.build import build_run
    from kdcli.engine.callbacks import standard
    from kdcli.engine.loop import fit
    from kdcli.methods import MethodSet
    from kdcli.models import TapModel

    seen: list[object] = []
    real_hook = MethodSet.on_epoch_end

    def spy(self: MethodSet, student: object, epoch: int) -> None:
        seen.append(student)
        real_hook(self, student, epoch)

    MethodSet.on_epoch_end = spy  # type: ignore[method-assign]
    try:
        plain = build_run(_cfg(tiny_shapes, teacher, tmp_path / "plain"), log=lambda s: None)
        plain.callbacks = standard()  # results.csv, as kdcli.api wires it
        assert not isinstance(plain.step_module, DistributedDataParallel)
        fit(plain, progress=False)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            run = build_run(_cfg(tiny_shapes, teacher, tmp_path / "ddp"), log=lambda s: None)
            run.callbacks = standard()
            assert isinstance(run.step_module, DistributedDataParallel) and run.dist.enabled
            fit(run, progress=False)
        finally:
            dist.destroy_process_group()
    finally:
        MethodSet.on_epoch_end = real_hook  # type: ignore[method-assign]
    assert len(seen) == 2 and all(isinstance(s, TapModel) and not isinstance(s, DistributedDataParallel)
                                  for s in seen)
    assert run.guard is not None and run.guard.grad_ok == {"kd.seg_logits", "fitnet.seg_feat"}
    rows = [next(csv.DictReader(open(tmp_path / f / "results.csv"))) for f in ("plain", "ddp")]
    terms = [k for k in rows[0] if k.startswith("loss/")]
    assert {"loss/kd.seg_logits", "loss/fitnet.seg_feat"} <= set(terms)
    for k in terms:
        assert float(rows[1][k]) == pytest.approx(float(rows[0][k]), rel=1e-6, abs=1e-9), k
    assert float(rows[1]["loss/kd.seg_logits"]) > 0 and float(rows[1]["loss/fitnet.seg_feat"]) > 0
    a = load_file(str(tmp_path / "plain" / "weights" / "last.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "weights" / "last.safetensors"))
    assert set(a) == set(b) and not any("module." in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert record["training"]["ddp"].startswith("student + method in one DistributedDataParallel")


@pytest.mark.parametrize("option, value, message", [
    ("accumulate", 0, "--accumulate 0"),
    ("ckpt_every_steps", -1, "--ckpt-every-steps -1"),
    ("zero_loss_steps", -2, "--zero-loss-steps -2"),
    ("sync_bn", True, "--sync-bn: .* CUDA only"),
])
def test_bad_speed_options_are_refused(tiny_shapes: Path, teacher: Path, tmp_path: Path, option: str, value: object,
                                       message: str):
    from kdcli.engine.build import build_run

    cfg = _cfg(tiny_shapes, teacher, tmp_path / "x", **{option: value})
    if option == "sync_bn":  # SyncBatchNorm only matters with several processes; on CPU it is refused there
        from kdcli.engine.distributed import DistInfo, convert_sync_bn

        with pytest.raises(ConfigError, match=message):
            convert_sync_bn(torch.nn.BatchNorm2d(3), DistInfo(world=2, backend="gloo"))
        return
    with pytest.raises(ConfigError, match=message):
        build_run(cfg, log=lambda s: None)


def test_channels_last_and_bf16_keep_the_losses(tiny_shapes: Path, teacher: Path, tmp_path: Path):
    """NHWC changes the memory layout only (losses equal to float32 round-off); bf16 autocast changes the
    numbers a little (losses are still computed in float32, within 5 %)."""
    from kdcli.engine.build import build_run
    from kdcli.engine.step import train_step

    run = build_run(_cfg(tiny_shapes, teacher, tmp_path / "s"), log=lambda s: None)
    images, targets = next(iter(run.train_loader))
    torch.manual_seed(0)
    first = train_step(run, images, targets)
    plain = first.terms()
    run.cfg.channels_last = True
    run.student.to(memory_format=torch.channels_last)
    run.teacher.to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    step = train_step(run, images, targets)
    nhwc = step.terms()
    assert step.total.dtype == torch.float32
    run.cfg.amp = "bf16"
    torch.manual_seed(0)
    step = train_step(run, images, targets)
    bf16 = step.terms()
    assert step.total.dtype == torch.float32 and set(plain) == set(nhwc) == set(bf16)
    for k, v in plain.items():
        assert nhwc[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
        assert bf16[k] == pytest.approx(v, rel=5e-2, abs=1e-3), k
    assert any(bf16[k] != plain[k] for k in plain)  # autocast did run in bf16


# -- the structured step result and the run callbacks -------------------------------------------------
def test_step_result_keeps_task_and_distillation_terms_apart():
    r = StepResult.of({"classification": 1.0, "bbox_regression": 2.0},
                      {"acam.p3": 0.5, "acam.p3.div": 0.25, "fgd.p4.fg": 3.0})
    assert r.task == {"classification": 1.0, "bbox_regression": 2.0}
    assert r.distill == {"acam": {"p3": 0.5, "p3.div": 0.25}, "fgd": {"p4.fg": 3.0}}
    # the flat names are results.csv's loss/ columns, in the order the terms came
    assert list(r.terms().items()) == [("classification", 1.0), ("bbox_regression", 2.0), ("acam.p3", 0.5),
                                       ("acam.p3.div", 0.25), ("fgd.p4.fg", 3.0)]
    avg = r.with_values([10.0, 20.0, 30.0, 40.0, 50.0])
    assert avg.task == {"classification": 10.0, "bbox_regression": 20.0}
    assert avg.distill == {"acam": {"p3": 30.0, "p3.div": 40.0}, "fgd": {"p4.fg": 50.0}}
    from kdcli.engine.result import loss_columns

    cols = ["epoch", "lr", *(f"loss/{k}" for k in r.terms()), "mask/acam.p3.mask.mean", "val/mAP"]
    assert loss_columns(cols) == (["loss/classification", "loss/bbox_regression"],
                                  {"acam": ["loss/acam.p3", "loss/acam.p3.div"], "fgd": ["loss/fgd.p4.fg"]})


def test_the_guard_reads_task_losses_from_the_result_not_from_their_names():
    """A model loss whose name has a dot is still a task loss: named as one, never grouped as a method's."""
    g = LossGuard(_Methods(aux=("seg",)), zero_steps=1)
    g.check(StepResult(None, {"aux.seg": 0.0}, {}))  # a zero task loss is no distillation failure
    assert g.zero_run == {}
    with pytest.raises(TrainingError, match="non-finite loss in task loss 'aux.seg'"):
        g.check(StepResult(None, {"aux.seg": math.nan}, {}))
    assert g.flags(StepResult(None, {"aux.seg": 1.0}, {"aux": {"seg": 1.0}})) == [0.0, 0.0]


def test_train_step_returns_the_models_losses_and_each_methods_terms(tiny_shapes: Path, teacher: Path,
                                                                      tmp_path: Path):
    from kdcli.engine.build import build_run
    from kdcli.engine.callbacks import Callback
    from kdcli.engine.step import train_step

    seen: list[tuple] = []

    class Probe(Callback):
        def on_step(self, run, s_out, t_out, targets) -> None:  # noqa: ANN001
            seen.append((s_out, t_out, targets))

    run = build_run(_cfg(tiny_shapes, teacher, tmp_path / "s"), log=lambda s: None)
    run.callbacks = [Probe()]
    images, targets = next(iter(run.train_loader))
    batch = run.student.preprocess(images, targets)
    model_losses = set(run.student(batch).losses)  # the student's own losses, by its own names
    r = train_step(run, images, targets)
    assert set(r.task) == model_losses and model_losses
    assert set(r.distill) == {"kd", "fitnet"} and set(r.distill["kd"]) == {"seg_logits"}
    assert set(r.distill["fitnet"]) == {"seg_feat"}
    assert all(v > 0 for terms in r.distill.values() for v in terms.values())
    assert float(r.total) == pytest.approx(sum(r.terms().values()), rel=1e-6)  # the total is every term's sum
    assert r.total.requires_grad
    (s_out, t_out, _), = seen  # the callback saw the step's student and teacher outputs once
    assert "seg_logits" in s_out.taps and "seg_logits" in t_out.taps


def test_callbacks_are_what_the_caller_wires_and_their_state_resumes(tiny_shapes: Path, teacher: Path,
                                                                      tmp_path: Path):
    """The loop writes checkpoints, best weights and metrics.json only; results.csv, config.json and any
    other record come from the callbacks in Run.callbacks, whose state (state_key) a resume restores."""
    from kdcli.engine.build import build_run
    from kdcli.engine.callbacks import Callback
    from kdcli.engine.csvlog import ResultsCsv
    from kdcli.engine.loop import fit

    class Counter(Callback):
        state_key = "counter"

        def __init__(self) -> None:
            self.steps, self.started, self.loaded = 0, [], None

        def on_start(self, run, resumed_at) -> None:  # noqa: ANN001
            self.started.append(resumed_at)

        def on_step(self, run, s_out, t_out, targets) -> None:  # noqa: ANN001
            self.steps += 1

        def epoch_columns(self, run) -> dict:  # noqa: ANN001
            return {"count/steps": self.steps}

        def state_dict(self, run) -> dict:  # noqa: ANN001
            return {"steps": self.steps}

        def load_state_dict(self, run, state) -> None:  # noqa: ANN001
            self.loaded = state
            self.steps = state["steps"]

    bare = build_run(_cfg(tiny_shapes, teacher, tmp_path / "bare"), log=lambda s: None)
    fit(bare, progress=False)  # no callbacks: trained and checkpointed, nothing else written
    assert (tmp_path / "bare" / "weights" / "last_state.pt").is_file()
    assert not (tmp_path / "bare" / "results.csv").exists() and not (tmp_path / "bare" / "config.json").exists()

    cfg = _cfg(tiny_shapes, teacher, tmp_path / "r", epochs=2)
    run = build_run(cfg, log=lambda s: None)
    first = Counter()
    run.callbacks = [ResultsCsv(), first]
    fit(run, progress=False, stop_after=1)
    assert first.started == [None] and first.steps == 2  # 4 images, batch 2
    state = torch.load(tmp_path / "r" / "weights" / "last_state.pt", weights_only=True)
    assert state["counter"] == {"steps": 2}
    again = build_run(cfg, log=lambda s: None)
    second = Counter()
    again.callbacks = [ResultsCsv(), second]
    fit(again, resume=True, progress=False)
    assert second.started == [1] and second.loaded == {"steps": 2} and second.steps == 4
    rows = list(csv.DictReader(open(tmp_path / "r" / "results.csv")))
    assert [int(r["count/steps"]) for r in rows] == [2, 4]
    assert list(rows[0]).index("count/steps") < list(rows[0]).index("val/mIoU")  # after the losses, before val


def test_the_engine_names_the_callers_resume_hint_and_never_reads_argv(
        tiny_shapes: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sys

    from kdcli.engine import loop
    from kdcli.engine.build import build_run
    from kdcli.engine.guards import Interrupted

    class SignalledAtOnce(GracefulStop):
        def __enter__(self) -> GracefulStop:
            super().__enter__()
            self.requested = "SIGTERM"
            return self

    monkeypatch.setattr(loop, "GracefulStop", SignalledAtOnce)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/kdcli", "distill", "--method", "kd"])
    run = build_run(_cfg(tiny_shapes, teacher, tmp_path / "h"), log=lambda s: None)
    assert run.command == "train"  # what the caller said (the default), not this process's command line
    run.resume_hint = "my-launcher --resume-run h"
    with pytest.raises(Interrupted, match="Continue with: my-launcher --resume-run h$"):
        loop.fit(run, progress=False)
