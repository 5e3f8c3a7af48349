"""Shared fixtures of the PEFT tests: offline mode, a float32 default dtype, the tiny input and base output."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import surm  # noqa: E402, F401  (registers the method before any test module is collected)

from .helpers import make_tiny, tiny_input  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_default():
    """Every test starts in float32 (some tests change the default dtype or the model dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def x() -> torch.Tensor:
    return tiny_input()


@pytest.fixture
def base_output(x) -> torch.Tensor:
    with torch.no_grad():
        return make_tiny()(x)
