"""Issue 2: init, config errors and precedence, secrets, doctor, error rendering — through the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ft.cli.app import app, run
from ft.config.loader import load_config
from ft.config.render import config_reference_markdown
from ft.config.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_SuperSecretToken_1234567890"


@pytest.fixture
def ft(capsys, monkeypatch):
    """Run `ft ARGS` in-process with the real entry logic; returns (exit code, stdout, stderr)."""
    for k in [k for k in os.environ if k.startswith("FT_")]:
        monkeypatch.delenv(k)

    def call(*args: str) -> tuple[int, str, str]:
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def ws(tmp_path, ft, monkeypatch):
    code, _, err = ft("init", tmp_path / "ws")
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "ws")
    return tmp_path / "ws"


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in (
        "init",
        "models",
        "dataset",
        "train",
        "evaluate",
        "export",
        "serve",
        "doctor",
        "config",
        "runs",
    ):
        assert cmd in result.output


def test_version(ft):
    code, out, _ = ft("--version")
    assert code == 0 and out.startswith("ft ")


def test_init_creates_workspace(ws):
    for rel in ("train.yml", "passwords.yml.example", ".gitignore", "data/sample.jsonl", "ft.db"):
        assert (ws / rel).exists(), rel
    ignored = (ws / ".gitignore").read_text().split()
    for entry in ("passwords.yml", "models/", "datasets/", "runs/"):
        assert entry in ignored
    text = (ws / "train.yml").read_text()
    assert "# name: mistralai/Mistral-7B-Instruct-v0.3" in text
    # every key of every section is present in the file, and it validates to the defaults
    data = yaml.safe_load(text)
    for section, sfield in TrainConfig.model_fields.items():
        assert set(data[section]) == set(sfield.annotation.model_fields), section
    assert load_config(ws).config == TrainConfig()
    cfg = TrainConfig()
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (
        16,
        32,
        0.05,
        ["q_proj", "v_proj"],
    )
    t = cfg.training
    assert (t.batch_size, t.grad_accumulation_steps, t.learning_rate, t.warmup_steps, t.lr_schedule) == (
        2,
        4,
        1e-4,
        100,
        "cosine",
    )
    assert (t.weight_decay, t.max_grad_norm, t.eval_steps, t.save_steps, t.keep_last, t.seed) == (
        0.01,
        1.0,
        50,
        100,
        3,
        42,
    )
    assert (cfg.data.val_split, cfg.data.max_seq_length, cfg.model.name) == (
        0.2,
        2048,
        "smollm2-135m-instruct",
    )


def test_sample_data_schema(ws):
    recs = [json.loads(line) for line in (ws / "data/sample.jsonl").read_text().splitlines()]
    assert len(recs) >= 200
    labels = [r["label"] for r in recs]
    assert 0.15 < labels.count(False) / len(labels) < 0.35  # roughly the brief's 746/254
    for r in recs:
        assert set(r) == {"conversations", "label"}
        roles = [m["role"] for m in r["conversations"]]
        assert set(roles) <= {"system", "user", "assistant"} and roles[-1] == "assistant"


def test_init_refuses_overwrite_then_force_keeps_backup(ws, ft):
    (ws / "train.yml").write_text((ws / "train.yml").read_text().replace("rank: 16", "rank: 8"))
    code, _, err = ft("init", ws)
    assert code == 4 and "already an ft workspace" in err and "--force" in err and "Traceback" not in err
    code, out, _ = ft("init", ws, "--force")
    assert code == 0
    backups = list(ws.glob("train.yml.*.bak"))
    assert len(backups) == 1 and "rank: 8" in backups[0].read_text()
    assert "rank: 16" in (ws / "train.yml").read_text()


@pytest.mark.parametrize("profile", ["chat", "instruction", "code", "tools", "domain"])
def test_profiles_change_only_their_values(tmp_path, ft, profile):
    from ft.config.profiles import PROFILES

    code, _, err = ft("init", tmp_path / profile, "--profile", profile)
    assert code == 0, err
    cfg = load_config(tmp_path / profile).config.model_dump()
    default = TrainConfig().model_dump()
    changed = {(s, k) for s in cfg for k in cfg[s] if cfg[s][k] != default[s][k]}
    assert changed == {(s, k) for s, kv in PROFILES[profile].items() for k in kv}


def _write(ws: Path, text: str) -> None:
    (ws / "train.yml").write_text(text)


def test_unknown_key_gets_suggestion(ws, ft):
    _write(ws, "training:\n  learnig_rate: 0.001\n")
    code, _, err = ft("config", "show")
    assert code == 3
    assert (
        "train.yml: training.learnig_rate is not a setting; did you mean training.learning_rate?"
        in err.replace(":2:", ":")
    )
    assert "train.yml:2" in err and "Traceback" not in err


def test_out_of_range_names_key_value_and_range(ws, ft):
    _write(ws, "data:\n  val_split: 1.5\nlora:\n  alpha: -2\n")
    code, _, err = ft("config", "show")
    assert code == 3
    assert "train.yml:2: data.val_split = 1.5 is not allowed" in err and "< 1" in err
    assert "train.yml:4: lora.alpha = -2 is not allowed" in err and "> 0" in err


def test_wrong_type(ws, ft):
    _write(ws, "training:\n  batch_size: two\n")
    code, _, err = ft("config", "show")
    assert code == 3 and "training.batch_size = 'two'" in err and "an integer" in err


def test_bad_yaml_has_line_number(ws, ft):
    _write(ws, "training:\n  batch_size: 2\n  eval_steps: [1\n")
    code, _, err = ft("config", "show")
    assert code == 3 and "train.yml:4" in err and "not valid YAML" in err


def test_cross_field_warmup(ws, ft):
    code, _, err = ft("config", "show", "--set", "training.max_steps=10", "--set", "training.warmup_steps=20")
    assert code == 3 and "warmup_steps (20) must be fewer than max_steps (10)" in err


def test_precedence_file_env_set(ws, ft, monkeypatch):
    _write(ws, "training:\n  learning_rate: 0.001\n  batch_size: 3\n  seed: 5\n")
    monkeypatch.setenv("FT_TRAINING__BATCH_SIZE", "6")
    monkeypatch.setenv("FT_TRAINING__SEED", "7")
    code, out, err = ft("config", "show", "--json", "--set", "training.seed=9")
    assert code == 0, err
    entries = {e["key"]: e for e in json.loads(out)["entries"]}
    assert entries["training.learning_rate"]["value"] == 0.001
    assert entries["training.learning_rate"]["source"] == "train.yml:2"
    assert entries["training.batch_size"]["value"] == 6
    assert entries["training.batch_size"]["source"] == "env FT_TRAINING__BATCH_SIZE"
    assert entries["training.seed"]["value"] == 9 and entries["training.seed"]["source"] == "--set"
    assert entries["training.epochs"]["source"] == "default"


def test_env_unknown_key_is_named(ws, ft, monkeypatch):
    monkeypatch.setenv("FT_TRAINING__EPOCS", "2")
    code, _, err = ft("config", "show")
    assert (
        code == 3
        and "env FT_TRAINING__EPOCS: training.epocs is not a setting; did you mean training.epochs?" in err
    )


def test_passwords_permission_refused(ws, ft):
    pw = ws / "passwords.yml"
    pw.write_text(f"hf_token: {SECRET}\n")
    pw.chmod(0o644)
    code, out, _ = ft("doctor", "--no-measure", "--json")
    report = json.loads(out)
    check = next(c for c in report["checks"] if c["name"] == "passwords.yml")
    assert code == 1 and check["status"] == "fail" and "chmod 600" in check["fix"]
    from ft.config.secrets import load_secrets
    from ft.errors import FtError

    with pytest.raises(FtError) as e:
        load_secrets(ws)
    assert "chmod 600" in e.value.hint and SECRET not in str(e.value)


def test_secret_never_printed(ws, ft, caplog):
    pw = ws / "passwords.yml"
    pw.write_text(f"hf_token: {SECRET}\nserve_api_key: {SECRET}x\n")
    pw.chmod(0o600)
    from ft.config.secrets import load_secrets

    s = load_secrets(ws)
    assert s.hf_token.get_secret_value() == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s) and SECRET not in s.model_dump_json()
    outputs = [
        ft("config", "show"),
        ft("config", "show", "--json"),
        ft("doctor", "--no-measure"),
        ft("doctor", "--no-measure", "--json"),
    ]
    for _code, out, err in outputs:
        assert SECRET not in out and SECRET not in err
    assert SECRET not in caplog.text
    pw.write_text(f"hf_tokn: {SECRET}\n")
    pw.chmod(0o600)
    code, out, err = ft("doctor", "--no-measure")
    assert code == 1 and "hf_tokn" in out and SECRET not in out + err


def test_workspace_found_upwards_and_env(ws, ft, tmp_path, monkeypatch):
    deep = ws / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    code, out, _ = ft("config", "show", "--json")
    assert code == 0 and json.loads(out)["path"] == str(ws / "train.yml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FT_WORKSPACE", str(tmp_path / "nowhere"))
    code, out, _ = ft("doctor", "--no-measure", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    # FT_WORKSPACE is honoured: doctor looks at that folder, not at the one found upwards from here.
    assert code == 0 and checks["workspace"]["status"] == "warn"
    assert f"{tmp_path / 'nowhere'} is not an ft workspace" in checks["workspace"]["detail"]


def test_usage_errors_and_debug_traceback(ws, ft):
    from ft.cli.app import _split_debug

    assert _split_debug(["train", "--debug"]) == (["--debug", "train"], True)
    # an unknown option is a usage error (exit 2), no traceback
    code, _, err = ft("init", "--no-such-option")
    assert code == 2 and "Traceback" not in err
    code, out, err = ft("config", "show", "--set", "nonsense")
    assert code == 2 and "section.key=value" in err and "Traceback" not in err
    code, out, err = ft("--debug", "config", "show", "--set", "nonsense")
    assert code == 2 and "Traceback" in err


def test_json_errors(ws, ft):
    _write(ws, "training:\n  learnig_rate: 0.001\n")
    code, out, _ = ft("config", "show", "--json")
    assert code == 3 and json.loads(out)["error"] == "config_invalid"


def test_doctor_reports(ws, ft):
    code, out, err = ft("doctor", "--json")
    assert code == 0, out + err
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert {"mlx", "blas", "matmul", "memory", "disk", "workspace", "train.yml", "registry"} <= set(checks)
    assert "GFLOP/s" in checks["matmul"]["detail"]


def test_config_docs_are_current():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference_markdown(), (
        "docs/config.md is stale: run `python -m ft.config.render > docs/config.md`"
    )


def test_subprocess_entry_point(tmp_path):
    """The installed console script: a real process, real exit codes, no traceback on user errors."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FT_")}
    exe = Path(sys.executable).parent / "ft"
    r = subprocess.run([exe, "init", tmp_path / "w"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "init", tmp_path / "w"], capture_output=True, text=True, env=env)
    assert r.returncode == 4 and "Traceback" not in r.stderr and "--force" in r.stderr
    (tmp_path / "w" / "train.yml").write_text("lora:\n  rank: 0\n")
    r = subprocess.run([exe, "config", "show"], capture_output=True, text=True, env=env, cwd=tmp_path / "w")
    assert r.returncode == 3 and "lora.rank = 0" in r.stderr and "Traceback" not in r.stderr
    assert stat.S_IMODE((tmp_path / "w" / "train.yml").stat().st_mode) & 0o200


def test_sample_records_are_distinct_and_deterministic():
    from ft.data.sample import sample_jsonl

    text = sample_jsonl()
    lines = text.splitlines()
    assert len(lines) == 240 and len(set(lines)) == 240
    assert sample_jsonl() == text and sample_jsonl(seed=7) != text


def _panic() -> None:
    """A real pyo3 PanicException (a BaseException, not an Exception): tiktoken given a byte it has no rank for."""
    import tiktoken

    enc = tiktoken.Encoding("ft-test", pat_str=r"\S+|\s+", mergeable_ranks={b"a": 0}, special_tokens={})
    enc.encode("b")


@pytest.mark.parametrize(
    "boom",
    [_panic, lambda: (_ for _ in ()).throw(EOFError("ran out")), lambda: 1 / 0],
    ids=["pyo3-panic", "eof", "zero-division"],
)
def test_no_exception_class_escapes_the_guard(ws, ft, monkeypatch, boom):
    from ft.services import dataset_inspect as svc

    def broken(*_a, **_k):
        boom()

    monkeypatch.setattr(svc, "list_datasets", broken)
    code, out, err = ft("dataset", "list", "--json")
    error = json.loads(out)
    assert code == 1 and error["error"] == "internal_error" and "--debug" in error["hint"]
    code, out, err = ft("dataset", "list")
    assert code == 1 and "internal error:" in err and "Traceback" not in err and "interrupted" not in err
    code, out, err = ft("--debug", "dataset", "list")
    assert code == 1 and "Traceback" in err


def test_the_removed_output_section_is_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    """output.dir was never read (runs are always in <workspace>/runs): a train.yml or run snapshot that
    still has it loads, and says the section is gone instead of ignoring it silently."""
    from ft.services.run_record import RunSnapshot

    yml = tmp_path / "train.yml"
    yml.write_text("output:\n  dir: elsewhere\ntraining:\n  epochs: 2\n")
    with caplog.at_level("WARNING"):
        cfg = load_config(yml).config
    assert cfg.training.epochs == 2 and not hasattr(cfg, "output")
    assert "output section is no longer a setting" in caplog.text
    old = {"config": {"output": {"dir": "runs"}, "lora": {"rank": 4}}, "dataset": {"name": "d", "version": 1}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert RunSnapshot.read(tmp_path / "config.json").config.lora.rank == 4
