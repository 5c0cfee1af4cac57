"""Shared test fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def qos_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Point QOS_COMPILE_HOME at an empty per-test folder, so no test reads or writes the real user data."""
    home = tmp_path_factory.mktemp("qos_home")
    monkeypatch.setenv("QOS_COMPILE_HOME", str(home))
    return home
