"""Shared fixtures: small threads, a private data cache, tiny checkpoints."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _quiet_env(tmp_path_factory):
    # A cache shared by the whole session keeps mnist1d generation to once.
    if os.environ.get("SHARPSCOPE_CACHE"):
        # the user's own cache: reuse its data, but leave its remembered HVP modes alone
        # (the tests of that file set up a cache of their own)
        os.environ.setdefault("SHARPSCOPE_HVP_MODE_CACHE", "0")
    else:
        os.environ["SHARPSCOPE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
