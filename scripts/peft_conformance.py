#!/usr/bin/env python3
"""PEFT's own generic tests run on surm: a conformance check against the installed PEFT version.

The tests are those of ``tests/test_custom_models.py`` (with its helpers ``testing_common.py`` and
``testing_utils.py``) in the source distribution of exactly the installed PEFT version, fetched from the package
index with ``pip download`` at run time (never copied into this repository) and cached under
``build/peft_conformance/<version>/``. A pytest plugin replaces the rows of PEFT's shared test tables
(``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``, ``MIXED_ADAPTER_TEST_CASES``
and a few inline mixed-batch tables) with surm configurations, every family in ``surm.STRUCTURES`` in both modes,
and deselects every test that none of those tables drives (LoRA-specific tests). The tests that do not apply to
surm are listed in :data:`NOT_APPLICABLE` with the reason and run as strict xfails: a case that starts passing
fails the run, so the list stays true. docs/peft_conformance.md mirrors the list.

Usage:
  python scripts/peft_conformance.py                    # fetch (once per PEFT version) and run
  python scripts/peft_conformance.py -- -k lowrank -x   # arguments after -- go to pytest

Exit status: pytest's (0: everything passed or xfailed as listed), 75 when the package index cannot be reached,
1 when the tests cannot be fetched otherwise.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

import surm
from surm import NotMergeableError, SurmConfig

ROOT = Path(__file__).resolve().parents[1]
#: Where each PEFT version's tests are unpacked (build/ is git-ignored).
DEFAULT_CACHE = ROOT / "build" / "peft_conformance"
#: The PEFT test file that is run, and the files of the sdist's tests/ folder it needs.
TEST_FILE = "test_custom_models.py"
HELPERS = ("testing_common.py", "testing_utils.py")
#: The unpacked tests/ folder becomes this package (not ``tests``, which is surm's own test package).
PACKAGE = "peft_tests"
#: Exit status when the package index is unreachable (sysexits' EX_TEMPFAIL); the CI test skips on it alone.
EXIT_UNREACHABLE = 75
#: pip output that means the index could not be reached (as opposed to a missing version or a broken sdist).
NETWORK_ERRORS = re.compile(
    r"NewConnectionError|ConnectTimeout|ReadTimeout|Max retries exceeded|Temporary failure in name resolution|"
    r"Name or service not known|Network is unreachable|Connection refused|ProxyError|No route to host"
)

MODES = ("delta", "adapter")
#: Family options small enough for PEFT's test models (MLP: 10 -> 20 -> 2, DeepMLP: 256 -> 256); other families
#: keep their defaults.
SMALL_OPTIONS: dict[str, dict[str, int]] = {"lowrank": {"rank": 2}, "monarch": {"nblocks": 2, "block_rank": 2}}
#: The same for a layer with one output feature (EmbConv1D's Conv1D: 5 -> 1).
ONE_FEATURE_OPTIONS: dict[str, dict[str, int]] = {"lowrank": {"rank": 1}, "monarch": {"nblocks": 1, "block_rank": 1}}

#: Modules PEFT's helpers import at module level only for tests not run here (Stable Diffusion pipelines, Hub
#: datasets): when one is not installed, a placeholder stands in (the name each helper imports; using it fails).
PLACEHOLDERS: dict[str, tuple[str, ...]] = {"diffusers": ("StableDiffusionPipeline",), "datasets": ("load_dataset",)}


class RegistryUnreachable(RuntimeError):
    """``pip download`` failed because the package index could not be reached."""


def surm_kwargs(family: str, mode: str, sizes: Optional[dict[str, dict[str, int]]] = None,
                **kwargs: Any) -> dict[str, Any]:
    """SurmConfig keyword arguments: family and mode, the family's options from ``sizes`` (default
    :data:`SMALL_OPTIONS`), then ``kwargs``."""
    return {"structure": family, "mode": mode, **(sizes or SMALL_OPTIONS).get(family, {}), **kwargs}


def family_modes() -> list[tuple[str, str]]:
    """Every (family, mode) pair: each registered family in delta and in adapter mode."""
    return [(family, mode) for family in surm.STRUCTURES for mode in MODES]


def custom_model_rows() -> list[Any]:
    """Rows for ``TEST_CASES`` (test name, model id, config class, config kwargs).

    Per family and mode, both MLP layers (10 -> 20 and 20 -> 2) with the default start (the model's output
    unchanged); per family, the bottleneck adapter (rectangular structured maps); then the two other layer kinds
    (transformers' Conv1D, 1x1 Conv2d) in both modes, ``modules_to_save``, ``override_pattern`` (two families in
    one adapter), and two rows with ``init_weights=False`` (a random start) for the tests that take a row as it is.
    PEFT's tests that need a non-identity start set ``init_weights=False`` themselves.
    """
    rows = [pytest.param(f"surm {family} {mode}", "MLP", SurmConfig,
                         surm_kwargs(family, mode, target_modules=["lin0", "lin1"]), id=f"{family}-{mode}")
            for family, mode in family_modes()]
    rows += [pytest.param(f"surm {family} bottleneck", "MLP", SurmConfig,
                          surm_kwargs(family, "adapter", target_modules=["lin0", "lin1"], bottleneck=2),
                          id=f"{family}-adapter-k2")
             for family in surm.STRUCTURES]
    for mode in MODES:
        rows.append(pytest.param(f"surm Conv1D {mode}", "EmbConv1D", SurmConfig,
                                 surm_kwargs("circulant", mode, target_modules=["conv1d"]),
                                 id=f"circulant-{mode}-conv1d"))
        rows.append(pytest.param(f"surm Conv2d 1x1 {mode}", "Conv2d1x1", SurmConfig,
                                 surm_kwargs("toeplitz", mode, target_modules=["conv2d"]),
                                 id=f"toeplitz-{mode}-conv2d"))
    rows.append(pytest.param("surm modules_to_save", "MLP", SurmConfig,
                             surm_kwargs("symmetric_toeplitz", "delta", target_modules=["lin0"],
                                         modules_to_save=["lin1"]),
                             id="symmetric_toeplitz-delta-modules_to_save"))
    rows.append(pytest.param("surm override_pattern", "MLP", SurmConfig,
                             surm_kwargs("circulant", "delta", target_modules=["lin0", "lin1"],
                                         override_pattern={"lin1": {"structure": "lowrank", "rank": 1}}),
                             id="circulant-delta-override"))
    for family, mode in (("kronecker", "delta"), ("monarch", "adapter")):
        rows.append(pytest.param(f"surm {family} {mode} random", "MLP", SurmConfig,
                                 surm_kwargs(family, mode, target_modules=["lin0", "lin1"], init_weights=False),
                                 id=f"{family}-{mode}-random"))
    return rows


def config_classes() -> list[Any]:
    """Entries for ``ALL_PEFT_CONFIG_CLASSES``: SurmConfig bound to each family and mode (the tests call it with
    ``target_modules`` and ``modules_to_save`` only)."""
    return [pytest.param(functools.partial(SurmConfig, **surm_kwargs(family, mode)), id=f"{family}-{mode}")
            for family, mode in family_modes()]


def multiple_active_adapter_cases() -> list[Any]:
    """Rows for ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``: two random adapters on the same layer, then on two."""
    rows = []
    for family, mode in family_modes():
        for label, second in (("same", "lin0"), ("different", "lin1")):
            first_kwargs = surm_kwargs(family, mode, target_modules=["lin0"], init_weights=False)
            second_kwargs = surm_kwargs(family, mode, target_modules=[second], init_weights=False)
            rows.append(pytest.param(f"surm {family} {mode} {label}", "surm", SurmConfig, first_kwargs,
                                     second_kwargs, id=f"{family}-{mode}-{label}"))
    return rows


def mixed_pairs(first: dict[str, Any], second: dict[str, Any],
                sizes: Optional[dict[str, dict[str, int]]] = None) -> list[Any]:
    """(test name, config0, config1) rows, one per family and mode: random adapters with these extra arguments."""
    return [pytest.param(f"surm {family} {mode}",
                         SurmConfig(**surm_kwargs(family, mode, sizes, init_weights=False, **first)),
                         SurmConfig(**surm_kwargs(family, mode, sizes, init_weights=False, **second)),
                         id=f"{family}-{mode}")
            for family, mode in family_modes()]


def mixed_adapter_cases() -> list[Any]:
    """Rows for ``MIXED_ADAPTER_TEST_CASES``: two adapters on ``lin0``, the second with another scale."""
    return mixed_pairs({"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "alpha": 2.0})


@dataclass(frozen=True)
class InlineTable:
    """A test whose parametrization is written inline in PEFT's file (LoRA, RoAd and GLoRA rows): surm's rows."""

    argnames: str
    rows: list[Any]


def inline_tables() -> dict[str, InlineTable]:
    """surm rows for PEFT's mixed-batch tests with inline tables, by test function name (Conv2d and MHA ones are
    left out: their models' layers are a 5x5 convolution and nn.MultiheadAttention, which surm does not adapt)."""
    names = "test_name, config0, config1"
    lin0 = {"target_modules": ["lin0"]}
    conv1d = {"target_modules": ["conv1d"]}
    return {
        "test_mixed_adapter_batches_different_target_layers":
            InlineTable(names, mixed_pairs(lin0, {"target_modules": ["lin1"]})),
        "test_mixed_adapter_batches_multiple_modules_to_save":
            InlineTable(names, mixed_pairs({**lin0, "modules_to_save": ["lin1"]},
                                           {**lin0, "modules_to_save": ["lin1"]})),
        "test_mixed_adapter_batches_partly_overlapping_target_layers":
            InlineTable(names, mixed_pairs(lin0, {"target_modules": ["lin0", "lin1"]})),
        "test_mixed_adapter_batches_lora_conv1d_emb":
            InlineTable(names, mixed_pairs(conv1d, {**conv1d, "alpha": 2.0}, ONE_FEATURE_OPTIONS)),
        "test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save":
            InlineTable(names, mixed_pairs({**conv1d, "modules_to_save": ["lin0"]},
                                           {**conv1d, "modules_to_save": ["lin0"]}, ONE_FEATURE_OPTIONS)),
        "test_mixed_adapter_batches_lora_wrong_adapter_name_raises":
            InlineTable("test_name, config", [
                pytest.param(f"surm {family} {mode}", SurmConfig(**surm_kwargs(
                    family, mode, target_modules=["lin0"], init_weights=False)), id=f"{family}-{mode}")
                for family, mode in family_modes()]),
    }


@dataclass(frozen=True)
class NotApplicable:
    """PEFT tests that do not apply to surm: ``Class::test`` names, an fnmatch pattern of their case ids, the
    reason, and the exception they end with (pytest's xfail ``raises``: any other error is a real failure)."""

    tests: tuple[str, ...]
    ids: str
    reason: str
    raises: type[BaseException]


#: Tests (of PEFT's TestPeftCustomModel, TestMultipleActiveAdapters, TestMixedAdapterBatches) that merge adapters.
MERGING_TESTS = (
    "TestPeftCustomModel::test_merge_layers", "TestPeftCustomModel::test_merge_layers_fp16",
    "TestPeftCustomModel::test_merge_layers_is_idempotent",
    "TestPeftCustomModel::test_merge_layers_is_deterministic_in_train_mode", "TestPeftCustomModel::test_safe_merge",
    "TestPeftCustomModel::test_forward_float16", "TestPeftCustomModel::test_forward_bfloat16",
    "TestPeftCustomModel::test_forward_float16_no_autocast", "TestPeftCustomModel::test_forward_bfloat16_no_autocast",
    "TestPeftCustomModel::test_disable_adapters_with_merging",
    "TestPeftCustomModel::test_delete_merged_adapter_raises_without_mutation",
    "TestPeftCustomModel::test_delete_merged_adapter_only_rejects_the_merged_one",
    "TestMultipleActiveAdapters::test_merge_layers_multi",
    "TestMultipleActiveAdapters::test_multiple_active_adapters_merge_and_unmerge",
    "TestMultipleActiveAdapters::test_sequential_merge_matches_batch_merge",
    "TestMultipleActiveAdapters::test_unmerge_after_sequential_merge_restores_base",
    "TestMixedAdapterBatches::test_mixed_adapter_batches_merged_raises",
)

#: Why a random-start row fails the tests that check the start first.
RANDOM_START = ("the row starts away from the base model on purpose (init_weights=False), but the test first checks "
                "that a fresh adapter leaves the output unchanged")
#: Why PEFT's mixed-batch error tests fail.
WORDING = ("PEFT matches its own error wording: surm raises the same ValueError at the same point with its own message "
           "(it names the counts, the unknown and the valid adapter names, or the merged adapters)")

#: Every expected failure, with its reason (mirrored in docs/peft_conformance.md). Run as strict xfails; a test
#: case may match one entry only.
NOT_APPLICABLE: tuple[NotApplicable, ...] = (
    NotApplicable(
        MERGING_TESTS, "*-adapter*",
        "adapter mode (h + act(S h) on a layer's output) is not a linear map of the input, so it has no weight to "
        "merge: surm refuses the merge with NotMergeableError before touching any layer",
        NotMergeableError,
    ),
    NotApplicable(("TestPeftCustomModel::test_disable_adapters",), "*-random", RANDOM_START, AssertionError),
    NotApplicable(("TestPeftCustomModel::test_disable_adapters_with_merging",), "*-delta-random", RANDOM_START,
                  AssertionError),
    NotApplicable(
        ("TestMixedAdapterBatches::test_mixed_adapter_batches_length_mismatch_raises",
         "TestMixedAdapterBatches::test_mixed_adapter_batches_training_mode_raises",
         "TestMixedAdapterBatches::test_mixed_adapter_batches_lora_wrong_adapter_name_raises"),
        "*", WORDING, AssertionError,
    ),
    NotApplicable(("TestMixedAdapterBatches::test_mixed_adapter_batches_merged_raises",), "*-delta", WORDING,
                  AssertionError),
)


class SurmConformance:
    """pytest plugin: surm rows in PEFT's tables, only the tests they drive, the not-applicable list as xfails."""

    def __init__(self) -> None:
        self.tables: Optional[dict[int, list[Any]]] = None
        self.inline = inline_tables()
        self.rewritten: set[Any] = set()
        self.inline_seen: set[str] = set()

    def _global_tables(self, module: Any) -> dict[int, list[Any]]:
        """surm rows by the identity of the PEFT table they replace (the module's list objects)."""
        if self.tables is None:
            self.tables = {
                id(module.TEST_CASES): custom_model_rows(),
                id(module.ALL_PEFT_CONFIG_CLASSES): config_classes(),
                id(module.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES): multiple_active_adapter_cases(),
                id(module.MIXED_ADAPTER_TEST_CASES): mixed_adapter_cases(),
            }
        return self.tables

    @pytest.hookimpl(tryfirst=True)
    def pytest_pycollect_makeitem(self, collector: pytest.Collector, name: str, obj: object) -> None:
        """Before pytest reads a test function's marks, swap PEFT's rows for surm's in its parametrize mark."""
        marks = getattr(obj, "pytestmark", None)
        module = getattr(collector, "module", None)
        if not callable(obj) or not isinstance(marks, list) or Path(getattr(module, "__file__", "")).name != TEST_FILE:
            return
        tables = self._global_tables(module)
        new_marks = []
        for mark in marks:
            if mark.name == "parametrize" and len(mark.args) == 2:
                argnames, values = mark.args
                if id(values) in tables:
                    mark = pytest.mark.parametrize(argnames, tables[id(values)]).mark
                    self.rewritten.add(obj)
                elif name in self.inline and " ".join(str(argnames).split()) == self.inline[name].argnames:
                    mark = pytest.mark.parametrize(argnames, self.inline[name].rows).mark
                    self.rewritten.add(obj)
                    self.inline_seen.add(name)
            new_marks.append(mark)
        obj.pytestmark = new_marks

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """Keep the tests surm's rows drive, mark the not-applicable ones, refuse entries that match nothing."""
        kept = [item for item in items if getattr(item, "function", None) in self.rewritten]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
        missing = sorted(set(self.inline) - self.inline_seen)
        unused, twice, marked = [], [], set()
        for entry in NOT_APPLICABLE:
            matched = [item for item in kept if item_test(item) in entry.tests
                       and fnmatch.fnmatchcase(item_case(item), entry.ids)]
            for item in matched:
                item.add_marker(pytest.mark.xfail(reason=entry.reason, strict=True, raises=entry.raises))
            twice += sorted(item.nodeid for item in matched if item in marked)
            marked.update(matched)
            unused += sorted(set(entry.tests) - {item_test(item) for item in matched})
        if missing or unused or twice:
            raise pytest.UsageError(
                f"PEFT's {TEST_FILE} no longer matches this script: inline tables not found {missing}, "
                f"NOT_APPLICABLE tests with no matching case {unused}, cases matched by two entries {twice}"
            )

    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        """Seed torch before every test: some of PEFT's tests draw random adapters unseeded, and a run (or one test
        picked with -k) must not depend on what ran before it."""
        torch.manual_seed(0)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        """One line: the counts of surm cases by outcome."""
        counts = {key: len(terminalreporter.stats.get(key, []))
                  for key in ("passed", "xfailed", "skipped", "failed", "xpassed", "error")}
        terminalreporter.write_line(
            f"surm conformance, PEFT {peft_version()}: " + ", ".join(f"{n} {key}" for key, n in counts.items())
        )


def item_test(item: pytest.Item) -> str:
    """``Class::test_function`` of a collected test."""
    cls = getattr(item, "cls", None)
    name = getattr(item, "originalname", item.name)
    return f"{cls.__name__}::{name}" if cls is not None else name


def item_case(item: pytest.Item) -> str:
    """The parameter id of a collected test (``lowrank-adapter``), empty if it has none."""
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else ""


def peft_version() -> str:
    """The installed PEFT version."""
    return importlib.metadata.version("peft")


def fetch_tests(version: str, cache: Path) -> Path:
    """The folder holding PEFT ``version``'s tests as package :data:`PACKAGE`, downloaded and unpacked if needed.

    Raises:
        RegistryUnreachable: if pip cannot reach the package index.
        RuntimeError: if the download fails otherwise, or the sdist lacks the test files.
    """
    target = cache / version
    package = target / PACKAGE
    if (target / "pytest.ini").is_file() and all((package / name).is_file() for name in (TEST_FILE, *HELPERS)):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps",
                   "--disable-pip-version-check", "--dest", scratch]
        done = subprocess.run(command, capture_output=True, text=True)
        output = done.stdout + done.stderr
        if done.returncode != 0:
            error = RegistryUnreachable if NETWORK_ERRORS.search(output) else RuntimeError
            raise error(f"{' '.join(command)} failed (exit {done.returncode}):\n{output[-3000:]}")
        archives = sorted(Path(scratch).glob("peft-*.tar.gz"))
        if len(archives) != 1:
            raise RuntimeError(f"expected one peft sdist from pip download, got {[p.name for p in archives]}")
        stage = Path(scratch) / version  # filled, then moved into place whole: a cache is never half unpacked
        unpacked = stage / PACKAGE
        unpacked.mkdir(parents=True)
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/tests/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            archive.extractall(unpacked, members=members, filter="data")
        absent = [name for name in (TEST_FILE, *HELPERS) if not (unpacked / name).is_file()]
        if absent:
            raise RuntimeError(f"the sdist {archives[0].name} has no tests/{absent}")
        (unpacked / "__init__.py").touch()  # the tests import their helpers relatively
        (stage / "pytest.ini").write_text("[pytest]\n")  # not PEFT's own settings: they want pytest-cov
        shutil.rmtree(target, ignore_errors=True)
        stage.rename(target)
    return target


def install_placeholders() -> list[str]:
    """Put a placeholder module in ``sys.modules`` for each of :data:`PLACEHOLDERS` that is not installed.

    A placeholder's class is no base of anything (``isinstance`` checks are False, as they are for every model
    here); its function raises. Returns the names replaced.
    """
    replaced = []
    for name, attributes in PLACEHOLDERS.items():
        if importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name, f"placeholder for {name}, which is not installed (scripts/peft_conformance.py)")

        def unavailable(*args: Any, _name: str = name, **kwargs: Any) -> None:
            raise RuntimeError(f"{_name} is not installed; this PEFT test does not run in surm's conformance check")

        for attribute in attributes:
            setattr(module, attribute, type(attribute, (), {}) if attribute[0].isupper() else unavailable)
        sys.modules[name] = module
        replaced.append(name)
    return replaced


def main(argv: Optional[list[str]] = None) -> int:
    """Fetch the tests of the installed PEFT version and run them on surm; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="folder for the unpacked PEFT tests")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: extra pytest arguments")
    args = parser.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    version = peft_version()
    try:
        target = fetch_tests(version, args.cache.resolve())
    except RegistryUnreachable as error:
        print(f"package index unreachable, PEFT {version}'s tests not fetched:\n{error}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RuntimeError as error:
        print(f"PEFT {version}'s tests not fetched: {error}", file=sys.stderr)
        return 1
    replaced = install_placeholders()
    if replaced:
        print(f"not installed, placeholders for PEFT's helpers: {', '.join(replaced)}")
    start = time.monotonic()
    status = pytest.main(["-c", str(target / "pytest.ini"), "--rootdir", str(target), "-p", "no:cacheprovider",
                          "-q", "--tb=line", "-rfEXs", "-W", "ignore::pytest.PytestAssertRewriteWarning",
                          str(target / PACKAGE / TEST_FILE), *extra], plugins=[SurmConformance()])
    print(f"{time.monotonic() - start:.0f} s")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
