"""A small Hugging Face Hub stand-in on 127.0.0.1 for the real ``huggingface_hub`` client.

It implements the endpoints that huggingface_hub 2.x calls to push and pull a model (read from the
installed client's source: ``hf_api.create_repo``/``create_branch``/``repo_info``/``_validate_yaml``,
``_commit_api._fetch_upload_modes``/``_send_commit``, ``file_download.get_hf_file_metadata``/``http_get``):

- ``POST /api/repos/create``                        json {name, organization, visibility?, type}
- ``GET  /api/models/{repo}[/revision/{rev}]``      repo info (sha, private, siblings)
- ``POST /api/validate-yaml``                       card metadata check (always accepted, recorded)
- ``POST /api/models/{repo}/branch/{branch}``       create a branch from main
- ``POST /api/models/{repo}/preupload/{rev}``       every file answered "regular" (no LFS)
- ``POST /api/models/{repo}/commit/{rev}``          ndjson: a header, then base64 "file" entries;
                                                    ``?create_pr=1`` opens ``refs/pr/N``
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``         X-Repo-Commit, ETag, Content-Length

Writes need ``Authorization: Bearer <token>`` with a token in ``tokens``; private repos need it
to be read too. Errors carry the ``X-Error-Code`` header the client maps (RepoNotFound,
RevisionNotFound, EntryNotFound). ``force`` makes matching requests fail with a given status.
Every request is recorded (method, path, query, headers, body) for the tests to inspect;
``resolved()`` lists the (repo, revision, file) of the file requests. ``add_repo`` commits files
directly (a weights repo not pushed by kdcli), optionally under a fixed commit id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"([^/]+/[^/]+)"


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N → commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha → files
    messages: list[dict[str, Any]] = field(default_factory=list)  # commit headers, in order
    prs: int = 0


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


def _sha(*parts: bytes) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class HubState:
    def __init__(self, tokens: set[str]) -> None:
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.validated: list[str] = []
        self.force: list[tuple[str, str, int]] = []  # (method, path regex, status)
        self.lock = threading.Lock()

    def commit(self, repo: Repo, ref: str, files: dict[str, bytes], header: dict[str, Any],
               sha: str | None = None) -> str:
        parent = repo.heads.get(ref, "")
        sha = sha or _sha(parent.encode(), json.dumps(sorted(files)).encode(), *files.values(),
                          json.dumps(header).encode())
        repo.branches[ref] = files
        repo.heads[ref] = sha
        repo.commits[sha] = files
        repo.messages.append({"ref": ref, **header})
        return sha


    def add_repo(self, repo_id: str, files: dict[str, bytes], ref: str = "main", sha: str | None = None,
                 private: bool = False) -> str:
        """Commit ``files`` to ``ref`` of ``repo_id`` (created if needed) without the client, e.g. a
        timm-style weights repo; ``sha`` fixes the commit id (a real Hub commit a manifest pins)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            return self.commit(repo, ref, dict(files), {"summary": f"add {', '.join(sorted(files))}"}, sha)

    def resolved(self, method: str | None = None) -> list[tuple[str, str, str]]:
        """(repo, revision, file) of every ``/resolve/`` request so far (``method``: only those)."""
        out = []
        for r in self.requests:
            m = re.fullmatch(rf"/{REPO}/resolve/([^/]+(?:/pr/\d+)?)/(.+)", r.path)
            if m and (method is None or r.method == method):
                out.append((m.group(1), m.group(2), m.group(3)))
        return out


class Handler(BaseHTTPRequestHandler):
    server: HubServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    # -- plumbing -------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None = None, message: str = "error") -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def _authorised(self) -> bool:
        return self._token() in self.server.state.tokens

    def _handle(self) -> None:
        st = self.server.state
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        with st.lock:
            st.requests.append(Request(self.command, path, query, dict(self.headers.items()), body))
            for method, pattern, status in st.force:
                if method == self.command and re.search(pattern, path):
                    return self._error(status, None, f"forced {status}")
            return self._route(path, query, body)

    do_GET = do_POST = do_HEAD = _handle  # noqa: N815 - http.server's naming

    # -- routes ---------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        st = self.server.state
        if self.command == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body or b"{}"))
        if self.command == "POST" and path == "/api/validate-yaml":
            st.validated.append(json.loads(body)["content"])
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(rf"/api/models/{REPO}/(preupload|commit|branch)/(.+)", path)
        if m and self.command == "POST":
            repo = self._writable(m.group(1))
            if repo is None:
                return None
            action, rev = m.group(2), m.group(3)
            if action == "branch":
                if rev in repo.branches:
                    return self._error(409, None, "branch exists")
                st.commit(repo, rev, dict(repo.branches["main"]), {"summary": f"branch {rev}"})
                return self._json(200, {})
            if rev not in repo.branches:
                return self._error(404, "RevisionNotFound", f"no revision {rev}")
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                   "oid": None} for f in files]})
            return self._commit(m.group(1), repo, rev, query, body)
        m = re.fullmatch(rf"/api/models/{REPO}(?:/revision/(.+))?", path)
        if m and self.command == "GET":
            repo = self._readable(m.group(1))
            if repo is None:
                return None
            ref = self._ref(repo, m.group(2) or "main")
            if ref is None:
                return self._error(404, "RevisionNotFound", "no such revision")
            files = repo.commits[ref]
            return self._json(200, {"id": m.group(1), "modelId": m.group(1), "sha": ref, "private": repo.private,
                                    "siblings": [{"rfilename": f} for f in sorted(files)]})
        m = re.fullmatch(rf"/{REPO}/resolve/([^/]+(?:/pr/\d+)?)/(.+)", path)
        if m and self.command in ("GET", "HEAD"):
            return self._resolve(m.group(1), m.group(2), m.group(3))
        return self._error(404, None, f"no route {self.command} {path}")

    def _readable(self, repo_id: str) -> Repo | None:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorised()):
            self._error(404 if self._token() is None or self._authorised() else 401, "RepoNotFound",
                        "Repository not found")
            return None
        return repo

    def _writable(self, repo_id: str) -> Repo | None:
        if not self._authorised():
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        repo = self.server.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _ref(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.heads:
            return repo.heads[rev]
        return rev if rev in repo.commits else None

    def _create(self, payload: dict[str, Any]) -> None:
        st = self.server.state
        if not self._authorised():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in st.repos:  # the Hub names the existing repo; the client reads "url" after a 409
            return self._json(409, {"error": "You already created this model repo",
                                    "url": f"{self.server.url}/{repo_id}"})
        repo = Repo(private=payload.get("visibility") == "private")
        st.repos[repo_id] = repo
        st.commit(repo, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                  {"summary": "initial commit"})
        return self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _commit(self, repo_id: str, repo: Repo, rev: str, query: dict[str, list[str]], body: bytes) -> None:
        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, None, "commit payload must start with a header")
        files = dict(repo.branches[rev])
        for item in lines[1:]:
            if item["key"] != "file" or item["value"].get("encoding") != "base64":
                return self._error(400, None, f"unsupported commit entry {item['key']}")
            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        header = lines[0]["value"]
        pr_url = None
        ref = rev
        if query.get("create_pr") == ["1"]:
            repo.prs += 1
            ref = f"refs/pr/{repo.prs}"
            repo.heads[ref] = repo.heads[rev]
            pr_url = f"{self.server.url}/{repo_id}/discussions/{repo.prs}"
        sha = self.server.state.commit(repo, ref, files, {**header, "base": rev})
        return self._json(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": pr_url, "success": True})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        repo = self._readable(repo_id)
        if repo is None:
            return None
        sha = self._ref(repo, rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"no revision {rev}")
        files = repo.commits[sha]
        if name not in files:
            return self._error(404, "EntryNotFound", f"no file {name}")
        data = files[name]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{_sha(data)}"', "Accept-Ranges": "bytes"}
        return self._send(200, data, headers, ctype="application/octet-stream")


class Background(ThreadingHTTPServer):
    """A test HTTP server on 127.0.0.1 that serves from a daemon thread inside a ``with`` block."""

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: set[str]) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = HubState(tokens)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
