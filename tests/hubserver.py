"""A small Hugging Face Hub look-alike on 127.0.0.1 for tests: the routes huggingface_hub uses to download.

    GET  /api/models?search=TEXT&limit=N         public repos whose id contains TEXT (HfApi.list_models)
    GET  /api/models/{repo}[/revision/{rev}]     repo info: sha (commit), siblings, gated
    GET  /api/models/{repo}/tree/{rev}           file listing (path, size, oid, lfs)
    HEAD /{repo}/resolve/{rev}/{path}            X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{path}            the bytes; honours Range (206 + Content-Range)

and the routes huggingface_hub's create_repo / create_commit / upload_folder use to upload:

    POST /api/repos/create                       {"name", "organization", "visibility"}: 200, 409 if it exists
    POST /api/models/{repo}/preupload/{rev}      every file "regular" (inline in the commit; no LFS/Xet)
    POST /api/models/{repo}/commit/{rev}         NDJSON: header, file (base64), deletedFile -> a new commit

Uploads need a token in :attr:`write_tokens` (401 without one, 403 with another); every request body is
kept in :attr:`bodies` so a test can look for bytes that must never be uploaded.
Errors are answered as the Hub does, with X-Error-Code: RepoNotFound (404), RevisionNotFound (404),
EntryNotFound (404), GatedRepo (401 without a token, 403 with a token lacking access; like the Hub, a
gated repo's info and file listing are public, its files are not).
Tests write repositories with :meth:`HubServer.add_repo`, can cut one file's first download short
(:attr:`cut_after`) to exercise resume, and read what was asked in :attr:`requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: data}
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens with access (gated repos)
    private: bool = False
    card: dict | None = None  # the model card's metadata (cardData in the repo info)


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.write_tokens: set[str] = set()
        self.bodies: list[bytes] = []  # every request body received (uploads)
        self.fail_commits = 0  # answer this many commits with a 500 (an interrupted push)
        self.cut_after: dict[
            str, int
        ] = {}  # file path -> bytes to send before dropping the connection (once)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                server._handle(self, head=True)

            def do_GET(self) -> None:
                server._handle(self, head=False)

            def do_POST(self) -> None:
                server._post(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------- repositories
    def add_repo(self, repo_id: str, gated: bool = False, tokens: set[str] | None = None) -> Repo:
        self.repos[repo_id] = Repo(gated=gated, tokens=set(tokens or ()))
        return self.repos[repo_id]

    def commit(
        self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", tag: str | None = None
    ) -> str:
        """Add a commit holding exactly ``files`` and point ``branch`` (and ``tag``) at it; returns its sha."""
        repo = self.repos[repo_id]
        sha = hashlib.sha1(
            repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
            + str(len(repo.commits)).encode()
        ).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[branch] = sha
        if tag:
            repo.refs[tag] = sha
        return sha

    @staticmethod
    def folder_files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.endswith(suffix))

    # ---------------------------------------------------------------- uploads
    def _post(self, h: BaseHTTPRequestHandler) -> None:
        import base64

        path = unquote(urlsplit(h.path).path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append(("POST", path, None))
            self.bodies.append(body)
        auth = h.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth else ""
        if token not in self.write_tokens:
            status = 403 if token else 401
            return self._error(
                h, status, "Unauthorized", "Invalid credentials in Authorization header", False
            )
        if path == "/api/validate-yaml":  # huggingface_hub checks a README's metadata before committing it
            import yaml

            try:
                yaml.safe_load(json.loads(body)["content"].split("---")[1])
                out = {"errors": [], "warnings": []}
            except Exception as e:  # any parse failure is the answer
                out = {"errors": [{"message": str(e)}], "warnings": []}
            return self._send(h, 200, json.dumps(out).encode(), {"Content-Type": "application/json"})
        if path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req.get('organization')}/{req['name']}" if req.get("organization") else req["name"]
            if repo_id in self.repos:  # the Hub's 409 names the existing repository's url
                out = {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}
                return self._send(h, 409, json.dumps(out).encode(), {"Content-Type": "application/json"})
            repo = self.add_repo(repo_id)
            repo.private = req.get("visibility") == "private" or bool(req.get("private"))
            self.commit(repo_id, {".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"})
            out = {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}
            return self._send(h, 200, json.dumps(out).encode(), {"Content-Type": "application/json"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not m or m.group(1) not in self.repos:
            return self._error(h, 404, "RepoNotFound", "Repository not found", False)
        repo_id, what, rev = m.groups()
        repo = self.repos[repo_id]
        if what == "preupload":
            files = json.loads(body)["files"]
            out = {
                "files": [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                    for f in files
                ]
            }
            return self._send(h, 200, json.dumps(out).encode(), {"Content-Type": "application/json"})
        if self.fail_commits:
            self.fail_commits -= 1
            return self._error(h, 500, "InternalError", "the commit failed (test)", False)
        files = dict(repo.commits[repo.refs[rev]]) if rev in repo.refs else {}
        summary = ""
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value.get("summary", "")
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                files = {k: v for k, v in files.items() if not k.startswith(value["path"])}
            else:
                return self._error(h, 400, "BadRequest", f"unsupported commit operation {item['key']}", False)
        sha = self.commit(repo_id, files, branch=rev)
        repo.summaries = {**getattr(repo, "summaries", {}), sha: summary}
        out = {"commitOid": sha, "commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "pullRequestUrl": None}
        return self._send(h, 200, json.dumps(out).encode(), {"Content-Type": "application/json"})

    # ---------------------------------------------------------------- HTTP
    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str, message: str, head: bool) -> None:
        body = json.dumps({"error": message}).encode()
        self._send(
            h,
            status,
            body,
            {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"},
            head,
        )

    def _resolve(
        self, h: BaseHTTPRequestHandler, repo_id: str, rev: str | None, head: bool, gate: bool = True
    ) -> tuple[Repo, str] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(
                h,
                401 if "authorization" not in {k.lower() for k in h.headers} else 404,
                "RepoNotFound",
                "Repository not found",
                head,
            )
            return None
        if repo.gated and gate:  # as on the Hub: metadata and listings are public, file contents are gated
            auth = h.headers.get("Authorization", "")
            token = auth.removeprefix("Bearer ").strip() if auth else ""
            if token not in repo.tokens:
                status = 403 if token else 401
                self._error(
                    h,
                    status,
                    "GatedRepo",
                    "Access to this model is restricted. You must be authenticated "
                    "and have accepted its conditions.",
                    head,
                )
                return None
        rev = rev or "main"
        sha = rev if rev in repo.commits else repo.refs.get(rev)
        if sha is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return None
        return repo, sha

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if path == "/api/models":
            return self._search(h, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if m:
            return self._info(h, m.group(1), m.group(2), head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
        if m:
            return self._tree(h, m.group(1), m.group(2), head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._file(h, m.group(1), m.group(2), m.group(3), head)
        self._error(h, 404, "NotFound", f"no route {path}", head)

    def _search(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        from urllib.parse import parse_qs

        q = parse_qs(urlsplit(h.path).query)
        text = (q.get("search") or [""])[0].lower()
        limit = int((q.get("limit") or ["1000"])[0])
        found = [
            {"id": rid, "modelId": rid, "downloads": 0, "likes": 0, "private": False, "tags": ["mlx"]}
            for rid, repo in sorted(self.repos.items())
            if text in rid.lower() and not repo.private
        ][:limit]
        self._send(h, 200, json.dumps(found).encode(), {"Content-Type": "application/json"}, head)

    def _info(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str | None, head: bool) -> None:
        found = self._resolve(h, repo_id, rev, head, gate=False)
        if found is None:
            return
        repo, sha = found
        files = repo.commits[sha]
        body = {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "siblings": [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())],
        }
        if repo.card is not None:
            body["cardData"] = repo.card
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

    def _tree(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, head: bool) -> None:
        found = self._resolve(h, repo_id, rev, head, gate=False)
        if found is None:
            return
        repo, sha = found
        entries = []
        for p, d in sorted(repo.commits[sha].items()):
            entry = {"type": "file", "path": p, "size": len(d), "oid": _git_oid(d)}
            if _is_lfs(p):
                entry["lfs"] = {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}
            entries.append(entry)
        self._send(h, 200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, fpath: str, head: bool) -> None:
        found = self._resolve(h, repo_id, rev, head)
        if found is None:
            return
        repo, sha = found
        data = repo.commits[sha].get(fpath)
        if data is None:
            self._error(h, 404, "EntryNotFound", f"{fpath} does not exist at {sha}", head)
            return
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(fpath) else _git_oid(data)
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if _is_lfs(fpath):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        start = 0
        rng = h.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                part = data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                headers["Content-Length"] = str(len(part))
                self._send(h, 206, part, headers)
                return
        headers["Content-Length"] = str(len(data))
        cut = None if head else self.cut_after.pop(fpath, None)
        if cut is not None:
            # Announce the whole file, send part of it, then drop the connection: a network failure mid-file.
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(data[:cut])
            h.wfile.flush()
            h.close_connection = True
            import socket

            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(h, 200, data, headers, head)
