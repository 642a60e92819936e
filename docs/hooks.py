"""MkDocs hooks: the reference pages are generated from the code at build time.

A page holds a marker such as ``<!-- generated: cli -->`` and ``on_page_markdown`` replaces it with
Markdown made from the argparse parser (``orchestrator.cli._parser()``), the pydantic run config
(``orchestrator.train.config.RunSettings``) or the error classes (``orchestrator.errors``). Why at
build time: a reference written by hand drifts the first time someone adds an option; this one
cannot, and ``mkdocs build --strict`` in ``.ci/run`` fails on a marker nobody knows.

The functions are plain (no MkDocs import), so ``tests/test_docs_site.py`` calls them directly.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
from typing import Any

MARKER = re.compile(r"<!--\s*generated:\s*([\w-]+)\s*-->")


def on_page_markdown(markdown: str, page: Any = None, config: Any = None, files: Any = None) -> str:
    """Replace every ``<!-- generated: NAME -->`` marker; an unknown NAME stops the build."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            where = getattr(getattr(page, "file", None), "src_path", "a page")
            raise ValueError(f"{where}: unknown generated section {name!r} (known: {', '.join(sorted(GENERATORS))})")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


# --- CLI reference -------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """(name, parser, one-line help) of a parser's subcommands, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            name = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.nargs != 0:
                name += f" `{action.metavar or action.dest.upper()}`"
        else:
            name = f"`{action.metavar or action.dest}`"
        text = action.help or ""
        if action.choices and not isinstance(action.choices, dict):
            text += f" (one of: {', '.join(f'`{c}`' for c in action.choices)})"
        if action.required and action.option_strings:
            text = "**required.** " + text
        rows.append(f"| {_cell(name)} | {_cell(text)} |")
    return rows


def _command_section(path: list[str], parser: argparse.ArgumentParser, summary: str, level: int) -> list[str]:
    title = " ".join(path)
    out = [f"{'#' * level} `{title}`", ""]
    if summary:
        out += [summary[0].upper() + summary[1:] + ".", ""]
    usage = parser.format_usage().removeprefix("usage: ").strip()
    out += ["```text", usage, "```", ""]
    rows = _argument_rows(parser)
    if rows:
        out += ["| argument | meaning |", "|---|---|", *rows, ""]
    for name, sub, help_text in _subcommands(parser):
        out += _command_section([*path, name], sub, help_text, level + 1)
    return out


def cli_reference() -> str:
    """Every command and subcommand of ``orchestrator``, its usage and its arguments, as Markdown."""
    saved = os.environ.pop("ORCHESTRATOR_STORE", None)  # --store's default is read from it
    try:
        from orchestrator.cli import _parser

        parser = _parser()
    finally:
        if saved is not None:
            os.environ["ORCHESTRATOR_STORE"] = saved
    parser.prog = "orchestrator"
    out = ["Global options (before the command):", "", "| argument | meaning |", "|---|---|",
           *_argument_rows(parser), "", "| command | what it does |", "|---|---|"]
    commands = _subcommands(parser)
    out += [f"| [`{name}`](#orchestrator-{name}) | {_cell(help_text)} |" for name, _, help_text in commands]
    out.append("")
    for name, sub, help_text in commands:
        out += _command_section(["orchestrator", name], sub, help_text, 2)
    return "\n".join(out)


# --- Run configuration reference -----------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation)
    return re.sub(r"typing\.|<class '(\w+)'>", lambda m: m.group(1) or "", text).replace("NoneType", "null")


def _constraints(field: Any) -> str:
    names = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "multiple of"}
    found = []
    for meta in field.metadata:
        for attr, sign in names.items():
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        return "{}" if value == {} else "(section)"
    return "null" if field.default is None else f"`{field.default!r}`".replace("'", "")


def config_reference() -> str:
    """Every key of a run config (``orchestrator.train.config.RunSettings``): type, default,
    constraints and meaning, section by section, as Markdown."""
    from pydantic import BaseModel

    from orchestrator.train.config import RunSettings

    out = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    sections: list[tuple[str, type[BaseModel]]] = []
    for name, field in RunSettings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            sections.append((name, annotation))
            continue
        out.append(f"| `{name}` | `{_cell(_type_name(annotation))}` | {_default(field)} | "
                   f"{_cell(_constraints(field))} | {_cell(field.description or TOP_LEVEL.get(name, ''))} |")
    for section, model in sections:
        doc = inspect.getdoc(model) or ""
        out += ["", f"### `{section}`", ""]
        if doc and model.__doc__:
            out += [" ".join(doc.split()), ""]
        out += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for name, field in model.model_fields.items():
            out.append(f"| `{section}.{name}` | `{_cell(_type_name(field.annotation))}` | {_default(field)} | "
                       f"{_cell(_constraints(field))} | {_cell(field.description or '')} |")
    return "\n".join(out)


#: The top-level keys have no pydantic description (they are plain strings); their meaning here.
TOP_LEVEL = {
    "store": "the store URI (`file:///abs/path`, `s3://bucket/prefix`) or a path relative to the config file; "
             "`--set store=`, `--store` and `$ORCHESTRATOR_STORE` take precedence, in that order",
    "dataset": "the dataset to train on",
    "version": "a version number or `latest`, resolved when the run starts and recorded in its lineage",
    "query": "a slice of the dataset, e.g. `labels.car >= 1` (see the slice language)",
    "framework": "`torch` or `tensorflow`",
}


# --- Error reference ------------------------------------------------------------------------------


def errors_reference() -> str:
    """Every public error class of ``orchestrator.errors``: its bases, the CLI exit code it gives
    (as ``orchestrator.cli.run`` maps it) and its docstring."""
    import orchestrator.errors as errors
    from orchestrator.cli import EXIT_DENIED, EXIT_SYSTEM, EXIT_USER

    out = ["| error | is a | exit code | when |", "|---|---|---|---|"]
    for name in errors.__all__:
        cls = getattr(errors, name)
        bases = ", ".join(f"`{b.__name__}`" for b in cls.__bases__ if b is not object)
        code = EXIT_DENIED if cls is errors.AccessDenied else EXIT_USER if cls.user_fault else EXIT_SYSTEM
        doc = " ".join((inspect.getdoc(cls) or "").split())
        out.append(f"| `{name}` | {bases} | {code} | {_cell(doc)} |")
    return "\n".join(out)


GENERATORS = {"cli": cli_reference, "config": config_reference, "errors": errors_reference}
