"""A circuit breaker: after Redis failed, requests stop waiting on it for a while."""

from __future__ import annotations

import time


class Breaker:
    """Closed (calls go through), open (calls are skipped), half-open (one probe goes through).

    ``failures`` consecutive failures open it for ``cooldown_s``; then one call probes
    Redis: success closes the breaker, failure opens it again.
    """

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    @property
    def is_open(self) -> bool:
        """True while calls are being skipped."""
        return self.failures >= self.threshold

    def allow(self) -> bool:
        """May this call try Redis?"""
        if not self.is_open:
            return True
        if self.probing or time.monotonic() < self.open_until:
            return False
        self.probing = True  # the one call that probes; the others keep skipping
        return True

    def succeeded(self) -> None:
        """Redis answered: close."""
        self.failures = 0
        self.probing = False

    def failed(self) -> bool:
        """Redis failed; returns True when this failure opened the breaker."""
        was_open = self.is_open
        self.failures += 1
        self.probing = False
        if self.is_open:
            self.open_until = time.monotonic() + self.cooldown_s
        return self.is_open and not was_open
