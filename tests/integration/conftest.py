"""Real servers for the integration tests, shared by the whole session: PostgreSQL-backed `mlflow server` and `prefect server`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .servers import POSTGRES_URL_ENV, Stack, postgres_unreachable, running_stack
from .servers import postgres_url as configured_postgres_url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server to put the test databases on; skip, saying why, when it cannot be reached."""
    url = configured_postgres_url()
    if reason := postgres_unreachable(url):
        pytest.skip(f"integration tests need PostgreSQL at {url} (set {POSTGRES_URL_ENV}); it cannot be reached: {reason}")
    return url


@pytest.fixture(scope="session")
def stack(tmp_path_factory, postgres_url) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("servers"), postgres_url) as stack:
        yield stack
