"""`ft ui` in a real headless Chromium (Debian's package, driven by Playwright): every page used as a
person would, on the 2-layer random model. Screenshots of each page go to build/ui-screenshots/
(FT_UI_SCREENSHOTS to change), the artifacts of this test."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from ft.workspace import Workspace
from test_resume_support import DATASET, make_workspace, settings
from ui_helpers import UiServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover
    pytest.skip("playwright is not installed (make setup installs it)", allow_module_level=True)
if not Path(CHROMIUM).is_file():  # pragma: no cover
    pytest.skip(
        f"no Chromium at {CHROMIUM}: `apt-get install chromium` (make setup tries)", allow_module_level=True
    )

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = Path(os.environ.get("FT_UI_SCREENSHOTS", Path(__file__).parents[1] / "build" / "ui-screenshots"))
TIMEOUT_MS = 120_000
expect.set_options(timeout=TIMEOUT_MS)  # jobs are real `ft` processes on a busy machine


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("uib") / "ws")


@pytest.fixture(scope="module")
def server(ws: Workspace):
    s = UiServer(ws)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    # Playwright's node driver and Chromium must not inherit the BLAS LD_PRELOAD of this test process
    # (conftest re-executes pytest with it): node's threads fail to start under MKL.
    saved = os.environ.pop("LD_PRELOAD", None)
    try:
        p = sync_playwright().start()
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    finally:
        if saved is not None:
            os.environ["LD_PRELOAD"] = saved
    yield b
    b.close()
    p.stop()


@pytest.fixture
def page(browser, server: UiServer):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server.url)
    yield pg
    ctx.close()
    assert not errors, errors


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def tab(page: Page, name: str) -> None:
    page.click(f"#tabs button[data-tab={name}]")
    expect(page.locator(f"#tab-{name}")).to_be_visible()


def test_datasets_upload_prepare_and_rejected_records(page: Page, ws: Workspace, tmp_path: Path) -> None:
    tab(page, "datasets")
    upload = tmp_path / "upload.jsonl"
    shutil.copy(ws.root / "data" / "sample.jsonl", upload)
    page.set_input_files("#upload-file", str(upload))
    page.click("#upload-form button")
    expect(page.locator("#upload-msg")).to_contain_text("uploaded data/upload.jsonl")
    assert (ws.root / "data" / "upload.jsonl").read_bytes() == upload.read_bytes()
    page.fill("#prepare-form [name=name]", "uploaded")
    page.fill("#prepare-form [name=model]", "tiny")
    page.click("#prepare-form button")
    expect(page.locator("#prepare-msg")).to_contain_text("prepared uploaded v1")
    expect(page.locator("#prepare-report .hist div").first).to_be_attached()
    page.locator("#datasets-table tr[data-dataset=uploaded]").click()
    expect(page.locator("#dataset-detail mark.trained").first).to_be_visible()

    lines = upload.read_text().splitlines()[:20]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines, "{not json", '{"messages": "nope"}']) + "\n")
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload-form button")
    expect(page.locator("#upload-msg")).to_contain_text("uploaded data/bad.jsonl")
    page.fill("#prepare-form [name=name]", "bad")
    page.click("#prepare-form button")
    expect(page.locator("#prepare-msg")).to_contain_text("invalid")
    rows = page.locator("#rejected-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("21")
    expect(rows.nth(0)).to_contain_text("invalid_json")
    expect(rows.nth(1)).to_contain_text("wrong_type")
    shot(page, "datasets")


def test_config_validation_error_on_the_field_then_save(page: Page, ws: Workspace) -> None:
    tab(page, "config")
    field = page.locator('#config-form [name="training.learning_rate"]')
    field.fill("-1")
    row = page.locator(".field", has=page.locator('[name="training.learning_rate"]'))
    expect(row.locator(".field-error")).to_contain_text("training.learning_rate")
    expect(field).to_have_class("invalid")
    shot(page, "config-error")
    before = ws.train_yml.read_text()
    field.fill("0.0005")
    expect(row.locator(".field-error")).to_have_text("")
    page.click("#config-save")
    expect(page.locator("#config-msg")).to_contain_text("saved training.learning_rate")
    after = ws.train_yml.read_text()
    diff = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(diff) == 1 and diff[0][1].strip() == "learning_rate: 0.0005", diff
    shot(page, "config")


def test_curve_updates_within_2s_of_a_new_metrics_line(page: Page, ws: Workspace) -> None:
    run_dir = ws.run_dir("20990101-000000-live")
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    rows = [
        {"type": "train", "step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "tokens_per_second": 100.0}
        for s in (1, 2)
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws.registry().upsert(
        "runs", {"id": run_dir.name}, name="live", status="running", meta={"step": 2, "total_steps": 10}
    )
    try:
        page.click("#runs-refresh")
        page.locator(f"#runs-table tr[data-run='{run_dir.name}']").click()
        chart = page.locator("#chart-loss")
        expect(chart).to_have_attribute("data-points", "2")
        delays = []
        for step in (3, 4, 5):
            t0 = time.monotonic()
            with metrics.open("a") as f:
                f.write(json.dumps({"type": "train", "step": step, "loss": 2.0, "lr": 1e-3}) + "\n")
            expect(chart).to_have_attribute("data-points", str(step), timeout=5000)
            delays.append(time.monotonic() - t0)
        assert max(delays) < 2.0, delays
    finally:
        ws.registry().delete("runs", id=run_dir.name)
        shutil.rmtree(run_dir)


def test_train_live_stop_resume(page: Page, ws: Workspace) -> None:
    tab(page, "runs")
    page.select_option("#train-dataset", DATASET)
    page.fill("#train-form [name=name]", "browser")
    sets = [s for s in settings(steps=60, save=5, evals=10) if not s.startswith("training.max_steps")]
    sets.append("training.eval_samples=1")  # a generation at each evaluation, shown under the curves
    page.fill("#train-form [name=steps]", "60")
    page.fill("#train-form [name=sets]", "\n".join(sets))
    page.click("#train-form button")
    expect(page.locator("#run-title")).to_contain_text("browser")
    expect(page.locator("#run-status")).to_have_text("running")
    chart = page.locator("#chart-loss")
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points || 0) >= 2")
    first = int(chart.get_attribute("data-points"))
    page.wait_for_function(f"Number(document.querySelector('#chart-loss').dataset.points || 0) > {first}")
    expect(page.locator("#run-status")).to_have_text("running")  # it gained points while running
    shot(page, "runs")
    page.click("#run-stop")
    expect(page.locator("#run-status")).to_have_text("interrupted", timeout=TIMEOUT_MS)
    stopped_at = int(page.locator("#stat-step").inner_text().split("/")[0])
    assert 0 < stopped_at < 60
    page.click("#run-resume")
    expect(page.locator("#run-status")).to_have_text("completed", timeout=300_000)
    expect(page.locator("#stat-step")).to_have_text("60 / 60")
    expect(page.locator("#run-samples .run-sample").first).to_contain_text("validation prompt #0")
    run_id = page.locator("#run-title").inner_text()
    page.click("#runs-refresh")
    links = page.locator("#jobs-table tbody tr", has_text="train").locator(f"a:text-is('{run_id}')")
    expect(links).to_have_count(2)  # the first job and the resume job both lead to the run
    shot(page, "runs-completed")


def test_evaluate_report(page: Page) -> None:
    tab(page, "evaluate")
    page.fill("#eval-form [name=n_samples]", "1")
    page.fill("#eval-form [name=max_tokens]", "8")
    page.fill("#eval-form [name=limit]", "4")
    page.click("#eval-form button")
    expect(page.locator("#eval-metrics")).to_be_visible(timeout=300_000)
    expect(page.locator("#eval-metrics")).to_contain_text("perplexity")
    expect(page.locator("#eval-report .sample").first).to_be_visible()
    shot(page, "evaluate")


def test_export_gguf_and_download(page: Page) -> None:
    tab(page, "export")
    page.select_option("#export-form [name=format]", "gguf")
    page.click("#export-form button")
    expect(page.locator("#export-checks")).to_be_visible(timeout=300_000)
    with page.expect_download() as dl:
        page.click("#export-download")
    path = dl.value.path()
    assert dl.value.suggested_filename.endswith(".gguf")
    assert Path(path).read_bytes()[:4] == b"GGUF"
    shot(page, "export")


def test_playground_streams_base_and_tuned_side_by_side(page: Page) -> None:
    tab(page, "playground")
    options = page.locator("#chat-model-a option")
    expect(options.first).to_be_attached()
    ids = options.all_inner_texts()
    assert "tiny" in ids and "browser" in ids, ids  # the base model and the tuned run (by its name)
    page.select_option("#chat-model-a", "tiny")
    page.check("#chat-compare")
    page.select_option("#chat-model-b", "browser")
    page.fill("#chat-input", "Hello")
    page.fill("#chat-max", "12")
    page.click("#chat-form button[type=submit]")
    for side in ("a", "b"):
        reply = page.locator(f"#chat-log-{side} .bubble.assistant.done")
        expect(reply).to_be_visible(timeout=TIMEOUT_MS)
        assert int(reply.get_attribute("data-chunks") or 0) >= 2, reply.inner_text()  # streamed in pieces
    shot(page, "playground")


def test_models_page(page: Page) -> None:
    tab(page, "models")
    expect(page.locator("#models-table tbody tr")).to_have_count(1)
    page.fill("#model-search", "zzz-none")
    expect(page.locator("#models-table tbody tr")).to_have_count(0)
    page.fill("#model-search", "")
    expect(page.locator("#models-table tbody tr")).to_have_count(1)
    page.locator("#models-table tr[data-model=tiny]").click()
    expect(page.locator("#memory-verdict")).to_contain_text("training with the current train.yml")
    shot(page, "models")


def test_page_asks_for_the_key_once_and_sends_it_as_a_header(browser, ws: Workspace) -> None:
    from pydantic import SecretStr

    from ft.ui.app import UiConfig

    key = "a-long-enough-test-key-123"
    s = UiServer(ws, UiConfig(api_key=SecretStr(key)))
    ctx = browser.new_context()
    try:
        pg = ctx.new_page()
        sent: list[str | None] = []
        pg.on(
            "request", lambda r: sent.append(r.headers.get("authorization")) if "/api/runs" in r.url else None
        )
        pg.goto(s.url)
        expect(pg.locator("#key-dialog")).to_be_visible()
        assert key not in pg.content()
        pg.fill("#key-input", key)
        pg.click("#key-form button")
        expect(pg.locator("#train-dataset option[value=sample]")).to_be_attached()
        assert f"Bearer {key}" in sent
        assert ctx.cookies() == []  # no ambient credential another site could make the browser send
        pg.reload()  # kept for this tab: not asked again
        expect(pg.locator("#train-dataset option[value=sample]")).to_be_attached()
        expect(pg.locator("#key-dialog")).to_be_hidden()
    finally:
        ctx.close()
        s.close()
