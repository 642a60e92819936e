"""The CLI's shape, read from its parser (nothing runs): every command takes ``--json`` and every
argument has help text, so ``orchestrator COMMAND -h`` explains each and scripts can parse each."""

from __future__ import annotations

import argparse

from orchestrator.cli import _parser


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from leaf_commands(sub, (*prefix, name))
                else:
                    yield " ".join((*prefix, name)), sub


def test_every_command_has_json_and_every_argument_help() -> None:
    commands = dict(leaf_commands(_parser()))
    assert {"ingest", "export", "diff", "stats", "show", "store serve", "policy check", "demo-data"} <= set(commands)
    no_json = [name for name, p in commands.items() if not any("--json" in a.option_strings for a in p._actions)]
    assert no_json == []
    no_help = [f"{name}: {a.dest}" for name, p in commands.items() for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert no_help == []


def test_dataset_commands_take_the_name_positionally() -> None:
    commands = dict(leaf_commands(_parser()))
    for name in ("versions", "info", "diff", "stats", "show", "export", "slice", "verify", "optimize", "vacuum",
                 "delete"):
        positional = [a.dest for a in commands[name]._actions if not a.option_strings]
        assert positional[0] == "name", name
