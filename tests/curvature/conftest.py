"""Tiny models with exact dense Hessians for the curvature tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.curvature import dense_hessian
from sharpscope.registry import build_model

from cases import fit_full_batch


def _blobs(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = 2 * torch.randn(classes, dim, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return centers[y] + torch.randn(n, dim, generator=gen), y


class Case:
    """A model, its data and its exact float64 Hessian."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.name, self.model, self.x, self.y = name, model, x, y
        self.H = dense_hessian(model, (x, y))
        self.eigenvalues = torch.linalg.eigvalsh(self.H)  # ascending

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y

    def top(self, k: int) -> torch.Tensor:
        return self.eigenvalues.flip(0)[:k]


@pytest.fixture(scope="session")
def mlp_case() -> Case:
    """MLP 10-12-4 (P = 184) on 60 blob examples, 30 GD steps."""
    torch.manual_seed(0)
    x, y = _blobs(60, 10, 4, seed=1)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4))
    return Case("mlp", fit_full_batch(model, x, y, 30, 0.1), x, y)


@pytest.fixture(scope="session")
def cnn_case() -> Case:
    """The registry's BatchNorm CNN at width 2 (P = 352) on 48 random 8x8 images."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(48, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (48,), generator=gen)
    model = build_model({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 10)
    model.train()
    fit_full_batch(model, x, y, 20, 0.05)  # also moves the BatchNorm running statistics
    model.eval()
    return Case("cnn-bn", model, x, y)


@pytest.fixture(params=["mlp", "cnn-bn"])
def case(request, mlp_case, cnn_case) -> Case:
    return {"mlp": mlp_case, "cnn-bn": cnn_case}[request.param]


def planted(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a seeded random orthogonal Q (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (Q * eigenvalues.to(torch.float64)) @ Q.T


@pytest.fixture(scope="session")
def planted_matrix():
    return planted


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The HVP-mode cache emptied: its file's path in a fresh folder, the disk cache on,
    nothing remembered in the process."""
    from sharpscope.curvature import clear_mode_cache
    from sharpscope.curvature.mode_cache import ENV_SWITCH, FILE_NAME

    monkeypatch.setenv("SHARPSCOPE_CACHE", str(tmp_path))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    clear_mode_cache()
    yield tmp_path / FILE_NAME
    clear_mode_cache()
