"""The web page for runs at ``/ui/``: one HTML shell and its static assets, served by the API's
own process (no Node runtime, nothing fetched from elsewhere at view time).

The page is a client of the public API: it keeps the API key in the browser's session storage
and sends it as ``Authorization: Bearer`` on every call (never in a URL, never in a cookie), so
no request carries an ambient credential and a cross-site page cannot make a state-changing
call (CSRF-safe by construction). Every response here carries a strict Content-Security-Policy
(scripts and styles from this origin only, no inline script, no framing); the page renders all
run content with ``textContent``, never as HTML.

Assets: ours in ``ui/static/``; third-party ones from the pinned npm packages of
``ui/package.json`` (installed by ``make`` into ``ui/node_modules``): ``prismjs`` (tokenizes
code for highlighting; the page builds the spans itself) and ``diff`` (word-level changes in
the side-by-side view). The shell links each asset as ``/ui/assets/{name}?v={hash}``: with the
current hash the answer may be cached for a year (``immutable``); the shell itself is
``no-cache``. A missing npm package is logged once and the page works without highlighting.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from critique_local.api.registry import Route
from critique_local.errors import NotFound
from critique_local.store.keys import Principal

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
STATIC = HERE / "static"
NODE_MODULES = HERE / "node_modules"

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"

# our files, in the order the shell loads them (each a classic script, deferred)
OWN_SCRIPTS = ("dom.js", "api.js", "diff.js", "activity.js", "runs.js", "run.js", "app.js")
OWN_STYLES = ("app.css",)
# third-party: prism's core, then grammars after the ones they extend (markup, clike, javascript, c)
PRISM = ("core", "markup", "clike", "javascript", "c", "cpp", "python", "bash", "json", "yaml", "markdown",
         "typescript", "go", "rust", "java", "toml", "css")
VENDOR_FILES = {
    "vendor.js": (["prismjs/components/prism-" + name + ".min.js" for name in PRISM] + ["diff/dist/diff.min.js"]),
}
CONTENT_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str  # the first 16 hex digits of the body's SHA-256: the cache key and the ETag


def _asset(name: str, body: bytes) -> Asset:
    return Asset(body, CONTENT_TYPES[Path(name).suffix], hashlib.sha256(body).hexdigest()[:16])


@functools.cache
def assets() -> dict[str, Asset]:
    """Every asset the page may load, by the name in its URL, read once per process. The
    vendor bundle is empty (with a warning in the log) when ``make`` has not installed it."""
    out = {name: _asset(name, (STATIC / name).read_bytes()) for name in (*OWN_SCRIPTS, *OWN_STYLES)}
    for name, parts in VENDOR_FILES.items():
        missing = [p for p in parts if not (NODE_MODULES / p).is_file()]
        if missing:
            log.warning("web page: %s is not installed (run make); the page works without syntax highlighting",
                        missing[0])
            body = b"/* not installed: run make */\n"
        else:
            # a newline between files: a minified file may end in a line comment
            body = b"\n;\n".join((NODE_MODULES / p).read_bytes() for p in parts)
        out[name] = _asset(name, body)
    return out


@functools.cache
def shell() -> bytes:
    """The one HTML page, with every asset linked by its current version."""
    table = assets()

    def url(name: str) -> str:
        return f"/ui/assets/{name}?v={table[name].version}"

    styles = "".join(f'<link rel="stylesheet" href="{url(n)}">' for n in OWN_STYLES)
    scripts = "".join(f'<script defer src="{url(n)}"></script>' for n in ("vendor.js", *OWN_SCRIPTS))
    html = (STATIC / "index.html").read_text()
    return html.replace("<!--STYLES-->", styles).replace("<!--SCRIPTS-->", scripts).encode()


async def to_shell(request: web.Request, principal: Principal) -> web.StreamResponse:
    raise web.HTTPFound("/ui/", headers=SECURITY_HEADERS)


async def page(request: web.Request, principal: Principal) -> web.StreamResponse:
    return web.Response(body=shell(), content_type="text/html", charset="utf-8",
                        headers={**SECURITY_HEADERS, "Cache-Control": REVALIDATE})


async def asset(request: web.Request, principal: Principal) -> web.StreamResponse:
    """One asset. Raises NotFound for a name that is not one of ours."""
    found = assets().get(request.match_info["name"])
    if found is None:
        raise NotFound("no such asset")
    etag = f'"{found.version}"'
    cache = IMMUTABLE if request.query.get("v") == found.version else REVALIDATE
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": etag}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=found.body, headers={**headers, "Content-Type": found.content_type})


ROUTES = [
    Route("GET", "/ui", to_shell, "The web page (redirects to /ui/)", None, tag="ui"),
    Route("GET", "/ui/", page, "The web page for runs (sign in with an API key)", None, tag="ui",
          raw=("text/html", "The page's HTML shell")),
    Route("GET", "/ui/assets/{name}", asset, "A script or style sheet of the web page", None, tag="ui",
          raw=("text/javascript", "The asset; cacheable for a year with ?v= its current version"), errors=(404,)),
]
