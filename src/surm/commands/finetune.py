"""One fine-tuning run: data, model, method, training loop, evaluation, checkpoints and results.

The loop is the same for every method (surm families, PEFT's LoRA / C3A / LoKr / BOFT, full fine-tuning), so
comparisons are fair: identical data order, batches, schedule, head learning rate and seeds.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import peft
import torch
import transformers
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import __version__, atomic
from ..checkpoint import CHECKPOINT, check_resumable, read_checkpoint, save_checkpoint
from ..data import DatasetSplits, accuracy, confusion_matrix, is_imbalanced, load_dataset, macro_f1_of
from ..distributed import Topology, barrier, gather_objects, init_topology, shutdown
from ..errors import CheckpointError, TrainingDiverged
from ..methods import MethodChoice, build_peft_config, default_learning_rate, recommended_method
from ..models import LoadedModel, load_model
from ..settings import RunSettings
from ..validation import is_int, require_positive_int

RESULTS = "results.json"
LOG = "train.log"
#: ``on_epoch(epoch, validation_metrics)``, called after each epoch (see :meth:`Run.execute`).
EpochCallback = Callable[[int, dict[str, Any]], None]
#: The saved model folder: the PEFT adapter, or the whole model for full fine-tuning.
MODEL_FOLDERS = ("adapter", "model")
log = logging.getLogger("surm")


@dataclass
class RunConfig:
    """One run: the method, the output folder, the run settings, how to checkpoint, and whether the test split is
    evaluated at the end (``evaluate_test=False``: a tuning run, whose test metrics are None and which never reads
    the test split, so that a choice made on validation cannot have looked at it). With ``budget_params``, the
    method is replaced, once the model is loaded, by :func:`surm.recommendation.recommend`'s for that budget (its
    ``method`` must be left at the default), and an unset learning rate by the recipe's.

    Raises:
        ValueError: for a checkpoint interval or evaluation batch size out of range (the settings check themselves).
    """

    method: MethodChoice
    output: Path
    settings: RunSettings = field(default_factory=RunSettings)
    checkpoint_every: int = 0
    resume: bool = False
    eval_batch_size: int = 128
    evaluate_test: bool = True
    budget_params: Optional[int] = None

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if not is_int(self.checkpoint_every, minimum=0):
            raise ValueError(f"checkpoint_every must be >= 0 (0: once per epoch), got {self.checkpoint_every!r}")
        require_positive_int("eval_batch_size", self.eval_batch_size)
        if self.budget_params is not None:
            require_positive_int("budget_params", self.budget_params)

    @property
    def learning_rate(self) -> float:
        """The adapter's learning rate: the setting, or the method's default (:func:`default_learning_rate`)."""
        lr = self.settings.lr
        return lr if lr is not None else default_learning_rate(self.method.name)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly view of what determines the training (results.json, checkpoint and reuse checks): the
        method, the output folder, every run setting but the device (a run may resume on another), the resolved
        learning rate and the evaluation batch size."""
        data = {"method": asdict(self.method), "output": str(self.output), **self.settings.describe(),
                "lr": self.learning_rate, "eval_batch_size": self.eval_batch_size,
                "evaluate_test": self.evaluate_test, "budget_params": self.budget_params}
        data.pop("device")
        return data


@dataclass
class LossWatch:
    """Divergence detection: a non-finite loss, or a loss above :attr:`FACTOR` x the starting loss for
    :attr:`PATIENCE` steps in a row.

    The starting loss is that of the first step (computed at the initial weights), but at least ln(C) for C classes
    (a uniform guess), so that an easy first batch does not make the bar low. A healthy run stays near or below it;
    a learning rate far too high sends the loss to hundreds or thousands while it stays finite. The state is saved in
    checkpoints, so a resumed run watches exactly as an uninterrupted one.
    """

    FACTOR = 10.0
    PATIENCE = 3

    start: Optional[float] = None
    above: int = 0

    def observe(self, loss: float, num_labels: int) -> Optional[str]:
        """Record one step's loss; return why training diverged, or None."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if self.start is None:
            self.start = max(loss, math.log(max(num_labels, 2)))
            return None
        self.above = self.above + 1 if loss > self.FACTOR * self.start else 0
        if self.above >= self.PATIENCE:
            return (f"loss {loss:.4g} above {self.FACTOR:g} x the starting loss {self.start:.4g} for "
                    f"{self.PATIENCE} steps in a row")
        return None

    def state(self) -> dict[str, Any]:
        return {"start": self.start, "above": self.above}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LossWatch:
        start, above = state.get("start"), state.get("above", 0)
        if not ((start is None or (isinstance(start, float) and math.isfinite(start))) and isinstance(above, int)):
            raise ValueError(f"malformed loss watch state {state!r}")
        return cls(start, above)


#: Set to "1" by ``surm compare`` in the environment of the runs it starts. Compare forwards Ctrl-C to its runs, which
#: share its terminal's process group, so one Ctrl-C reaches such a run twice; on a busy machine the forwarded copy can
#: come seconds after the first, when the run has already stopped.
FORWARDED_CTRL_C = "SURM_FORWARDED_CTRL_C"


def ctrl_c_arrives_twice() -> bool:
    """Whether each Ctrl-C reaches this process twice (it runs under ``surm compare``: :data:`FORWARDED_CTRL_C`)."""
    return os.environ.get(FORWARDED_CTRL_C) == "1"


def ignore_next_ctrl_c() -> None:
    """Ignore the next SIGINT (the late copy of a Ctrl-C already acted on), then restore the handler set now.

    Only in the main thread, where signal handlers are set.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    restored = current if current is not None else signal.default_int_handler

    def restore(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, restored)

    signal.signal(signal.SIGINT, restore)


class StepBoundaryInterrupt:
    """While training, Ctrl-C (SIGINT) stops the run between two steps, never inside one.

    The first Ctrl-C is noted and :meth:`check`, called after each step and epoch, raises KeyboardInterrupt there:
    the step and any checkpoint it writes finish, and no library is interrupted halfway through its own cleanup. A
    second Ctrl-C, :data:`SAME_CTRL_C_SECONDS` or more after the first, interrupts at once; one sooner is the same
    Ctrl-C arriving twice and is ignored. Under ``surm compare`` (``forwarded``, by default
    :func:`ctrl_c_arrives_twice`) every Ctrl-C arrives twice (a terminal signals the whole process group, and compare
    also forwards Ctrl-C to the runs it started), so the second SIGINT is ignored however late it comes, the third
    interrupts at once, and a run that stops before the copy has come ignores it after the block too
    (:func:`ignore_next_ctrl_c`). Only in the main thread of a single process (under ``torchrun`` every process
    would have to stop at the same step, so there Ctrl-C keeps Python's default).
    """

    #: SIGINTs this close to the first are one Ctrl-C delivered twice, not a second press.
    SAME_CTRL_C_SECONDS = 0.5

    def __init__(self, enabled: bool = True, forwarded: Optional[bool] = None) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.forwarded = ctrl_c_arrives_twice() if forwarded is None else forwarded
        self.requested = False
        self._first_at = 0.0
        self._copy_seen = False
        self._previous: Any = None

    def __enter__(self) -> StepBoundaryInterrupt:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)
            if self.forwarded and self.requested and not self._copy_seen:
                ignore_next_ctrl_c()

    def _note(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first_at = True, now
        elif self.forwarded and not self._copy_seen:
            self._copy_seen = True
        elif now - self._first_at >= self.SAME_CTRL_C_SECONDS:
            raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed since training started."""
        if self.requested:
            raise KeyboardInterrupt


def divergence_cause(lr: float, head_lr: float, weight_decay: float) -> str:
    """The likely cause of a divergence, as advice: AdamW's decay multiplies every weight by (1 - lr x decay) each
    step, which flips and grows the weights once lr x decay exceeds 1; otherwise the learning rate is too high."""
    decay = max(lr, head_lr) * weight_decay
    if decay >= 1:
        return (f"the weight decay: --weight-decay {weight_decay:g} x learning rate {max(lr, head_lr):g} = {decay:g} "
                ">= 1 flips the sign of every weight each step; use a weight decay below 1 / lr")
    return f"the learning rate: try a smaller --lr (now {lr:g}) or --head-lr (now {head_lr:g})"


def pick_device(name: str, topology: Topology) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
        if name == "cuda":
            return torch.device("cuda", topology.local_rank)
    return torch.device(name)


def subset(examples: list, size: Optional[int], seed: int) -> list:
    """A seeded random subset of ``size`` examples (all of them when size is None or larger)."""
    if size is None or size >= len(examples):
        return examples
    order = np.random.default_rng(seed).permutation(len(examples))[:size]
    return [examples[i] for i in sorted(order)]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, world_size: int = 1) -> list[np.ndarray]:
    """The global batches of one epoch: a permutation seeded by (seed, epoch), cut into batch_size pieces.

    A last batch smaller than ``world_size`` (some process would get no example) is dropped.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= world_size]


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def head_parameter_names(model: nn.Module, head: list[str]) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if any(h in parts for h in head):
            names.add(name)
    return names


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def jsonable(value: Any) -> Any:
    """``value`` with sets turned into sorted lists (PEFT configs hold ``target_modules`` as a set), recursively.

    A set would otherwise reach results.json as its ``str``, in an order that changes from process to process.
    """
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    return value


def versions() -> dict[str, str]:
    return {"surm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


class Run:
    """A fine-tuning run; :meth:`execute` trains, evaluates and writes the output folder."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.settings = settings = config.settings
        self.topology = init_topology(torch.device("cuda" if settings.device.startswith("cuda") else "cpu"))
        self.device = pick_device(settings.device, self.topology)
        self.output = config.output
        self._check_output()
        # Everything that can fail on bad input happens here, before any training.
        self.data: DatasetSplits = load_dataset(
            settings.dataset, text_column=settings.text_column, text_pair_column=settings.text_pair_column,
            label_column=settings.label_column, seed=settings.seed,
        )
        self.train_examples = subset(self.data.train, settings.train_size, settings.seed)
        self.validation_examples = subset(self.data.validation, settings.eval_size, settings.seed)
        self.test_examples = (subset(self.data.test, settings.eval_size, settings.seed) if config.evaluate_test
                              else [])
        torch.manual_seed(settings.seed)  # the classifier head and adapter inits depend on the seed only
        self.loaded: LoadedModel = load_model(settings.model, self.data, settings.max_length, settings.pooling,
                                              settings.model_dropout)
        if config.budget_params is not None:  # the recommended method, at its recipe's rate unless --lr is given
            config.method, rate = recommended_method(self.loaded.model, config.budget_params)
            if settings.lr is None:
                self.settings = settings = config.settings = replace(settings, lr=rate)
        self.peft_config = build_peft_config(config.method, self.loaded.task_type, self.loaded.head,
                                             self.loaded.default_targets)
        self.model = self._wrap(self.loaded.model).to(self.device)
        self.steps_per_epoch = len(epoch_batches(len(self.train_examples), settings.batch_size, settings.seed, 0,
                                                 self.topology.world_size))
        self.optimizer = self._optimizer()
        total_steps = self.steps_per_epoch * settings.epochs
        warmup = int(settings.warmup_ratio * total_steps)
        self.scheduler = transformers.get_linear_schedule_with_warmup(self.optimizer, warmup, total_steps)
        self.checkpoint = self._read_checkpoint()  # checked against this run before anything is written

    # -- set-up --------------------------------------------------------------------------------------------

    def _check_output(self) -> None:
        """Refuse an output that this run would clobber; called before anything is loaded or written."""
        if self.output.exists() and not self.output.is_dir():
            raise ValueError(f"--output {self.output} exists and is not a folder")
        checkpoint = self.output / CHECKPOINT
        if checkpoint.exists() and not self.config.resume:
            raise ValueError(
                f"{self.output} holds a checkpoint of an earlier run; pass --resume to continue it or choose "
                "another --output"
            )
        if (self.output / RESULTS).exists() and not self.config.resume:
            raise ValueError(f"{self.output} already holds results.json; choose another --output")
        # A surm run writes its model folder only after its last checkpoint, so a model folder without a
        # checkpoint is someone else's, and saving would replace it whole.
        foreign = [name for name in MODEL_FOLDERS if (self.output / name).exists()]
        if foreign and not checkpoint.exists():
            raise ValueError(f"{self.output} already holds {foreign[0]!r}, which is not the output of a surm run "
                             "(no checkpoint.pt); choose another --output")
        if self.topology.is_main:
            atomic.check_writable(self.output)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.peft_config is None:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        return peft.get_peft_model(model, self.peft_config)

    def _optimizer(self) -> torch.optim.Optimizer:
        head = head_parameter_names(self.model, self.loaded.head)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in trainable if n not in head], "lr": self.config.learning_rate},
            {"params": [p for n, p in trainable if n in head], "lr": self.settings.head_lr},
        ]
        groups = [g for g in groups if g["params"]]
        return torch.optim.AdamW(groups, weight_decay=self.settings.weight_decay)

    # -- checkpoints -----------------------------------------------------------------------------------------

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._trainable_parameters().items()}

    def _trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _check_finite(self, what: str) -> None:
        """Refuse to save non-finite weights (they would be reloaded, merged or served as if trained)."""
        bad = [n for n, p in self._trainable_parameters().items() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDiverged(
                f"training diverged: {len(bad)} trainable tensor(s) hold NaN or inf (first: {bad[0]}); not writing "
                f"the {what}; likely cause: "
                f"{divergence_cause(self.config.learning_rate, self.settings.head_lr, self.settings.weight_decay)}")

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        self._check_finite("checkpoint")
        rng = gather_objects(self.topology, torch.get_rng_state())
        if self.topology.is_main:
            save_checkpoint(self.output / CHECKPOINT, {
                **state, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng, "trainable": self._trainable_state(), "settings": self.config.describe()})
        barrier(self.topology)

    def _read_checkpoint(self) -> Optional[dict[str, Any]]:
        """The checkpoint to resume from (None for a fresh run), read safely and checked against this run.

        Raises:
            CheckpointError: if it cannot be read or does not match this run; nothing has been written then.
        """
        path = self.output / CHECKPOINT
        if not (self.config.resume and path.exists()):
            return None
        checkpoint = read_checkpoint(path)
        check_resumable(path, checkpoint, settings=self.config.describe(), parameters=self._trainable_parameters(),
                        optimizer=self.optimizer, scheduler=self.scheduler, world_size=self.topology.world_size,
                        epochs=self.settings.epochs, steps_per_epoch=self.steps_per_epoch)
        try:
            LossWatch.from_state(checkpoint["loss_watch"])
        except ValueError as error:
            raise CheckpointError(f"cannot resume {path}: {error}") from None
        return checkpoint

    def _resume(self, checkpoint: dict[str, Any]) -> None:
        """Load a checked checkpoint into the model, optimizer, scheduler and random state."""
        parameters = self._trainable_parameters()
        with torch.no_grad():
            for name, value in checkpoint["trainable"].items():
                parameters[name].copy_(value)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        torch.set_rng_state(checkpoint["rng"][self.topology.rank])

    # -- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, examples: list) -> dict[str, Any]:
        """Accuracy, macro-F1, mean loss and the confusion matrix (``confusion[i][j]``: examples of class ``i``
        predicted as ``j``, :func:`surm.data.confusion_matrix`) on ``examples``, sharded over processes and
        gathered."""
        self.model.eval()
        shard = np.array_split(np.arange(len(examples)), self.topology.world_size)[self.topology.rank]
        preds, labels, losses = [], [], []
        for start in range(0, len(shard), self.config.eval_batch_size):
            batch = move(self.loaded.collate([examples[i] for i in shard[start : start + self.config.eval_batch_size]]),
                         self.device)
            target = batch.pop("labels")
            logits = logits_of(self.model(**batch)).float()
            losses.append(float(nn.functional.cross_entropy(logits, target, reduction="sum")))
            preds.append(logits.argmax(-1).cpu().numpy())
            labels.append(target.cpu().numpy())
        local = (np.concatenate(preds) if preds else np.zeros(0, int),
                 np.concatenate(labels) if labels else np.zeros(0, int),
                 sum(losses))
        parts = gather_objects(self.topology, local)
        all_preds = np.concatenate([p[0] for p in parts])
        all_labels = np.concatenate([p[1] for p in parts])
        self.model.train()
        counts = confusion_matrix(all_preds, all_labels, self.data.num_labels)
        return {
            "accuracy": accuracy(all_preds, all_labels),
            "macro_f1": macro_f1_of(counts),
            "loss": sum(p[2] for p in parts) / max(1, len(all_labels)),
            "confusion": counts.tolist(),
        }

    # -- training --------------------------------------------------------------------------------------------

    def execute(self, on_epoch: Optional[EpochCallback] = None) -> dict[str, Any]:
        """Train, evaluate and write the outputs; returns the results.

        ``on_epoch(epoch, validation_metrics)`` is called on every process after each epoch's checkpoint (epoch
        counts from 1; the metrics are the gathered ones, the same everywhere); an exception it raises stops the
        run there, before the test split is touched (``surm search`` prunes trials this way).
        """
        config, settings, topology = self.config, self.settings, self.topology
        if topology.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            # A process killed while writing leaves its temporary files (never valid outputs) behind.
            leftovers = atomic.remove_leftovers(self.output, (CHECKPOINT, RESULTS, *MODEL_FOLDERS))
            self._configure_logging()
            if leftovers:
                log.info("removed temporary files of an interrupted run: %s", ", ".join(p.name for p in leftovers))
        trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total_steps = self.steps_per_epoch * settings.epochs
        state: dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "history": [], "train_seconds": 0.0,
                                 "samples": 0, "loss_watch": LossWatch().state()}
        if self.checkpoint is not None:
            self._resume(self.checkpoint)
            state = {k: self.checkpoint[k] for k in state}
            log.info("resumed from %s at epoch %d, step %d", self.output / CHECKPOINT, state["epoch"] + 1,
                     state["step_in_epoch"])
        watch = LossWatch.from_state(state["loss_watch"])
        model = DistributedDataParallel(self.model) if topology.distributed else self.model
        log.info("method %s: %s trainable parameters; %d train / %d validation / %d test examples; %d steps",
                 config.method.label, f"{trainable_params:,}", len(self.train_examples),
                 len(self.validation_examples), len(self.test_examples), total_steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        model.train()
        with StepBoundaryInterrupt(enabled=not topology.distributed) as interrupt:
            while state["epoch"] < settings.epochs:
                self._train_epoch(model, state, watch, interrupt)
                metrics = self.evaluate(self.validation_examples)
                state["history"].append({"epoch": state["epoch"] + 1, "step": state["global_step"], **metrics})
                log.info("epoch %d: validation accuracy %.4f, macro-F1 %.4f, loss %.4f", state["epoch"] + 1,
                         metrics["accuracy"], metrics["macro_f1"], metrics["loss"])
                state["epoch"] += 1
                state["step_in_epoch"] = 0
                self._save_checkpoint(state)
                interrupt.check()
                if on_epoch is not None:
                    on_epoch(state["epoch"], metrics)
        test = self.evaluate(self.test_examples) if config.evaluate_test else None
        results = self._results(state, test, trainable_params)
        self._check_finite("adapter" if self.peft_config is not None else "model")
        if topology.is_main:
            self._save_model()
            atomic.write_json(self.output / RESULTS, results)
            if test is None:
                log.info("the test split was not evaluated (--no-test); %.1f s of training, %.1f samples/s",
                         state["train_seconds"], results["samples_per_second"])
            else:
                log.info("test accuracy %.4f, macro-F1 %.4f; %.1f s of training, %.1f samples/s", test["accuracy"],
                         test["macro_f1"], state["train_seconds"], results["samples_per_second"])
        barrier(topology)
        shutdown(topology)
        return results

    def _train_epoch(self, model: nn.Module, state: dict[str, Any], watch: LossWatch,
                     interrupt: StepBoundaryInterrupt) -> None:
        """The remaining steps of epoch ``state["epoch"]``, updating ``state``; checkpoints every
        ``--checkpoint-every`` steps; stops with TrainingDiverged, or KeyboardInterrupt between steps."""
        config, settings = self.config, self.settings
        batches = epoch_batches(len(self.train_examples), settings.batch_size, settings.seed, state["epoch"],
                                self.topology.world_size)
        with tqdm(total=len(batches), initial=state["step_in_epoch"], desc=f"epoch {state['epoch'] + 1}/"
                  f"{settings.epochs}", disable=not self.topology.is_main, mininterval=1.0, file=sys.stderr) as bar:
            for index in range(state["step_in_epoch"], len(batches)):
                start = time.perf_counter()
                loss = self._step(model, batches[index], self.optimizer, self.scheduler)
                diverged = watch.observe(loss, self.data.num_labels)
                if diverged:
                    raise TrainingDiverged(
                        f"training diverged at step {state['global_step'] + 1}: {diverged}; likely cause: "
                        f"{divergence_cause(config.learning_rate, settings.head_lr, settings.weight_decay)}")
                state["loss_watch"] = watch.state()
                state["train_seconds"] += time.perf_counter() - start
                state["samples"] += len(batches[index])
                state["global_step"] += 1
                state["step_in_epoch"] = index + 1
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                samples_per_s=f"{state['samples'] / max(state['train_seconds'], 1e-9):.1f}")
                bar.update(1)
                every = config.checkpoint_every
                if every and state["global_step"] % every == 0 and index + 1 < len(batches):
                    self._save_checkpoint(state)
                interrupt.check()

    def _step(self, model: nn.Module, indices: np.ndarray, optimizer: torch.optim.Optimizer, scheduler: Any) -> float:
        """One optimiser step on a global batch; this process handles its contiguous share of it.

        The loss is the sum over this share divided by the global batch size, times the world size, so that
        DDP's gradient average equals the gradient of the global batch mean (also for a smaller last batch).
        """
        topology = self.topology
        share = np.array_split(indices, topology.world_size)[topology.rank]
        batch = move(self.loaded.collate([self.train_examples[i] for i in share]), self.device)
        target = batch.pop("labels")
        logits = logits_of(model(**batch)).float()
        loss_sum = nn.functional.cross_entropy(logits, target, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * topology.world_size / len(indices)).backward()
        if self.settings.max_grad_norm is not None:  # after DDP's all-reduce: every process clips the same gradient
            nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                     self.settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        return float(loss_sum.detach()) / len(share)

    def _results(self, state: dict[str, Any], test: Optional[dict[str, Any]],
                 trainable_params: int) -> dict[str, Any]:
        """results.json; the test metrics are None when the test split was not evaluated."""
        test_labels = np.array([e.label for e in self.test_examples])
        return {
            "method": self.config.method.name,
            "label": self.config.method.label,
            "mode": self.config.method.mode,
            "config": self.config.describe(),
            "peft_config": jsonable(self.peft_config.to_dict()) if self.peft_config is not None else None,
            "model_source": self.loaded.source,
            "pooling": self.loaded.pooling,
            "dataset": self.data.name,
            "num_labels": self.data.num_labels,
            "label_names": list(self.data.label_names),
            "trainable_params": trainable_params,
            "head_params": sum(p.numel() for n, p in self.model.named_parameters()
                               if p.requires_grad and n in head_parameter_names(self.model, self.loaded.head)),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "test_accuracy": test["accuracy"] if test else None,
            "test_macro_f1": test["macro_f1"] if test else None,
            "test_loss": test["loss"] if test else None,
            "test_confusion": test["confusion"] if test else None,
            "imbalanced": bool(is_imbalanced(test_labels, self.data.num_labels)) if test else None,
            "validation_history": state["history"],
            "train_seconds": state["train_seconds"],
            "samples_per_second": state["samples"] / max(state["train_seconds"], 1e-9),
            "peak_memory_mb": peak_memory_mb(self.device),
            "seed": self.settings.seed,
            "world_size": self.topology.world_size,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "versions": versions(),
        }

    def _save_model(self) -> None:
        """The PEFT adapter folder (or, for full fine-tuning, the whole model), written atomically."""
        name = "adapter" if self.peft_config is not None else "model"
        with atomic.atomic_directory(self.output / name) as staging:
            if hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(staging)
            else:
                state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
                save_file(state, staging / "model.safetensors")

    def _configure_logging(self) -> None:
        log.setLevel(logging.INFO)
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(self.output / LOG)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(file_handler)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(stream)
        log.propagate = False


def finetune(config: RunConfig, on_epoch: Optional[EpochCallback] = None) -> dict[str, Any]:
    """Run one fine-tuning job and return its results (also written to ``config.output / "results.json"``).

    ``on_epoch``: see :meth:`Run.execute`.
    """
    return Run(config).execute(on_epoch)
