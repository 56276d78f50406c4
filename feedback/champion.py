"""Announcing a new champion to the service workers (Redis), without loading any training code."""

from __future__ import annotations

import json
import logging

import redis

from feedback.keys import Keys

logger = logging.getLogger(__name__)


def announce(client: redis.Redis, keys: Keys, model_name: str, model_version: str) -> None:
    """Tell every service worker: the key for those that start or missed it, the message for the rest."""
    pipe = client.pipeline(transaction=True)
    pipe.set(keys.champion(model_name), model_version)
    pipe.publish(keys.promotions, json.dumps({"model_name": model_name, "model_version": model_version}))
    pipe.execute()
    logger.info("announced %s:%s as champion on %s", model_name, model_version, keys.promotions)
