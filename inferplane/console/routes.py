"""The console's own routes: `/console` (the page) and `/console/static/{file}` (its script and
style sheet), served from memory out of the package's `static/` folder.

The page and its assets are public: they hold no data. Everything the page shows comes from
the server's gated endpoints (`/inferplane/models`, `/v2/models/.../config`, `/metrics`,
`/inferplane/services`, `/inferplane/audit`), called with the credential the person pastes.

Caching: the page is `no-cache` (revalidated with its ETag on every load) and names its assets
with a content hash (`console.js?v=<sha256 prefix>`), so an asset fetched under its current
hash is cached for a year (`immutable`) and a new release is picked up on the next page load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from inferplane.errors import NotFound
from inferplane.protocols.deps import ServingDeps
from inferplane.protocols.v2_rest import error_response

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
ASSETS = ("console.js", "console.css")
# Only our own files; fetch/XHR to this origin; no frames, no inline script or style.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
NO_CACHE = "no-cache"
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    digest: str  # sha256 prefix: the `v` of its URL and its ETag

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def _asset(name: str, body: bytes) -> Asset:
    suffix = name[name.rfind(".") :]
    return Asset(body, CONTENT_TYPES[suffix], hashlib.sha256(body).hexdigest()[:16])


def load_assets() -> tuple[Asset, dict[str, Asset]]:
    """(the page, the assets by file name), the page's asset URLs carrying their hashes."""
    folder = resources.files("inferplane.console") / "static"
    assets = {name: _asset(name, (folder / name).read_bytes()) for name in ASSETS}
    page = (folder / "index.html").read_text(encoding="utf-8")
    for name, asset in assets.items():
        page = page.replace(f"@{name}@", f"/console/static/{name}?v={asset.digest}")
    return _asset("index.html", page.encode()), assets


def _respond(request: Request, asset: Asset, cache_control: str) -> Response:
    headers = {**SECURITY_HEADERS, "cache-control": cache_control, "etag": asset.etag}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.content_type, headers=headers)


def build_routes(deps: ServingDeps) -> list[Route]:
    page, assets = load_assets()

    async def index(request: Request) -> Response:
        return _respond(request, page, NO_CACHE)

    async def static(request: Request) -> Response:
        name = request.path_params["file"]
        asset = assets.get(name)
        if asset is None:
            return error_response(NotFound(f"no console file '{name}'"))
        current = request.query_params.get("v") == asset.digest
        return _respond(request, asset, IMMUTABLE if current else NO_CACHE)

    return [
        Route("/console", index, methods=["GET"]),
        Route("/console/static/{file}", static, methods=["GET"]),
    ]
