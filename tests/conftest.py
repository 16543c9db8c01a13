"""Shared fixtures: a private KDCLI_HOME and a tiny shapes data set in the real layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def kdcli_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("kdcli_home")
    os.environ["KDCLI_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return home


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdcli.data import write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, n_train=12, n_val=6, size=64, seed=1)
    return root
