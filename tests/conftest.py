"""Shared test settings (pytest runs in importlib mode; there is no tests/__init__.py)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """Tiny models on a small shared machine (pytest-xdist already runs one worker per
    core): more intra-op threads only contend (~5x slower here); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
