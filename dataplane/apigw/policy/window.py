"""A count of events over the last few seconds, in fixed memory: what breakers and retry budgets measure."""

from __future__ import annotations


class SlidingCount:
    """Events of the last `window` seconds, kept in `buckets` time slots.

    The count covers between `window - window / buckets` and `window` seconds, and memory stays the same
    however many events arrive. Time comes from the caller, so the count can be driven by a fake clock.
    """

    __slots__ = ("_width", "_slots", "_current", "_total")

    def __init__(self, window: float, buckets: int = 10):
        self._width = window / buckets
        self._slots = [0] * buckets
        self._current = 0
        """The number of the time slot (`now // width`) that events are being added to."""
        self._total = 0

    def add(self, now: float, count: int = 1) -> None:
        self._advance(now)
        self._slots[self._current % len(self._slots)] += count
        self._total += count

    def total(self, now: float) -> int:
        self._advance(now)
        return self._total

    def _advance(self, now: float) -> None:
        """Empty the slots that have fallen out of the window since the last call."""
        slot = int(now // self._width)
        if slot <= self._current:  # same slot (or a clock that went back: keep counting in the current one)
            return
        slots = self._slots
        for expired in range(self._current + 1, self._current + 1 + min(slot - self._current, len(slots))):
            index = expired % len(slots)
            self._total -= slots[index]
            slots[index] = 0
        self._current = slot
