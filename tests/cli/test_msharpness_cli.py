"""``sharpscope msharpness`` on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.cli import app
from sharpscope.data import load_data
from sharpscope.io import FORMAT, VERSION, load_checkpoint, save_checkpoint
from sharpscope.registry import build_model

runner = CliRunner()
SPEC = {"name": "cnn1d", "norm": "batch", "width": 4, "depth": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model(SPEC, (40,), 10)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "model": SPEC,
            "data": {"name": "mnist1d"},
            "input_shape": [40],
            "num_classes": 10,
            "epoch": 1,
            "step": 1,
            "metrics": {},
            "state_dict": net.state_dict(),
        },
    )
    return path


def test_msharpness_prints_and_writes_json_equal_to_the_api(checkpoint, tmp_path):
    out = tmp_path / "ms.json"
    args = ["msharpness", str(checkpoint), "--m", "16", "--rho", "0.1", "--samples", "64"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "m-sharpness (m=16, rho=0.1, l2, 1 step)" in result.output
    saved = json.loads(out.read_text())
    for key in ("m", "rho", "adaptive", "steps", "sharpness", "meta"):
        assert key in saved
    assert saved["m"] == 16 and saved["steps"] == 1 and saved["adaptive"] is False
    assert saved["meta"]["checkpoint"] == str(checkpoint) and saved["num_subsets"] == 4
    split = load_data("mnist1d", "train", samples=64, seed=0)
    direct = m_sharpness(load_checkpoint(checkpoint).model, split.pair(), m=16, rho=0.1)
    assert saved["sharpness"] == pytest.approx(direct.sharpness, rel=1e-6)


def test_msharpness_adaptive_linf_multistep(checkpoint, tmp_path):
    args = ["msharpness", str(checkpoint), "--m", "32", "--rho", "0.01", "--samples", "64"]
    args += ["--adaptive", "--norm", "linf", "--steps", "3", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["adaptive"] is True and saved["norm"] == "linf" and saved["steps"] == 3
    assert saved["sharpness"] >= 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--m", "1000"], "m = 1000 is larger than the 64 examples"),
        (["--m", "0"], "--m/--subset-size must be an integer >= 1, got 0"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 2^62, got -1"),
        (["--subset-size", "0"], "--m/--subset-size must be an integer >= 1, got 0"),
        (["--rho", "0"], "--rho must be a finite number > 0, got 0"),
        (["--norm", "l3"], "--norm must be one of l2, linf"),
    ],
)
def test_msharpness_bad_input_is_one_line(checkpoint, extra, message):
    args = ["msharpness", str(checkpoint), "--samples", "64", "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output
    assert "subset/s" not in result.output  # no progress bar for no subset (--m too large)
    assert "m-sharpness of" not in result.output  # one line: no status line before it (dist)


def test_torchrun_splits_the_subsets_and_rank_zero_writes_the_same_result(checkpoint, tmp_path):
    """Two gloo processes under the real launcher; --m is torchrun's own, --subset-size ours."""
    import os
    import subprocess
    import sys

    args = [str(checkpoint), "--rho", "0.1", "--samples", "64", "--steps", "3", "--device", "cpu"]
    single = runner.invoke(
        app, ["msharpness", *args, "--m", "8", "--json", str(tmp_path / "one.json")]
    )
    assert single.exit_code == 0, single.output
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "sharpscope", "msharpness", *args, "--subset-size", "8",
         "--json", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("m-sharpness (m=8") == 1  # rank 0 alone reports
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["meta"]["extra"]["processes"] == 2 and two["num_subsets"] == 8
    assert two["per_subset"] == pytest.approx(one["per_subset"], rel=1e-6, abs=1e-9)
    assert two["sharpness"] == pytest.approx(one["sharpness"], rel=1e-6)


def one_error_line(result) -> str:
    """The single ``error:`` line of a failed command (and no traceback)."""
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_data_the_model_does_not_take_is_a_one_line_error(checkpoint):
    """8x8 digits images into a cnn1d for 40-long MNIST-1D: spectrum's wording, exit 2."""
    args = ["msharpness", str(checkpoint), "--data", "digits", "--samples", "64", "--m", "16"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert line.startswith("error: the model or loss failed on the data: RuntimeError:")


def test_model_and_data_options_override_the_checkpoints_specs(checkpoint, tmp_path):
    """--model-opt/--data-opt without --model/--data apply to the checkpoint's own specs."""
    args = ["msharpness", str(checkpoint), "--m", "16", "--samples", "64", "--device", "cpu"]
    out = tmp_path / "ms.json"
    result = runner.invoke(
        app,
        [*args, "--model-opt", "norm=batch", "--data-opt", "label_noise=0.5", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(out.read_text())["meta"]
    assert meta["data"]["name"] == "mnist1d" and meta["data"]["label_noise"] == 0.5
    assert meta["extra"]["model"] == {**SPEC, "norm": "batch"}
    clean = runner.invoke(app, [*args, "--json", str(tmp_path / "clean.json")])
    assert clean.exit_code == 0, clean.output
    # the noisy labels were used: a different loss at the same weights
    noisy_loss = json.loads(out.read_text())["clean_loss"]
    assert noisy_loss != json.loads((tmp_path / "clean.json").read_text())["clean_loss"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model-opt", "foo=1"], "model 'cnn1d' has no option 'foo'"),
        (["--data-opt", "bar=2"], "unknown data option 'bar'"),
        (["--model-opt", "width=8"], "do not fit the model (wrong architecture?)"),
        (["--model-opt", "width"], "--model-opt takes KEY=VALUE"),
    ],
)
def test_bad_model_and_data_options_with_a_checkpoint_are_one_line(checkpoint, extra, message):
    args = ["msharpness", str(checkpoint), "--samples", "64", "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in one_error_line(result)


def test_a_folder_as_checkpoint_names_its_last_pt(checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    result = runner.invoke(app, ["msharpness", str(run), "--device", "cpu"])
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "is a folder, not a checkpoint file" in line and "last.pt" in line
    (run / "last.pt").write_bytes(checkpoint.read_bytes())
    result = runner.invoke(app, ["msharpness", str(run), "--device", "cpu"])
    assert result.exit_code == 2
    assert one_error_line(result).endswith(f"did you mean {run / 'last.pt'}?")


def test_no_progress_hides_the_bar(checkpoint):
    args = ["msharpness", str(checkpoint), "--m", "16", "--samples", "64", "--device", "cpu"]
    shown = runner.invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "subset/s" in shown.stderr  # the bar is on by default
    hidden = runner.invoke(app, [*args, "--no-progress"])
    assert hidden.exit_code == 0, hidden.output
    assert "subset/s" not in hidden.stderr and "\r" not in hidden.stderr
    assert "m-sharpness (m=16" in hidden.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rho", "nan"], "--rho must be a finite number > 0, got nan"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--restarts", "0"], "--restarts must be an integer >= 1, got 0"),
        (["--chunk-size", "0"], "--chunk-size must be an integer >= 1, got 0"),
        (["--eta", "-1"], "--eta must be a finite number >= 0, got -1"),
        (["--projection", "rescale"], "--projection applies to --adaptive --norm l2 only"),
        (
            ["--adaptive", "--norm", "linf", "--projection", "exact"],
            "--projection applies to --adaptive --norm l2 only",
        ),
        (["--eta", "0.1"], "--eta applies to --adaptive only"),
        (["--json", "{folder}"], "--json {folder} is a folder; give a file name"),
        (["--json", "{file}/ms.json"], "{file} is a file, not a folder"),
    ],
)
def test_bad_numbers_and_output_paths_fail_before_the_checkpoint_is_loaded(
    checkpoint, tmp_path, extra, message
):
    """--json to a folder printed the result and only then failed; --rho nan ran."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    places = {"folder": str(tmp_path / "a-folder"), "file": str(tmp_path / "a-file")}
    extra = [a.format(**places) for a in extra]
    args = ["msharpness", str(checkpoint), "--samples", "64", "--device", "cpu", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(**places) in errors[0], result.output
    assert "m-sharpness" not in result.output and "Traceback" not in result.output


def test_meta_data_records_the_checkpoints_samples_when_none_is_given(checkpoint, tmp_path):
    """meta.data["samples"] was --samples, so None here, though the checkpoint's data spec
    chose 64 examples: reloading from the record gave all 4000."""
    raw = torch.load(checkpoint, weights_only=True)
    subset = tmp_path / "subset.pt"
    save_checkpoint(subset, {**raw, "data": {"name": "mnist1d", "samples": 64}})
    out = tmp_path / "ms.json"
    args = ["msharpness", str(subset), "--m", "32", "--device", "cpu", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = json.loads(out.read_text())["meta"]
    assert meta["num_samples"] == 64
    assert meta["data"] == {"name": "mnist1d", "samples": 64, "split": "train", "seed": 0}
    spec = {k: v for k, v in meta["data"].items() if k != "split"}
    again = load_data(spec, meta["data"]["split"], seed=meta["seed"])
    assert len(again) == 64


def test_samples_and_seed_stay_inside_the_examples_the_run_trained_on(checkpoint, tmp_path):
    """A run trained on 64 examples: --samples 1024 --seed 3 analysed 1024 others drawn with
    seed 3 from the whole split (mostly never trained on); now the 64 themselves, with a
    warning, and the record reloads exactly them."""
    raw = torch.load(checkpoint, weights_only=True)
    subset = tmp_path / "subset.pt"
    save_checkpoint(subset, {**raw, "data": {"name": "mnist1d", "samples": 64}})
    out = tmp_path / "ms.json"
    args = ["msharpness", str(subset), "--samples", "1024", "--seed", "3", "--m", "32"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "--samples 1024 is more than the data set's own samples=64" in warning
    meta = json.loads(out.read_text())["meta"]
    assert meta["num_samples"] == 64 and meta["data"]["samples"] == 64 and meta["data"]["seed"] == 0
    trained = load_data({"name": "mnist1d", "samples": 64}, "train")  # as the trainer loads it
    again = load_data({k: v for k, v in meta["data"].items() if k != "split"}, "train", seed=3)
    assert torch.equal(again.inputs, trained.inputs)


def test_samples_above_the_data_warn_and_the_number_used_is_recorded(checkpoint, tmp_path):
    """--samples 5000 of the 1000 test examples used 1000 silently and recorded 5000."""
    out = tmp_path / "ms.json"
    args = ["msharpness", str(checkpoint), "--samples", "5000", "--split", "test"]
    args += ["--m", "500", "--device", "cpu", "--no-progress", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --samples 5000 is more than the 1000 examples of the test split; using all 1000"
    ]
    meta = json.loads(out.read_text())["meta"]
    assert meta["num_samples"] == 1000 and meta["data"]["samples"] == 1000


def test_a_loss_that_is_not_finite_on_the_data_is_one_line(checkpoint, tmp_path):
    losses = tmp_path / "losses.py"
    losses.write_text(
        "import torch\n"
        "def nan_loss():\n"
        "    return lambda out, y: torch.nn.functional.cross_entropy(out, y) * float('nan')\n"
    )
    result = runner.invoke(app, ["msharpness", str(checkpoint), "--loss", f"{losses}:nan_loss"])
    assert result.exit_code == 2, result.output
    assert "the loss on the data is not a finite scalar" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(("m", "note"), [(20, True), (16, False)])
def test_examples_left_over_by_m_are_named(checkpoint, tmp_path, m, note):
    """n is rounded down to a multiple of m (analysis.md §5): --m 20 on 64 examples uses 60,
    which the summary line showed but nothing pointed out (adversarial L8)."""
    out = tmp_path / "ms.json"
    args = ["msharpness", str(checkpoint), "--m", str(m), "--samples", "64"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--no-progress", "--json", str(out)])
    assert result.exit_code == 0, result.output
    line = (
        "note: the last 4 of the 64 examples are left out: the 3 disjoint subsets of m = 20 "
        "take 60 (analysis.md §5)"
    )
    assert (line in result.output.splitlines()) == note
    assert ("note:" in result.output) == note
    assert json.loads(out.read_text())["num_samples_used"] == (60 if note else 64)


def test_under_torchrun_data_that_differ_between_processes_are_refused(checkpoint, tmp_path):
    """Session 27: a data factory drawing unseeded random data gave each process its own
    data set, and the analysis reported a mixture of them, exit 0. Every rank now stops
    with the same line (a seeded factory runs: the check does not refuse equal data)."""
    from cases import DIFFERENT_DATA, error_lines, torchrun

    (tmp_path / "fac.py").write_text(
        "import torch\n\n\n"
        "def noisy():  # unseeded: every process draws its own\n"
        "    return torch.randn(64, 40), torch.randint(0, 10, (64,))\n\n\n"
        "def seeded():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)\n"
    )
    args = ["msharpness", str(checkpoint), "--subset-size", "16", "--device", "cpu"]
    args += ["--trust-factories", "--no-progress"]
    refused = torchrun(*args, "--data", f"{tmp_path / 'fac.py'}:noisy")
    assert refused.returncode != 0
    assert set(error_lines(refused)) == {DIFFERENT_DATA}, refused.stderr[-2000:]
    accepted = torchrun(*args, "--data", f"{tmp_path / 'fac.py'}:seeded")
    assert accepted.returncode == 0, accepted.stderr[-2000:]


@pytest.mark.parametrize("command", ["msharpness", "spectrum"])
@pytest.mark.parametrize("as_folder", [False, True])
def test_json_onto_the_analysed_checkpoint_is_refused(checkpoint, tmp_path, command, as_folder):
    """Session 27: `--json c.pt` replaced the trained weights with the result, exit 0."""
    import shutil

    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = folder / "last.pt"
    shutil.copy(checkpoint, ckpt)
    before = ckpt.read_bytes()
    given = folder if as_folder else ckpt
    result = runner.invoke(app, [command, str(given), "--samples", "64", "--json", str(ckpt)])
    assert result.exit_code == 2
    assert one_error_line(result) == (
        f"error: --json {ckpt} is the checkpoint being analysed; writing there would replace "
        "it: choose another file"
    )
    assert ckpt.read_bytes() == before
