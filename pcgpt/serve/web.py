"""The browser pages: the playground at / and /playground, and the API docs (/docs, /redoc) with
their assets served from this server, so both work offline.

The playground is plain HTML/CSS/JS in pcgpt/serve/playground/ (package data, no build step), a
client of the public API only. Every page carries a Content-Security-Policy: the playground's
allows scripts, styles and connections from this origin only (no inline script), so text that
reaches the page as HTML could run nothing even if it were parsed; the docs pages allow their one
inline start-up script by its hash. API responses carry no policy: they are not documents.
"""

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

PLAYGROUND_DIR = Path(__file__).parent / "playground"
PLAYGROUND_STATIC = "/playground/static"
DOCS_STATIC = "/docs/static"

PLAYGROUND_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                  "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI and Redoc style elements inline (React, styled-components); Redoc runs its search in a
# blob: worker. Scripts: this origin's files and the page's own start-up script, by hash.
DOCS_CSP = ("default-src 'none'; script-src 'self' {hashes}; worker-src blob:; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def swagger_assets_dir() -> Path:
    """Swagger UI's and Redoc's bundles, as the fastapi-offline package ships them."""
    import fastapi_offline
    return Path(fastapi_offline.__file__).parent / "static"


def install(app: FastAPI) -> None:
    """Adds the pages to `app`, which must be built with docs_url=None and redoc_url=None (this
    replaces FastAPI's CDN-loading docs pages)."""
    page = PLAYGROUND_DIR / "index.html"
    page_headers = {"Content-Security-Policy": PLAYGROUND_CSP, "Cache-Control": "no-cache", **SECURITY_HEADERS}

    async def playground():
        return FileResponse(page, media_type="text/html", headers=page_headers)

    app.add_api_route("/", playground, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/playground", playground, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount(PLAYGROUND_STATIC, StaticFiles(directory=PLAYGROUND_DIR), name="playground-static")
    app.mount(DOCS_STATIC, StaticFiles(directory=swagger_assets_dir()), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        root = request.scope.get("root_path", "")
        html = get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{root}{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_STATIC}/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})})
        return _docs_page(html)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        root = request.scope.get("root_path", "")
        html = get_redoc_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{root}{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{root}{DOCS_STATIC}/favicon.png", with_google_fonts=False)
        return _docs_page(html)


def _docs_page(response: HTMLResponse) -> HTMLResponse:
    html = response.body.decode()
    hashes = " ".join(inline_script_hashes(html))
    response.headers.update({"Content-Security-Policy": DOCS_CSP.format(hashes=hashes), **SECURITY_HEADERS})
    return response


def inline_script_hashes(html: str) -> list[str]:
    """CSP source expressions ('sha256-...') for each inline <script> of `html`."""
    bodies = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in bodies]
