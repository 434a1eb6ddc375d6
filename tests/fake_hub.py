"""A Hugging Face Hub stand-in on loopback, in the hub's URL layout and headers.

Enough of the hub for huggingface-hub's own client code: ``GET /api/models`` (search),
``GET /api/models/OWNER/NAME/revision/REV`` (model info with file sizes and LFS SHA-256),
and ``HEAD``/``GET /OWNER/NAME/resolve/REV/FILE`` with ``X-Repo-Commit``, ``ETag`` and
byte ranges. Tests point ``HF_ENDPOINT`` at it. It can misbehave on request: cut a
download short (the client must resume), or serve corrupted bytes (the client must refuse).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "bastion-test/Tiny-GGUF"  # what the ``fake_hub`` fixture (tests/conftest.py) serves


@dataclass
class Repo:
    name: str
    files: dict[str, bytes]
    license: str = "apache-2.0"
    downloads: int = 1234


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: int | None = None  # the next download stops after this many bytes
    corrupt: bool = False  # serve every file with one byte changed
    ranges: list[str | None] = field(default_factory=list)  # Range header of each GET
    paths: list[str] = field(default_factory=list)
    tokens: list[str | None] = field(default_factory=list)  # Authorization of each request
    url: str = ""

    def add(self, repo: Repo) -> None:
        self.repos[repo.name] = repo

    def start(self) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                hub.paths.append(self.path)
                hub.tokens.append(self.headers.get("Authorization"))
                self._route(body=True)

            def do_HEAD(self) -> None:
                hub.paths.append("HEAD " + self.path)
                self._route(body=False)

            def _json(self, value: Any) -> None:
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _missing(self) -> None:
                data = b'{"error": "Repository not found"}'
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, body: bool) -> None:
                url = urlparse(self.path)
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                if parts[:2] == ["api", "models"] and len(parts) == 2:
                    query = parse_qs(url.query)
                    text = (query.get("search") or [""])[0].lower()
                    found = [r for r in hub.repos.values() if text in r.name.lower()]
                    self._json([_listing(r) for r in found])
                elif parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                    self._json(_info(repo)) if repo else self._missing()
                elif len(parts) >= 5 and parts[2] == "resolve":
                    repo = hub.repos.get(f"{parts[0]}/{parts[1]}")
                    name = "/".join(parts[4:])
                    if repo is None or name not in repo.files:
                        self._missing()
                        return
                    self._file(repo.files[name], body)
                else:
                    self._missing()

            def _file(self, data: bytes, body: bool) -> None:
                sha = hashlib.sha256(data).hexdigest()
                if hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                if body:
                    wanted = self.headers.get("Range")
                    hub.ranges.append(wanted)
                    if wanted and wanted.startswith("bytes="):
                        start = int(wanted[6:].split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                payload = data[start:]
                if hub.cut_after is not None:
                    cut, hub.cut_after = hub.cut_after, None
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        return server


def _listing(repo: Repo) -> dict[str, Any]:
    return {
        "id": repo.name,
        "modelId": repo.name,
        "downloads": repo.downloads,
        "likes": 7,
        "tags": ["gguf", f"license:{repo.license}"],
    }


def _info(repo: Repo) -> dict[str, Any]:
    return {
        **_listing(repo),
        "sha": COMMIT,
        "cardData": {"license": repo.license},
        "siblings": [
            {
                "rfilename": name,
                "size": len(data),
                "blobId": hashlib.sha1(data).hexdigest(),
                "lfs": {
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "pointerSize": 134,
                },
            }
            for name, data in repo.files.items()
        ]
        + [{"rfilename": "README.md", "size": 10, "blobId": "0" * 40}],
    }
