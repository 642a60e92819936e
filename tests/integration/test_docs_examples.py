"""Every example of README.md and docs/ runs, page by page, as a reader types it (the harness is
tests/support/doc_examples.py), and getting-started.md alone takes a reader from a COCO folder to a
finished training run.

Cost: the other pages start from one small store made once per session (24 demo images, the
state getting-started.md leaves), copied per page, so no page ingests from scratch; a page that
continues another (FOLLOWS) runs after it in the same folder instead of repeating its training.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import orchestrator
from tests.support.doc_examples import FOLLOWS, FRESH_PAGES, PAGES, REPO, ShellState, fences, run_page, shell_env

pytestmark = pytest.mark.usefixtures("ray_cluster")

#: What a reader's checkout holds that the pages name (configs/, jobs/, ...): linked into the folder
#: each page runs in, which stands for the root of the checkout.
CHECKOUT = ["configs", "jobs", "benchmarks", "cluster.yaml", "k8s", "pyproject.toml"]


def _checkout(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in CHECKOUT:
        (folder / name).symlink_to(REPO / name)
    return folder


@pytest.fixture(scope="session")
def after_getting_started(tmp_path_factory, ray_cluster) -> Path:
    """What getting-started.md leaves: my-coco/ (24 demo images, seed 0) and store/ holding
    'street' version 0. Made once, through the library (the page's own test makes it by hand)."""
    from orchestrator.dev.demo import make_demo_data

    folder = tmp_path_factory.mktemp("docs-template")
    make_demo_data(folder / "my-coco", 24, 0)
    orchestrator.connect(f"file://{folder / 'store'}").ingest(
        "street", coco=folder / "my-coco" / "annotations.json", images=folder / "my-coco" / "images",
        message="first import")
    return folder


def _runnable(page: Path) -> bool:
    return any(f.is_example and f.not_run_reason is None for f in fences(page))


LATER_PAGES = [p for p in PAGES if str(p.relative_to(REPO)) not in FRESH_PAGES | set(FOLLOWS) and _runnable(p)]


@pytest.mark.parametrize("page", LATER_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_pages_examples_run(page: Path, after_getting_started: Path, tmp_path: Path):
    work = tmp_path / "checkout"
    shutil.copytree(after_getting_started, work)
    _checkout(work)
    state = ShellState(work, shell_env({"ORCHESTRATOR_STORE": f"file://{work / 'store'}"}))
    ran = run_page(page, state)
    assert ran, f"{page}: no example ran"
    for follower, leader in FOLLOWS.items():
        if leader == str(page.relative_to(REPO)):
            assert run_page(REPO / follower, state), f"{follower}: no example ran"


def test_getting_started_alone_goes_from_a_coco_folder_to_a_finished_run(tmp_path: Path):
    state = ShellState(_checkout(tmp_path / "checkout"), shell_env())
    ran = run_page(REPO / "docs" / "getting-started.md", state)
    assert [f.language for f in ran].count("bash") >= 4
    # The page's own terminal: the store it exported holds one finished run of the page's config.
    store = state.env["ORCHESTRATOR_STORE"]
    r = subprocess.run(["orchestrator", "runs", "--json"], env=state.env, cwd=state.cwd, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = json.loads(r.stdout)
    assert [run["status"] for run in runs] == ["finished"], runs
    assert runs[0]["dataset"] == "street" and len(runs[0]["metrics"]) == 1, runs[0]
    assert store == f"file://{tmp_path / 'checkout' / 'store'}"
