"""``orchestrator browse``: its JSON endpoints (status codes, shapes, pagination, errors, the
token, access control) through Starlette's test client, and its pages in a real headless Chromium
(Debian's ``chromium`` + ``chromium-driver``, driven by Selenium) against the app served by
uvicorn. Screenshots of each page go to ``test-screenshots/`` at the repository root."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

import orchestrator
from orchestrator.browse.app import create_app
from orchestrator.browse.serve import free_port
from tests.conftest import REPO, run_cli
from tests.integration.test_access import as_principal, expected_ids, governed  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("ray_cluster")
SHOTS = REPO / "test-screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def history(tmp_path_factory, demo_small) -> dict:
    """A file:// store where ``street`` has three versions: v0 the 60 demo items; v1 deletes two;
    v2 relabels one instance of one item. And ``broken``: 3 loose items, one blob removed."""
    root = tmp_path_factory.mktemp("browse")
    uri = f"file://{root / 'store'}"
    store = orchestrator.connect(uri)
    store.ingest("street", coco=demo_small / "annotations.json", images=demo_small / "images")
    doc = json.loads((demo_small / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in doc["images"]}
    gone = [names[doc["images"][0]["id"]], names[doc["images"][1]["id"]]]
    store.delete("street", gone)
    images = [im for im in doc["images"] if im["file_name"] not in gone]
    keep = {im["id"] for im in images}
    anns = [a for a in doc["annotations"] if a["image_id"] in keep]
    cats = {c["name"]: c["id"] for c in doc["categories"]}
    first = anns[0]
    relabelled = names[first["image_id"]]
    new_cat = next(i for n, i in cats.items() if i != first["category_id"])
    anns[0] = dict(first, category_id=new_cat)
    coco = root / "v2.json"
    coco.write_text(json.dumps(dict(doc, images=images, annotations=anns)))
    assert store.ingest("street", coco=coco, images=demo_small / "images").changed == 1

    src = root / "broken"
    (src / "images").mkdir(parents=True)
    pictures = sorted((demo_small / "images").iterdir())[:3]
    for p in pictures:  # bytes of their own (a comment), so no blob cache on this machine holds them
        with Image.open(p) as img:
            img.save(src / "images" / p.name, "JPEG", quality=90, comment=uuid.uuid4().hex)
    (src / "items.jsonl").write_text("".join(json.dumps({"item_id": p.name, "path": f"images/{p.name}"}) + "\n"
                                             for p in pictures))
    store.ingest("broken", jsonl=src / "items.jsonl", pack=False)
    victim = pictures[1].name
    blob = store.dataset("broken").manifest_rows(["item_id", "blob"]).to_pylist()
    store.fs.delete_file(store.blobs("broken").path(next(r["blob"] for r in blob if r["item_id"] == victim)))
    return {"uri": uri, "gone": sorted(gone), "relabelled": relabelled, "victim": victim}


@pytest.fixture(scope="module")
def client(history) -> TestClient:
    return TestClient(create_app(orchestrator.connect(history["uri"])), raise_server_exceptions=False)


# -- the JSON endpoints ---------------------------------------------------------------------------
def test_datasets_versions_and_pages(client, history):
    body = client.get("/api/datasets").json()
    street = next(d for d in body["datasets"] if d["name"] == "street")
    assert street == {**street, "latest": 2, "items": 58, "versions": 3} and body["store"] == history["uri"]
    versions = client.get("/api/datasets/street/versions").json()["versions"]
    assert [v["version"] for v in versions] == [0, 1, 2] and [v["items"] for v in versions] == [60, 58, 58]

    ds = orchestrator.connect(history["uri"]).dataset("street")
    seen = []
    for offset in range(0, 58, 25):
        page = client.get("/api/datasets/street/items", params={"version": 2, "offset": offset, "limit": 25}).json()
        assert page["count"] == 58 and page["version"] == 2 and len(page["items"]) == min(25, 58 - offset)
        seen += [it["id"] for it in page["items"]]
    assert seen == ds.item_ids()  # pages tile the version in position order
    first = client.get("/api/datasets/street/items", params={"version": 2, "limit": 3}).json()
    it = first["items"][0]
    want = ds.get(it["id"])
    assert len(it["instances"]) == len(want["boxes"]) and set(first["colours"]) == set(ds.label_map.names)
    assert [i["label"] for i in it["instances"]] == want["label_names"]
    thumb = client.get(it["thumb"])
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert thumb.headers["content-type"] == "image/jpeg"
    media = client.get(it["media"])
    blob = ds.manifest_rows(["item_id", "blob"]).to_pylist()
    assert hashlib.sha256(media.content).hexdigest() == next(r["blob"] for r in blob if r["item_id"] == it["id"])


def test_slices_items_diffs_and_stats(client, history):
    ds = orchestrator.connect(history["uri"]).dataset("street")
    query = "labels.car >= 3"
    page = client.get("/api/datasets/street/items", params={"version": 2, "query": query}).json()
    assert page["count"] == len(ds.slice(query)) and [i["id"] for i in page["items"]] == ds.slice(query).item_ids()[:48]

    item = client.get("/api/datasets/street/item", params={"id": history["relabelled"], "version": 2}).json()
    assert [(h["version"], h["state"], h["parts"]) for h in item["history"]] == [
        (0, "added", []), (1, "unchanged", []), (2, "changed", ["labels"])]
    assert len(item["instances"]) == len(ds.get(history["relabelled"])["boxes"])
    assert item["attributes"] == ds.get(history["relabelled"])["attributes"] and item["media_error"] is None

    d = client.get("/api/datasets/street/diff", params={"before": 0, "after": 2}).json()
    assert d["counts"] == {"added": 0, "removed": 2, "changed": 1, "unchanged": 57}
    assert sorted(i["id"] for i in d["removed"]) == history["gone"]
    assert [c["id"] for c in d["changed"]] == [history["relabelled"]] and d["changed"][0]["parts"] == ["labels"]
    assert client.get(d["changed"][0]["before"]["thumb"]).status_code == 200

    stats = client.get("/api/datasets/street/stats", params={"version": 2}).json()
    assert stats["items"] == 58 and sum(v["instances"] for v in stats["labels"].values()) == sum(
        ds.label_counts().values())
    png = client.get("/api/datasets/street/stats.png", params={"version": 2})
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_bad_input_is_a_clear_json_error_and_the_server_keeps_serving(client, history):
    cases = [
        ("/api/datasets/street/items", {"query": "labels.car >>= 3"}, 400, "^"),
        ("/api/datasets/street/items", {"query": "lables.car > 1"}, 400, "did you mean"),
        ("/api/datasets/nope/items", {}, 404, "nope"),
        ("/api/datasets/street/items", {"version": 9}, 404, "9"),
        ("/api/datasets/street/items", {"offset": "x"}, 400, "whole number"),
        ("/api/datasets/street/items", {"limit": 5000}, 400, "out of range"),
        ("/api/datasets/street/item", {"id": "no-such.jpg"}, 404, "no-such.jpg"),
        ("/api/datasets/street/diff", {}, 400, "before"),
        ("/thumb/forged.AAAA", {}, 403, "not issued by this server"),
    ]
    for path, params, status, words in cases:
        r = client.get(path, params=params)
        assert r.status_code == status and words in r.json()["error"], (path, params, r.status_code, r.text)
        assert "Traceback" not in r.text
    broken = client.get("/api/datasets/broken/items").json()["items"]
    bad = next(i for i in broken if i["id"] == history["victim"])
    r = client.get(bad["thumb"])
    assert r.status_code == 404 and history["victim"] in r.json()["error"]
    item = client.get("/api/datasets/broken/item", params={"id": history["victim"]}).json()
    assert "orchestrator verify broken" in item["media_error"]
    assert client.get("/api/datasets").status_code == 200  # still serving


def test_the_token_guards_every_request(history):
    client = TestClient(create_app(orchestrator.connect(history["uri"]), token="s3cret"))
    assert client.get("/api/datasets").status_code == 403 and client.get("/").status_code == 403
    assert client.get("/api/datasets", headers={"X-Orchestrator-Token": "wrong"}).status_code == 403
    assert client.get("/", params={"token": "s3cret"}).status_code == 200  # sets the cookie
    assert client.get("/api/datasets").status_code == 200


def test_a_reader_sees_only_its_rows_and_no_hidden_value_in_any_endpoint(governed):  # noqa: F811
    client = TestClient(create_app(as_principal(governed, "bob-key")))
    page = client.get("/api/datasets/street/items", params={"limit": 200}).json()
    assert [i["id"] for i in page["items"]] == expected_ids() and page["count"] == len(expected_ids())
    texts = [client.get("/api/datasets/street/items", params={"limit": 200}).text,
             client.get("/api/datasets/street/stats").text,
             client.get("/api/datasets/street/diff", params={"before": 0}).text]
    for item_id in expected_ids()[:5]:
        item = client.get("/api/datasets/street/item", params={"id": item_id})
        assert item.status_code == 200
        texts.append(item.text)
    for text in texts:
        assert "gps" not in text and "plate" not in text and "P-1" not in text
    assert "oslo" in texts[-1] and "red" in texts[-1]  # visible fields are shown
    hidden = client.get("/api/datasets/street/item", params={"id": "item-00"})  # filtered out for bob
    assert hidden.status_code == 404 and "gps" not in hidden.text
    assert client.get("/api/datasets/other/items").status_code in (200, 403)


# -- the pages, in Chromium ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed to test the browse pages: install Debian's "
                    "`chromium` and `chromium-driver` (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    SHOTS.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def serve_app(app):
    """``app`` under uvicorn on a free loopback port, in a thread: (base URL, server)."""
    import uvicorn

    port = free_port("127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    return f"http://127.0.0.1:{port}", server


@pytest.fixture(scope="module")
def site(history):
    url, server = serve_app(create_app(orchestrator.connect(history["uri"]), token="tok"))
    yield url
    server.should_exit = True


def visit(driver, url: str) -> None:
    """Open ``url`` (or change the fragment) and wait until the page says it has drawn."""
    driver.execute_script("var m = document.getElementById('main'); if (m) m.dataset.ready = 'false';")
    driver.get(url)
    wait_ready(driver)


def wait_ready(driver, timeout: float = 30) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("var m = document.getElementById('main'); return m && m.dataset.ready === 'true';"))


def wait_images(driver, selector: str, timeout: float = 30) -> int:
    """Wait until every image matching ``selector`` has loaded; their count."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = (f"var imgs = Array.from(document.querySelectorAll({json.dumps(selector)}));"
              "return imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : -1;")
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script) >= 0)
    return driver.execute_script(script)


def test_pages_in_a_real_browser(browser, site, history):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ds = orchestrator.connect(history["uri"]).dataset("street")
    visit(browser, f"{site}/?token=tok")
    rows = browser.find_elements(By.CSS_SELECTOR, "#datasets tr[data-name]")
    assert {r.get_attribute("data-name") for r in rows} == {"street", "broken"}
    browser.save_screenshot(str(SHOTS / "datasets.png"))

    browser.execute_script("document.getElementById('main').dataset.ready = 'false'")
    browser.find_element(By.LINK_TEXT, "street").click()
    wait_ready(browser)
    assert browser.find_element(By.ID, "count").text == "58 items"
    assert wait_images(browser, "#grid img.thumb-img") == 48
    browser.save_screenshot(str(SHOTS / "dataset.png"))

    query = "labels.car >= 3"
    box = browser.find_element(By.ID, "query")
    box.clear()
    browser.execute_script("window.__same_page = true; document.getElementById('main').dataset.ready = 'false'")
    box.send_keys(query, Keys.ENTER)
    wait_ready(browser)
    matches = ds.slice(query).item_ids()
    assert browser.find_element(By.ID, "count").text == f"{len(matches)} of 58 items match"
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid .cell")
    assert [c.get_attribute("data-id") for c in cells] == matches[:48]
    assert wait_images(browser, "#grid img.thumb-img") == min(48, len(matches))
    label = browser.find_element(By.CSS_SELECTOR, "#grid svg .instance text")
    assert label.is_displayed()
    browser.find_element(By.ID, "show-labels").click()  # labels off, without reloading the page
    assert not label.is_displayed() and browser.execute_script("return window.__same_page === true")
    browser.find_element(By.ID, "show-labels").click()
    browser.save_screenshot(str(SHOTS / "slice.png"))

    item_id = history["relabelled"]
    visit(browser, f"{site}/#/i/street?v=2&id={item_id}")
    want = ds.get(item_id)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".item-image svg .instance")) == len(want["boxes"])
    assert wait_images(browser, "#image") == 1
    states = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#history td.changed, #history td.added")]
    assert states == ["added", "changed"]
    browser.save_screenshot(str(SHOTS / "item.png"))

    visit(browser, f"{site}/#/diff/street?a=0&b=2")
    assert browser.find_element(By.ID, "summary").text.endswith("0 added, 2 removed, 1 changed, 57 unchanged")
    def ids(selector: str) -> list[str]:
        return [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, selector)]

    assert ids("#changed .grid > .cell") == [item_id] and sorted(ids("#removed .grid > .cell")) == history["gone"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#changed .pair svg .instance")) == 2 * len(want["boxes"])
    assert wait_images(browser, "#changed img") == 2
    browser.save_screenshot(str(SHOTS / "diff.png"))

    visit(browser, f"{site}/#/d/street?v=2&q=labels.car%20%3E%3E%3D%203")
    error = browser.find_element(By.ID, "error").text
    assert "^" in error and ">>=" in error and browser.find_element(By.ID, "count").text == "—"
    browser.save_screenshot(str(SHOTS / "bad-query.png"))

    visit(browser, f"{site}/#/d/broken")
    wait_images(browser, f"#grid .cell:not([data-id='{history['victim']}']) img")
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid .problem"))
    problem = browser.find_element(By.CSS_SELECTOR, f"#grid .cell[data-id='{history['victim']}'] .problem").text
    assert "orchestrator verify broken" in problem

    visit(browser, f"{site}/#/stats/street?v=2")
    assert wait_images(browser, "#stats-figure") == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#labels tr")) == len(ds.label_map.names) + 1
    browser.save_screenshot(str(SHOTS / "stats.png"))


def test_a_readers_browser_never_shows_a_filtered_item_or_hidden_value(browser, governed):  # noqa: F811
    from selenium.webdriver.common.by import By

    url, server = serve_app(create_app(as_principal(governed, "bob-key")))
    try:
        visit(browser, f"{url}/#/d/street")
        ids = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#grid .cell")]
        assert ids == expected_ids()
        hidden = [f"item-{i:02d}" for i in range(30) if f"item-{i:02d}" not in ids]
        pages = [browser.page_source]
        visit(browser, f"{url}/#/i/street?id={ids[0]}")
        assert "oslo" in browser.page_source and "red" in browser.page_source
        pages.append(browser.page_source)
        visit(browser, f"{url}/#/i/street?id={hidden[0]}")  # a filtered-out id typed by hand
        assert "has no item" in browser.find_element(By.ID, "error").text
        pages.append(browser.page_source)
        for page in pages:
            assert "gps" not in page and "plate" not in page and "P-1" not in page
            assert not any(f'data-id="{h}"' in page for h in hidden)
        browser.save_screenshot(str(SHOTS / "reader.png"))
    finally:
        server.should_exit = True


def test_the_command_serves_loopback_behind_a_token_and_refuses_other_interfaces(history):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    exe = str(Path(sys.executable).parent / "orchestrator")
    proc = subprocess.Popen([exe, "browse", "--store", history["uri"], "--port", "0", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert info["host"] == "127.0.0.1" and info["token"] and info["url"].endswith(f"/?token={info['token']}")
        base = info["url"].split("/?")[0]
        deadline = time.monotonic() + 30
        while True:
            try:
                denied = httpx.get(f"{base}/api/datasets", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert denied.status_code == 403 and "token" in denied.json()["error"]
        ok = httpx.get(f"{base}/api/datasets", headers={"X-Orchestrator-Token": info["token"]}, timeout=10)
        assert ok.status_code == 200 and {d["name"] for d in ok.json()["datasets"]} == {"street", "broken"}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    r = run_cli("browse", "--store", history["uri"], "--host", "0.0.0.0")
    assert r.returncode == 2 and "--remote" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("browse", "--store", history["uri"], "--host", "0.0.0.0", "--remote", "--no-token")
    assert r.returncode == 2 and "loopback only" in r.stderr
