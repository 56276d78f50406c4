"""The images a Label Studio task names, read: a data URI from the task itself, a path on Label
Studio (with its API token), or a URL on an origin the service was told it may fetch from. Nothing
else is fetched, no redirect is followed, and a body stops at a size limit."""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from feedback.errors import Invalid, TooLarge, Unavailable
from service.settings import Settings

logger = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 10.0


def origin(url: str) -> str:
    """scheme://host[:port] of a URL, lower-cased (the default port left out, as browsers do)."""
    parts = urlsplit(url.strip())
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    host = (parts.hostname or "").lower()
    return f"{parts.scheme.lower()}://{host}" + ("" if port in (None, default) else f":{port}")


@dataclass(frozen=True)
class Fetcher:
    label_studio_url: str | None  # where paths point; its origin is allowed
    label_studio_token: str | None
    other_origins: tuple[str, ...]
    max_bytes: int

    @classmethod
    def of(cls, settings: Settings) -> Fetcher:
        url, hosts = settings.label_studio_url, settings.fetch_hosts
        others = tuple(origin(h) for h in hosts.split(",") if h.strip())
        return cls(url.rstrip("/") if url else None, settings.label_studio_token, others, settings.max_body_bytes)

    @property
    def allowed(self) -> tuple[str, ...]:
        return ((origin(self.label_studio_url),) if self.label_studio_url else ()) + self.other_origins

    async def read(self, reference: str) -> bytes:
        """The bytes `reference` (a data URI, a path on Label Studio or an allowed URL) names."""
        if reference.startswith("data:"):
            return _data_uri(reference, self.max_bytes)
        if reference.startswith("/"):
            if self.label_studio_url is None:
                raise Invalid(f"{reference[:80]!r} is a path on Label Studio: set LOOP_LABEL_STUDIO_URL to fetch it")
            reference = urljoin(self.label_studio_url + "/", reference.lstrip("/"))
        if urlsplit(reference).scheme not in ("http", "https"):
            raise Invalid(f"{reference[:80]!r} is neither a data URI nor an http(s) URL")
        where = origin(reference)
        if where not in self.allowed:
            allowed = ", ".join(self.allowed) or "none (set LOOP_LABEL_STUDIO_URL or LOOP_FETCH_HOSTS)"
            raise Invalid(f"{reference[:80]!r} is not on a host the service may fetch from; allowed: {allowed}")
        headers = {}
        if self.label_studio_token and self.label_studio_url and where == origin(self.label_studio_url):
            headers["Authorization"] = f"Token {self.label_studio_token}"
        return await self._get(reference, headers)

    async def _get(self, url: str, headers: dict[str, str]) -> bytes:
        try:
            async with (
                httpx.AsyncClient(timeout=FETCH_TIMEOUT_S, follow_redirects=False) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                if response.status_code != 200:
                    raise Invalid(f"{url[:80]} answered {response.status_code}, not the image")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise TooLarge(f"{url[:80]} is over {self.max_bytes} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            logger.warning("fetching %s failed: %s", url, exc)
            raise Unavailable(f"{url[:80]} could not be fetched: {type(exc).__name__}") from None


def _data_uri(uri: str, max_bytes: int) -> bytes:
    head, _, payload = uri.partition(",")
    if not head.endswith(";base64"):
        raise Invalid("a data URI of an image must be base64 (data:image/png;base64,...)")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise TooLarge(f"the data URI is over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("the data URI's base64 is not valid") from None
