"""Where the tests find the repository's own files (README.md, adapters/, deploy/, docker/, tests/crds/, ...),
wherever in tests/ the test module lives."""

from __future__ import annotations

from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
