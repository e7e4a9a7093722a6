"""Shared fixtures of the test suite.

* ``one_thread``: run a test with one intra-op thread (the suite runs on few, shared cores, where
  tiny models only lose time to thread synchronisation). Modules opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
* Multi-process tests use ``_dist.spawn`` (gloo ranks in fresh processes, a file rendezvous, the
  worker's traceback on failure, a timeout on a hang) and the model, data and checks of
  ``_models``. Those stay plain modules rather than fixtures because the spawned workers import
  them. Every test that starts processes is marked ``@pytest.mark.slow``:

      pytest -m "not slow"      # the fast subset, single process
      pytest                    # everything (what CI runs)
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# tests/ holds the helpers every test folder imports (_dist, _models); the test folders mirror gradcomp/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def one_thread():
    """Run the test with ``torch.set_num_threads(1)`` and restore the thread count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
