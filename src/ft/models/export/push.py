"""Upload an export to a Hugging Face Hub repository (``ft export --push``), with huggingface_hub.

* The endpoint is HF_ENDPOINT, read when the push starts (as pulls do).
* Resumable per file: files the repository already holds with the same content (git blob id, or LFS
  sha256) are not sent again, so re-running an interrupted push uploads only what is missing.
* Nothing that must stay local leaves: the caller passes the bytes to upload, and :func:`push_files`
  refuses (before any request) when any of them contains one of the ``forbidden`` strings (secrets from
  passwords.yml, the workspace path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ft.errors import ErrorCode, FtError
from ft.models.hub import SECRETS_HINT, hub_endpoint

Source = bytes | Path


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str | None
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def _git_blob_id(data: Source) -> str:
    h = hashlib.sha1()  # noqa: S324 - git's object id, not a security hash
    h.update(b"blob %d\0" % _size(data))
    _feed(h, data)
    return h.hexdigest()


def _size(data: Source) -> int:
    return len(data) if isinstance(data, bytes) else Path(data).stat().st_size


def _sha256(data: Source) -> str:
    h = hashlib.sha256()
    _feed(h, data)
    return h.hexdigest()


def _feed(h: hashlib._Hash, data: Source) -> None:
    if isinstance(data, bytes):
        h.update(data)
        return
    with open(data, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)


def find_forbidden(files: dict[str, Source], forbidden: list[str]) -> tuple[str, str] | None:
    """(file, string) for the first of ``files`` whose bytes hold one of ``forbidden``; None when clean."""
    pairs = [(x, x.encode()) for x in forbidden if x and len(x) >= 4]
    if not pairs:
        return None
    overlap = max(len(n) for _, n in pairs)
    for name, data in files.items():
        if isinstance(data, bytes):
            hit = next((x for x, n in pairs if n in data), None)
            if hit:
                return name, hit
            continue
        tail = b""
        with open(data, "rb") as f:
            while block := f.read(1 << 22):
                window = tail + block
                hit = next((x for x, n in pairs if n in window), None)
                if hit:
                    return name, hit
                tail = window[-overlap:]
    return None


def push_files(
    repo_id: str,
    files: dict[str, Source],
    *,
    token: str | None,
    private: bool = False,
    message: str,
    forbidden: list[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> PushResult:
    """Create ``repo_id`` if needed and commit ``files`` (path in repo -> bytes or local file) that differ."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    say = progress or (lambda _m: None)
    if not token:
        raise FtError(
            ErrorCode.AUTH_REQUIRED, f"pushing to {repo_id} needs a Hugging Face token", SECRETS_HINT
        )
    hit = find_forbidden(files, forbidden or [])
    if hit:
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            f"refusing to push: {hit[0]} contains a secret or a local path ({'workspace path' if '/' in hit[1] else 'a passwords.yml value'})",
            "nothing was uploaded; export again (the GGUF description and the manifest hold no paths) or report this",
        )
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        say(f"creating {repo_id} on {endpoint} (if it does not exist)")
        api.create_repo(repo_id, private=private, exist_ok=True)
        remote = {}
        for entry in api.list_repo_tree(repo_id, recursive=True):
            lfs = getattr(entry, "lfs", None)
            blob = getattr(entry, "blob_id", None)
            remote[entry.path] = ("lfs", lfs.sha256) if lfs else ("git", blob)
        todo: list[str] = []
        same: list[str] = []
        for path, data in sorted(files.items()):
            kind, oid = remote.get(path, (None, None))
            mine = _sha256(data) if kind == "lfs" else _git_blob_id(data) if kind == "git" else None
            (same if mine is not None and mine == oid else todo).append(path)
        url = f"{endpoint}/{repo_id}"
        if not todo:
            say(f"{repo_id} already holds every file")
            return PushResult(repo_id, url, None, [], same)
        size = sum(_size(files[p]) for p in todo)
        say(f"uploading {len(todo)} files ({size / 1e6:,.1f} MB) to {repo_id}")
        ops = [
            CommitOperationAdd(
                path_in_repo=p, path_or_fileobj=files[p] if isinstance(files[p], bytes) else str(files[p])
            )
            for p in todo
        ]
        info = api.create_commit(repo_id, operations=ops, commit_message=message)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            raise FtError(
                ErrorCode.AUTH_REQUIRED,
                f"the Hub refused the push to {repo_id} ({status}): the hf_token has no write access there",
                SECRETS_HINT + " (with write access)",
            ) from None
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            f"pushing to {repo_id} failed: {str(e).splitlines()[0]}",
            "run the same command again: files already on the Hub are not sent twice",
        ) from None
    except OSError as e:
        raise FtError(
            ErrorCode.EXPORT_FAILED,
            f"pushing to {repo_id} failed: {e}",
            "check the network (or HF_ENDPOINT) and run the same command again",
        ) from None
    return PushResult(repo_id, url, getattr(info, "oid", None), todo, same)
