"""Every ``surm`` command written in the README and docs (the ones behind the results tables included) still parses
into valid settings, methods and options: a documented command that no longer runs is a broken result."""

from __future__ import annotations

import re
import shlex

import pytest

from surm.cli import build_parser, method_choice, settings_from_args
from surm.commands.compare import parse_methods

from .scripts import ROOT, load_script

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
#: Shell variables the documents define before using them.
VARIABLE = re.compile(r"^([A-Z]+)=(?:\"(.*)\"|(\S+))$")
COMMAND = re.compile(r"(^|\s)surm\s+(finetune|compare|search|bench|demo)\b")


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every ``surm ...`` line in the code blocks of the documents (continuations joined, shell
    variables expanded, trailing comments dropped; templates with ``...`` or ``[--flag N]`` left out)."""
    found = []
    for document in DOCUMENTS:
        variables: dict[str, str] = {}
        in_code, shell, pending = False, False, ""
        for number, line in enumerate(document.read_text().splitlines(), 1):
            if line.startswith("```"):
                in_code, shell = not in_code, line.strip("`").strip() in ("", "bash", "sh", "console")
                continue
            if not (in_code and shell):
                continue
            line = pending + line.split(" #")[0].strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            match = VARIABLE.match(line)
            if match:
                variables[match.group(1)] = match.group(2) or match.group(3)
                continue
            if not COMMAND.search(line):
                continue
            words = shlex.split(re.sub(r"\$([A-Z]+)", lambda m: variables.get(m.group(1), m.group(0)), line))
            if "surm" in words and "..." not in words and not any(w.startswith("[") for w in words):  # not templates
                start = words.index("surm") + 1
                if start < len(words) and words[start] in ("finetune", "compare", "search", "bench", "demo"):
                    found.append((f"{document.relative_to(ROOT)}:{number}", words[start:]))
    return found


COMMANDS = documented_commands()


def test_the_documents_hold_commands_of_every_kind():
    assert {argv[0] for _, argv in COMMANDS} >= {"finetune", "compare", "search", "bench"}


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_documented_command_parses_into_valid_settings(where, argv):
    args = build_parser().parse_args(argv)
    if args.command in ("finetune", "compare", "search"):
        settings_from_args(args)
    if args.command == "compare" and args.methods:
        parse_methods(args.methods)
    if args.command == "finetune" and args.config is None:
        method_choice(args)


def test_the_learning_rate_sweep_methods_parse():
    """benchmarks/lr_sweep.py (behind docs/sweep.md) passes its method list to surm compare."""
    sweep = load_script("benchmarks/lr_sweep.py")
    assert len(parse_methods(sweep.DEFAULT_METHODS)) == len(sweep.DEFAULT_METHODS.split(","))
