"""The reviewers' web page (`GET /review/ui`, through the review router): one HTML file served with a
strict content policy."""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.contract import ContractRoute

router = APIRouter(route_class=ContractRoute)  # included by the review router, under /review


@functools.cache
def _page() -> tuple[str, dict[str, str]]:
    """The page and its headers. Its one script and one style sheet are inline and allowed by
    their hashes; nothing else may run, load, frame it or be posted from it."""
    html = resources.files("service").joinpath("static/review.html").read_text()

    def digest(tag: str) -> str:
        body = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert body is not None, f"the review page has no <{tag}>"
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.group(1).encode()).digest()).decode() + "'"

    policy = (
        f"default-src 'none'; script-src {digest('script')}; style-src {digest('style')}; img-src 'self' data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )
    return html, {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
def ui() -> HTMLResponse:
    """The reviewers' web page: a client of the review routes (it holds no data itself)."""
    html, headers = _page()
    return HTMLResponse(html, headers=headers)
