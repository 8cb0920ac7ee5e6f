"""The one exception `prefixserve train` raises for problems the user can fix."""

from __future__ import annotations


class TrainingError(Exception):
    """A known training failure; the message says what went wrong and what to change."""
