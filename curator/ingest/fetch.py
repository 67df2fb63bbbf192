"""A polite HTTP client for scrapers: a request rate, timeouts, retries with exponential backoff and jitter on 429,
5xx and broken connections (honouring `Retry-After`), a clear User-Agent, and a cap on how many bytes a body may
have. Thread-safe: many download threads share one client and one rate.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from curator.core.errors import SettingsError

USER_AGENT = "atelier-curator/0.1 (+https://github.com/atelier; dataset curation; polite: rate-limited)"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class FetchError(Exception):
    """A request that failed for good (after retries); the message is the catalog's `error` text."""


@dataclass(frozen=True)
class FetchSettings:
    rate: float = 2.0  # requests per second over all threads
    concurrency: int = 4
    timeout: float = 30.0
    retries: int = 4
    backoff: float = 1.0  # first retry waits about this long, doubling each time
    max_backoff: float = 60.0
    max_bytes: int = 50 * 1024 * 1024
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.concurrency < 1 or self.timeout <= 0 or self.retries < 0 or self.max_bytes < 1:
            raise SettingsError("--rate, --timeout and --max-bytes must be positive, --concurrency at least 1, "
                                "--retries at least 0")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class PoliteClient:
    """GET/POST with the rate, retries and size cap of `settings`. `sleep` is injectable for tests."""

    def __init__(self, settings: FetchSettings | None = None, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        self.settings = settings or FetchSettings()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._next = 0.0
        self.requests = 0
        self.retries = 0
        self.bytes = 0
        self.client = httpx.Client(
            timeout=self.settings.timeout, follow_redirects=True,
            headers={"User-Agent": self.settings.user_agent},
            limits=httpx.Limits(max_connections=self.settings.concurrency + 2),
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> PoliteClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait_turn(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + 1.0 / self.settings.rate
            self.requests += 1
        if start > now:
            self._sleep(start - now)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.settings.max_backoff)
        base = self.settings.backoff * (2 ** attempt)
        return min(self.settings.max_backoff, base * (0.5 + self._rng.random()))

    def request(self, method: str, url: str, *, params: dict | None = None, data: dict | None = None,
                headers: dict | None = None, max_bytes: int | None = None) -> tuple[httpx.Headers, bytes]:
        """Headers and body of a successful response; `FetchError` with the reason once retries are spent."""
        limit = max_bytes or self.settings.max_bytes
        last = "no attempt"
        for attempt in range(self.settings.retries + 1):
            if attempt:
                self.retries += 1
            self._wait_turn()
            retry_after = None
            try:
                with self.client.stream(method, url, params=params, data=data, headers=headers) as response:
                    if response.status_code in RETRY_STATUSES:
                        retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                        last = f"HTTP {response.status_code}"
                    elif response.status_code >= 400:
                        raise FetchError(f"HTTP {response.status_code} from {_short(url)}")
                    else:
                        declared = response.headers.get("Content-Length")
                        if declared and declared.isdigit() and int(declared) > limit:
                            raise FetchError(f"response of {int(declared):,} bytes is larger than --max-bytes "
                                             f"({limit:,})")
                        chunks, size = [], 0
                        for chunk in response.iter_bytes():
                            size += len(chunk)
                            if size > limit:
                                raise FetchError(f"response is larger than --max-bytes ({limit:,})")
                            chunks.append(chunk)
                        body = b"".join(chunks)
                        if declared and declared.isdigit() and len(body) != int(declared):
                            last = f"truncated download ({len(body):,} of {int(declared):,} bytes)"
                        else:
                            with self._lock:
                                self.bytes += len(body)
                            return response.headers, body
            except httpx.TimeoutException:
                last = f"timed out after {self.settings.timeout:g} s"
            except httpx.TransportError as exc:
                last = f"connection error: {type(exc).__name__}: {str(exc)[:120]}"
            if attempt < self.settings.retries:
                self._sleep(self._backoff(attempt, retry_after))
        raise FetchError(f"{last} from {_short(url)} (after {self.settings.retries + 1} attempts)")

    def get_bytes(self, url: str, *, headers: dict | None = None, params: dict | None = None) -> bytes:
        return self.request("GET", url, params=params, headers=headers)[1]

    def get_json(self, url: str, *, params: dict | None = None, headers: dict | None = None) -> Any:
        return _json(self.request("GET", url, params=params, headers=headers, max_bytes=64 * 1024 * 1024)[1], url)

    def post_json(self, url: str, *, data: dict, headers: dict | None = None) -> Any:
        return _json(self.request("POST", url, data=data, headers=headers, max_bytes=16 * 1024 * 1024)[1], url)


def _json(body: bytes, url: str) -> Any:
    import json

    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        head = body[:60].decode("utf-8", "replace").strip()
        raise FetchError(f"{_short(url)} did not return JSON (starts {head!r})") from None


def _short(url: str) -> str:
    return url if len(url) <= 120 else url[:117] + "..."
