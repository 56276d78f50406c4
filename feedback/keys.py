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
