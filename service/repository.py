"""The Open Inference Protocol's model repository extension: stored models loaded into the running
service and taken out of it, without a restart.

The models the service starts with (`LOOP_MODELS`) stay. An admin loads another stored model (its
champion, else its newest version, or a version named by tag or number) and unloads what was loaded.
What is loaded is kept in Redis (`<prefix>:repository`, name -> tag) and announced on
`<prefix>:repository:events`, so every worker follows at once, and a worker that missed the message
(or started later) follows on its periodic check. Unloading takes the model out of the routes first
(a request for it is then a 404), lets the requests already in it finish, then closes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis

from feedback.errors import Conflict, NotFound, Unavailable
from feedback.keys import Keys
from models import store
from service.predictions import Predictions
from service.serving import ModelSlot, Served, Where
from service.settings import CHAMPION

logger = logging.getLogger(__name__)

LOAD_WAIT_S = 120.0  # a load answers once the model serves here, or says why not
DRAIN_S = 5.0  # at most this long for requests already in an unloaded model before it closes


class Repository:
    """This worker's side of the repository: what it serves beyond `configured`, kept as Redis says."""

    def __init__(
        self, plane: Predictions, where: Where, *, configured: Sequence[str], keys: Keys, redis_url: str | None
    ) -> None:
        self._plane = plane
        self._where = where
        self._configured = list(configured)
        self._keys = keys
        self._redis_url = redis_url
        self._lock = asyncio.Lock()  # one change at a time in this worker

    # -- what an admin asks ---------------------------------------------------------------------

    def index(self) -> list[dict[str, Any]]:
        """Every stored version with its state here: READY when it is the version a model serves."""
        entries = []
        for stored in store.list_models():
            slot = self._plane.slots.get(stored.name)
            served = None if slot is None else slot.served
            if served is not None and served.stored.version == stored.version:
                state, reason = "READY", ""
            elif slot is None:
                state, reason = "UNAVAILABLE", "not loaded"
            elif served is None:
                state, reason = "UNAVAILABLE", slot.load_error or "loading"
            else:
                state, reason = "UNAVAILABLE", f"version {served.stored.version} of it is served"
            entries.append({"name": stored.name, "version": stored.version, "state": state, "reason": reason})
        return entries

    async def load(self, name: str, version: str | None) -> Served:
        """Serve `name` (its champion, else its newest; or `version`) in every worker; answers once
        this worker serves it."""
        slot = self._plane.slots.get(name)
        if slot is not None and slot.served is not None:
            current = slot.served.stored.version
            if version is None or version in (current, str(self._plane.version_number(name, current))):
                return slot.served  # loaded already: loading again changes nothing
            raise Conflict(f"{name!r} is loaded with version {current}: unload it first, or promote {version!r}")
        tag = await asyncio.to_thread(self._tag, name, version)
        self._announce(name, tag)
        slot = await self._open(name, tag)
        await asyncio.to_thread(slot.loaded.wait, LOAD_WAIT_S)
        if slot.served is None:
            self._announce(name, None)
            await self._close(name)
            raise Unavailable(f"{name!r} could not be loaded: {slot.load_error or 'it is still loading'}")
        return slot.served

    async def unload(self, name: str) -> None:
        if name not in self._plane.slots:
            raise NotFound(f"model {name!r} is not loaded; loaded: {', '.join(self._plane.slots)}")
        if name in self._configured:
            raise Conflict(
                f"{name!r} is one of the models the service started with (LOOP_MODELS): only models loaded "
                "through the repository are unloaded"
            )
        self._announce(name, None)
        await self._close(name)

    # -- following what Redis says --------------------------------------------------------------

    async def follow(self, wanted: dict[str, str] | None = None) -> None:
        """Open what is wanted and not served here, close what was loaded and is no longer wanted
        (`wanted`: name -> tag; read from Redis when not given)."""
        if wanted is None:
            wanted = await asyncio.to_thread(self._wanted)
            if wanted is None:
                return  # Redis unreadable: keep what is served
        for name, tag in wanted.items():
            if name not in self._plane.slots:
                await self._open(name, tag)
        for name in [n for n in self._plane.slots if n not in self._configured and n not in wanted]:
            await self._close(name)

    def _wanted(self) -> dict[str, str] | None:
        if self._redis_url is None:
            return None
        try:
            with redis.Redis.from_url(self._redis_url, socket_connect_timeout=2, socket_timeout=2) as client:
                found: dict[bytes, bytes] = client.hgetall(self._keys.repository)
        except redis.RedisError as exc:
            logger.warning("the model repository is not readable: %s", exc)
            return None
        return {name.decode(): tag.decode() for name, tag in found.items()}

    def _announce(self, name: str, tag: str | None) -> None:
        """Record what is loaded and tell every worker (nothing to tell without Redis: one worker)."""
        if self._redis_url is None:
            return
        try:
            with redis.Redis.from_url(self._redis_url, socket_connect_timeout=2, socket_timeout=2) as client:
                pipe = client.pipeline(transaction=True)
                if tag is None:
                    pipe.hdel(self._keys.repository, name)
                else:
                    pipe.hset(self._keys.repository, name, tag)
                pipe.publish(self._keys.repository_events, name)
                pipe.execute()
        except redis.RedisError as exc:
            raise Unavailable(f"the model repository could not be changed: {exc}") from None

    def _tag(self, name: str, version: str | None) -> str:
        """The tag to serve: the champion's when no version is named, else a stored version named by
        tag or number; `NotFound` when the store has neither."""
        try:
            versions = [s.version for s in store.list_models(name)]
        except store.InvalidModelTag:
            versions = []
        if not versions:
            raise NotFound(f"no model {name!r} in the store")
        if version is None:
            return CHAMPION
        if version in versions:
            return version
        if version.isdigit() and 1 <= int(version) <= len(versions):
            return versions[int(version) - 1]
        raise NotFound(f"model {name!r} has no version {version!r}; stored: {', '.join(versions)}")

    async def _open(self, name: str, tag: str) -> ModelSlot:
        async with self._lock:
            slot = self._plane.slots.get(name)
            if slot is None:
                slot = ModelSlot(name, tag, self._where)
                slot.start_loading()
                self._plane.slots[name] = slot
                logger.info("loading %s:%s through the model repository", name, tag)
            return slot

    async def _close(self, name: str) -> None:
        async with self._lock:
            slot = self._plane.slots.pop(name, None)  # from here on, a request for it is a 404
        if slot is None:
            return
        await asyncio.sleep(min(DRAIN_S, self._where.max_latency_s * 2))  # requests already in it reach the batcher
        await slot.close()  # the batcher finishes what it holds, then the session closes
        logger.info("unloaded %s through the model repository", name)
