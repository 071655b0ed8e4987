"""The fixture every test file may use; ranks are launched by support/launch.py."""

from __future__ import annotations

import pytest
from support import free_port


@pytest.fixture
def port() -> int:
    """A loopback port that was free a moment ago."""
    return free_port()
