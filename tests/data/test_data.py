"""Data registry: shapes, splits, noise, subsets, CIFAR files in the real pickle format."""

from __future__ import annotations

import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from sharpscope.data import check_data_files, check_data_spec, dataset_names, load_data
from sharpscope.data.augment import random_crop_flip
from sharpscope.data.batches import as_batches, as_tensors, num_examples
from sharpscope.errors import SharpscopeError

from cases import write_cifar


def test_registry_lists_builtins():
    assert dataset_names() == ["cifar10", "cifar100", "digits", "mnist1d"]


def test_mnist1d_standard_split_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPSCOPE_CACHE", str(tmp_path))
    train = load_data("mnist1d")
    test = load_data("mnist1d", "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert train.input_shape == (40,) and train.num_classes == 10
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    assert sorted(train.targets.unique().tolist()) == list(range(10))
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    again = load_data("mnist1d")
    assert torch.equal(again.inputs, train.inputs)


@pytest.fixture(scope="module")
def mnist1d_reference():
    """MNIST-1D as the mnist1d package itself makes it, with its default arguments."""
    from mnist1d.data import get_dataset_args, make_dataset

    return make_dataset(get_dataset_args())


def test_mnist1d_inputs_and_labels_are_mnist1ds_own_arrays(mnist1d_reference):
    """Compares with mnist1d.make_dataset: labels shifted against their inputs were unnoticed."""
    train, test = load_data("mnist1d"), load_data("mnist1d", "test")
    for split, x, y in ((train, "x", "y"), (test, "x_test", "y_test")):
        assert torch.equal(split.inputs, torch.as_tensor(mnist1d_reference[x], dtype=torch.float32))
        assert torch.equal(split.targets, torch.as_tensor(mnist1d_reference[y], dtype=torch.long))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other shapes"])
def test_a_damaged_or_truncated_mnist1d_cache_is_rebuilt(
    tmp_path, monkeypatch, mnist1d_reference, damage
):
    """A truncated cache ended in zipfile.BadZipFile; either damage is regenerated and
    rewritten. So is a well-formed archive of other shapes (10 examples), which was read as
    MNIST-1D and trained on (session 28's data round)."""
    import mnist1d.data

    monkeypatch.setenv("SHARPSCOPE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(
        mnist1d.data, "make_dataset", lambda args: calls.append(args) or mnist1d_reference
    )
    load_data("mnist1d")
    (cached,) = tmp_path.glob("mnist1d-*.npz")
    data = cached.read_bytes()
    if damage == "other shapes":
        np.savez(cached, **{k: mnist1d_reference[k][:10] for k in ("x", "y", "x_test", "y_test")})
    else:
        cached.write_bytes(b"not an npz archive" if damage == "garbage" else data[: len(data) // 2])
    again = load_data("mnist1d")
    assert len(calls) == 2 and len(again) == 4000
    assert torch.equal(again.targets, torch.as_tensor(mnist1d_reference["y"], dtype=torch.long))
    with np.load(cached, allow_pickle=False) as archive:  # rewritten whole
        assert np.array_equal(archive["y_test"], mnist1d_reference["y_test"])
    load_data("mnist1d")
    assert len(calls) == 2  # and read back next time


def test_digits_split_is_fixed_and_disjoint():
    train, test, everything = (load_data("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(everything)) == (1437, 360, 1797)
    assert train.input_shape == (1, 8, 8)
    assert float(train.inputs.max()) <= 1.0
    rows = {tuple(x.flatten().tolist()) for x in train.inputs}
    overlap = sum(tuple(x.flatten().tolist()) in rows for x in test.inputs)
    # digits has a handful of exact duplicate images; a real leak would be hundreds
    assert overlap < 10
    assert torch.equal(load_data("digits").inputs, train.inputs)


def test_digits_split_is_the_documented_seed_0_permutation():
    """Compares with sklearn's digits split by randperm(seed 0), as documented; a changed seed
    (another split, results no longer comparable) was unnoticed."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))
    test_rows = order[:360].sort().values
    test = load_data("digits", "test")
    expected = torch.as_tensor(bunch.data, dtype=torch.float32)[test_rows].reshape(-1, 1, 8, 8)
    assert torch.equal(test.inputs, expected / 16.0)
    assert torch.equal(test.targets, torch.as_tensor(bunch.target)[test_rows])
    assert test_rows[:10].tolist() == [10, 14, 21, 22, 26, 27, 33, 34, 39, 42]


@pytest.mark.parametrize("fraction", [0.2, 0.4, 0.6])
def test_label_noise_rate_is_exact_and_clean_labels_kept(fraction):
    clean = load_data("mnist1d")
    noisy = load_data({"name": "mnist1d", "label_noise": fraction, "noise_seed": 3})
    assert torch.equal(noisy.clean_targets, clean.targets)
    rate = (noisy.targets != clean.targets).float().mean().item()
    assert rate == pytest.approx(fraction, abs=1 / len(clean))
    assert torch.equal(noisy.noisy_mask, noisy.targets != clean.targets)
    # flipped labels are spread over the other classes (symmetric noise)
    flipped = noisy.targets[noisy.noisy_mask]
    counts = torch.bincount(flipped, minlength=10).float()
    assert counts.min() > 0.5 * counts.mean()
    # the test split is never noisy
    assert torch.equal(
        load_data({"name": "mnist1d", "label_noise": fraction}, "test").targets,
        load_data("mnist1d", "test").targets,
    )


@pytest.mark.parametrize("samples, seed", [(1024, 0), (500, 0), (1024, 1), (256, 3)])
def test_a_subset_of_noisy_data_has_the_noise_rate(samples, seed):
    """The flipped examples are drawn apart from the subset's shuffle (they once coincided)."""
    split = load_data({"name": "mnist1d", "label_noise": 0.4}, samples=samples, seed=seed)
    flipped = float(split.noisy_mask.float().mean())
    # binomial spread of the subset's rate: sd = sqrt(0.4 * 0.6 / n) <= 0.031
    assert abs(flipped - 0.4) < 4 * (0.4 * 0.6 / samples) ** 0.5, flipped


def test_label_noise_is_seeded():
    a = load_data({"name": "mnist1d", "label_noise": 0.3, "noise_seed": 1}).targets
    b = load_data({"name": "mnist1d", "label_noise": 0.3, "noise_seed": 1}).targets
    c = load_data({"name": "mnist1d", "label_noise": 0.3, "noise_seed": 2}).targets
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_symmetric_noise_spreads_each_class_over_all_other_classes():
    """Each clean class flips about uniformly to the C-1 others, never to itself: a pair flip
    y -> y+1 is balanced in aggregate too, and passed the pooled check."""
    from sharpscope.data.noise import symmetric_label_noise

    classes = 10
    clean = torch.arange(classes).repeat(1000)  # 1000 examples per class
    noisy = symmetric_label_noise(clean, 0.5, classes, seed=0)
    flipped = noisy != clean
    pairs = torch.zeros(classes, classes, dtype=torch.long)
    pairs.index_put_((clean[flipped], noisy[flipped]), torch.tensor(1), accumulate=True)
    assert int(pairs.diagonal().sum()) == 0
    for c in range(classes):
        others = torch.cat([pairs[c, :c], pairs[c, c + 1 :]]).float()
        expected = others.sum() / (classes - 1)  # about 55 per other class
        assert others.min() > 0.5 * expected and others.max() < 1.6 * expected, (c, others)


def test_validation_split_is_a_disjoint_holdout():
    spec = {"name": "mnist1d", "val_fraction": 0.1}
    train, val, full = load_data(spec), load_data(spec, "val"), load_data("mnist1d")
    assert (len(train), len(val)) == (3600, 400)
    merged = torch.cat([train.inputs, val.inputs])
    assert torch.equal(merged.sum(0), full.inputs.sum(0)) or torch.allclose(
        merged.sum(0), full.inputs.sum(0), atol=1e-3
    )
    assert len({tuple(r) for r in torch.cat([train.inputs, val.inputs]).tolist()}) == 4000


def _rows_in(full, part):
    """Index in ``full`` of each example of ``part`` (MNIST-1D inputs are all distinct)."""
    index = {tuple(x): i for i, x in enumerate(full.inputs.tolist())}
    return torch.tensor([index[tuple(x)] for x in part.inputs.tolist()])


def test_val_split_is_a_shuffled_holdout_not_the_first_examples():
    """The hold-out is drawn from the whole training split (not its first 400), the same on
    every call."""
    spec = {"name": "mnist1d", "val_fraction": 0.1}
    val = load_data(spec, "val")
    rows = _rows_in(load_data("mnist1d"), val).sort().values
    assert not torch.equal(rows, torch.arange(400))
    assert int((rows < 2000).sum()) > 100 and int((rows >= 2000).sum()) > 100
    assert torch.equal(load_data(spec, "val").inputs, val.inputs)


def test_label_noise_and_val_fraction_combine_consistently():
    """Train and val partition the noisy training split, clean_targets and noisy_mask aligned
    (the e-label-noise studies combine both): clean_targets kept uncut, or a val split with
    clean labels, were unnoticed."""
    noisy_full = load_data({"name": "mnist1d", "label_noise": 0.4, "noise_seed": 2})
    spec = {"name": "mnist1d", "label_noise": 0.4, "noise_seed": 2, "val_fraction": 0.1}
    train, val = load_data(spec, "train"), load_data(spec, "val")
    assert (len(train), len(val)) == (3600, 400)
    for part in (train, val):
        rows = _rows_in(noisy_full, part)
        assert torch.equal(part.targets, noisy_full.targets[rows])
        assert part.clean_targets is not None and len(part.clean_targets) == len(part)
        assert torch.equal(part.clean_targets, noisy_full.clean_targets[rows])
        assert torch.equal(part.noisy_mask, noisy_full.noisy_mask[rows])
        assert abs(float(part.noisy_mask.float().mean()) - 0.4) < 0.1


def test_the_val_holdout_does_not_move_with_the_subset_seed():
    """The trainer loads train with seed 0, a study analyses it with analysis.seed: a hold-out
    seeded by ``seed`` would put never-trained val examples in the analysed train split."""
    spec = {"name": "mnist1d", "val_fraction": 0.1}
    for split in ("train", "val"):
        a, b = load_data(spec, split, seed=0), load_data(spec, split, seed=3)
        assert torch.equal(a.inputs, b.inputs), split
    trained = {tuple(x) for x in load_data(spec, "train").inputs.tolist()}
    analysed = load_data(spec, "train", samples=200, seed=3)
    assert all(tuple(x) in trained for x in analysed.inputs.tolist())


def test_samples_subset_is_seeded_shuffle():
    a = load_data("mnist1d", samples=100, seed=0)
    b = load_data("mnist1d", samples=100, seed=0)
    c = load_data("mnist1d", samples=100, seed=1)
    assert len(a) == 100 and torch.equal(a.inputs, b.inputs) and not torch.equal(a.inputs, c.inputs)
    assert not torch.equal(a.inputs, load_data("mnist1d").inputs[:100])


@pytest.mark.parametrize("samples, seed", [(None, 3), (1000, 0), (1000, 3), (50, 3)])
def test_a_specs_own_samples_bound_every_analysis_subset(samples, seed):
    """A run trained on {"samples": 200}: an analysis subset (any samples, any seed) is a
    prefix of those 200, never examples the run did not train on."""
    spec = {"name": "mnist1d", "samples": 200}
    trained = load_data(spec, "train")  # as the trainer loads it (seed 0)
    chosen = load_data(spec, "train", samples=samples, seed=seed)
    n = min(samples or 200, 200)
    assert torch.equal(chosen.inputs, trained.inputs[:n])
    assert torch.equal(chosen.targets, trained.targets[:n])


def test_a_specs_own_seed_wins_over_the_seed_argument():
    """load_data: a spec's own seed wins over ``seed=``; with the spec's own samples, that
    subset is shuffled by the spec's seed whatever ``seed=`` says, ``samples=`` a prefix."""
    reference = load_data("mnist1d", samples=100, seed=1).inputs
    assert not torch.equal(load_data("mnist1d", samples=100, seed=0).inputs, reference)
    seeded = {"name": "mnist1d", "seed": 1}
    assert torch.equal(load_data(seeded, samples=100, seed=0).inputs, reference)
    own = {"name": "mnist1d", "samples": 100, "seed": 1}
    for seed in (0, 3):
        assert torch.equal(load_data(own, seed=seed).inputs, reference)
        assert torch.equal(load_data(own, samples=40, seed=seed).inputs, reference[:40])


@pytest.mark.parametrize(
    "spec, split, message",
    [
        ("imagenet", "train", "unknown data set 'imagenet'; choose one of: cifar10"),
        ({"name": "mnist1d", "label_noise": 1.5}, "train", "label_noise must be in [0, 1)"),
        ({"name": "mnist1d", "colour": 1}, "train", "unknown data option 'colour'"),
        ("mnist1d", "validation", "unknown split 'validation'"),
        ("mnist1d", "val", "split 'val' needs a data option val_fraction"),
        ({"name": "mnist1d", "samples": "abc"}, "train", "samples must be an integer >= 1"),
        ({"name": "mnist1d", "samples": 2.7}, "train", "samples must be an integer >= 1, got 2.7"),
        ({"name": "mnist1d", "label_noise": 0.1, "noise_seed": "x"}, "train", "noise_seed must be"),
        ({"name": "mnist1d", "val_fraction": 0.9999999}, "train", "leaves no training examples"),
    ],
)
def test_bad_data_specs_give_one_line(spec, split, message):
    with pytest.raises(SharpscopeError) as info:
        load_data(spec, split)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"samples": 8, "seed": 10**23}, "seed must be an integer from 0 to 2^62, got 10"),
        ({"samples": 8, "seed": 2**62 + 1}, "seed must be an integer from 0 to 2^62, got 46"),
        ({"samples": 8, "seed": "1e30"}, "seed must be an integer from 0 to 2^62, got '1e30'"),
        ({"label_noise": 0.1, "noise_seed": 2**64}, "noise_seed must be an integer from 0 to 2^62"),
        ({"noise_seed": -1}, "noise_seed must be an integer from 0 to 2^62, got -1"),
    ],
)
def test_b5_data_spec_seeds_are_bounded_as_the_seed_flag_is(options, message):
    """Bug B5, session 28: a data option seed beyond 2^63 ended in a traceback from torch's
    generator (`Overflow when unpacking long long`); noise_seed=-1 passed without noise."""
    for check in (load_data, check_data_spec):
        with pytest.raises(SharpscopeError) as info:
            check({"name": "mnist1d", **options})
        assert str(info.value).startswith(message), str(info.value)
    subset = load_data({"name": "mnist1d", "samples": 8, "seed": "7"}).subset
    assert subset == {"samples": 8, "seed": 7}


LABEL_FACTORIES = """\
import torch
def floats():
    return torch.randn(12, 3), torch.randn(12)
def one_hot():
    return torch.randn(12, 3), torch.nn.functional.one_hot(torch.arange(12) % 3, 3)
def one_class():
    return torch.randn(12, 3), torch.zeros(12, dtype=torch.long)
def booleans():
    return torch.randn(12, 3), torch.arange(12) % 2 == 0
"""


def test_b5_label_noise_on_data_without_two_classes_is_one_line(tmp_path):
    """Bug B5, session 28: label noise on float, one-hot or one-class targets ended in a
    traceback from torch.randint or a shape mismatch."""
    file = tmp_path / "labels.py"
    file.write_text(LABEL_FACTORIES)
    cases = {
        "floats": "the data give float32 targets of shape (12,)",
        "one_hot": "int64 targets of shape (12, 3) (one class index per example, not one-hot)",
        "one_class": "needs at least 2 classes to flip between; the data hold 1 (all labels 0)",
    }
    for name, message in cases.items():
        with pytest.raises(SharpscopeError, match=re.escape(message)):
            load_data({"factory": f"{file}:{name}", "label_noise": 0.5})
        load_data({"factory": f"{file}:{name}", "label_noise": 0.5}, "test")  # no noise there
    noisy = load_data({"factory": f"{file}:booleans", "label_noise": 0.5})
    assert int(noisy.noisy_mask.sum()) == 6 and set(noisy.targets.tolist()) == {0, 1}


@pytest.mark.parametrize("name, n_train, classes", [("cifar10", 30, 10), ("cifar100", 6, 100)])
def test_cifar_loader_reads_real_pickle_layout(tmp_path, name, n_train, classes):
    sub = write_cifar(tmp_path, name)
    train = load_data(name, data_root=str(tmp_path))
    test = load_data(name, "test", data_root=str(tmp_path))
    assert len(train) == n_train and len(test) == 5
    assert train.input_shape == (3, 32, 32) and train.num_classes == classes
    # pixel (c, h, w) of image 0 comes from row-major data[0, c*1024 + h*32 + w]
    with (sub / ("data_batch_1" if name == "cifar10" else "train")).open("rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    value = raw[b"data"][0, 1 * 1024 + 2 * 32 + 3] / 255.0
    mean, std = {"cifar10": (0.4822, 0.2435), "cifar100": (0.4865, 0.2564)}[name]
    assert train.inputs[0, 1, 2, 3].item() == pytest.approx((value - mean) / std, abs=1e-5)
    # the folder itself also works as data_root
    assert len(load_data(name, data_root=str(sub))) == n_train


@pytest.mark.parametrize(
    "name, mean, std",
    [
        ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ],
)
def test_cifar_normalisation_uses_the_published_per_channel_statistics(tmp_path, name, mean, std):
    """Every channel against the published mean/std (the layout test reads green only, so
    statistics in BGR order or a typo in a red or blue one passed)."""
    values = np.repeat(np.array([200, 100, 50], dtype=np.uint8), 1024)  # one value a channel
    write_cifar(tmp_path, name, pixels=lambda images, labels: np.tile(values, (len(images), 1)))
    inputs = load_data(name, data_root=str(tmp_path)).inputs
    for c, value in enumerate((200, 100, 50)):
        expected = (value / 255.0 - mean[c]) / std[c]
        assert torch.allclose(inputs[:, c], torch.full_like(inputs[:, c], expected), atol=1e-5)


def test_cifar_labels_stay_with_their_images_in_file_order(tmp_path):
    """Each image carries its label in pixel (0, 0, 0): labels joined in another file order
    than the images were unnoticed."""
    labels = [[i, (i + 1) % 10, (i + 2) % 10] for i in range(6)]

    def mark(images, targets):
        images[:, 0] = np.asarray(targets, dtype=np.uint8) * 10
        return images

    write_cifar(tmp_path, "cifar10", labels=labels, pixels=mark)
    train = load_data("cifar10", data_root=str(tmp_path))
    test = load_data("cifar10", "test", data_root=str(tmp_path))
    assert train.targets.tolist() == [y for file in labels[:5] for y in file]
    assert test.targets.tolist() == labels[5]
    for split in (train, test):
        pixel = split.inputs[:, 0, 0, 0] * 0.2470 + 0.4914  # undo the normalisation
        assert torch.allclose(pixel * 255.0, split.targets.float() * 10, atol=1e-3)


def test_a_specs_data_root_wins_over_the_argument(tmp_path):
    """load_data: 'a spec's data_root wins' over ``data_root=``."""
    write_cifar(tmp_path / "real", "cifar10")
    spec = {"name": "cifar10", "data_root": str(tmp_path / "real")}
    assert len(load_data(spec, data_root=str(tmp_path / "missing"))) == 30


def test_cifar_missing_files_name_folder_and_files(tmp_path):
    with pytest.raises(SharpscopeError, match="expected cifar-10-batches-py/ with data_batch_1"):
        load_data("cifar10", data_root=str(tmp_path))
    with pytest.raises(SharpscopeError, match="--data-root"):
        load_data("cifar100")


def test_check_data_files_finds_what_load_data_would_read(tmp_path):
    """The check a study makes before writing its folder: the same folder rules as
    load_data (a spec's data_root wins), without reading the files."""
    write_cifar(tmp_path / "real", "cifar100")
    check_data_files("cifar100", str(tmp_path / "real"))
    check_data_files({"name": "cifar100", "data_root": str(tmp_path / "real")}, "missing")
    with pytest.raises(
        SharpscopeError,
        match=r"cifar100 files not found in .*\(--data-root DIR names the folder that holds it\)$",
    ):
        check_data_files("cifar100", str(tmp_path))
    with pytest.raises(SharpscopeError, match="--data-root"):
        check_data_files({"name": "cifar10", "label_noise": 0.2})
    check_data_files({"name": "digits"}, str(tmp_path / "missing"))  # no files needed


def test_cifar_partial_or_malformed_files_are_one_line(tmp_path):
    sub = write_cifar(tmp_path, "cifar10")
    (sub / "data_batch_3").unlink()
    with pytest.raises(SharpscopeError, match="lacks data_batch_3"):
        load_data("cifar10", data_root=str(tmp_path))
    cases = {
        "rows": ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, "rows of 3072"),
        "floats": ({b"data": np.zeros((4, 3072)), b"labels": [0] * 4}, "must be uint8"),
        "labels": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 images but 3"),
        "range": ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 12]}, "0..9"),
        "not-int": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 3.5]}, "integers"),
        "strings": ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["1", "3"]}, "integers"),
    }
    for name, (batch, message) in cases.items():
        root = tmp_path / name
        folder = write_cifar(root, "cifar10")
        with (folder / "data_batch_1").open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
        with pytest.raises(SharpscopeError, match=message):
            load_data("cifar10", data_root=str(root))


def test_cifar_files_pickled_with_the_newest_protocol_read_the_same(tmp_path):
    """Protocol 5 (pickle.HIGHEST_PROTOCOL) stores arrays through numpy's _frombuffer."""
    write_cifar(tmp_path / "p2", "cifar10")
    write_cifar(tmp_path / "p5", "cifar10", protocol=5)
    old, new = (load_data("cifar10", data_root=str(tmp_path / p)) for p in ("p2", "p5"))
    assert torch.equal(old.inputs, new.inputs) and torch.equal(old.targets, new.targets)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    sub = write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with (sub / "data_batch_1").open("wb") as handle:
        pickle.dump({b"data": Evil(), b"labels": [0]}, handle)
    with pytest.raises(SharpscopeError, match="refusing to load"):
        load_data("cifar10", data_root=str(tmp_path))
    assert not marker.exists()


def test_cifar_pickle_naming_builtins_open_is_refused(tmp_path):
    """A pickle whose global is builtins.open is refused before anything runs (the test above
    pickles ``open`` as io.open, so an allow-list admitting builtins passed)."""
    sub = write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    # protocol 0: {"data": builtins.open(marker, "w"), "labels": [0]}
    payload = (
        b"(dp0\nVdata\np1\ncbuiltins\nopen\np2\n(V" + str(marker).encode() + b"\nVw\ntp3\nRp4\n"
        b"sVlabels\np5\n(lp6\nI0\nas."
    )
    (sub / "data_batch_1").write_bytes(payload)
    with pytest.raises(SharpscopeError, match="refusing to load builtins.open"):
        load_data("cifar10", data_root=str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, raised",
    [
        ("latin1 -> latinX", "LookupError"),  # the encoding name of the array's bytes
        (b"\x80\x02}K\x01a.", "AttributeError"),  # APPEND onto a dict
        (b"\x80\x03C\x01a)R.", "TypeError"),  # REDUCE calling a bytes object
        (b"\x80\x04\x95" + (2**62).to_bytes(8, "little") + b"}.", "MemoryError"),  # FRAME
    ],
    ids=["encoding", "append-to-dict", "call-bytes", "huge-frame"],
)
def test_b2_a_damaged_cifar_pickle_is_one_line_whatever_the_unpickler_raises(
    tmp_path, damage, raised
):
    """Bug B2, session 28: only UnpicklingError, EOFError and ValueError became the one
    line; a few changed bytes raise other errors, which ended in a traceback."""
    sub = write_cifar(tmp_path, "cifar10")
    path = sub / "data_batch_2"
    if isinstance(damage, bytes):
        path.write_bytes(damage)
    else:
        raw = path.read_bytes()
        assert b"latin1" in raw
        path.write_bytes(raw.replace(b"latin1", b"latinX", 1))
    with pytest.raises(SharpscopeError) as caught:
        load_data("cifar10", data_root=str(tmp_path))
    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable CIFAR pickle file: {raised}")
    assert "\n" not in message


def test_random_crop_flip_matches_a_per_image_reference():
    images = torch.randn(6, 3, 8, 8)
    out = random_crop_flip(images, torch.Generator().manual_seed(5), padding=2)
    gen = torch.Generator().manual_seed(5)
    top = torch.randint(0, 5, (6,), generator=gen)
    left = torch.randint(0, 5, (6,), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for i in range(6):
        crop = padded[i, :, top[i] : top[i] + 8, left[i] : left[i] + 8]
        expected = crop.flip(-1) if flip[i] else crop
        assert torch.equal(out[i], expected)


def test_as_batches_accepts_the_three_forms():
    x, y = torch.randn(10, 3), torch.arange(10)
    from_pair = as_batches((x, y), batch_size=4)
    from_dataset = as_batches(torch.utils.data.TensorDataset(x, y), batch_size=4)
    from_iterable = as_batches([(x[:4], y[:4]), (x[4:], y[4:])])
    assert [len(b[1]) for b in from_pair] == [4, 4, 2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_pair, from_dataset))
    assert num_examples(from_iterable) == 10
    with pytest.raises(SharpscopeError, match="cannot use int as data"):
        as_batches(3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=4, drop_last=True
    )
    with pytest.raises(SharpscopeError, match="drop_last=True"):  # would keep 8 of 10
        as_batches(loader)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert num_examples(as_batches(loader)) == 10


class _Items(torch.utils.data.Dataset):
    """A map-style dataset returning whatever ``item(i)`` gives."""

    def __init__(self, item, n=4):
        self.item, self.n = item, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.item(i)


@pytest.mark.parametrize(
    "data, message",
    [
        # a Dataset of dicts ended in "TypeError: new(): invalid data type 'str'"
        (
            _Items(lambda i: {"x": torch.zeros(3), "y": 1}),
            "item 0 of the Dataset is a dict with keys 'x', 'y'; each item must be an "
            "(input, target) pair (return (x, y) instead of a dict)",
        ),
        (_Items(lambda i: torch.zeros(3)), "item 0 of the Dataset is a tensor of shape (3,)"),
        (_Items(lambda i: ("abc", 1)), "cannot turn the input of item 0 (a str) into a tensor"),
        (_Items(lambda i: (torch.zeros(3), "cat")), "targets cannot be read as class labels"),
        (_Items(lambda i: (torch.zeros(i + 1), 1)), "inputs cannot be stacked into one tensor"),
        (
            (torch.zeros(5, 3), torch.zeros(4)),
            "the inputs and targets differ in length: 5 inputs, 4 targets",
        ),
        (
            [(torch.zeros(5, 3), torch.zeros(5)), (torch.zeros(3, 3), torch.zeros(2))],
            "the inputs and targets of batch 1 differ in length: 3 inputs, 2 targets",
        ),
        ([{"x": torch.zeros(2, 3)}], "batch 0 of the data is a dict with keys 'x'; data must be"),
        ([("a", "b")], "cannot turn the inputs of batch 0 (a str) into a tensor"),
        ([[1, 2], [3, 4]], "batch 0 of the data holds a single number, not a batch"),
    ],
    ids=[
        "dicts",
        "bare-tensors",
        "str-inputs",
        "str-targets",
        "ragged-inputs",
        "pair-lengths",
        "batch-lengths",
        "batch-dicts",
        "batch-strings",
        "batch-scalars",
    ],
)
def test_data_of_the_wrong_form_is_one_line_naming_the_expected_form(data, message):
    for convert in (as_batches, as_tensors):
        with pytest.raises(SharpscopeError) as info:
            convert(data)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_batches_of_different_input_shapes_cannot_be_joined():
    batches = [(torch.zeros(2, 3), torch.zeros(2)), (torch.zeros(2, 4), torch.zeros(2))]
    assert len(as_batches(batches)) == 2
    with pytest.raises(SharpscopeError, match="the batches cannot be joined into one tensor"):
        as_tensors(batches)


def test_a_failing_data_factory_is_one_line_like_a_model_factory(tmp_path):
    file = tmp_path / "data.py"
    file.write_text(
        "import torch\n"
        "def broken():\n    raise OSError('no such folder\\nmore')\n"
        "def dicts():\n    return [{'x': torch.zeros(3), 'y': 1}] * 4\n"
    )
    with pytest.raises(
        SharpscopeError, match=r"^data factory '.*:broken' failed: OSError: no such folder$"
    ):
        load_data(f"{file}:broken")
    with pytest.raises(
        SharpscopeError, match=r"^data factory '.*:dicts': batch 0 of the data is a dict"
    ):
        load_data(f"{file}:dicts")


@pytest.mark.parametrize("targets", ["torch.zeros(0, dtype=torch.long)", "torch.zeros(0)"])
def test_a_data_factory_of_empty_tensors_is_one_line(tmp_path, targets):
    """Integer labels had their class count read (max of nothing) before the check."""
    (tmp_path / "empty.py").write_text(
        f"import torch\ndef empty():\n    return torch.zeros(0, 40), {targets}\n"
    )
    with pytest.raises(SharpscopeError, match=r"^data factory '.*:empty': the data set is empty$"):
        load_data(f"{tmp_path / 'empty.py'}:empty")


def test_a_cache_folder_that_takes_no_new_file_only_costs_a_regeneration(tmp_path, monkeypatch):
    """A shared read-only cache (a cluster's project folder): the data are generated and
    used, nothing is written, no error. (The refusal is injected: tests may run as root.)"""
    import tempfile

    from sharpscope.data.sources import load_mnist1d

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setenv("SHARPSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    raw = load_mnist1d()
    assert raw.train_inputs.shape == (4000, 40) and list(tmp_path.iterdir()) == []


def test_a_pair_of_numpy_arrays_is_told_how_to_become_tensors():
    x, y = np.zeros((4, 2), dtype=np.float32), np.arange(4)
    with pytest.raises(SharpscopeError, match=r"NumPy arrays; give tensors: \(torch.as_tensor"):
        as_batches((x, y))


def test_a_factory_dataset_that_changes_between_reads_is_refused(tmp_path):
    # a CLI --data factory returning a Dataset with random augmentation would otherwise
    # freeze one unseeded draw: the same command gave different results run to run
    (tmp_path / "noisy.py").write_text(
        "import torch\n"
        "class Noisy(torch.utils.data.Dataset):\n"
        "    def __len__(self):\n"
        "        return 8\n"
        "    def __getitem__(self, i):\n"
        "        return torch.randn(4), i % 2\n"
        "def noisy():\n"
        "    return Noisy()\n"
        "def fixed():\n"
        "    return torch.utils.data.TensorDataset(torch.ones(8, 4), torch.arange(8) % 2)\n"
    )
    with pytest.raises(SharpscopeError, match="changed between two reads"):
        load_data(f"{tmp_path / 'noisy.py'}:noisy")
    assert len(load_data(f"{tmp_path / 'noisy.py'}:fixed")) == 8


def test_a_factory_may_return_a_generator_of_batches(tmp_path):
    (tmp_path / "gen.py").write_text(
        "import torch\n"
        "def batches():\n"
        "    return ((torch.ones(4, 3), torch.zeros(4, dtype=torch.long)) for _ in range(2))\n"
    )
    assert len(load_data(f"{tmp_path / 'gen.py'}:batches")) == 8


def test_a_protocol_2_pickle_with_an_empty_bytes_value_reads_and_bytes_calls_stay_refused():
    """Acceptance report, session 15: Python 3 writes b"" under protocol 2 as a call of
    bytes(), refused as if it were code; a call with an argument (a size) still is."""
    import io
    import pickle

    import numpy as np

    from sharpscope.data.sources import _ArrayOnlyUnpickler

    raw = pickle.dumps({b"data": np.zeros((0, 3072), np.uint8), b"batch_label": b""}, protocol=2)
    assert _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()[b"batch_label"] == b""

    class Sized:
        def __reduce__(self):
            return (bytes, (10**12,))

    with pytest.raises(pickle.UnpicklingError, match="bytes with arguments"):
        _ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(Sized(), protocol=2)), encoding="bytes").load()


SPLIT_FACTORY = """\
import torch
def split():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(12, 5, generator=g), torch.arange(12) % 3
    test = torch.utils.data.TensorDataset(torch.randn(4, 5, generator=g), torch.tensor([0, 1, 3, 1]))
    return {"train": train, "test": test}
def one():
    return split()["train"]
def extra():
    return {**split(), "val": split()["train"]}
def shapes():
    return {"train": split()["train"], "test": (torch.zeros(2, 6), torch.zeros(2, dtype=torch.long))}
def kinds():
    return {"train": split()["train"], "test": (torch.zeros(2, 5), torch.zeros(2))}
def empty_test():
    return {"train": split()["train"], "test": (torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))}
"""


def test_a_factory_may_return_its_own_train_and_test_sets(tmp_path):
    """A factory's one set is its own test set (test metrics = training metrics);
    ``{"train": ..., "test": ...}`` gives a real test split (session 26)."""
    (tmp_path / "sets.py").write_text(SPLIT_FACTORY)
    path = f"{tmp_path / 'sets.py'}:split"
    namespace: dict = {}
    exec(SPLIT_FACTORY, namespace)
    (train_x, train_y), test = namespace["split"]().values()
    train, test_split, both = (load_data(path, s) for s in ("train", "test", "all"))
    assert torch.equal(train.inputs, train_x) and torch.equal(train.targets, train_y)
    assert torch.equal(test_split.inputs, test.tensors[0])
    assert test_split.targets.tolist() == [0, 1, 3, 1]
    assert torch.equal(both.inputs, torch.cat([train_x, test.tensors[0]]))
    # the class count reads both sets (the test set holds class 3, the train set 0..2)
    assert train.num_classes == test_split.num_classes == 4
    assert not (train.test_is_train or test_split.test_is_train or both.test_is_train)
    # a --val-fraction hold-out comes from the training set only
    val = load_data({"factory": path, "val_fraction": 0.25}, "val")
    assert len(val) == 3 and all(any(torch.equal(v, t) for t in train_x) for v in val.inputs)


def test_a_factory_of_one_set_is_its_own_test_set_and_all_holds_it_once(tmp_path):
    (tmp_path / "sets.py").write_text(SPLIT_FACTORY)
    path = f"{tmp_path / 'sets.py'}:one"
    train, test, both = (load_data(path, s) for s in ("train", "test", "all"))
    assert train.test_is_train and test.test_is_train and both.test_is_train
    assert torch.equal(test.inputs, train.inputs)
    # "all" was train + test: every example twice
    assert torch.equal(both.inputs, train.inputs) and len(both) == 12
    assert load_data(path).to("cpu").test_is_train


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "extra",
            r"a dict of data sets needs exactly the keys 'train' and 'test', got "
            r"\['test', 'train', 'val'\]$",
        ),
        ("shapes", r"train inputs of shape \(5,\) and test inputs of shape \(6,\) per example"),
        ("kinds", "the train and test targets must both be class indices or both be floats$"),
        ("empty_test", r"'test': the data set is empty$"),
    ],
)
def test_a_bad_dict_of_data_sets_is_one_line(tmp_path, name, message):
    (tmp_path / "sets.py").write_text(SPLIT_FACTORY)
    with pytest.raises(SharpscopeError, match=rf"^data factory '.*:{name}': {message}"):
        load_data(f"{tmp_path / 'sets.py'}:{name}")


def test_one_factory_call_serves_every_split_from_one_call(tmp_path):
    """Session 27: train called a factory once per split, so an unseeded one-set factory
    gave a "test" set other than the train set it is said to be."""
    from sharpscope.data import one_factory_call

    (tmp_path / "counted.py").write_text(
        "import torch\n"
        "calls = []\n"
        "def data():\n"
        "    calls.append(1)\n"
        "    return torch.randn(16, 3), torch.randint(0, 2, (16,))\n"
    )
    factory = f"{tmp_path / 'counted.py'}:data"
    with one_factory_call():
        train, test = load_data(factory, "train"), load_data(factory, "test")
        with one_factory_call():  # nested: the same call still serves
            again = load_data(factory, "all")
    assert torch.equal(train.inputs, test.inputs) and torch.equal(train.inputs, again.inputs)
    outside = load_data(factory, "train")  # outside the block: a call of its own
    assert not torch.equal(outside.inputs, train.inputs)


def test_b8_bool_class_labels_give_the_int64_labels_results():
    """Bug B8, session 28: bool labels, which train and m_sharpness take as classes 0 and
    1, failed in top_eigenvalues, landscape, epsilon_sharpness and pac_bayes_flatness
    ("expected target dtype to be Long or Byte, but got Bool")."""
    import sharpscope as ss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(32, 5), torch.randint(0, 2, (32,))
    calls = [
        (ss.top_eigenvalues, {"k": 1}),
        (ss.landscape, {"dims": 1, "grid": 3}),
        (ss.epsilon_sharpness, {"iterations": 2}),
        (ss.pac_bayes_flatness, {}),
        (ss.m_sharpness, {"m": 8, "rho": 0.05}),
    ]
    for function, options in calls:
        wide, narrow = (function(model, (x, t), **options).to_dict() for t in (y, y.bool()))
        for part in (wide, narrow):
            part.pop("meta"), part.pop("seconds", None)
        assert repr(wide) == repr(narrow), function.__name__


def test_d2_label_noise_is_exact_on_the_full_split_and_a_subset_takes_its_labels():
    """Doubt D2, session 28: noise.py said the realised rate "equals the requested one";
    it does on the full training split, which is flipped before samples cuts it, so a
    subset holds the full split's noisy labels and a rate near, not at, the requested one
    (the docstring and README now say so)."""
    full = load_data({"name": "mnist1d", "label_noise": 0.4})
    subset = load_data({"name": "mnist1d", "label_noise": 0.4, "samples": 512})
    assert int(full.noisy_mask.sum()) == 1600
    keep = torch.randperm(4000, generator=torch.Generator().manual_seed(0))[:512]
    assert torch.equal(full.targets[keep], subset.targets)
    assert int(subset.noisy_mask.sum()) == 195  # 38.1%, not 40%


def test_ignored_labels_warn_because_batch_weights_would_be_wrong():
    """cross_entropy skips targets of -100, so its mean is over the others only; the
    analyses' n_b/N batch weights then make values depend on the batching (they do, below),
    and the user is told to drop those examples."""
    import torch.nn as nn

    import sharpscope as ss

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(24, 4), torch.randint(0, 3, (24,))
    y[:6] = -100
    with pytest.warns(UserWarning, match=r"6 of 24 targets are negative labels") as caught:
        whole = ss.landscape(model, (x, y), dims=1, grid=3).loss
        batched = ss.landscape(model, (x, y), dims=1, grid=3, batch_size=7).loss
    assert caught[0].filename == __file__  # it names the user's line
    assert not np.allclose(whole, batched)  # the reason for the warning
    with pytest.warns(UserWarning, match="negative labels"):
        as_tensors((x, y))
    with pytest.warns(UserWarning, match="2 of 12 targets"):
        as_batches([(x[:6], y[4:10]), (x[6:12], y[12:18])])
    clean = y.clamp(min=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_batches((x, clean), batch_size=7)
        as_tensors((x, clean))
        as_batches((x, torch.randn(24)))  # float regression targets may be negative
