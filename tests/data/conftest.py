"""Fixtures shared by the data tests."""
from __future__ import annotations

import pytest

from dlkit.data import download


@pytest.fixture
def never_download(monkeypatch, tmp_path):
    """Fail any download attempt and point the cache at the test's own folder."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(download, "fetch", refuse)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
