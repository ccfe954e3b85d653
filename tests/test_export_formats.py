"""mlx, hf and peft exports, DoRA, the failure path, and the CLI's refusals.

On a 2-layer random Llama with SmolLM2's tokenizer and hand-made non-zero LoRA/DoRA updates, where each
export takes a second; the tuned SmolLM2 (tests/export_tune.py) is exercised by test_export_gguf.py
and by the slow quantized-mlx test here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import export_tune as tune
from ft.errors import ErrorCode, FtError
from ft.models.export import checks as export_checks
from ft.workspace import Workspace
from run_helpers import write_checkpoint

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws(
    smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Workspace:
    ckpt = tune.cached_checkpoint(smollm2_dir, Path(request.config.rootpath) / ".pytest_cache" / "ft-export")
    return Workspace(tune.make_workspace(tmp_path_factory.mktemp("export-formats") / "ws", smollm2_dir, ckpt))


@pytest.fixture(scope="module")
def adapted(ws: Workspace):
    """The adapter-on-base MLX model (not fused), its tokenizer, and prompt ids."""
    from ft.models.export import verify
    from ft.models.loading import load
    from ft.services.export import apply_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(ws, None, "best")
    model, tok = load(ckpt.base_model_dir, dequantize=True, dtype="float32")
    apply_checkpoint(model, ckpt)
    ids = verify.prompt_ids(tok, chat=tune.QUESTION)
    return model, tok, ids, verify.logits(model, ids)


def test_mlx_export_loads_with_mlx_lm_and_matches_the_adapter_on_base_model(tiny_ws):
    from mlx_lm.utils import load as mlx_load

    from ft.models.export import verify
    from ft.services.export import export

    model, tok, ids, reference = _adapted(tiny_ws, "run-lora")
    result = export(tiny_ws, run="run-lora", fmt="mlx", quant="f16")
    assert Path(result.path) == tiny_ws.run_dir("run-lora") / "export" / "mlx-f16"
    loaded, tok2 = mlx_load(result.path)
    assert not any("lora" in k for k in _names(loaded))  # fused: plain linear layers only
    d = verify.diff(verify.logits(loaded, ids), reference)
    assert d.rel < 0.02 and d.top1 >= 0.95, d.describe()  # fp16 weights and fp16 math
    assert verify.distance(reference, verify.logits(_base(tiny_ws), ids)) > 10 * verify.distance(
        verify.logits(loaded, ids), reference
    )
    assert tok2.encode("Hello 123 world") == tok.encode("Hello 123 world")
    assert json.loads((Path(result.path) / "config.json").read_text()).get("quantization") is None


def _adapted(ws: Workspace, run: str):
    """The adapter-on-base MLX model (not fused) of ``run``, its tokenizer, prompt ids and logits."""
    from ft.models.export import verify
    from ft.models.loading import load
    from ft.services.export import apply_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(ws, run, "latest")
    model, tok = load(ckpt.base_model_dir, dequantize=True, dtype="float32")
    apply_checkpoint(model, ckpt)
    ids = verify.prompt_ids(tok, chat=tune.QUESTION)
    return model, tok, ids, verify.logits(model, ids)


def _base(ws: Workspace):
    from ft.models.loading import load

    return load(ws.model_dir("tiny-llama"), dtype="float32")[0]


@pytest.mark.slow
def test_mlx_export_quantized_q8_keeps_the_tune(ws, adapted):
    from mlx_lm.utils import load as mlx_load

    from ft.services.export import export

    _, tok, _, _ = adapted
    result = export(ws, fmt="mlx", quant="q8_0")
    config = json.loads((Path(result.path) / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and config["quantization"]["group_size"] == 32
    assert {c.name for c in result.checks} >= {"fuse", "tensors", "logits", "tune kept"}
    model, _ = mlx_load(result.path)
    from mlx_lm import generate

    text = generate(model, tok, prompt=tune.chat_prompt(tok), max_tokens=16)
    assert "PINEAPPLE-42" in text, text


def _names(model) -> list[str]:
    from mlx.utils import tree_flatten

    return [k for k, _ in tree_flatten(model.parameters())]


# PEFT's documented format (LoraConfig fields; get_peft_model_state_dict key names).
PEFT_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    r"\.lora_(A|B)\.weight$"
)


def test_peft_export_uses_peft_names_and_reproduces_the_adapter(tiny_ws):
    import mlx.core as mx
    from safetensors import safe_open

    from ft.services.export import export

    model, _, _, _ = _adapted(tiny_ws, "run-lora")
    result = export(tiny_ws, run="run-lora", fmt="peft")
    folder = Path(result.path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == TINY_LORA["rank"] and cfg["lora_alpha"] == TINY_LORA["alpha"]
    assert sorted(cfg["target_modules"]) == sorted(TINY_LORA["target_modules"])
    assert cfg["use_dora"] is False and cfg["use_rslora"] is False and cfg["bias"] == "none"
    assert cfg["base_model_name_or_path"] == "tiny-llama" and cfg["layers_to_transform"] is None
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert len(tensors) == 2 * 2 * len(TINY_LORA["target_modules"])
    bad = [k for k in tensors if not PEFT_KEY.match(k)]
    assert not bad, bad[:5]
    r = cfg["r"]
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (r, 64) and b.shape == (
        32,
        r,
    )  # torch Linear layout: (r, in), (out, r); k_proj is 64 -> 2x16
    # PEFT's forward, by hand: y = x W^T + (lora_alpha / r) * (x A^T) B^T -- equals the MLX adapter layer.
    layer = model.model.layers[1].self_attn.k_proj
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w = np.array(layer.linear.weight)
    peft_y = x @ w.T + (cfg["lora_alpha"] / r) * (x @ a.T) @ b.T
    mlx_y = np.array(layer(mx.array(x)))
    assert np.abs(peft_y - mlx_y).max() < 1e-4 * np.abs(mlx_y).max()


def test_hf_export_loads_with_transformers(tiny_ws, smollm2_dir):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from ft.models.loading import load
    from ft.services.export import export

    tok = load(smollm2_dir)[1]  # the tiny model carries SmolLM2's tokenizer files
    result = export(tiny_ws, run="run-lora", fmt="hf", quant="bf16")
    folder = Path(result.path)
    config = AutoConfig.from_pretrained(str(folder))
    assert config.model_type == "llama" and config.num_hidden_layers == 2 and config.tie_word_embeddings
    assert config.num_key_value_heads == 2 and config.hidden_size == 64
    assert not hasattr(config, "quantization") or config.quantization is None
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    for s in ["Hello world", "12345 café 😀", "<|im_start|>user\nhi<|im_end|>"]:
        assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
    assert hf_tok.chat_template == tok.chat_template
    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        assert f.metadata().get("format") == "pt"
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied embeddings, as the config says
    header = json.loads(
        (folder / "model.safetensors").read_bytes()[
            8 : 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
        ]
    )
    assert header["model.norm.weight"]["dtype"] == "BF16"


def test_a_failing_check_leaves_nothing_behind(tiny_ws, monkeypatch):
    from ft.services import export as svc

    ws = tiny_ws
    monkeypatch.setitem(
        export_checks.TENSOR_TOLERANCE, "f16", -1.0
    )  # an impossible limit: the f16 GGUF fails on tensor values
    out = ws.root / "exports" / "doomed"
    with pytest.raises(FtError) as e:
        svc.export(ws, run="run-lora", checkpoint="latest", fmt="gguf", quant="f16", out=out)
    assert e.value.code == ErrorCode.EXPORT_FAILED
    assert (
        "tensor values" in e.value.message
        and "relative RMS" in e.value.message
        and "nothing was written" in e.value.message
    )
    assert not out.exists()
    assert (
        not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")] if out.parent.exists() else True
    )
    assert not [r for r in ws.registry().list("exports") if r["meta"].get("path") == str(out)]


def test_a_lost_tune_names_more_precise_types_and_allow_drift_writes_it_anyway(tiny_ws, monkeypatch):
    from ft.services import export as svc

    ws = tiny_ws
    monkeypatch.setitem(export_checks.MIN_TUNE_KEPT, "f16", 1.01)  # no export keeps more than all of the tune
    out = ws.root / "exports" / "drifty"
    with pytest.raises(FtError) as e:
        svc.export(ws, run="run-lora", checkpoint="latest", fmt="gguf", quant="f16", out=out)
    assert "the tune does not survive f16" in e.value.message and "need 101%" in e.value.message
    assert "--quant f32" in e.value.hint and "--allow-drift" in e.value.hint
    assert "q8_0" not in e.value.hint  # never a *less* precise type
    assert not out.exists()
    assert export_checks.higher_precisions("q4_k_m") == ["q5_k_m", "q6_k"]
    assert export_checks.higher_precisions("q8_0") == ["f16", "f32"]
    assert export_checks.higher_precisions("bf16") == ["f16", "f32"]

    result = svc.export(
        ws, run="run-lora", checkpoint="latest", fmt="gguf", quant="f16", out=out, allow_drift=True
    )
    assert result.drift_allowed and result.tune_kept is not None and 0.5 < result.tune_kept < 1.01
    kept = next(c for c in result.checks if c.name == "tune kept")
    assert not kept.ok and "--allow-drift" in kept.detail
    manifest = json.loads((out / "ft_export.json").read_text())
    assert manifest["allow_drift"] is True and manifest["tune_kept"] == result.tune_kept
    assert {"write", "verify"} <= set(result.timings)


def test_push_uploads_the_export_and_a_model_card_and_no_secret(tiny_ws, monkeypatch, capsys):
    """`ft export --push` against a hub-shaped server on 127.0.0.1 (HF_ENDPOINT), as the pull tests do."""
    from huggingface_hub import ModelCard

    from ft.cli.app import run
    from ft.config.train import TrainConfig
    from hubserver import HubServer

    ws = tiny_ws
    token, canary = "hf_WRITEtoken0123456789", "wandb-CANARY-5f0e2b7c9d"
    (ws.root / "passwords.yml").write_text(f"hf_token: {token}\nwandb_api_key: {canary}\n")
    (ws.root / "passwords.yml").chmod(0o600)
    folder = ws.model_dir("tiny-llama")
    ws.registry().upsert(
        "models",
        {"name": "tiny-llama"},
        source="acme/tiny-llama",
        meta={
            "kind": "hf",
            "path": str(folder),
            "architecture": "llama",
            "parameters": 1,
            "quantization": "none",
            "dtype": "float32",
            "size_bytes": 1,
            "sha256": {},
        },
    )
    snapshot = {"config": TrainConfig().model_dump(mode="json"), "dataset": {"name": "notes", "version": 2}}
    (ws.run_dir("run-lora") / "config.json").write_text(json.dumps(snapshot))
    ws.registry().upsert(
        "datasets",
        {"name": "notes", "version": 2},
        source="notes.jsonl",
        meta={"records": {"train": 90, "val": 10}},
    )
    report = ws.run_dir("run-lora") / "eval" / "latest-val" / "report.json"
    report.parent.mkdir(parents=True)
    metrics = {"loss": 2.5, "perplexity": 12.18, "accuracy": 0.41, "tokens": 900, "records": 10}
    report.write_text(
        json.dumps(
            {
                "split": "val",
                "split_records": 10,
                "base": {"metrics": metrics},
                "tuned": {"metrics": {**metrics, "loss": 1.25, "perplexity": 3.49}},
            }
        )
    )
    args = [
        "--workspace",
        str(ws.root),
        "export",
        "run-lora",
        "--checkpoint",
        "latest",
        "--format",
        "gguf",
        "--quant",
        "f16",
        "--out",
        str(ws.root / "exports" / "pushed"),
    ]

    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.add_repo("acme/tiny-llama").card = {"license": "apache-2.0"}
        hub.commit("acme/tiny-llama", {"config.json": b"{}"})
        assert run([*args, "--push", "alice/tiny-tuned"]) != 0  # the token has no write access yet
        err = capsys.readouterr().err
        assert "refused the push" in err and "write access" in err and token not in err
        hub.write_tokens.add(token)
        hub.fail_commits = 1  # the upload dies once: a re-run must finish it
        assert run([*args, "--push", "alice/tiny-tuned"]) != 0
        err = capsys.readouterr().err
        assert "run the same command again" in err and "Traceback" not in err
        assert run([*args, "--push", "alice/tiny-tuned", "--json"]) == 0, hub.requests[-6:]
        out = json.loads(capsys.readouterr().out)
        assert out["reused"] is True  # the export made by the first attempt, not made again
        repo = hub.repos["alice/tiny-tuned"]
        files = repo.commits[repo.refs["main"]]
        gguf_name = Path(out["main_file"]).name
        assert {gguf_name, "Modelfile", "ft_export.json", "README.md"} <= set(files)
        assert files[gguf_name] == (Path(out["path"]) / gguf_name).read_bytes()
        card = ModelCard(files["README.md"].decode())
        assert card.data.base_model == "acme/tiny-llama" and card.data.library_name == "gguf"
        assert card.data.license == "apache-2.0" and {"ft", "gguf", "lora"} <= set(card.data.tags)
        text = card.text
        assert "| tuned | 1.2500 | 3.490 |" in text and "train records: 90" in text
        assert (
            "llama-cli -hf alice/tiny-tuned:F16" in text and "ollama run hf.co/alice/tiny-tuned:F16" in text
        )
        assert "checkpoint_path" not in json.loads(files["ft_export.json"])
        sent = b"".join(hub.bodies)
        for secret in (token, canary, str(ws.root), str(ws.root.resolve())):
            assert secret.encode() not in sent, secret
        # Pushing again sends nothing: every file is already there with the same content.
        assert run([*args, "--push", "alice/tiny-tuned", "--json"]) == 0
        again = json.loads(capsys.readouterr().out)["pushed"]
        assert again["uploaded"] == [] and len(again["unchanged"]) == len(files) - 1  # .gitattributes


def test_imatrix_measures_the_runs_training_data_and_feeds_the_quantizer(tiny_ws):
    from ft.config.train import TrainConfig
    from ft.data.sample import sample_jsonl
    from ft.services import export as svc
    from ft.services.dataset_prepare import prepare_dataset

    ws = tiny_ws
    (ws.root / "imx.jsonl").write_text(sample_jsonl(n=40))
    ds = prepare_dataset(
        ws, str(ws.root / "imx.jsonl"), name="imx", model="tiny-llama", data={"val_split": 0.0}
    )
    snapshot = {
        "config": TrainConfig().model_dump(mode="json"),
        "dataset": {"name": "imx", "version": ds.version},
    }
    (ws.run_dir("run-dora") / "config.json").write_text(json.dumps(snapshot))
    with pytest.raises(FtError) as e:
        svc.export(ws, run="run-dora", checkpoint="latest", fmt="gguf", quant="f16", imatrix=True)
    assert "quantized type" in e.value.message
    result = svc.export(ws, run="run-dora", checkpoint="latest", fmt="gguf", quant="q8_0", imatrix=True)
    im = next(c for c in result.checks if c.name == "imatrix")
    assert "from" in im.detail and "tokens of the run's training data" in im.detail
    assert any(c.name == "quantize" for c in result.checks) and result.timings["quantize"] > 0


def test_cli_refusals_are_clear_and_cheap(tiny_ws, capsys):
    from ft.cli.app import run

    ws = tiny_ws
    base = ["--workspace", str(ws.root), "export"]
    assert run([*base, "--format", "onnx"]) == 2
    assert "unknown --format 'onnx'" in capsys.readouterr().err
    assert run([*base, "--format", "hf", "--quant", "q4_0"]) == 2
    assert "not available for --format hf" in capsys.readouterr().err
    assert run([*base, "--format", "mlx", "--quant", "q4_k_m"]) == 2
    assert "exist only as GGUF" in capsys.readouterr().err
    assert run([*base, "no-such-run"]) == 5
    assert run([*base, "--checkpoint", "step-999"]) == 5
    assert "checkpoints: step-000001" in capsys.readouterr().err
    existing = ws.root / "exports" / "taken"
    existing.mkdir(parents=True)
    assert run([*base, "--out", str(existing)]) == 5
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ DoRA, tiny model
TINY_LORA = {"rank": 4, "alpha": 8.0, "target_modules": ("q_proj", "k_proj", "v_proj", "down_proj")}


@pytest.fixture(scope="module")
def tiny_ws(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A 2-layer random Llama (SmolLM2's tokenizer) with a LoRA run and a DoRA run, updates not zero."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from ft.engine.lora import AdapterSpec, apply_adapters, trainable_weights
    from ft.services.project import init_workspace

    root = tmp_path_factory.mktemp("export-dora") / "ws"
    init_workspace(root)
    ws = Workspace(root)
    folder = ws.model_dir("tiny-llama")
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir / name, folder / name)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    }
    (folder / "config.json").write_text(json.dumps(config))
    mx.random.seed(1)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    base_weights = dict(tree_flatten(model.parameters()))
    for run, spec in (
        ("run-lora", AdapterSpec(method="lora", layers="all", **TINY_LORA)),
        (
            "run-dora",
            AdapterSpec(method="dora", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), layers="all"),
        ),
    ):
        model = llama.Model(llama.ModelArgs.from_dict(config))
        model.load_weights(list(base_weights.items()))
        apply_adapters(model, spec)
        weights = {
            k: (mx.random.normal(v.shape) * 0.2 if k.endswith("lora_b") else v)
            for k, v in trainable_weights(model).items()
        }
        model.load_weights(list(weights.items()), strict=False)
        write_checkpoint(ws, run, 1, model, spec, "tiny-llama")
    return ws


def test_dora_exports_to_peft_with_magnitude_vectors_and_fuses_for_gguf(tiny_ws):
    dora_ws = tiny_ws
    from safetensors.numpy import load_file

    from ft.services.export import export

    result = export(dora_ws, run="run-dora", checkpoint="latest", fmt="peft")
    cfg = json.loads((Path(result.path) / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    tensors = load_file(str(Path(result.path) / "adapter_model.safetensors"))
    mags = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 4 and "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector" in mags
    assert tensors[mags[0]].shape in {(64,), (32,)}
    assert any(c.name == "peft" and c.ok for c in result.checks)

    gguf = export(dora_ws, run="run-dora", checkpoint="latest", fmt="gguf", quant="f32")
    assert gguf.method == "dora" and not gguf.base_quantized
    logits = next(c for c in gguf.checks if c.name == "logits")
    assert "top-1 agreement 100.0%" in logits.detail
