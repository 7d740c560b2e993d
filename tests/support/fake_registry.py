"""A Hugging Face-compatible model registry on loopback, serving folders of files.

Just the endpoints huggingface-hub uses to list and download a model repository: model info
with siblings, the recursive tree listing, and `resolve` for each file (HEAD for metadata,
GET for bytes). Every request is recorded with its Authorization header, so a test can check
which files were fetched and that the mirror's token was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@dataclass
class FakeRegistry:
    repos: dict[str, Path]
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, authorization

    def _files(self, repo_id: str) -> dict[str, bytes]:
        folder = self.repos[repo_id]
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}

    def downloaded(self) -> set[str]:
        return {
            path.rsplit(f"/resolve/{COMMIT}/", 1)[1]
            for method, path, _ in self.requests
            if method == "GET" and "/resolve/" in path
        }

    def app(self) -> Starlette:
        async def api(request: Request) -> Response:
            self.requests.append((request.method, request.url.path, request.headers.get("authorization")))
            rest = request.path_params["rest"]
            # `{repo}/tree/...` lists the files; `{repo}/revision/...` is the model info.
            repo_id = rest.split("/tree/", 1)[0] if "/tree/" in rest else rest.split("/revision/", 1)[0]
            if repo_id not in self.repos:
                return JSONResponse(
                    {"error": "Repository not found"},
                    status_code=404,
                    headers={"x-error-code": "RepoNotFound"},
                )
            if "/tree/" in rest:
                return JSONResponse(
                    [
                        {
                            "type": "file",
                            "path": name,
                            "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest(),
                        }
                        for name, data in self._files(repo_id).items()
                    ]
                )
            siblings = [{"rfilename": name, "size": len(data)} for name, data in self._files(repo_id).items()]
            return JSONResponse(
                {"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings, "private": False}
            )

        async def resolve(request: Request) -> Response:
            self.requests.append((request.method, request.url.path, request.headers.get("authorization")))
            repo_id = f"{request.path_params['org']}/{request.path_params['name']}"
            data = self._files(repo_id).get(request.path_params["file"])
            if data is None:
                return Response(status_code=404, headers={"x-error-code": "EntryNotFound"})
            headers = {
                "x-repo-commit": COMMIT,
                "etag": f'"{hashlib.sha256(data).hexdigest()}"',
                "content-length": str(len(data)),
            }
            if request.method == "HEAD":
                return Response(status_code=200, headers=headers)
            return Response(data, headers=headers, media_type="application/octet-stream")

        return Starlette(
            routes=[
                Route("/api/models/{rest:path}", api, methods=["GET"]),
                Route("/{org}/{name}/resolve/{rev}/{file:path}", resolve, methods=["GET", "HEAD"]),
            ]
        )


@contextlib.asynccontextmanager
async def serve_registry(registry: FakeRegistry) -> AsyncIterator[str]:
    """Serve on a free loopback port for the duration; yields the endpoint URL."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    stop = asyncio.Event()
    task = asyncio.create_task(serve(registry.app(), config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(200):
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        break
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        await task
