"""Shared test settings: every test runs in its own temporary working folder."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    # runs/ and any other relative output land in the test's own folder
    monkeypatch.chdir(tmp_path)
