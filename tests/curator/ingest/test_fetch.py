from __future__ import annotations

import random

import pytest

from curator.core.errors import UsageError
from curator.ingest.fetch import FetchError, FetchSettings, PoliteClient


def test_retry_after_is_honoured_and_backoff_grows_with_jitter(services):
    state, url = services
    sleeps: list[float] = []
    with PoliteClient(FetchSettings(rate=1000, retries=3, backoff=0.5), sleep=sleeps.append,
                      rng=random.Random(0)) as client:
        assert client.get_bytes(f"{url}/images/ratelimited.jpg")[:2] == b"\xff\xd8"
        assert 1.0 in sleeps  # the server's Retry-After: 1
        sleeps.clear()
        assert client.get_bytes(f"{url}/images/flaky.jpg")[:2] == b"\xff\xd8"
        assert len([s for s in sleeps if s >= 0.2]) == 1 and 0.25 <= max(sleeps) <= 0.75  # 0.5 x (0.5..1.5)
        assert client.retries == 2


def test_a_body_cut_mid_way_is_retried_and_counted_once(services):
    state, url = services
    with PoliteClient(FetchSettings(rate=1000, retries=2, backoff=0.01)) as client:
        body = client.get_bytes(f"{url}/images/dropped.jpg")
        assert body == state.images["img11"]
        assert state.hits["/images/dropped.jpg"] == 2


def test_size_cap_http_errors_and_json_errors_are_one_sentence(services):
    state, url = services
    with PoliteClient(FetchSettings(rate=1000, retries=0, max_bytes=10_000)) as client:
        with pytest.raises(FetchError, match="larger than --max-bytes"):
            client.get_bytes(f"{url}/images/huge.jpg")
        with pytest.raises(FetchError, match="HTTP 404"):
            client.get_bytes(f"{url}/nothing-here")
        with pytest.raises(FetchError, match="did not return JSON"):
            client.get_json(f"{url}/images/html.jpg")


def test_rate_limit_spaces_requests(services):
    state, url = services
    sleeps: list[float] = []
    with PoliteClient(FetchSettings(rate=4, retries=0), sleep=sleeps.append) as client:
        for _ in range(3):
            client.get_bytes(f"{url}/images/img0.jpg")
    # with a sleep that returns at once, the third request waits for both slots: 1/4 s apart
    assert len(sleeps) == 2 and 0.1 < sleeps[0] <= 0.25 and 0.35 < sleeps[1] <= 0.5


def test_bad_settings():
    with pytest.raises(UsageError):
        FetchSettings(rate=0)
