"""Checkpoint files: a write killed between any two renames, a truncated or bit-flipped tensor file,
an unreadable state file — loading always finds the newest intact checkpoint, or says why not."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdcli.engine import checkpoint as ckpt
from kdcli.errors import TrainingError


def _tensors(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"net.w": torch.randn(64, 32, generator=g), "method.b": torch.full((3,), float(step))}


def _save(folder: Path, step: int) -> None:
    ckpt.save_checkpoint(folder, _tensors(step), {"step": step, "epoch": 0, "marker": f"s{step}"})


def _check(loaded: ckpt.Loaded, step: int) -> None:
    assert loaded.state["step"] == step and loaded.state["marker"] == f"s{step}"
    for k, v in _tensors(step).items():
        assert torch.equal(loaded.tensors[k], v), k


def test_newest_is_loaded_and_two_are_kept(tmp_path: Path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.safetensors", "last_state.pt", "prev.safetensors", "prev_state.pt"]
    loaded = ckpt.load_checkpoint(tmp_path)
    _check(loaded, 3)
    assert loaded.slot == "last" and loaded.skipped == []


class _Killed(Exception):
    pass


@pytest.mark.parametrize("renames", [0, 1, 2, 3])
def test_a_write_killed_after_any_rename_leaves_a_loadable_checkpoint(tmp_path: Path, renames: int,
                                                                      monkeypatch: pytest.MonkeyPatch):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    real = os.replace
    done = [0]

    def replace(src: str, dst: str) -> None:
        if done[0] == renames:
            raise _Killed
        real(src, dst)
        done[0] += 1

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(_Killed):
        _save(tmp_path, 3)
    monkeypatch.setattr(ckpt.os, "replace", real)
    loaded = ckpt.load_checkpoint(tmp_path)
    _check(loaded, 2)  # the new one never completed its last rename: the previous newest is used
    _save(tmp_path, 4)  # and writing goes on from there, leftover temporaries removed
    _check(ckpt.load_checkpoint(tmp_path), 4)
    assert not list(tmp_path.glob(".last*"))


def test_truncated_tensor_file_falls_back_to_the_previous(tmp_path: Path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    last = tmp_path / "last.safetensors"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    loaded = ckpt.load_checkpoint(tmp_path)
    _check(loaded, 1)
    assert loaded.slot == "prev"
    assert any("last_state.pt" in s for s in loaded.skipped)
    assert any("truncated" in s for s in loaded.skipped)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path: Path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    last = tmp_path / "last.safetensors"
    data = bytearray(last.read_bytes())
    data[-5] ^= 0x01  # inside a tensor: the header and the size still agree
    last.write_bytes(bytes(data))
    assert ckpt.safetensors_problem(bytes(data)) is None
    _check(ckpt.load_checkpoint(tmp_path), 1)


def test_unreadable_state_falls_back(tmp_path: Path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    state = tmp_path / "last_state.pt"
    state.write_bytes(state.read_bytes()[:200])
    loaded = ckpt.load_checkpoint(tmp_path)
    _check(loaded, 1)
    assert any("last_state.pt: unreadable" in s for s in loaded.skipped)


def test_no_intact_checkpoint_is_a_clear_error(tmp_path: Path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    _save(tmp_path, 1)
    (tmp_path / "last.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(TrainingError, match="no intact checkpoint.*truncated"):
        ckpt.load_checkpoint(tmp_path)


def test_safetensors_problem_names_the_damage():
    from safetensors.torch import save

    data = save({"a": torch.zeros(10)})
    assert ckpt.safetensors_problem(data) is None
    assert "truncated" in ckpt.safetensors_problem(data[:-1])
    assert "trailing" in ckpt.safetensors_problem(data + b"xx")
    assert "header" in ckpt.safetensors_problem(data[:8] + b"\xff" * (len(data) - 8))


def test_rng_states_round_trip_including_method_generators():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Module()
            self.inner.generator = torch.Generator().manual_seed(3)

    m = M()
    gens = ckpt.module_generators(m)
    assert list(gens) == ["inner.generator"]
    state = ckpt.rng_state(gens)
    want = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=m.inner.generator))
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    ckpt.set_rng_state(torch.load(buf, weights_only=True), gens)  # as a checkpoint stores it
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=m.inner.generator))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and want[2] == got[2]
    assert torch.equal(want[3], got[3])
