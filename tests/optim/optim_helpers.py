"""Tiny models, data and step drivers shared by the optimizer tests."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sharpscope.optim import BatchClosure, build_optimizer

CE = nn.functional.cross_entropy


class TinyBNNet(nn.Module):
    """Conv -> BatchNorm -> ReLU -> (Dropout) -> Linear on (N, 1, 8) inputs, 3 classes."""

    def __init__(self, dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 4, 3, dtype=dtype)
        self.bn = nn.BatchNorm1d(4, dtype=dtype)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(4 * 6, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(self.drop(h.flatten(1)))


class TinyMLP(nn.Module):
    """Linear -> tanh -> Linear, no normalization layer."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6, dtype=dtype)
        self.fc2 = nn.Linear(6, 3, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyNormMLP(TinyMLP):
    """TinyMLP with a LayerNorm or GroupNorm after fc1: a normalization layer, no buffers."""

    def __init__(self, norm: str = "layer", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dtype=dtype)
        self.norm = (
            nn.LayerNorm(6, dtype=dtype) if norm == "layer" else nn.GroupNorm(2, 6, dtype=dtype)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def bn_net(seed: int = 0, **kwargs: Any) -> TinyBNNet:
    torch.manual_seed(seed)
    return TinyBNNet(**kwargs)


def mlp(seed: int = 0, **kwargs: Any) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)


def norm_mlp(seed: int = 0, **kwargs: Any) -> TinyNormMLP:
    torch.manual_seed(seed)
    return TinyNormMLP(**kwargs)


def bn_batches(
    num: int, size: int = 12, seed: int = 1, dtype=torch.float32
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 1, 8, generator=gen, dtype=dtype),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(num)
    ]


def mlp_batches(
    num: int, size: int = 8, seed: int = 1, dtype=torch.float32
) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 5, generator=gen, dtype=dtype),
            torch.randint(0, 3, (size,), generator=gen),
        )
        for _ in range(num)
    ]


def plain_closure(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor) -> Callable:
    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    return closure


def run(opt, model, batches, *, plain: bool = False) -> list[Tensor]:
    losses = []
    for x, y in batches:
        closure = plain_closure(opt, model, x, y) if plain else BatchClosure(model, CE, x, y)
        losses.append(opt.step(closure))
    return losses


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def through_file(obj: Any) -> Any:
    """Save and load with weights_only=True, as checkpoints are."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def build(spec: dict[str, Any], model: nn.Module, val=None, **kwargs: Any):
    return build_optimizer(spec, model, num_data=100, val_batches=val, **kwargs)


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


#: one spec per two-pass variant with a base (rho given separately)
BASE_SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}
TWO_PASS = {
    "sam": {"name": "sam", "base": BASE_SGD},
    "asam": {"name": "asam", "base": BASE_SGD},
    "vasso": {"name": "vasso", "theta": 0.5, "base": BASE_SGD},
    "samon": {"name": "samon", "base": BASE_SGD},
    "lets": {"name": "lets", "rho_lr": 0.0, "base": BASE_SGD},
}
ALL_SPECS = {
    **TWO_PASS,
    "lets-learning": {"name": "lets", "rho_lr": 0.5, "base": BASE_SGD},
    "lets-vasso-adam": {
        "name": "lets",
        "inner": "vasso",
        "rho_lr": 0.5,
        "base": {"name": "adam", "lr": 0.01},
    },
    "bsam": {"name": "bsam", "lr": 0.1, "rho": 0.05, "splits": 2},
    "sgd": BASE_SGD,
}
