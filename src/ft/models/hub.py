"""Pull a model repository from the Hugging Face Hub with the real ``huggingface_hub`` client.

* Only what a model folder needs is downloaded (config, ``model*.safetensors``, tokenizer files);
  pickle checkpoints (``*.bin``) never are, and ``*.py`` only with --trust-remote-code.
* The revision is resolved to a commit first and everything is fetched at that commit.
* config.json is fetched and checked before the weights, so an unsupported architecture costs
  kilobytes, not gigabytes.
* Files go to a staging folder beside the final one: files finished by an interrupted pull are kept
  and not fetched again, and a broken connection mid-file is resumed with an HTTP Range request.
* HF_ENDPOINT and HF_HUB_OFFLINE are read when a pull starts (not when the library was imported).
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ft.errors import ErrorCode, FtError
from ft.models.architectures import architecture_of

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "vocab.json",
    "merges.txt",
    "*.jinja",
    "chat_template.json",
]
REMOTE_CODE_PATTERNS = ["*.py"]
SECRETS_HINT = "put your token in passwords.yml as `hf_token: hf_...` (create one at https://huggingface.co/settings/tokens)"


@dataclass
class HubPull:
    repo_id: str
    revision: str | None
    commit: str
    path: Path
    files: list[str] = field(default_factory=list)
    download_bytes: int = 0


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline_mode() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _translate(e: Exception, repo_id: str, revision: str | None, token: str | None) -> FtError:
    """huggingface_hub / network exceptions -> one clear FtError."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import errors as hf

    where = hub_endpoint()
    page = f"{where}/{repo_id}"
    if isinstance(e, hf.GatedRepoError):
        if token:
            return FtError(
                ErrorCode.AUTH_REQUIRED,
                f"{repo_id} is gated and the hf_token from passwords.yml has no access to it",
                f"accept the model's terms at {page} with the account that owns the token, then pull again",
            )
        return FtError(
            ErrorCode.AUTH_REQUIRED,
            f"{repo_id} is gated: downloading it needs a Hugging Face token, and passwords.yml has no hf_token",
            f"accept the terms at {page}, then {SECRETS_HINT}",
        )
    if isinstance(e, hf.RevisionNotFoundError):
        return FtError(
            ErrorCode.NOT_FOUND,
            f"revision {revision!r} does not exist in {repo_id}",
            f"use a branch, tag or commit listed at {page}/commits",
        )
    if isinstance(e, hf.RemoteEntryNotFoundError):
        return FtError(
            ErrorCode.MODEL_DOWNLOAD, f"{repo_id}: a listed file is missing on the server ({e})", "pull again"
        )
    if isinstance(e, hf.RepositoryNotFoundError):
        hint = "check the spelling (owner/name, as on huggingface.co)"
        hint += (
            "; if it is private, the hf_token in passwords.yml needs access"
            if token
            else f"; if it is private, {SECRETS_HINT}"
        )
        return FtError(ErrorCode.NOT_FOUND, f"no model repository {repo_id!r} on {where}", hint)
    if isinstance(e, hf.OfflineModeIsEnabled | hf.LocalEntryNotFoundError | hf.IncompleteSnapshotError):
        return FtError(
            ErrorCode.MODEL_DOWNLOAD,
            f"{repo_id} is not (completely) downloaded and the Hub cannot be used ({type(e).__name__})",
            "unset HF_HUB_OFFLINE and check the network, then pull again: finished files are kept",
        )
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        if status == 401:
            return FtError(
                ErrorCode.AUTH_REQUIRED,
                f"{where} refused the token for {repo_id} (401)",
                f"check hf_token in passwords.yml; {SECRETS_HINT}",
            )
        return FtError(
            ErrorCode.MODEL_DOWNLOAD,
            f"download of {repo_id} failed: HTTP {status} from {where}",
            "pull again later: finished files are kept",
        )
    if isinstance(e, httpx2.HTTPError | ConnectionError | TimeoutError):
        return FtError(
            ErrorCode.MODEL_DOWNLOAD,
            f"cannot download {repo_id} from {where}: {type(e).__name__}: {e}",
            "check the network (or HF_ENDPOINT) and pull again: finished files are kept, the rest resumes",
        )
    if isinstance(e, OSError):
        return FtError(
            ErrorCode.MODEL_DOWNLOAD,
            f"download of {repo_id} failed: {e}",
            "pull again: finished files are kept",
        )
    raise e


def _wanted(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def pull_repo(
    repo_id: str,
    staging: Path,
    *,
    revision: str | None = None,
    token: str | None = None,
    trust_remote_code: bool = False,
    tqdm_class: Any = None,
) -> HubPull:
    """Download ``repo_id`` at ``revision`` into ``staging`` (created; reused to resume). See module doc."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    endpoint = hub_endpoint()
    patterns = ALLOW_PATTERNS + (REMOTE_CODE_PATTERNS if trust_remote_code else [])
    staging.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {"token": token or False, "endpoint": endpoint}

    if offline_mode():
        try:
            path = snapshot_download(
                repo_id,
                revision=revision,
                local_dir=staging,
                allow_patterns=patterns,
                local_files_only=True,
                **common,
            )
        except Exception as e:
            raise _translate(e, repo_id, revision, token) from e
        files = sorted(
            str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and ".cache" not in p.parts
        )
        if not any(fnmatch.fnmatch(f, "model*.safetensors") for f in files):
            raise FtError(
                ErrorCode.MODEL_DOWNLOAD,
                f"{repo_id} is not downloaded and HF_HUB_OFFLINE is set",
                "unset HF_HUB_OFFLINE to download it",
            )
        return HubPull(repo_id, revision, "offline", Path(path), files)

    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha or revision or "main"
        siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
        if not any(fnmatch.fnmatch(f, "model*.safetensors") for f in siblings):
            pickles = [f for f in siblings if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if pickles:
                raise FtError(
                    ErrorCode.MODEL_UNSUPPORTED,
                    f"{repo_id} has only pickle weights ({', '.join(sorted(pickles)[:3])}); ft never loads pickle "
                    "files (they can run arbitrary code)",
                    "look for a safetensors version of this model, e.g. under mlx-community/ on huggingface.co",
                )
            raise FtError(
                ErrorCode.MODEL_INVALID, f"{repo_id} has no model*.safetensors weights at {commit[:12]}"
            )
        if "config.json" not in siblings:
            raise FtError(ErrorCode.MODEL_INVALID, f"{repo_id} has no config.json at {commit[:12]}")
        # Architecture check before the weights: kilobytes instead of gigabytes when it is not supported.
        cfg_path = hf_hub_download(repo_id, "config.json", revision=commit, local_dir=staging, **common)
        config = json.loads(Path(cfg_path).read_text())
        architecture_of(config, where=f"{repo_id}/config.json", trust_remote_code=trust_remote_code)
        wanted = [f for f in siblings if _wanted(f, patterns)]
        path = snapshot_download(
            repo_id,
            revision=commit,
            local_dir=staging,
            allow_patterns=patterns,
            tqdm_class=tqdm_class,
            max_workers=4,
            **common,
        )
    except FtError:
        raise
    except Exception as e:
        raise _translate(e, repo_id, revision, token) from e
    return HubPull(repo_id, revision, commit, Path(path), sorted(wanted), sum(siblings[f] for f in wanted))


def search_repos(query: str, limit: int = 20, timeout_s: float = 8.0) -> list[dict[str, Any]]:
    """Model repositories of the Hub whose id contains ``query`` (most downloaded first): id, downloads,
    likes, tags, pipeline tag. FtError (network) when the Hub cannot be reached in ``timeout_s``."""
    import concurrent.futures

    from huggingface_hub import HfApi

    where = hub_endpoint()
    if offline_mode():
        raise FtError(ErrorCode.MODEL_DOWNLOAD, "HF_HUB_OFFLINE is set: the Hub is not searched", None)

    def run() -> list[dict[str, Any]]:
        api = HfApi(endpoint=where, token=False)
        return [
            {
                "id": m.id,
                "downloads": getattr(m, "downloads", None),
                "likes": getattr(m, "likes", None),
                "tags": list(getattr(m, "tags", None) or []),
                "pipeline_tag": getattr(m, "pipeline_tag", None),
            }
            for m in api.list_models(search=query, limit=limit, sort="downloads")
        ]

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(run).result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise FtError(
            ErrorCode.MODEL_DOWNLOAD, f"{where} did not answer in {timeout_s:.0f} s", None
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to reach or read the Hub is "not reachable"
        raise FtError(
            ErrorCode.MODEL_DOWNLOAD, f"cannot search {where}: {type(e).__name__}: {e}", None
        ) from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def progress_tqdm(update: Any) -> type:
    """A tqdm class for ``pull_repo(tqdm_class=...)`` that reports bytes written as ``update(done, total)``.

    huggingface_hub drives several bars; only the one counting bytes on disk is forwarded, so a CLI
    can draw a single bar with any library (the models layer stays free of UI code).
    """
    import io

    from tqdm.std import tqdm as std_tqdm

    class _Forward(std_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # tqdm's own text goes nowhere
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)
            self._forward = kwargs.get("unit") == "B" and str(kwargs.get("desc", "")).startswith(
                "Reconstruct"
            )
            self._report()

        def _report(self) -> None:
            if getattr(self, "_forward", False):
                update(int(self.n), int(self.total) if self.total else None)

        def update(self, n: float | None = 1) -> bool | None:
            out = super().update(n)
            self._report()
            return out

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            super().refresh(*args, **kwargs)
            self._report()

    return _Forward
