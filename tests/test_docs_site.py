"""The documentation site without running its examples (tests/integration/test_docs_examples.py
runs them): the README keeps its two commands first, every fence is an example the harness runs, a
marked one with its reason, or data; the generated references cover the whole parser, config and
error hierarchy; a marker nobody knows stops the build."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from tests.support.doc_examples import PAGES, REPO, SYBIL, all_fences, not_run


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_opens_with_the_two_commands_and_ci_runs_the_second_verbatim():
    lines = (REPO / "README.md").read_text().splitlines()
    assert lines[0] == "# orchestrator" and lines[2].startswith("```bash")
    first, second = lines[3], lines[4]
    assert first.startswith("python3 -m venv .venv && ") and first.endswith(".venv/bin/python jobs/quickstart.py")
    assert second.endswith(".venv/bin/python -m pytest") and lines[5] == "```"
    assert (REPO / ".ci" / "run").read_text().rstrip("\n").splitlines()[-1] == second


def test_every_page_parses_and_every_fence_is_run_marked_or_data():
    for page in PAGES:
        SYBIL.parse(page)  # raises on a fence language the harness neither runs nor treats as data
    examples = [f for f in all_fences() if f.is_example]
    marked = not_run()
    assert len(examples) >= 25, len(examples)
    # Few, and each says why where the reader sees it (the fence's title).
    assert len(marked) <= 12, [f"{f.page}:{f.line}" for f in marked]
    for fence in marked:
        assert len(fence.not_run_reason) >= 20, f"{fence.page}:{fence.line}: say why it is not run"
    print(f"\ndoc examples: {len(examples) - len(marked)} run, {len(marked)} marked not run:")
    for fence in marked:
        print(f"  {fence.page}:{fence.line}: {fence.not_run_reason}")


def test_a_fence_in_an_unknown_language_or_a_misspelt_mark_fails_the_harness(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text("# page\n\n```ruby\nputs 1\n```\n")
    with pytest.raises(ValueError, match="```ruby fence"):
        SYBIL.parse(page)
    page.write_text('# page\n\n```bash title="not run here: a reason"\nrm -rf /\n```\n')
    with pytest.raises(ValueError, match='title="not run: REASON"'):
        SYBIL.parse(page)


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("orchestrator",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_the_cli_reference_has_every_command_and_option():
    from orchestrator.cli import _parser

    text = _hooks().cli_reference()
    for path, parser in _commands(_parser()):
        if len(path) > 1:
            assert f"`{' '.join(path)}`" in text, path
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue  # -h on every command: said once on the page, not in every table
            for option in action.option_strings:
                assert f"`{option}`" in text, (path, option)


def test_the_config_reference_has_every_key_with_its_default_and_range():
    from pydantic import BaseModel

    from orchestrator.train.config import RunSettings

    text = _hooks().config_reference()
    for name, field in RunSettings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            for sub in field.annotation.model_fields:
                assert f"`{name}.{sub}`" in text, (name, sub)
        else:
            assert f"| `{name}` |" in text, name
    assert re.search(r"`train.epochs` \| `int` \| `3` \| >= 1 \|", text), text
    assert re.search(r"`model.image_size` \| `int` \| `128` \| >= 32, <= 1024, multiple of 8 \|", text)


def test_the_errors_reference_has_every_public_error_and_its_exit_code():
    import orchestrator.errors as errors

    text = _hooks().errors_reference()
    for name in errors.__all__:
        assert f"| `{name}` |" in text
    assert "| `AccessDenied` | `OrchestratorError`, `PermissionError` | 4 |" in text
    assert "| `StoreUnavailable` | `StoreError` | 1 |" in text


def test_a_marker_nobody_knows_stops_the_build():
    hooks = _hooks()
    assert "`orchestrator ingest`" in hooks.on_page_markdown("<!-- generated: cli -->")
    with pytest.raises(ValueError, match="unknown generated section 'clli'"):
        hooks.on_page_markdown("x\n<!-- generated: clli -->\n")


def test_the_readmes_links_and_images_lead_to_files_that_exist():
    """mkdocs checks the site's links; the README is not part of the site, so this checks its own."""
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert len(local) >= 15 and "docs/images/contact_sheet.png" in local
    for target in local:
        assert (REPO / target).is_file(), target


def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path):
    """What `mkdocs build --strict` in .ci/run relies on: mkdocs.yml turns a link to a page that
    does not exist into a failure (the site is copied, one link broken, and built)."""
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "concepts.md"
    page.write_text(page.read_text() + "\nSee [nowhere](guides/no-such-page.md).\n")
    mkdocs = Path(sys.executable).parent / "mkdocs"
    assert mkdocs.exists(), "mkdocs is missing: pip install -e '.[dev]'"
    r = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "no-such-page.md" in r.stderr, r.stderr[-3000:]
