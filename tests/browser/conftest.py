"""The browser tests start the real service with the integration tests' fixtures."""

from tests.integration.conftest import start_ingest, start_service

__all__ = ["start_ingest", "start_service"]
