"""A test double of the Hugging Face Hub protocol, served over HTTP on 127.0.0.1.

It implements the endpoints that ``huggingface_hub`` calls for s2reg's push and pull (repo
create, branch create, preupload, commit with regular uploads, repo/revision info, tree, refs,
resolve/download), keeping repositories in memory, so the real client code runs unmodified
against it through its ``endpoint`` setting. Faults can be injected per request path: an HTTP
status, a delay (for timeouts) or a truncated body. It is not a Hub implementation: no auth, no
LFS, no pull requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)

    def files(self, revision: str) -> dict[str, bytes] | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def commit(self, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(json.dumps(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode()
                           + str(len(self.commits)).encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        return sha


@dataclass
class Fault:
    status: int | None = None
    delay: float = 0.0
    truncate: bool = False
    times: int = 1_000_000


class HubDouble:
    """``with HubDouble() as hub:`` serves on ``hub.endpoint`` until the block ends."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, pattern: str, **kwargs) -> None:
        """Inject a fault into requests whose path matches the regular expression ``pattern``."""
        self.faults[pattern] = Fault(**kwargs)

    def __enter__(self) -> HubDouble:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: HubDouble):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # -- plumbing ---------------------------------------------------------------------------
        def _fault(self, path: str) -> Fault | None:
            for pattern, fault in hub.faults.items():
                if re.search(pattern, path) and fault.times > 0:
                    fault.times -= 1
                    return fault
            return None

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, truncate=False):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body[: len(body) // 2] if truncate else body)
                if truncate:
                    self.close_connection = True

        def _json(self, status: int, obj, **kwargs):
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"}, **kwargs)

        def _error(self, status: int, message: str):
            self._send(status, json.dumps({"error": message}).encode(),
                       {"Content-Type": "application/json", "X-Error-Message": message})

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _dispatch(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            hub.requests.append((self.command, path))
            fault = self._fault(path)
            if fault and fault.delay:
                time.sleep(fault.delay)
            if fault and fault.status:
                self._body() if self.command == "POST" else None
                return self._error(fault.status, "injected fault")
            try:
                with hub.lock:
                    return self._route(path, parse_qs(url.query), truncate=bool(fault and fault.truncate))
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up (a timeout test); nothing to answer

        do_GET = do_POST = do_HEAD = lambda self: self._dispatch()

        # -- routes -----------------------------------------------------------------------------
        def _route(self, path: str, query, *, truncate: bool):
            if self.command == "POST" and path == "/api/repos/create":
                data = json.loads(self._body())
                repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                repo = hub.repos[repo_id] = Repo(private=bool(data.get("private")))
                repo.commit("main", {".gitattributes": b"*.zst filter=lfs\n"})
                return self._json(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
            if self.command == "POST" and path == "/api/validate-yaml":
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit|revision|tree|refs)(?:/(.*))?", path)
            if m:
                repo_id, verb, rest = m.group(1), m.group(2), m.group(3) or ""
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._body() if self.command == "POST" else None
                    return self._error(404, "Repository not found")
                return getattr(self, f"_api_{verb}")(repo_id, repo, rest, query, truncate)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3), truncate)
            return self._error(404, f"no route for {self.command} {path}")

        def _api_branch(self, repo_id, repo, branch, query, truncate):
            self._body()
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            repo.branches[branch] = repo.branches["main"]
            return self._json(200, {})

        def _api_preupload(self, repo_id, repo, revision, query, truncate):
            data = json.loads(self._body())
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in data["files"]]
            return self._json(200, {"files": files})

        def _api_commit(self, repo_id, repo, revision, query, truncate):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            files = dict(repo.files(revision) or {})
            for line in lines:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                elif line["key"] == "deletedFile":
                    files.pop(line["value"]["path"], None)
            sha = repo.commit(revision, files)
            return self._json(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha})

        def _api_revision(self, repo_id, repo, revision, query, truncate):
            files = repo.files(revision or "main")
            if files is None:
                return self._error(404, "Revision not found")
            sha = repo.branches.get(revision, revision)
            return self._json(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                                    "siblings": [{"rfilename": name} for name in sorted(files)]}, truncate=truncate)

        def _api_tree(self, repo_id, repo, rest, query, truncate):
            revision, _, prefix = rest.partition("/")
            files = repo.files(revision)
            if files is None:
                return self._error(404, "Revision not found")
            entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in sorted(files.items()) if name.startswith(prefix)]
            return self._json(200, entries, truncate=truncate)

        def _api_refs(self, repo_id, repo, rest, query, truncate):
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in repo.branches.items()]
            return self._json(200, {"branches": branches, "tags": [], "converts": []})

        def _resolve(self, repo_id, revision, name, truncate):
            repo = hub.repos.get(repo_id)
            files = repo.files(revision) if repo else None
            if files is None or name not in files:
                return self._send(404, b"", {"X-Error-Code": "EntryNotFound" if files is not None else "RepositoryNotFound"})
            data = files[name]
            sha = repo.branches.get(revision, revision)
            etag = hashlib.sha1(data).hexdigest()
            self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                       truncate=truncate)

    return Handler
