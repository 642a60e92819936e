"""How fast `orchestrator browse` shows the first page of a 100k-item dataset, in headless Chromium.

    python benchmarks/browse.py [--items 100000] [--rounds 5] [--keep DIR]

Data: the 60-image demo set is ingested into a ``file://`` store (real packed media), then its
manifest rows are tiled, under new item ids, up to ``--items`` rows appended to the same dataset
(``deltalake.write_deltalake``, chunks of 10,000): every row points at real bytes, and the first
page (48 items) holds 48 distinct images, as a real dataset's would.

Each round starts a fresh app (no dataset opened, no thumbnail made) on a uvicorn server in this
process and opens the dataset view in Chromium (Debian's ``chromium`` + ``chromium-driver``), timing
from navigation until the page has drawn its grid and all 48 thumbnails have loaded:

* ``first``: the fresh app: the version is opened and indexed (one scan of ``item_id`` over 100k
  rows), the page's rows read, 48 thumbnails made (their media from the node blob cache, which
  the first round fills: "after the store is warm");
* ``again``: the same page reloaded (the index and the thumbnails are kept by the app);
* ``query``: a slice typed into the page (``labels.car >= 3``: a scan of the ``labels`` column).

It prints the medians and ranges over the rounds, and the API's share (the ``items`` request
alone, timed with httpx against the same server). Nothing here is asserted; tests check
behaviour, this script measures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orchestrator  # noqa: E402
from orchestrator.browse.app import create_app  # noqa: E402
from orchestrator.browse.serve import free_port  # noqa: E402
from orchestrator.scan import read_table  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHUNK = 10_000


def build(root: Path, items: int) -> str:
    from deltalake import write_deltalake

    from orchestrator.dev.demo import make_demo_data

    uri = f"file://{root / 'store'}"
    store = orchestrator.connect(uri)
    if (root / "store").is_dir() and "street" in store.datasets() and store.versions("street")[-1].items >= items:
        return uri
    make_demo_data(root / "demo", 60, seed=0)
    store.ingest("street", coco=root / "demo" / "annotations.json", images=root / "demo" / "images")
    base = read_table(store.location, store.manifest("street").snapshot())
    for start in range(60, items, CHUNK):
        n = min(CHUNK, items - start)
        rows = base.take(pa.array(np.arange(n) % base.num_rows))
        ids = pa.array([f"tiled/{start + k:07d}.jpg" for k in range(n)], pa.string())
        write_deltalake(store.manifest("street").uri, rows.set_column(0, "item_id", ids), mode="append")
        print(f"  {start + n:,} rows", file=sys.stderr)
    return uri


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def until_drawn(driver, url: str | None = None, enter: str | None = None) -> float:
    """Seconds from navigating to ``url`` (or typing ``enter`` into the query box) until the page
    is drawn and every thumbnail has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("var m = document.getElementById('main'); if (m) m.dataset.ready = 'false';")
    started = time.perf_counter()
    if url is not None:
        driver.get(url)
    else:
        box = driver.find_element(By.ID, "query")
        box.clear()
        box.send_keys(enter, Keys.ENTER)
    script = ("var m = document.getElementById('main'); if (!m || m.dataset.ready !== 'true') return false;"
              "var imgs = Array.from(document.querySelectorAll('#grid img'));"
              "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);")
    WebDriverWait(driver, 120, poll_frequency=0.01).until(lambda d: d.execute_script(script))
    return time.perf_counter() - started


def main() -> None:
    import httpx
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", type=Path, default=None, help="build the store here and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-browse-"))
    root.mkdir(parents=True, exist_ok=True)
    uri = build(root, args.items)
    store = orchestrator.connect(uri)
    version = store.versions("street")[-1]
    print(f"dataset street version {version.version}: {version.items:,} items")
    driver = chromium()
    times: dict[str, list[float]] = {"first": [], "again": [], "query": [], "api items (first)": []}
    try:
        for r in range(args.rounds):
            port = free_port("127.0.0.1")
            server = uvicorn.Server(uvicorn.Config(create_app(orchestrator.connect(uri)), host="127.0.0.1",
                                                   port=port, log_level="warning"))
            threading.Thread(target=server.run, daemon=True).start()
            while not server.started:
                time.sleep(0.01)
            page = f"http://127.0.0.1:{port}/#/d/street?v={version.version}"
            driver.get("about:blank")
            t = until_drawn(driver, page)
            if r:  # round 0 fills the node blob cache: the store is warm from round 1 on
                times["first"].append(t)
            times["again"].append(until_drawn(driver, page + "&p=0"))
            times["query"].append(until_drawn(driver, enter="labels.car >= 3"))
            server.should_exit = True
            time.sleep(0.3)
            port = free_port("127.0.0.1")  # the API alone, on a fresh app
            server = uvicorn.Server(uvicorn.Config(create_app(orchestrator.connect(uri)), host="127.0.0.1",
                                                   port=port, log_level="warning"))
            threading.Thread(target=server.run, daemon=True).start()
            while not server.started:
                time.sleep(0.01)
            started = time.perf_counter()
            body = httpx.get(f"http://127.0.0.1:{port}/api/datasets/street/items",
                             params={"version": version.version, "limit": 48}, timeout=60).json()
            times["api items (first)"].append(time.perf_counter() - started)
            assert body["count"] == version.items and len(body["items"]) == 48
            server.should_exit = True
            time.sleep(0.3)
    finally:
        driver.quit()
    print(f"{'what':<22} {'median s':>9}  range")
    for what, values in times.items():
        if values:
            print(f"{what:<22} {statistics.median(values):>9.3f}  [{min(values):.3f} - {max(values):.3f}] "
                  f"over {len(values)} rounds")
    print(json.dumps({k: [round(v, 4) for v in vs] for k, vs in times.items()}))
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
