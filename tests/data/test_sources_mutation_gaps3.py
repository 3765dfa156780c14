"""Mutation gaps in sharpscope/data/sources.py (session 25)."""

from __future__ import annotations

import pytest
import torch

from sharpscope.data import load_data
from sharpscope.errors import SharpscopeError

from cases import write_cifar


# kills S07: the label range check `label.max() >= num_classes` relaxed to `>`, so a CIFAR-10
# label 10 (or a CIFAR-100 label 100) was read and failed later inside the loss
@pytest.mark.parametrize("name, classes, files", [("cifar10", 10, 6), ("cifar100", 100, 2)])
def test_a_label_equal_to_the_class_count_is_refused_and_the_last_class_is_read(
    tmp_path, name, classes, files
):
    top = [[classes - 1, 0] for _ in range(files)]
    write_cifar(tmp_path / "ok", name, labels=top)
    assert load_data(name, data_root=str(tmp_path / "ok")).targets.max().item() == classes - 1
    bad = [[0, 1] for _ in range(files)]
    bad[0] = [classes, 0]
    write_cifar(tmp_path / "bad", name, labels=bad)
    with pytest.raises(
        SharpscopeError, match=rf"labels must lie in 0\.\.{classes - 1}, got 0\.\.{classes}"
    ):
        load_data(name, data_root=str(tmp_path / "bad"))


# kills S11: the digits training split left in permutation order instead of sorted (the
# seeded --samples subset and every batch order then differ from the documented split)
def test_digits_train_split_is_the_sorted_complement_of_the_test_rows():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))
    train_rows = order[360:].sort().values
    train = load_data("digits", "train")
    expected = torch.as_tensor(bunch.data, dtype=torch.float32)[train_rows].reshape(-1, 1, 8, 8)
    assert torch.equal(train.inputs, expected / 16.0)
    assert torch.equal(train.targets, torch.as_tensor(bunch.target)[train_rows])
    # rows 0..7 are all in the training split: it starts with the file's first eight digits
    assert train.targets[:8].tolist() == bunch.target[:8].tolist()
