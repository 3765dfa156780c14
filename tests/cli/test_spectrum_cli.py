"""`sharpscope spectrum` end to end on tiny checkpoints (CliRunner)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.analysis import TopEigs, top_eigenvalues
from sharpscope.cli import app
from sharpscope.cli._common import out_of_memory_line
from sharpscope.data import load_data
from sharpscope.io import save_checkpoint
from sharpscope.registry import build_model

from cases import SLOW_AGENT, SPECTRUM_JSON_KEYS, error_lines, loss_that_kills_rank_1, torchrun

runner = CliRunner()
SPEC = {"name": "mlp", "width": 8, "depth": 1}
FAST = ["--samples", "64", "--probes", "2", "--lanczos-steps", "8", "--trace-probes", "9"]
FAST += ["--device", "cpu"]


def _model():
    torch.manual_seed(0)
    return build_model(SPEC, (1, 8, 8), 10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    save_checkpoint(
        path,
        {
            "format": "sharpscope-checkpoint",
            "version": 1,
            "model": SPEC,
            "data": {"name": "digits"},
            "optimizer": {"name": "sgd", "lr": 0.1},
            "epoch": 1,
            "step": 10,
            "metrics": {},
            "state_dict": _model().state_dict(),
            "input_shape": [1, 8, 8],
            "num_classes": 10,
        },
    )
    return path


def test_spectrum_prints_writes_json_plot_and_eigenvectors(checkpoint, tmp_path):
    out, plot, vecs = tmp_path / "s.json", tmp_path / "s.pdf", tmp_path / "e.npz"
    args = ["spectrum", str(checkpoint), *FAST, "--json", str(out), "--plot", str(plot)]
    result = runner.invoke(app, [*args, "--eigenvectors", str(vecs)])
    assert result.exit_code == 0, result.output
    for label in ("lambda_max:", "lambda_5:", "lambda_max/lambda_5:", "trace:", "+-", "hvp_count"):
        assert label in result.stdout
    data = json.loads(out.read_text())
    # the seconds are the whole call's, not the products' (it read as if they were)
    assert f"hvp_count: {data['hvp_count']:g} full passes; {data['seconds']:.2f} s in all, " in (
        result.stdout
    )
    assert SPECTRUM_JSON_KEYS <= set(data)
    assert data["meta"]["checkpoint"] == str(checkpoint)
    assert data["meta"]["data"]["name"] == "digits" and data["meta"]["num_samples"] == 64
    assert plot.exists() and plot.with_suffix(".png").exists()
    # The same numbers as the Python API on the same data.
    split = load_data("digits", "train", samples=64, seed=0)
    api = top_eigenvalues(_model(), (split.inputs, split.targets), k=5)
    assert data["eigenvalues"] == pytest.approx(api.eigenvalues.tolist(), rel=1e-5)
    assert data["lambda_max"] == pytest.approx(float(api.eigenvalues[0]), rel=1e-5)
    saved = TopEigs.load(vecs)
    assert saved.eigenvectors.shape == (5, sum(p.numel() for p in _model().parameters()))


USER_CODE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)


def loss():
    return nn.CrossEntropyLoss()
"""


def _users_code_and_weights(tmp_path, name: str, source: str):
    """Write the user's module and the state_dict of its model(); return the module path."""
    code = tmp_path / name
    code.write_text(source)
    namespace: dict = {}
    exec(compile(source, str(code), "exec"), namespace)
    torch.save(namespace["model"]().state_dict(), tmp_path / "weights.pt")
    return code


def test_bare_state_dict_with_the_users_own_model_data_and_loss(tmp_path):
    code = _users_code_and_weights(tmp_path, "mine.py", USER_CODE)
    out = tmp_path / "s.json"
    result = runner.invoke(
        app,
        [
            "spectrum",
            str(tmp_path / "weights.pt"),
            "--model",
            f"{code}:model",
            "--data",
            f"{code}:data",
            "--loss",
            f"{code}:loss",
            "--k",
            "3",
            "--probes",
            "1",
            "--lanczos-steps",
            "5",
            "--device",
            "cpu",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["lambda_5"] is None and len(data["eigenvalues"]) == 3
    assert data["meta"]["num_params"] == 6 * 5 + 5 + 5 * 3 + 3
    assert data["meta"]["extra"]["loss"].endswith("mine.py:loss")


def test_factories_a_checkpoint_names_run_only_with_trust_factories(tmp_path):
    """A checkpoint from someone else whose specs name module:function ran that code on
    `sharpscope spectrum ckpt.pt`. Each of its model, data and loss factories is now
    refused in one line (nothing imported) unless the user names it or trusts the file."""
    marker = tmp_path / "imported"
    code = _users_code_and_weights(
        tmp_path, "theirs.py", f"open({str(marker)!r}, 'w').close()\n" + USER_CODE
    )
    marker.unlink()  # written by the helper's own exec
    payload = {
        "format": "sharpscope-checkpoint",
        "version": 1,
        "model": {"factory": f"{code}:model"},
        "data": {"factory": f"{code}:data"},
        "loss": f"{code}:loss",
        "state_dict": torch.load(tmp_path / "weights.pt", weights_only=True),
    }
    ckpt = save_checkpoint(tmp_path / "theirs.pt", payload)
    base = ["spectrum", str(ckpt), "--skip", "trace,density", "--k", "2", "--device", "cpu"]
    named = ["--model", f"{code}:model", "--data", f"{code}:data"]
    factory = {
        kind: f"the {kind} factory '{code}:{name}'"
        for kind, name in (("model", "model"), ("data set", "data"), ("loss", "loss"))
    }
    for extra, named_here, flags in (
        (
            [],
            f"{factory['model']}, {factory['data set']} and {factory['loss']}",
            "name them yourself with --model, --data and --loss",
        ),
        (
            named[:2],
            f"{factory['data set']} and {factory['loss']}",
            "name them yourself with --data and --loss",
        ),
        (named, factory["loss"], "name the loss yourself with --loss"),
    ):
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 2 and "Traceback" not in result.output
        (line,) = result.output.strip().splitlines()[-1:]
        # every factory left to the file in one line (they were refused one at a time)
        assert line == (
            f"error: {ckpt} names {named_here}, code that would run: pass --trust-factories "
            f"if you trust the file, or {flags}"
        ), line
        assert not marker.exists()  # nothing imported before the refusal, not even --model's
    result = runner.invoke(app, [*base, *named, "--loss", f"{code}:loss"])
    assert result.exit_code == 0, result.output
    marker.unlink()
    # a fresh process (the file's module was imported above under the user's --model)
    for key in [k for k, m in sys.modules.items() if getattr(m, "__file__", "") == str(code)]:
        del sys.modules[key]
    result = runner.invoke(app, [*base, "--trust-factories"])
    assert result.exit_code == 0, result.output
    assert marker.exists()


def test_test_split_of_a_data_factory_is_refused_not_recorded_as_test(tmp_path):
    """A factory gives one data set; '--split test' would analyse it and record 'test'."""
    code = _users_code_and_weights(tmp_path, "mine.py", USER_CODE)
    args = ["msharpness", str(tmp_path / "weights.pt"), "--model", f"{code}:model"]
    args += ["--data", f"{code}:data", "--m", "8", "--split", "test"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: --split test needs a test set: the data factory")
    assert "mine.py" in line and '{"train": ..., "test": ...}' in line


def test_test_split_of_a_factory_with_its_own_test_set_is_analysed(tmp_path):
    """A factory returning {"train": ..., "test": ...} has a test split (session 26)."""
    source = USER_CODE + (
        "\n\ndef split():\n"
        "    g = torch.Generator().manual_seed(2)\n"
        '    return {"train": data(), "test": (torch.randn(24, 6, generator=g), '
        "torch.randint(0, 3, (24,), generator=g))}\n"
    )
    code = _users_code_and_weights(tmp_path, "mine.py", source)
    out = tmp_path / "m.json"
    args = ["msharpness", str(tmp_path / "weights.pt"), "--model", f"{code}:model"]
    args += ["--data", f"{code}:split", "--m", "8", "--split", "test", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["num_samples"] == 24 and data["meta"]["data"]["split"] == "test"


def test_thick_restart_flag_bounds_the_basis_and_is_recorded(checkpoint, tmp_path):
    out = tmp_path / "s.json"
    args = ["spectrum", str(checkpoint), *FAST, "--restart-size", "12", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["extra"]["restart_size"] == 12
    assert len(data["eigenvalues"]) == 5


def test_pyhessian_backend(checkpoint):
    pytest.importorskip("pyhessian")
    result = runner.invoke(
        app, ["spectrum", str(checkpoint), *FAST, "--backend", "pyhessian", "--k", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "pyhessian-hutchinson" in result.stdout


def test_block_size_runs_block_lanczos_and_is_recorded(checkpoint, tmp_path):
    out = tmp_path / "block.json"
    args = ["spectrum", str(checkpoint), *FAST, "--skip", "trace,density", "--json", str(out)]
    result = runner.invoke(app, [*args, "--block-size", "2", "--max-steps", "80"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["meta"]["extra"]["block_size"] == 2 and len(data["eigenvalues"]) == 5


def test_skip_gives_the_top_k_alone_with_nulls_in_the_json(checkpoint, tmp_path):
    out = tmp_path / "top.json"
    args = ["spectrum", str(checkpoint), *FAST, "--skip", "trace,density", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "lambda_max:" in result.stdout and "skipped: trace, density" in result.stdout
    assert "trace:" not in result.stdout
    data = json.loads(out.read_text())
    assert data["trace"] is None and data["density"] is None and data["parts"] == ["top"]
    assert data["hvp_count"] == data["top"]["hvp_count"]
    full = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--skip", "density"])
    assert full.exit_code == 0, full.output
    assert "trace:" in full.stdout and "skipped: density" in full.stdout


@pytest.mark.parametrize("stop_in", ["trace", "density"])
def test_an_interrupt_keeps_the_parts_already_finished(checkpoint, tmp_path, monkeypatch, stop_in):
    """Ctrl-C after the top-k wrote nothing: at ResNet-20 scale on a CPU that is hours lost."""
    import importlib

    module = importlib.import_module("sharpscope.analysis.spectrum")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, f"_{stop_in}_from_op", interrupted)
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--json", str(out)])
    assert result.exit_code == 130 and "Traceback" not in result.output
    done = ["top"] if stop_in == "trace" else ["top", "trace"]
    assert result.output.strip().splitlines()[-1] == (
        f"error: interrupted during the {stop_in}; {out} holds the parts finished before it "
        f"({', '.join(done)}), the rest null"
    )
    data = json.loads(out.read_text())
    assert data["parts"] == done and data["density"] is None
    assert len(data["eigenvalues"]) == 5 and (data["trace"] is None) == (stop_in == "trace")
    assert data["meta"]["extra"]["interrupted_in"] == stop_in


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--skip", "top"], "--skip: cannot skip 'top': choose from trace, density"),
        (["--block-size", "2", "--eigenvectors", "e.npz"], "--block-size does not take --eig"),
        (["--block-size", "2", "--restart-size", "20"], "--block-size does not take --restart"),
        (["--skip", "density", "--deflate", "2"], "--deflate 2 applies to the density"),
        (["--skip", "density", "--plot", "d.pdf"], "--plot draws the density"),
        (["--k", "100000"], "larger than the number of parameters"),
        (["--which", "BIG"], "--which must be one of"),
        (["--eigenvectors", "vectors.txt"], "must name a .npz file"),
        (["--dtype", "float16"], "--dtype must be one of"),
        (["--restart-size", "3"], "--restart-size 3 must be larger than --k 5"),
    ],
)
def test_bad_flags_are_one_line_errors(checkpoint, extra, message):
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_bare_state_dict_without_model_is_refused(tmp_path):
    torch.save(_model().state_dict(), tmp_path / "bare.pt")
    result = runner.invoke(app, ["spectrum", str(tmp_path / "bare.pt"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "--model" in result.output and "Traceback" not in result.output


def test_non_finite_checkpoint_names_the_cause(tmp_path):
    model = _model()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    torch.save(model.state_dict(), tmp_path / "nan.pt")
    result = runner.invoke(
        app,
        ["spectrum", str(tmp_path / "nan.pt"), "--model", "mlp", "--data", "digits"]
        + ["--model-opt", "width=8", "--model-opt", "depth=1", *FAST],
    )
    assert result.exit_code == 2
    assert "not finite" in result.output and "Traceback" not in result.output


SQRT_CODE = """
import torch
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), Sqrt(), nn.Linear(8, 3))


class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
"""


@pytest.mark.parametrize("command", ["spectrum", "landscape"])
def test_b1_a_non_finite_hessian_vector_product_is_one_error_line(tmp_path, command):
    """Stress B1 (session 28): sqrt at 0 (finite loss and gradient) printed two numpy
    LinAlgError tracebacks and exited 1."""
    code = _users_code_and_weights(tmp_path, "sqrtnet.py", SQRT_CODE)
    extra = (
        ["--skip", "trace,density", "--k", "1"]
        if command == "spectrum"
        else ["--directions", "eigen", "--dims", "1", "--grid", "3", "--out", str(tmp_path / "o")]
    )
    result = runner.invoke(
        app,
        [command, str(tmp_path / "weights.pt"), "--model", f"{code}:model"]
        + ["--data", f"{code}:data", "--device", "cpu", *extra],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Hessian-vector product is not finite" in lines[0]


def test_help_lists_the_interface_flags():
    result = runner.invoke(app, ["spectrum", "--help"])
    assert result.exit_code == 0
    for flag in ("--k", "--probes", "--lanczos-steps", "--samples", "--batch-size", "--json"):
        assert flag in result.output
    for flag in ("--backend", "--which", "--dtype", "--eigenvectors", "--tol", "--trace-method"):
        assert flag in result.output


SMALL_DEVICE_CODE = USER_CODE.replace(
    "def model():",
    '''class SmallDevice(nn.Sequential):
    """Runs out of memory on more than 16 examples at a time (a real allocation that fails:
    2^50 bytes is more than any process can address)."""

    def forward(self, x):
        if x.shape[0] > 16:
            torch.empty(2**50, dtype=torch.uint8)
        return super().forward(x)


def model():''',
).replace("return nn.Sequential(", "return SmallDevice(")


def test_data_that_does_not_fit_in_device_memory_is_read_in_smaller_batches(tmp_path):
    code = _users_code_and_weights(tmp_path, "small.py", SMALL_DEVICE_CODE)
    args = ["spectrum", str(tmp_path / "weights.pt"), "--model", f"{code}:model"]
    args += ["--data", f"{code}:data", "--k", "2", "--probes", "1", "--lanczos-steps", "4"]
    args += ["--trace-probes", "6", "--device", "cpu", "--dtype", "float64"]
    # all 40 examples as one batch (the default) do not fit: halved twice, in one line each
    result = runner.invoke(app, [*args, "--json", str(tmp_path / "auto.json")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    warnings = [line for line in lines if line.startswith("warning: a batch of")]
    assert len(warnings) == 2 and "batches of at most 10" in warnings[1]
    assert not any("RuntimeWarning" in line for line in lines)  # no file:line: lines
    result = runner.invoke(app, [*args, "--batch-size", "10", "--json", str(tmp_path / "10.json")])
    assert result.exit_code == 0, result.output
    auto, fixed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("auto", "10"))
    assert auto["eigenvalues"] == pytest.approx(fixed["eigenvalues"], rel=1e-10)
    assert auto["meta"]["extra"]["batches_halved"] == 2
    # in batch-statistics mode the partition is fixed: a one-line error naming the way out
    result = runner.invoke(app, [*args, "--bn-mode", "batch"])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last == "error: " + out_of_memory_line(torch.OutOfMemoryError(), "spectrum")
    assert "--batch-size" in last and "--basis-device cpu" in last
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*args, "--bn-mode", "batch", "--batch-size", "16"])
    assert result.exit_code == 0, result.output


def _one_error_line(result) -> str:
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_data_the_model_does_not_take_fails_before_the_analysis(checkpoint):
    """The shared check of msharpness and landscape: one line, and no progress bar yet."""
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--data", "mnist1d"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith("error: the model or loss failed on the data: RuntimeError:")
    assert "hvp" not in result.stderr


def test_k_above_max_steps_names_the_flags_and_the_default_grows_with_k(checkpoint, tmp_path):
    args = ["spectrum", str(checkpoint), *FAST, "--k", "30", "--max-steps", "20"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--max-steps 20 is fewer than --k 30" in line and "--max-steps 100" in line
    # without --max-steps, k > 100 raises it to 2k + 10
    out = tmp_path / "s.json"
    args = ["spectrum", str(checkpoint), *FAST, "--k", "101", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["eigenvalues"]) == 101


def test_which_sa_says_the_order_and_why_lambda_max_is_null(checkpoint, tmp_path):
    out = tmp_path / "s.json"
    result = runner.invoke(
        app, ["spectrum", str(checkpoint), *FAST, "--which", "SA", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "5 most negative eigenvalues (descending: the most negative last):" in result.stdout
    assert "n/a with --which SA" in result.stdout
    data = json.loads(out.read_text())
    assert data["lambda_max"] is None and data["lambda_5"] is None and data["ratio"] is None
    assert data["eigenvalues"] == sorted(data["eigenvalues"], reverse=True)  # unchanged
    help_text = " ".join(runner.invoke(app, ["spectrum", "--help"]).output.split())
    assert "null" in help_text


def test_progress_bar_ends_at_its_count_and_no_progress_hides_it(checkpoint):
    """The total assumes every Lanczos step; converged early, the bar ends where it did."""
    shown = runner.invoke(app, ["spectrum", str(checkpoint), *FAST])
    assert shown.exit_code == 0, shown.output
    counts = re.findall(r"(\d+)/(\d+) \[", shown.stderr)
    assert counts and counts[-1][0] == counts[-1][1]
    hidden = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--no-progress"])
    assert hidden.exit_code == 0, hidden.output
    assert "hvp/s" not in hidden.stderr and "\r" not in hidden.stderr
    assert "lambda_max:" in hidden.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--probes", "0"], "--probes must be an integer >= 1, got 0"),
        (
            ["--seed", "99999999999999999999"],
            "--seed must be an integer from 0 to 2^62, got 99999999999999999999",
        ),
        (["--lanczos-steps", "0"], "--lanczos-steps must be an integer >= 1, got 0"),
        (["--trace-probes", "4"], "--trace-probes 4 does not suit --trace-method hutchpp"),
        (["--trace-probes", "10"], "give a multiple of 3, at least 6"),
        (["--trace-method", "hutchinson", "--trace-probes", "1"], "give at least 2"),
        (["--samples", "0"], "--samples must be an integer >= 1"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--json", "{folder}"], "--json {folder} is a folder; give a file name"),
        (["--json", "{file}/s.json"], "{file} is a file, not a folder"),
        (["--eigenvectors", "{folder}/e.npz"], "is a folder; give a file name"),
        (["--plot", "{folder}/d"], "--plot {folder}/d.pdf is a folder"),
        (["--plot", "{file}/d.pdf"], "{file} is a file, not a folder"),
    ],
)
def test_bad_counts_and_output_paths_fail_before_the_checkpoint_is_loaded(
    checkpoint, tmp_path, extra, message
):
    """They failed only after the top-k (and the trace) had run, or after the results were
    printed; "spectrum of ..." is printed once the checkpoint and data are loaded."""
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-folder" / "d.pdf").mkdir()
    (tmp_path / "a-folder" / "e.npz").mkdir()
    (tmp_path / "a-file").write_text("")
    places = {"folder": str(tmp_path / "a-folder"), "file": str(tmp_path / "a-file")}
    extra = [a.format(**places) for a in extra]
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, *extra])
    assert result.exit_code == 2
    assert message.format(**places) in _one_error_line(result)
    assert "spectrum of" not in result.output and "lambda_max" not in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--deflate", "-1"], "--deflate must be an integer >= 0, got -1"),
        (["--tol", "nan"], "--tol must be a finite number > 0, got nan"),
        (["--tol", "-1"], "--tol must be a finite number > 0, got -1"),
        (["--tol", "0"], "--tol must be a finite number > 0, got 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
    ],
)
def test_out_of_range_numbers_are_refused(checkpoint, extra, message):
    """--deflate -1 deflated k - 1 pairs, --tol nan/-1/0 ran every step and exited 0, and
    --weight-decay nan blamed the checkpoint for a non-finite loss."""
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, *extra])
    assert result.exit_code == 2
    assert message in _one_error_line(result)
    assert "spectrum of" not in result.output


def test_deflate_of_every_parameter_fails_before_the_top_k(checkpoint):
    """It failed in the density, after the top-k and the trace."""
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--deflate", "100000"])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--deflate 100000 must be fewer than the number of parameters (610)" in line
    assert "hvp" not in result.stderr


def test_plot_suffix_other_than_pdf_or_png_is_refused_and_the_help_says_both_are_written(
    checkpoint, tmp_path
):
    """--plot out.jpg silently wrote out.pdf and out.png."""
    plot = tmp_path / "out.jpg"
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--plot", str(plot)])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "written as PATH.pdf and PATH.png" in line and str(plot.with_suffix(".pdf")) in line
    assert not any(tmp_path.iterdir())
    help_text = " ".join(runner.invoke(app, ["spectrum", "--help"]).output.split())
    assert "PATH.pdf and PATH.png" in help_text


def test_plot_into_an_existing_folder_is_refused_as_json_is(checkpoint, tmp_path):
    """--plot plots/ wrote plots.pdf beside the folder; --json plots/ was already refused."""
    folder = tmp_path / "plots"
    folder.mkdir()
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--plot", str(folder)])
    assert result.exit_code == 2
    assert f"--plot {folder} is a folder; give a file name" in _one_error_line(result)
    assert list(tmp_path.iterdir()) == [folder]


@pytest.mark.parametrize("given", ["sam_rho0.05", "sam_rho0.05.pdf", "sam_rho0.05.png"])
def test_plot_named_after_a_hyperparameter_keeps_its_whole_name(checkpoint, tmp_path, given):
    """--plot runs/sam_rho0.05 wrote runs/sam_rho0.pdf (Path.with_suffix), so a second run
    with --plot runs/sam_rho0.1 silently overwrote it."""
    result = runner.invoke(
        app, ["spectrum", str(checkpoint), *FAST, "--plot", str(tmp_path / given)]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam_rho0.05.pdf", "sam_rho0.05.png"]


def test_unconverged_deflated_eigenvalues_are_a_warning_line():
    """analysis.md section 2 (never silently unconverged) for the pairs deflated before SLQ."""
    import dataclasses

    from sharpscope.analysis import spectrum
    from sharpscope.cli.spectrum import summary_lines

    torch.manual_seed(0)
    model = build_model({"name": "mlp", "width": 8, "depth": 1}, (40,), 10)
    data = load_data("mnist1d", "test", samples=64)
    result = spectrum(model, data, k=2, deflate=2, num_probes=1, num_lanczos_steps=5)
    assert len(result.density.deflated_converged) == 2
    assert not any("deflated" in line for line in summary_lines(result))
    density = dataclasses.replace(result.density, deflated_converged=[True, False])
    lines = summary_lines(dataclasses.replace(result, density=density))
    assert "warning: 1 of the 2 deflated eigenvalues did not converge" in "\n".join(lines)


@pytest.mark.parametrize("lost", [1, 0])
def test_a_lost_torchrun_process_is_one_line_and_the_finished_parts_are_kept(
    checkpoint, tmp_path, lost
):
    """Rank 1 dies in the density: rank 0 printed gloo's 40-line traceback and wrote no
    JSON, though the top-k was done. It now says so in one line and keeps the top-k.
    Session 27: only rank 0 wrote the finished parts, so losing rank 0 (the one an
    out-of-memory killer may pick) lost them; every survivor keeps and names them now."""
    (tmp_path / "dying.py").write_text(loss_that_kills_rank_1(after_calls=45, rank=lost))
    out = tmp_path / "s.json"
    args = ["spectrum", str(checkpoint), "--samples", "64", "--device", "cpu", "--skip", "trace"]
    args += ["--k", "2", "--max-steps", "20", "--tol", "1e-14", "--probes", "1"]
    args += ["--lanczos-steps", "60", "--loss", "dying.py:loss", "--json", str(out)]
    args += ["--hvp-mode", "forward"]  # one loss call per product (reverse reuses a graph)
    launched = torchrun(
        *args, "--no-progress", cwd=tmp_path, launcher=SLOW_AGENT if lost == 0 else ()
    )
    assert launched.returncode != 0
    errors = error_lines(launched)
    assert len(errors) == 1, launched.stderr[-3000:]
    # the survivor notices the lost peer, or torchrun's agent stops it first (SIGTERM, under
    # load; not with rank 0 lost, where the agent waits)
    said = ("error: another process of this torchrun job stopped (gloo: ",)
    if lost == 1:
        said += (
            "error: interrupted by SIGTERM (torchrun stops every process when one of them fails",
        )
    assert errors[0].startswith(said), errors[0]
    assert errors[0].endswith(
        f"during the density; {out} holds the parts finished before it (top), the rest null"
    )
    assert "[rank0]: Traceback" not in launched.stderr
    saved = json.loads(out.read_text())
    assert saved["parts"] == ["top"] and saved["density"] is None
    assert saved["meta"]["extra"]["interrupted_in"] == "density"
    assert len(saved["top"]["eigenvalues"]) == 2


@pytest.mark.parametrize("flag, value", [("--k", "100000"), ("--block-size", str(10**30))])
def test_a_size_above_the_parameter_count_is_refused_before_the_pre_flight(checkpoint, flag, value):
    """--k was refused after the gradient passes and the HVP-mode timing, below a progress
    bar of 0/(max_steps) products (session 26); --block-size ended in an out-of-memory
    line that named --batch-size (or, for 1e30, a TypeError traceback), after the
    pre-flight (session 27)."""
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, flag, value])
    assert result.exit_code == 2
    assert "pre-flight" not in result.output and "hvp" not in result.stderr
    (line,) = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
    assert re.fullmatch(
        rf"error: {flag} {value} is larger than the number of parameters \(\d+\); "
        rf"use {flag} <= \d+",
        line,
    ), line


@pytest.mark.parametrize(
    "device, message",
    [
        ("bogus", "--basis-device: unknown device 'bogus'; choose one of"),
        ("meta", "--basis-device: unknown device 'meta'"),
        (" ", "--basis-device: unknown device ' '"),
    ],
)
def test_a_bad_basis_device_is_one_line_before_the_work(checkpoint, device, message):
    """Session 27: torch.device() raised a traceback after the checkpoint, the data and the
    pre-flight; it is checked as --device is now."""
    result = runner.invoke(app, ["spectrum", str(checkpoint), *FAST, "--basis-device", device])
    assert result.exit_code == 2
    assert "pre-flight" not in result.output
    (line,) = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
    assert line.startswith(f"error: {message}"), line


def test_basis_device_auto_is_the_default(checkpoint, tmp_path):
    result = runner.invoke(
        app, ["spectrum", str(checkpoint), *FAST, "--skip", "trace,density", "--basis-device",
              "auto", "--json", str(tmp_path / "s.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
