"""The documentation's examples as tests: every ```python and ```bash fence of README.md and docs/
runs, page by page, as a reader would type them (Sybil parses the pages; this module evaluates).

Why one shell session per page: a reader types a page's commands into one terminal, so a ```bash
fence here runs in real bash with the working folder and exported variables the previous fences
left (``cd`` and ``export`` carry over), and a ```python fence sees the same folder and variables.
Python fences of a page share one namespace, as in one notebook.

A fence that must not run says so where the reader sees it, in its Material title:
```` ```bash title="not run: needs an AWS account" ````. Nothing else skips an example: a fence in a
language this module does not know is an error, so a new kind of example cannot slip through
untested. ``text``, ``yaml``, ``json`` and plain fences are output or data, not examples; a
``yaml`` fence titled ``run config…`` or ``policy…`` is validated as one (it cannot run, but it
can be wrong).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sybil import Document, Example, Region, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer

REPO = Path(__file__).resolve().parents[2]
#: Every page whose examples run: the README and the whole docs/ folder.
PAGES = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
#: Pages that start from an empty folder (they make their own data); every other page starts
#: where getting-started.md ends (see ``tests/integration/test_docs_examples.py``).
FRESH_PAGES = {"docs/getting-started.md"}
#: A page that continues where another ends (resume.md resumes the run train.md trained): run
#: right after it, in the same folder, as one test; not on its own.
FOLLOWS = {"docs/guides/resume.md": "docs/guides/train.md"}
RUN = {"python", "bash"}
DATA = {"", "text", "yaml", "json", "console"}
NOT_RUN = re.compile(r'title="not run: (?P<reason>[^"]+)"')
INFO = re.compile(r"(?P<language>[\w-]*)(?P<attributes>[^\n]*)$\n", re.MULTILINE)
SHELL_TIMEOUT_S = 600


@dataclass
class Fence:
    page: str  # relative to the repository
    line: int
    language: str
    attributes: str
    source: str

    @property
    def not_run_reason(self) -> str | None:
        found = NOT_RUN.search(self.attributes)
        return found.group("reason") if found else None

    @property
    def is_example(self) -> bool:
        return self.language in RUN


def _fence_regions(document: Document):
    for region in RawFencedCodeBlockLexer(info_pattern=INFO)(document):
        lexemes = region.lexemes
        line = document.text.count("\n", 0, region.start) + 1
        path = Path(document.path).resolve()
        page = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        yield Fence(page, line, lexemes["language"], lexemes["attributes"].strip(), str(lexemes["source"])), region


def fences(page: Path) -> list[Fence]:
    """Every fenced block of a page, examples or not, with its line (1-based)."""
    return [fence for fence, _ in _fence_regions(Document(page.read_text(), str(page)))]


@dataclass
class ShellState:
    """The reader's terminal: working folder and environment, carried from fence to fence."""

    cwd: Path
    env: dict[str, str]
    log: list[str] = field(default_factory=list)


def run_bash(state: ShellState, source: str, where: str) -> None:
    """Run one fence in bash (``set -euo pipefail``) and keep its folder and exports."""
    with tempfile.TemporaryDirectory(prefix="doc-shell-") as tmp:
        saved = Path(tmp)
        script = (f"set -euo pipefail\n{source}\n"
                  f"pwd > {shlex.quote(str(saved / 'cwd'))}\n"
                  f"env -0 > {shlex.quote(str(saved / 'env'))}\n")
        try:
            r = subprocess.run(["bash", "-c", script], cwd=state.cwd, env=state.env, capture_output=True, text=True,
                               timeout=SHELL_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{where}: still running after {SHELL_TIMEOUT_S} s:\n{source}") from exc
        state.log.append(f"$ {where}\n{r.stdout}{r.stderr}")
        if r.returncode != 0:
            raise AssertionError(f"{where}: exit code {r.returncode}\n--- fence ---\n{source}\n--- stdout ---\n"
                                 f"{r.stdout[-4000:]}\n--- stderr ---\n{r.stderr[-6000:]}")
        state.cwd = Path((saved / "cwd").read_text().strip())
        state.env = dict(item.split("=", 1) for item in (saved / "env").read_text().split("\0") if "=" in item)


def _evaluate(example: Example) -> None:
    fence: Fence = example.region.lexemes["fence"]
    state: ShellState = example.namespace["__shell__"]
    where = f"{fence.page}:{fence.line}"
    if fence.not_run_reason is not None:
        return  # counted and reported by the caller; see not_run()
    if fence.language == "bash":
        run_bash(state, fence.source, where)
        return
    if fence.language == "yaml" and 'title="policy' in fence.attributes:
        from orchestrator.access.policy import parse_policy

        parse_policy(fence.source, where)
        return
    if fence.language == "yaml":
        _check_run_config(fence, state)
        return
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    os.environ.clear()
    os.environ.update(state.env)
    os.chdir(state.cwd)
    try:
        PythonEvaluator()(example)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _check_run_config(fence: Fence, state: ShellState) -> None:
    import yaml

    from orchestrator.train.config import load_config

    doc = yaml.safe_load(fence.source)
    doc.setdefault("store", state.env.get("ORCHESTRATOR_STORE", "file:///tmp/store"))
    load_config(doc=doc)


def _parser(document: Document):
    for fence, region in _fence_regions(document):
        if fence.language not in RUN | DATA:
            raise ValueError(f"{fence.page}:{fence.line}: a ```{fence.language} fence: this harness runs "
                             f"{sorted(RUN)} and treats {sorted(DATA - {''})} as data; use one of those")
        if "not run" in fence.attributes and fence.not_run_reason is None:
            raise ValueError(f'{fence.page}:{fence.line}: write the mark as title="not run: REASON"')
        checked = fence.language == "yaml" and ('title="run config' in fence.attributes
                                                or 'title="policy' in fence.attributes)
        if fence.is_example or checked:
            yield Region(region.start, region.end, parsed=region.lexemes["source"], evaluator=_evaluate,
                         lexemes={"fence": fence})


SYBIL = Sybil(parsers=[_parser])


def run_page(page: Path, state: ShellState) -> list[Fence]:
    """Evaluate a page's examples in order in one shell session; returns the fences run."""
    document = SYBIL.parse(page)
    document.namespace["__shell__"] = state
    ran = []
    for example in document:
        example.evaluate()
        fence = example.region.lexemes["fence"]
        if fence.not_run_reason is None:
            ran.append(fence)
    return ran


def shell_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A reader's environment after ``source .venv/bin/activate``: this interpreter's scripts
    first on PATH, matplotlib without a display."""
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_STORE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env["MPLBACKEND"] = "Agg"
    env.update(extra or {})
    return env


def all_fences() -> list[Fence]:
    return [f for page in PAGES for f in fences(page)]


def not_run() -> list[Fence]:
    """The examples marked ``not run: REASON``, with their reasons."""
    return [f for f in all_fences() if f.is_example and f.not_run_reason is not None]
