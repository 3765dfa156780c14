"""The CPU allocator setting the command line applies at start-up."""

from __future__ import annotations

import ctypes
import sys

import pytest

from sharpscope import allocator


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(allocator.OPT_OUT_ENV, "default")
    monkeypatch.setattr(allocator, "_applied", {})
    assert allocator.tune_cpu_allocator() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_thresholds_are_set_on_glibc(monkeypatch):
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    monkeypatch.delenv(allocator.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(allocator, "_applied", {})
    assert allocator.tune_cpu_allocator() is True
    assert allocator.tune_cpu_allocator() is True  # idempotent


def test_the_command_line_applies_it(monkeypatch):
    from typer.testing import CliRunner

    from sharpscope.cli import app

    monkeypatch.delenv(allocator.OPT_OUT_ENV, raising=False)
    monkeypatch.setattr(allocator, "_applied", {})
    result = CliRunner().invoke(app, ["spectrum", "missing.pt"])
    assert result.exit_code != 0  # the file does not exist ...
    assert "done" in allocator._applied  # ... but the start-up step ran
