"""`ft export --push OWNER/NAME`: an export folder, a model card written from its run, uploaded to the Hub.

What is uploaded: the export's files (the manifest with its local paths removed) and README.md, a model
card with YAML metadata (base_model, library_name, license, tags, datasets) and the run's data, settings,
evaluation (base vs tuned), the export checks and how to run the model. The token is passwords.yml's
``hf_token``; every byte is checked against the workspace's secrets and its path before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ft import __version__
from ft.errors import ErrorCode, FtError
from ft.services.export import EXPORT_MANIFEST as MANIFEST
from ft.workspace import Workspace

log = logging.getLogger(__name__)

_LOCAL_KEYS = ("checkpoint_path",)


def push_export(
    ws: Workspace,
    result: Any,
    repo_id: str,
    *,
    private: bool = False,
    progress: Any = None,
) -> Any:
    """Upload the export described by ``result`` (an ExportResult) to ``repo_id``; returns a PushResult."""
    from ft.config.secrets import load_secrets
    from ft.models.export.card import model_card
    from ft.models.export.push import push_files

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise FtError(ErrorCode.USAGE, f"--push {repo_id!r} is not OWNER/NAME", "e.g. --push alice/my-model")
    secrets = load_secrets(ws)
    token = secrets.hf_token.get_secret_value() if secrets.hf_token else None
    folder = Path(result.path)
    files: dict[str, bytes | Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            files[rel] = p
    manifest = json.loads((folder / MANIFEST).read_text())
    files[MANIFEST] = (
        json.dumps({k: v for k, v in manifest.items() if k not in _LOCAL_KEYS}, indent=2) + "\n"
    ).encode()
    facts = card_facts(ws, result, repo_id, manifest, token)
    files["README.md"] = model_card(facts).encode()
    forbidden = [
        s.get_secret_value() for s in (secrets.hf_token, secrets.wandb_api_key, secrets.serve_api_key) if s
    ]
    forbidden += [str(ws.root.resolve()), str(ws.root)]
    home = os.path.expanduser("~")
    if home not in ("/", "/root", ""):
        forbidden.append(home)
    what = f"{result.run_id}/{result.checkpoint}" if result.run_id else result.base_model
    return push_files(
        repo_id,
        files,
        token=token,
        private=private,
        message=f"ft export of {what}: {result.format} {result.quant}",
        forbidden=forbidden,
        progress=progress,
    )


def _base_hub_id(ws: Workspace, base_model: str) -> tuple[str, bool, str | None]:
    """(base model id, whether it is a Hub repo id, its license when known)."""
    from ft.models.embedded import UPSTREAM_REPO, embedded_gguf_path

    row = next((r for r in ws.registry().list("models") if r.get("name") == base_model), None)
    source = (row or {}).get("source") or ""
    kind = ((row or {}).get("meta") or {}).get("kind")
    if kind == "embedded" or source == "embedded":
        from ft.models.gguf_import import read_gguf_header

        try:
            lic = read_gguf_header(embedded_gguf_path()).metadata.get("general.license")
        except (FtError, OSError):
            lic = None
        return UPSTREAM_REPO, True, lic
    if kind == "hf" and "/" in source:
        return source, True, None
    return base_model, False, None


def _hub_license(repo: str, token: str | None) -> str | None:
    from huggingface_hub import HfApi

    from ft.models.hub import hub_endpoint

    try:
        info = HfApi(endpoint=hub_endpoint(), token=token or False).model_info(repo)
        card = getattr(info, "card_data", None) or getattr(info, "cardData", None)
        lic = card.get("license") if card else None
        return str(lic) if lic else None
    except Exception as e:  # no network, a private base, an old hub: the card says "see the base"
        log.debug("no license for %s: %s", repo, e)
        return None


def card_facts(ws: Workspace, result: Any, repo_id: str, manifest: dict[str, Any], token: str | None) -> Any:
    from ft.models.export.card import CardFacts

    base, is_hub, lic = _base_hub_id(ws, result.base_model)
    if is_hub and lic is None:
        lic = _hub_license(base, token)
    facts = CardFacts(
        repo_id=repo_id,
        fmt=result.format,
        quant=result.quant,
        base_model=base,
        base_is_hub_id=is_hub,
        license=lic,
        method=result.method,
        main_file=Path(result.main_file).name if result.main_file else None,
        run_id=result.run_id,
        checkpoint=result.checkpoint,
        checks=[{"name": c.name, "ok": c.ok, "detail": _no_paths(c.detail, ws)} for c in result.checks],
        tune_kept=result.tune_kept,
        drift_allowed=result.drift_allowed,
        ft_version=__version__,
    )
    if result.run_id:
        _run_facts(ws, result.run_id, facts)
    return facts


def _no_paths(text: str, ws: Workspace) -> str:
    return text.replace(str(ws.root.resolve()), "<workspace>").replace(str(ws.root), "<workspace>")


def _run_facts(ws: Workspace, run_id: str, facts: Any) -> None:
    from ft.services.run_record import RunSnapshot

    run_dir = ws.run_dir(run_id)
    snap = RunSnapshot.find(run_dir / "config.json")
    if snap is not None:
        c = snap.config
        t, lc = c.training, c.lora
        facts.hyperparameters = {
            "method": t.method,
            "LoRA rank": lc.rank,
            "LoRA alpha": lc.alpha,
            "LoRA dropout": lc.dropout,
            "target modules": ", ".join(lc.target_modules)
            if not isinstance(lc.target_modules, str)
            else lc.target_modules,
            "learning rate": t.learning_rate,
            "epochs": t.epochs,
            "batch size": t.batch_size,
            "gradient accumulation": t.grad_accumulation_steps,
            "max sequence length": c.data.max_seq_length,
            "seed": t.seed,
        }
        if snap.dataset is not None:
            facts.data = {"dataset": snap.dataset.name, "version": snap.dataset.version}
            row = next(
                (
                    r
                    for r in ws.registry().list("datasets")
                    if r.get("name") == snap.dataset.name
                    and int(r.get("version") or 0) == snap.dataset.version
                ),
                None,
            )
            meta = (row or {}).get("meta") or {}
            for split, n in (meta.get("records") or {}).items():
                facts.data[f"{split} records"] = n
            source = (row or {}).get("source") or ""
            if source.startswith("hf:") or (source.count("/") == 1 and not Path(source).exists()):
                facts.datasets = [source.removeprefix("hf:")]
    reports = sorted((run_dir / "eval").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if reports:
        try:
            rep = json.loads(reports[-1].read_text())
            ev: dict[str, Any] = {"split": rep.get("split"), "records": rep.get("split_records")}
            for who in ("base", "tuned"):
                if rep.get(who):
                    ev[who] = rep[who]["metrics"]
            facts.evaluation = ev
        except (OSError, ValueError, KeyError) as e:
            log.warning("cannot read %s for the model card: %s", reports[-1], e)
