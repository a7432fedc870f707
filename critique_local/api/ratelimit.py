"""Per-key rate limits: a token bucket per API key (``limits.requests_per_minute``, with
``limits.burst`` requests allowed at once). Over the limit: 429 ``rate_limited`` with
``Retry-After``. In memory: a restart refills every bucket, which errs on the side of the
client."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from critique_local.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(max(1, burst))
        self._buckets: dict[str, _Bucket] = {}
        self.clock = time.monotonic

    def check(self, key_id: str) -> None:
        """Take one request from ``key_id``'s bucket or raise :class:`RateLimited`."""
        if self.rate <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            if len(self._buckets) > 100_000:  # bounded memory under key churn
                self._buckets.clear()
            bucket = self._buckets[key_id] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        wait = math.ceil((1 - bucket.tokens) / self.rate)
        raise RateLimited(f"rate limit of {self.rate * 60:.0f} requests per minute exceeded for this key; "
                          f"retry in {wait} s", retry_after=wait)
