"""The one place that knows label bounds: caps per label for /metrics and OTLP.

A label's first N distinct values are admitted and stay admitted for the life of the process, so a
series never changes name between scrapes; later values are folded into `__other__` (their sums
are added there) and each folded value is counted once in `label_overflow`. REST and SQLite keep
the real names: only the metric views are bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from exporter.settings import Settings

__all__ = ["OTHER", "LabelBounds"]

OTHER: Final = "__other__"


class LabelBounds:
    """Admits at most `limit(label)` distinct values per label; folds the rest into `OTHER`."""

    def __init__(
        self,
        limits: dict[str, int],
        default: int,
        on_overflow: Callable[[str], None] | None = None,
    ) -> None:
        self._limits = limits
        self._default = default
        self._admitted: dict[str, set[str]] = {}
        self._folded: dict[str, set[str]] = {}
        self._on_overflow = on_overflow

    @classmethod
    def from_settings(
        cls, settings: Settings, on_overflow: Callable[[str], None] | None = None
    ) -> LabelBounds:
        model = settings.max_models
        limits = {
            "model": model,
            "from_model": model,
            "to_model": model,
            "project": settings.max_projects,
            "agent": settings.max_agents,
        }
        return cls(limits, settings.max_label_values, on_overflow)

    def fold(self, label: str, value: str) -> str:
        """The value to publish for `label`: the value itself, or `OTHER` beyond the cap."""
        admitted = self._admitted.get(label)
        if admitted is None:
            admitted = self._admitted[label] = set()
        if value in admitted:
            return value
        if len(admitted) < self._limits.get(label, self._default):
            admitted.add(value)
            return value
        folded = self._folded.setdefault(label, set())
        if value not in folded:
            folded.add(value)
            if self._on_overflow is not None:
                self._on_overflow(label)
        return OTHER

    def overflow(self) -> dict[str, int]:
        """Distinct values folded so far, per label."""
        return {label: len(values) for label, values in self._folded.items()}
