from __future__ import annotations

from collections.abc import Iterator

import pytest

from apigw.testkit.redis import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server per test, on its own free port."""
    with RedisServer() as server:
        yield server
