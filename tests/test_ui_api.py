"""`ft ui`'s REST API over a real workspace (2-layer random model), through real HTTP on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from ft.errors import FtError
from ft.ui.app import UiConfig
from ft.ui.serve import run_ui
from ft.workspace import Workspace
from test_resume_support import DATASET, make_workspace, settings
from ui_helpers import UiServer, files_under, wait_job

KEY = "k" * 24


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    return make_workspace(tmp_path_factory.mktemp("ui") / "ws")


@pytest.fixture(scope="module")
def server(ws: Workspace):
    s = UiServer(ws)
    yield s
    s.close()


def test_training_started_by_api_is_a_cli_run(server: UiServer, ws: Workspace) -> None:
    c = server.client()
    assert c.get("/health").json()["status"] == "ok"
    found = c.get("/api/models/search", params={"q": "tin"}).json()
    assert [m["name"] for m in found["models"]] == ["tiny"]
    assert c.get("/api/models/search", params={"q": "no-such-model-xyz"}).json()["models"] == []

    job = c.post(
        "/api/training/start", json={"dataset": DATASET, "name": "from-ui", "set": settings(steps=4)}
    ).json()
    assert job["kind"] == "train" and job["status"] in ("queued", "running")
    done = wait_job(c, job["id"])
    assert done["status"] == "completed", done["log_tail"]
    status = c.get(f"/api/training/{job['id']}/status").json()
    run_id = status["run"]["id"]
    assert status["job"]["run_id"] == run_id and status["run"]["status"] == "completed"
    assert status["progress"] == 1.0

    rows = c.get(f"/api/metrics/{job['id']}").json()["rows"]
    assert [r["step"] for r in rows if "loss" in r][:4] == [1, 2, 3, 4]

    listed = subprocess.run(
        [sys.executable, "-m", "ft", "--workspace", str(ws.root), "runs", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    runs = {r["id"]: r for r in json.loads(listed.stdout)["runs"]}
    assert runs[run_id]["name"] == "from-ui" and runs[run_id]["status"] == "completed"
    # the page's run list is the same service result
    assert run_id in {r["id"] for r in c.get("/api/runs").json()["runs"]}

    # generation through `ft serve`'s application (the model `ft serve` picks: the newest tuned run)
    r = c.post(
        "/api/inference/generate",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_upload_and_prepare_with_rejected_records(server: UiServer, ws: Workspace) -> None:
    c = server.client()
    good = (ws.root / "data" / "sample.jsonl").read_text().splitlines()
    text = "\n".join([*good[:20], "{not json", '{"messages": "nope"}']) + "\n"
    r = c.post("/api/datasets/upload", params={"filename": "mixed.jsonl"}, content=text.encode())
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "data/mixed.jsonl", "bytes": len(text.encode())}
    assert (ws.root / "data" / "mixed.jsonl").read_text() == text
    again = c.post("/api/datasets/upload", params={"filename": "mixed.jsonl"}, content=b"x")
    assert again.status_code == 400 and (ws.root / "data" / "mixed.jsonl").read_text() == text

    job = c.post(
        "/api/datasets/prepare", json={"source": "data/mixed.jsonl", "name": "mixed", "model": "tiny"}
    ).json()
    done = wait_job(c, job["id"])
    assert done["status"] == "failed" and "invalid" in done["result"]["message"]  # 2 of 22 > 5 %
    rejected = c.get(f"/api/jobs/{job['id']}/rejected").json()["records"]
    assert [(r["line"], r["reason"]) for r in rejected] == [(21, "invalid_json"), (22, "wrong_type")]

    job = c.post(
        "/api/datasets/prepare",
        json={"source": "data/mixed.jsonl", "name": "mixed", "model": "tiny", "max_bad": "20%"},
    ).json()
    done = wait_job(c, job["id"])
    assert done["status"] == "completed", done["log_tail"]
    assert done["result"]["stats"]["bad"] == 2 and done["result"]["stats"]["kept"] > 0
    info = c.get("/api/datasets/mixed").json()
    assert info["summary"]["name"] == "mixed"
    shown = c.get("/api/datasets/mixed/records", params={"n": 2}).json()
    assert len(shown["records"]) == 2 and any(s["trained"] for s in shown["records"][0]["segments"])


def test_oversized_upload_is_413_and_writes_nothing(ws: Workspace) -> None:
    s = UiServer(ws, UiConfig(max_upload_bytes=1024))
    try:
        before = files_under(ws.root / "data")
        r = s.client().post("/api/datasets/upload", params={"filename": "big.jsonl"}, content=b"x" * 5000)
        assert r.status_code == 413
        assert files_under(ws.root / "data") == before
        ok = s.client().post("/api/datasets/upload", params={"filename": "small.jsonl"}, content=b"{}\n")
        assert ok.status_code == 200
    finally:
        s.close()


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("post", "/api/datasets/upload", {"params": {"filename": "../evil.jsonl"}, "content": b"{}"}),
        ("post", "/api/datasets/upload", {"params": {"filename": ".."}, "content": b"{}"}),
        ("get", "/api/runs/..%2F..%2Fetc", {}),
        ("get", "/api/datasets/..", {}),
        ("post", "/api/datasets/prepare", {"json": {"source": "../../etc/passwd"}}),
        ("post", "/api/datasets/prepare", {"json": {"source": "/etc/passwd"}}),
        ("get", "/api/evaluations/report", {"params": {"path": "../../etc/passwd"}}),
        ("get", "/api/exports/download", {"params": {"path": "../outside"}}),
        ("post", "/api/training/start", {"json": {"name": "../x"}}),
        ("post", "/api/export", {"json": {"run": "../x"}}),
        ("get", "/static/..%2Fapp.py", {}),
    ],
)
def test_traversal_refused(server: UiServer, ws: Workspace, method: str, path: str, kwargs: dict) -> None:
    before = files_under(ws.root.parent)
    r = getattr(server.client(), method)(path, **kwargs)
    assert r.status_code in (400, 404), r.text
    assert r.status_code == 404 or r.json()["error"] == "name_invalid", r.text
    assert files_under(ws.root.parent) == before


def test_key_required_on_every_route_but_health(ws: Workspace) -> None:
    s = UiServer(ws, UiConfig(api_key=SecretStr(KEY)))
    try:
        c = s.client()
        routes = [(m, r.path) for r in s.app.fastapi.routes for m in getattr(r, "methods", ()) if m != "HEAD"]
        api = [(m, p) for m, p in routes if p.startswith("/api/")]
        assert len(api) >= 25
        for method, path in api:
            url = path.replace("{", "").replace("}", "")  # any value: the key is checked first
            r = c.request(method, url)
            assert r.status_code == 401, (method, path, r.status_code)
            assert KEY not in r.text
        for path in ("/serve/v1/models", "/serve/v1/chat/completions", "/api/nope", "/anything"):
            assert c.get(path).status_code == 401
        assert c.get("/health").json()["auth"] is True
        assert c.get("/").status_code == 200 and KEY not in c.get("/").text  # the page; it asks for the key
        assert s.client(KEY).get("/api/runs").status_code == 200
        assert s.client("wrong" * 5).get("/api/runs").status_code == 401
    finally:
        s.close()


def test_exposed_host_needs_key(ws: Workspace) -> None:
    with pytest.raises(FtError) as e:
        run_ui(ws, UiConfig(host="0.0.0.0", port=0))
    assert e.value.code == "serve_unsafe"


def test_loopback_server_refuses_foreign_host_header(server: UiServer) -> None:
    r = server.client().get("/api/runs", headers={"Host": "evil.example"})
    assert r.status_code == 403


def test_config_validate_and_save_keeps_comments(server: UiServer, ws: Workspace) -> None:
    c = server.client()
    schema = c.get("/api/config/schema").json()
    keys = {f["key"]: f for f in schema["fields"]}
    assert keys["training.learning_rate"]["doc"] and "training.max_steps" in keys
    bad = c.post("/api/config/validate", json={"values": {"training.learning_rate": -1}}).json()
    assert bad["ok"] is False and "training.learning_rate" in bad["errors"]
    before = ws.train_yml.read_text()
    r = c.put("/api/config", json={"values": {"training.learning_rate": 5}})
    assert r.status_code == 422 and ws.train_yml.read_text() == before
    r = c.put("/api/config", json={"values": {"training.learning_rate": 0.0005, "lora.rank": 4}})
    assert r.status_code == 200, r.text
    after = ws.train_yml.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(changed) == 2 and all(a.split(":")[0] == b.split(":")[0] for a, b in changed)
    assert [a for a in before.splitlines() if a.lstrip().startswith("#")] == [
        b for b in after.splitlines() if b.lstrip().startswith("#")
    ]
    values = {e["key"]: e["value"] for e in c.get("/api/config").json()["entries"]}
    assert values["training.learning_rate"] == 0.0005 and values["lora.rank"] == 4


def test_metrics_stream_delivers_a_new_line_within_2s(server: UiServer, ws: Workspace) -> None:
    run_dir = ws.run_dir("20990101-000000-sse")
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    ws.registry().upsert("runs", {"id": run_dir.name}, name="sse", status="running", meta={})
    with (
        httpx.Client(base_url=server.url, timeout=10) as c,
        c.stream("GET", f"/api/metrics/{run_dir.name}/stream") as r,
    ):
        lines = r.iter_lines()
        seen = [ln for ln in _until(lines, '"step": 1')]
        assert seen
        t0 = time.monotonic()
        with metrics.open("a") as f:
            f.write(json.dumps({"step": 2, "loss": 1.5}) + "\n")
        list(_until(lines, '"step": 2'))
        assert time.monotonic() - t0 < 2.0


def _until(lines, needle: str):
    for line in lines:
        yield line
        if needle in line:
            return
    raise AssertionError(f"stream ended before {needle}")


def test_restarted_ui_sees_jobs_of_the_one_before(ws: Workspace, tmp_path: Path) -> None:
    s = UiServer(ws)
    job = s.client().post("/api/models/pull", json={"source": "/nonexistent/folder", "name": "nope"}).json()
    s.close()
    s2 = UiServer(ws)
    try:
        done = wait_job(s2.client(), job["id"])
        assert done["status"] == "failed" and done["result"]["error"]
    finally:
        s2.close()


def test_ft_ui_command_ctrl_c_leaves_its_jobs_running(ws: Workspace) -> None:
    """`ft ui` as a user runs it; Ctrl-C (SIGINT to its process group, as a terminal sends it) ends the
    server, and the training job it started goes on to the end."""
    import os
    import re
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "ft", "--workspace", str(ws.root), "ui", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        banner = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:\d+", banner)
        assert m, banner
        with httpx.Client(base_url=m.group(0), timeout=60) as c:
            assert c.get("/health").json()["auth"] is False
            job = c.post(
                "/api/training/start",
                json={"dataset": DATASET, "name": "outlives", "set": settings(steps=12)},
            ).json()
            deadline = time.monotonic() + 120
            while c.get(f"/api/jobs/{job['id']}").json()["run_id"] is None:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
    s = UiServer(ws)  # a new ft ui sees the job of the one before, still running, then completed
    try:
        done = wait_job(s.client(), job["id"])
        assert done["status"] == "completed", done["log_tail"]
        assert s.client().get(f"/api/training/{job['id']}/status").json()["run"]["step"] == 12
    finally:
        s.close()


def test_cli_run_is_listed_and_stopped_from_the_ui(server: UiServer, ws: Workspace, tmp_path: Path) -> None:
    from test_resume_support import set_args, start_ft

    log = tmp_path / "cli.log"
    args = [
        "train",
        "--dataset",
        DATASET,
        "--name",
        "from-cli",
        *set_args(settings(steps=400, save=50, evals=400)),
    ]
    proc = start_ft(ws, args, log)
    c = server.client()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            rows = [r for r in c.get("/api/runs").json()["runs"] if r["name"] == "from-cli"]
            if rows and rows[0]["status"] == "running" and (rows[0]["step"] or 0) >= 1:
                break
            time.sleep(0.2)
        run_id = rows[0]["id"]
        assert c.get(f"/api/training/{run_id}/status").json()["job"] is None  # not a job of the page
        r = c.post(f"/api/training/{run_id}/stop")
        assert r.status_code == 200, r.text
        assert proc.wait(timeout=60) == 130  # SIGINT: the step finished, a checkpoint saved, exit 130
    finally:
        if proc.poll() is None:
            proc.kill()
    status = c.get(f"/api/training/{run_id}/status").json()
    assert status["run"]["status"] == "interrupted" and status["run"]["step"] < 400
    assert c.post(f"/api/training/{run_id}/stop").status_code == 400  # not running any more


def test_openapi_lists_the_seed_endpoints(server: UiServer) -> None:
    paths = server.client().get("/api/openapi.json").json()["paths"]
    for p in (
        "/api/training/start",
        "/api/training/{job_id}/status",
        "/api/models/search",
        "/api/datasets/upload",
        "/api/metrics/{job_id}",
        "/api/inference/generate",
    ):
        assert p in paths, p
    ref = paths["/api/runs"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/RunList")  # the CLI's --json model


def test_hub_search_when_reachable_and_the_reason_when_not(
    server: UiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubserver import HubServer

    c = server.client()
    with HubServer() as hub:
        hub.add_repo("someone/tiny-llama-mlx")
        hub.add_repo("someone/other")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        r = c.get("/api/models/hub", params={"q": "tiny"}).json()
        assert r["error"] is None and [m["id"] for m in r["models"]] == ["someone/tiny-llama-mlx"]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = c.get("/api/models/hub", params={"q": "tiny"}).json()
    assert r["models"] == [] and "http://127.0.0.1:9" in r["error"]  # refused, or retried past the timeout
