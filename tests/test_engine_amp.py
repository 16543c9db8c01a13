"""``--amp auto``: bf16 only where the hardware has native bf16 kernels; explicit choices warn on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcli import runtime as amp_mod
from kdcli.errors import ConfigError
from kdcli.runtime import resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native: bool):
    monkeypatch.setattr(amp_mod, "cpu_has_native_bf16", lambda: native)
    assert resolve_amp("auto", CPU) == ("bf16" if native else "none", None)
    assert resolve_amp("none", CPU) == ("none", None)
    chosen, warning = resolve_amp("bf16", CPU)
    assert chosen == "bf16" and (warning is None) == native
    if not native:
        assert warning.startswith("--amp bf16: this CPU has no native bf16") and "\n" not in warning
    chosen, warning = resolve_amp("fp16", CPU)
    assert chosen == "fp16" and warning is not None and "slower than float32" in warning


def test_auto_on_cuda_prefers_bf16_else_fp16(monkeypatch):
    cuda = torch.device("cuda")
    for supported, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_amp("auto", cuda) == (want, None)
    assert resolve_amp("fp16", cuda) == ("fp16", None)


def test_unknown_value_is_named():
    with pytest.raises(ConfigError, match="--amp fp8: expected none, bf16, fp16, auto"):
        resolve_amp("fp8", CPU)


def test_the_probe_answers_on_this_machine():
    # whatever the CPU, the probe returns a bool (False where PyTorch cannot tell)
    assert isinstance(amp_mod.cpu_has_native_bf16(), bool)


def test_a_run_records_the_precision_auto_chose(tiny_shapes: Path, tmp_path: Path, monkeypatch):
    from kdcli import api
    from kdcli.config import RunConfig

    monkeypatch.setattr(amp_mod, "cpu_has_native_bf16", lambda: False)
    torch.set_flush_denormal(False)
    logs: list[str] = []
    cfg = RunConfig(model="shapes-mbv3-lraspp", data=f"semantic:{tiny_shapes / 'cityscapes'}", amp="auto",
                    out=str(tmp_path / "run"), epochs=1, batch_size=2, image_size=64, workers=0,
                    max_train_images=2, max_val_images=2, bn_recal=0, warmup_iters=0, device="cpu")
    folder, _ = api.train(cfg, log=logs.append)
    assert json.loads((folder / "config.json").read_text())["config"]["amp"] == "none"
    assert "--amp auto: none on cpu" in logs
    # and the CPU run flushed subnormals to zero (kdcli/runtime.py flush_denormals): 1e-39 now reads as 0
    assert (torch.tensor([1e-39]) * 1.0).item() == 0.0


def test_flush_denormals_on_cpu_only():
    try:
        torch.set_flush_denormal(False)
        tiny = torch.tensor([1e-39, 1e-30])  # made with subnormals kept (conversion would flush it too)
        assert not amp_mod.flush_denormals(torch.device("meta"))
        assert (tiny * 1.0)[0].item() > 0  # left alone off the CPU
        assert amp_mod.flush_denormals(CPU)
        assert (tiny * 1.0).tolist() == [0.0, pytest.approx(1e-30)]  # subnormal flushed, normal kept
    finally:
        torch.set_flush_denormal(True)
