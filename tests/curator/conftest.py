"""Fixtures for the data-side tests."""

from __future__ import annotations

import pytest

from tests.curator.fake_services import Services, serve


@pytest.fixture()
def services():
    """A fresh local imitation of WikiArt and Pixiv per test: (state, base URL)."""
    state = Services()
    server, base = serve(state)
    yield state, base
    server.shutdown()
