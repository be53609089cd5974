"""Every command's --help: what the command does first, a usage example, and a word on every option.

All in this process: each console-script function (pyproject.toml) runs with
`sys.argv` set to `--help`; the argparse tools' parsers are caught as they
parse, so that every option, subcommand included, is checked for a help string.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
HYDRA_APPS = ("pretrain", "pretrain-launch")
ARGPARSE_TOOLS = sorted(set(SCRIPTS) - set(HYDRA_APPS))
SUBCOMMANDS = {"pretrain-data": ("tokenizer", "preprocess", "check")}


def run_help(prog: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, list[argparse.ArgumentParser]]:
    """Runs `prog args --help` in this process: (exit status, stdout, the parsers that parsed)."""
    parsers = []
    parse_known_args = argparse.ArgumentParser.parse_known_args

    def catching(self, *a, **kw):
        parsers.append(self)
        return parse_known_args(self, *a, **kw)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catching)
    monkeypatch.setattr(sys, "argv", [prog, *args, "--help"])
    module, function = SCRIPTS[prog].split(":")
    status = 0
    try:
        getattr(importlib.import_module(module), function)()
    except SystemExit as exit_:
        status = exit_.code or 0
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
    out = capsys.readouterr()
    assert out.err == "", out.err
    return status, out.out, parsers


def description_after_usage(text: str) -> str:
    """argparse's help: the usage block, a blank line, then the description."""
    paragraphs = text.split("\n\n")
    assert paragraphs[0].startswith("usage: "), text[:300]
    return paragraphs[1].strip()


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The options and positionals of a parser (and of its subcommands) that have no help."""
    missing = []
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{parser.prog}: {name}")
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{parser.prog} {choice.dest}" for choice in action._choices_actions if not choice.help]
            for sub in action.choices.values():
                missing += undocumented(sub)
    return missing


@pytest.mark.parametrize("prog", ARGPARSE_TOOLS)
def test_argparse_tool_help(prog, monkeypatch, capsys):
    for sub in (None, *SUBCOMMANDS.get(prog, ())):
        status, text, parsers = run_help(prog, [sub] if sub else [], monkeypatch, capsys)
        command = f"{prog} {sub}" if sub else prog
        assert status == 0, command
        description = description_after_usage(text)
        assert len(description.split()) >= 5 and not description.startswith(("options:", "positional")), text
        examples = text.split("\nexamples:\n")
        assert len(examples) == 2, f"{command}: no examples section\n{text}"
        assert any(line.strip().startswith(f"{command} ") for line in examples[1].splitlines()), text
        assert undocumented(parsers[0]) == [], text


def test_hydra_apps_say_what_they_do(monkeypatch, capsys):
    status, text, _ = run_help("pretrain", [], monkeypatch, capsys)
    assert status == 0
    assert text.startswith("pretrain: pretrain a Llama-style language model")
    assert "\nUsage: pretrain " in text and "\nExamples:\n  pretrain " in text
    # The config groups and their options.
    assert "model: deepseek_v3, gpt2_124m, llama_1b, llama_70b, llama_8b, moe_tiny, olmoe_1b_7b, " \
           "qwen3_30b_a3b, tiny" in text
    assert "experiment: long_context" in text
    assert "Chosen: model=tiny " in text
    for key in ("trainer.run_dir", "trainer.resume", "trainer.verbose", "data.sources", "parallel.tensor",
                "parallel.zero_stage", "optim.lr", "logger="):
        assert key in text, key
    assert "--cfg,-c : " in text  # Hydra's own flags
    assert "\nmodel:\n  name: tiny" not in text  # not the whole config: --cfg job prints that

    status, text, _ = run_help("pretrain-launch", ["launcher=slurm"], monkeypatch, capsys)
    assert status == 0
    assert text.startswith("pretrain-launch: start a pretrain run")
    assert "\nUsage: pretrain-launch " in text and "\nExamples:\n  pretrain-launch " in text
    assert "--dry-run" in text and "--multirun" in text and "trainer.verbose" in text
    assert "launcher: deepspeed, local, slurm, torchrun" in text and "launcher=slurm" in text
    from launch.config import LAUNCHERS

    for kind, cls in LAUNCHERS.items():  # every launcher and every key of each
        assert f"\n{kind}" in text, kind
        for field in dataclasses.fields(cls):
            if field.name not in ("kind", "dry_run"):
                assert f"{field.name}=" in text or f"{field.name}," in text, f"launcher={kind}: {field.name}"
