"""Shared fixtures: small, CPU-only, built once per session where they are expensive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine
from omnivox.models.loader import build_dummy_model
from omnivox.models.synthetic import write_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic snapshot in the official layout (seed 0, bf16). Shared: never modify it in place."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), "tiny", seed=0, progress=False)


@pytest.fixture(scope="module")
def model():
    """The tiny random-weight speech model in fp32 on the CPU (one per test module)."""
    return build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture()
def engine(model):
    """A fresh engine with the default config over the module's tiny model."""
    return Engine(model)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop every engine's loop thread while the interpreter is whole (the atexit hook runs later, during teardown)."""
    from omnivox.engine.engine import _stop_loops

    _stop_loops()
