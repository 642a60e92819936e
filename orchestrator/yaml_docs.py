"""YAML documents validated by pydantic (run configs, access policies): one place that turns
YAML and validation problems into ``ConfigError`` messages naming the line or the key path."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.errors import ConfigError


def load_mapping(text: str, source: str, what: str) -> dict[str, Any]:
    """``text`` as a YAML mapping (empty → ``{}``); ``what`` names the expected keys."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source} must be a mapping of keys ({what})")
    return doc


def validation_message(exc: ValidationError, heading: str) -> str:
    """One line per problem: ``key.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and err["type"] != "missing":
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  {path}: {msg}")
    return f"{heading}:\n" + "\n".join(lines)
