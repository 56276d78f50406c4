"""Redis key names, built once from a prefix so that tests and tenants never share keys."""

from __future__ import annotations

from dataclasses import dataclass

INGEST_GROUP = "ingest"  # the consumer group of the ingest workers


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def stream(self) -> str:
        """Every prediction, appended on the request path."""
        return f"{self.prefix}:predictions"

    @property
    def dead_letters(self) -> str:
        """Entries the ingest worker could not decode or store, with the reason."""
        return f"{self.prefix}:predictions:dead"

    @property
    def promotions(self) -> str:
        """Pub/sub channel: a JSON message {model_name, model_version} per new champion."""
        return f"{self.prefix}:promotions"

    def champion(self, model_name: str) -> str:
        """The champion's version of a model: what a worker that missed a message reloads to."""
        return f"{self.prefix}:champion:{model_name}"

    @property
    def shadows(self) -> str:
        """Pub/sub channel: a JSON message {model_name[, model_version, share]} per shadow started or stopped."""
        return f"{self.prefix}:shadows"

    def shadow(self, model_name: str) -> str:
        """The model's shadow as last announced (the same JSON): what a worker that missed a message reads."""
        return f"{self.prefix}:shadow:{model_name}"

    @property
    def statistics(self) -> str:
        """Hash: each service worker's inference statistics (JSON), by worker: what any worker answers
        the protocol's statistics with, summed."""
        return f"{self.prefix}:statistics"

    @property
    def repository(self) -> str:
        """Hash: the models loaded through the model repository (name -> tag), beyond those a service starts with."""
        return f"{self.prefix}:repository"

    @property
    def repository_events(self) -> str:
        """Pub/sub channel: a model's name each time it is loaded or unloaded through the repository."""
        return f"{self.prefix}:repository:events"
