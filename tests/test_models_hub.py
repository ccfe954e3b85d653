"""Hugging Face pulls with the real huggingface_hub client against a hub-shaped server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from tests.hubserver import HubServer
from tests.tiny_models import logits_of, write_tiny_llama

from ft.errors import ErrorCode, FtError
from ft.services import models as svc
from ft.services.project import init_workspace
from ft.workspace import Workspace

REPO = "tiny-org/tiny-llama"
GATED = "gated-org/secret-llama"
TOKEN = "hf_test_token_123"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two versions of a tiny model (v1 tagged, v2 on main) as folders."""
    root = tmp_path_factory.mktemp("hub-src")
    write_tiny_llama(root / "v1", seed=1)
    write_tiny_llama(root / "v2", seed=2)
    return root


@pytest.fixture(scope="module")
def hub(sources):
    with HubServer() as server:
        server.add_repo(REPO)
        v1 = HubServer.folder_files(sources / "v1")
        # Files a model folder does not need must not be downloaded; pickle never.
        v1 |= {"README.md": b"# tiny", "pytorch_model.bin": b"\x80\x04pickle", "train.py": b"print('hi')"}
        server.v1 = server.commit(REPO, v1, tag="v1")
        server.v2 = server.commit(REPO, HubServer.folder_files(sources / "v2"))
        server.add_repo(GATED, gated=True, tokens={TOKEN})
        server.commit(GATED, HubServer.folder_files(sources / "v1"))
        yield server


@pytest.fixture
def ws(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file or cache from the user
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FT_MODELS_CACHE", "FT_HF_TOKEN", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    init_workspace(tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def _files(path) -> set[str]:
    return {p.name for p in path.iterdir() if p.is_file()}


def test_pull_default_branch_and_pinned_revision(ws, hub, sources):
    seen: list[tuple[int, int | None]] = []
    r = svc.pull(ws, REPO, tqdm_class=svc.download_progress(lambda done, total: seen.append((done, total))))
    files = HubServer.folder_files(sources / "v2")
    total = sum(
        len(d) for name, d in files.items() if name != "config.json"
    )  # config.json comes first, alone
    assert seen and seen[-1] == (total, total)  # the progress bar sees every byte written
    assert r.model.name == "tiny-llama" and r.model.commit == hub.v2 and not r.already_present
    folder = ws.model_dir("tiny-llama")
    assert np.allclose(logits_of(folder), logits_of(sources / "v2"))
    row = ws.registry().get("models", name="tiny-llama")
    assert row["source"] == REPO and row["meta"]["commit"] == hub.v2
    data = (sources / "v2" / "model.safetensors").read_bytes()
    assert r.model.sha256["model.safetensors"] == hashlib.sha256(data).hexdigest()

    r1 = svc.pull(ws, REPO, revision="v1", name="tiny-v1")
    assert r1.model.commit == hub.v1 and r1.model.revision == "v1"
    folder1 = ws.model_dir("tiny-v1")
    assert np.allclose(logits_of(folder1), logits_of(sources / "v1"))
    assert not np.allclose(logits_of(folder1), logits_of(folder))
    files = _files(folder1)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not files & {"pytorch_model.bin", "README.md", "train.py"}  # pickle and extras never fetched
    assert not any(p.endswith("pytorch_model.bin") for _, p, _ in hub.requests)
    assert not (folder1 / ".cache").exists()

    again = svc.pull(ws, REPO, revision="v1", name="tiny-v1")
    assert again.already_present
    with pytest.raises(FtError) as e:  # same name, other revision: never silently replaced
        svc.pull(ws, REPO, name="tiny-v1")
    assert e.value.code == ErrorCode.ALREADY_EXISTS


def test_missing_repo_and_revision(ws):
    with pytest.raises(FtError) as e:
        svc.pull(ws, "nobody/nothing-here")
    assert e.value.code == ErrorCode.NOT_FOUND and "nobody/nothing-here" in e.value.message
    with pytest.raises(FtError) as e:
        svc.pull(ws, REPO, revision="v9")
    assert e.value.code == ErrorCode.NOT_FOUND and "v9" in e.value.message


def test_broken_connection_mid_file_resumes_with_range(ws, hub, sources, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub writes what it received in chunks of 10 MB and resumes from the last whole chunk;
    # with 64 kB chunks a 460 kB file shows the same behaviour.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    data = (sources / "v2" / "model.safetensors").read_bytes()
    hub.cut_after["model.safetensors"] = cut = len(data) // 2
    before = len(hub.requests)
    r = svc.pull(ws, REPO, name="tiny-resumed")
    ranges = [rng for m, p, rng in hub.requests[before:] if m == "GET" and p.endswith("/model.safetensors")]
    assert len(ranges) == 2 and ranges[0] is None, (
        ranges
    )  # one cut download, then only the rest was asked for
    offset = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert cut - 64 * 1024 < offset <= cut
    assert r.model.sha256["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_interrupted_pull_keeps_finished_files(ws, hub, sources, monkeypatch):
    # First attempt: the weights fail (server error) after the small files are done.
    original = hub._file

    def failing(h, repo_id, rev, fpath, head):
        if fpath == "model.safetensors" and not head:
            return hub._error(h, 500, "Internal", "boom", head)
        return original(h, repo_id, rev, fpath, head)

    monkeypatch.setattr(hub, "_file", failing)
    with pytest.raises(FtError) as e:
        svc.pull(ws, REPO, name="tiny-retry")
    assert e.value.code == ErrorCode.MODEL_DOWNLOAD and "pull again" in (e.value.hint or "")
    assert ws.registry().get("models", name="tiny-retry") is None
    assert not (ws.models_dir / "tiny-retry").exists()  # nothing half-done under the real name
    staging = ws.models_dir / ".download-tiny-retry"
    kept = {p.name for p in staging.iterdir() if p.is_file()}
    assert "config.json" in kept and "model.safetensors" not in kept  # finished files are kept
    monkeypatch.setattr(hub, "_file", original)
    before = len(hub.requests)
    r = svc.pull(ws, REPO, name="tiny-retry")
    again = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests[before:] if m == "GET" and "/resolve/" in p}
    assert "model.safetensors" in again and not again & kept, (again, kept)  # only missing files are fetched
    assert np.allclose(logits_of(r.model.path), logits_of(sources / "v2"))


def test_gated_repo_needs_token_from_passwords_yml(ws, hub):
    with pytest.raises(FtError) as e:
        svc.pull(ws, GATED)
    assert e.value.code == ErrorCode.AUTH_REQUIRED
    assert "passwords.yml" in f"{e.value.message} {e.value.hint}" and "hf_token" in (e.value.hint or "")
    assert not (ws.models_dir / ".download-secret-llama").exists()  # nothing fetched, nothing left behind
    ws.passwords_yml.write_text("hf_token: hf_wrong\n")
    os.chmod(ws.passwords_yml, 0o600)
    with pytest.raises(FtError) as e:
        svc.pull(ws, GATED)
    assert e.value.code == ErrorCode.AUTH_REQUIRED and "no access" in e.value.message
    ws.passwords_yml.write_text(f"hf_token: {TOKEN}\n")
    r = svc.pull(ws, GATED)
    assert r.model.name == "secret-llama" and (ws.model_dir("secret-llama") / "model.safetensors").is_file()


def test_offline_mode(ws, hub, monkeypatch):
    svc.pull(ws, REPO, revision="v1", name="tiny-offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(hub.requests)
    assert svc.pull(ws, REPO, revision="v1", name="tiny-offline").already_present
    with pytest.raises(FtError) as e:
        svc.pull(ws, REPO, name="not-downloaded")
    assert (
        e.value.code == ErrorCode.MODEL_DOWNLOAD and "HF_HUB_OFFLINE" in f"{e.value.message} {e.value.hint}"
    )
    assert len(hub.requests) == before  # offline means no request at all


def test_refusals_before_downloading_weights(ws, hub, sources):
    hub.add_repo("odd/pickle-only")
    hub.commit(
        "odd/pickle-only",
        {"config.json": (sources / "v1" / "config.json").read_bytes(), "pytorch_model.bin": b"\x80\x04"},
    )
    with pytest.raises(FtError) as e:
        svc.pull(ws, "odd/pickle-only")
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "pickle" in e.value.message

    files = HubServer.folder_files(sources / "v1")
    files["config.json"] = b'{"model_type": "no_such_arch", "architectures": ["NoSuchForCausalLM"]}'
    hub.add_repo("odd/new-arch")
    hub.commit("odd/new-arch", files)
    with pytest.raises(FtError) as e:
        svc.pull(ws, "odd/new-arch")
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "no_such_arch" in e.value.message
    assert (
        hub.count(
            "GET", "odd/new-arch/resolve/" + hub.repos["odd/new-arch"].refs["main"] + "/model.safetensors"
        )
        == 0
    )


def test_quantize_on_pull(ws, sources):
    r = svc.pull(ws, REPO, quantize=4)
    assert r.model.name == "tiny-llama-4bit" and r.model.quantization == "4-bit" and r.model.quantize == 4
    ref = np.array(logits_of(sources / "v2"))
    q = np.array(logits_of(r.model.path))
    assert np.corrcoef(ref, q)[0, 1] > 0.9  # same model, 4-bit rounding
