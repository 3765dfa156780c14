"""End-to-end CLI: `sharpscope --help`, `train`, one-line errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.cli import COMMANDS, app

runner = CliRunner()
TINY = [
    "--dataset",
    "mnist1d",
    "--samples",
    "256",
    "--model",
    "mlp",
    "--model-opt",
    "width=16",
    "--model-opt",
    "depth=1",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--device",
    "cpu",
    "--no-progress",
]


def test_help_lists_every_command_of_the_interface():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("train", "spectrum", "msharpness", "landscape", "study", "figures", "bench"):
        assert name in result.output
    assert set(COMMANDS) == {
        "train",
        "spectrum",
        "msharpness",
        "landscape",
        "study",
        "figures",
        "bench",
    }


def test_no_progress_logs_one_line_per_epoch(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "sharpscope", "train", *TINY, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("epoch 1/1  train loss "), done.stderr
    assert "\r" not in done.stderr  # no progress bar


def test_train_prints_accuracy_and_writes_checkpoint(tmp_path):
    result = runner.invoke(
        app, ["train", *TINY, "--optimizer", "sgd", "--lr", "0.05", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    raw = torch.load(tmp_path / "last.pt", weights_only=True)
    spec = raw["optimizer"]
    assert spec["name"] == "sgd" and spec["lr"] == 0.05 and spec["momentum"] == 0.9
    assert spec["weight_decay"] == 5e-4
    assert raw["model"] == {"name": "mlp", "width": 16, "depth": 1}


def test_a_full_disk_says_which_epoch_is_kept_and_how_to_go_on(tmp_path, monkeypatch):
    """The checkpoint write of epoch 2 finds the disk full (injected: a full disk cannot be
    made without root). last.pt still holds epoch 1 (written atomically), and the one
    line says so, as an interrupt's does, instead of only "No space left on device"."""
    import errno
    import os

    from sharpscope import trainer

    written = []
    real_save = trainer.save_checkpoint

    def fills_up(path, payload):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        written.append(path)
        return real_save(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", fills_up)
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--samples", "128", "--epochs", "2", "--out", str(out)]
    result = runner.invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {os.strerror(errno.ENOSPC)}: {out / 'last.pt'}; {out / 'last.pt'} holds epoch "
        "1: free space, then run the same command with --resume to continue"
    )
    monkeypatch.undo()
    resumed = runner.invoke(app, [*args, "--no-progress", "--resume"])
    assert resumed.exit_code == 0, resumed.output


def test_train_sam_flags_reach_the_optimizer_spec(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            *TINY,
            "--optimizer",
            "sam",
            "--rho",
            "0.1",
            "--lr",
            "0.05",
            "--bn-policy",
            "both",
            "--subset-size",  # = --m, a spelling that passes through torchrun's parser
            "16",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    spec = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    assert spec["name"] == "sam" and spec["rho"] == 0.1 and spec["bn_policy"] == "both"
    assert spec["m"] == 16
    base = spec["base"]
    assert (base["name"], base["lr"], base["momentum"], base["weight_decay"]) == (
        "sgd",
        0.05,
        0.9,
        5e-4,
    )


def test_train_from_toml_config(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'epochs = 1\nbatch_size = 64\ndevice = "cpu"\nprogress = false\n'
        'dataset = {name = "mnist1d", samples = 256}\n'
        'model = {name = "mlp", width = 16, depth = 1}\n'
        'optimizer = {name = "adam", lr = 0.001}\n'
    )
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["epoch"] == 1


@pytest.mark.parametrize(
    "base, expected",
    [('"adam"', {"name": "adam"}), ("{lr = 0.01}", {"name": "sgd", "lr": 0.01})],
    ids=["a name", "a table without a name"],
)
def test_a_toml_base_optimizer_is_a_name_or_a_table(tmp_path, base, expected):
    """Acceptance report, session 15: both were tracebacks (ValueError, KeyError 'name')."""
    config = tmp_path / "run.toml"
    config.write_text(
        'epochs = 1\nbatch_size = 64\ndevice = "cpu"\nprogress = false\n'
        'dataset = {name = "mnist1d", samples = 128}\n'
        'model = {name = "mlp", width = 8, depth = 1}\n'
        f'optimizer = {{name = "sam", base = {base}}}\n'
    )
    result = runner.invoke(app, ["train", "--config", str(config), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "o" / "config.json").read_text())["optimizer"]["base"]
    assert {k: saved[k] for k in expected} == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizer", "sgdm"], "unknown optimizer 'sgdm'"),
        (["--model", "resnet18"], "unknown model 'resnet18'; choose one of:"),
        (["--dataset", "imagenet"], "unknown data set 'imagenet'; choose one of:"),
        (["--optimizer", "sam", "--rho", "-0.1"], "rho"),
        (["--optimizer", "vasso", "--theta", "1.5"], "theta"),
        (["--model-opt", "width"], "--model-opt takes KEY=VALUE"),
        (["--resume"], "--resume needs"),
        (["--optimizer", "sgd", "--base", "adam"], "--base is the base optimizer of a SAM variant"),
        (["--optimizer", "bsam", "--momentum", "0.9"], "--momentum does not apply"),
        # was "unknown option(s) ['m'] for vasso": the key, not the flag (session 26)
        (["--optimizer", "vasso", "--m", "16"], "--m does not apply to vasso (only to asam, sam"),
        # refused at the first step, after config.json was written (session 26)
        (
            ["--optimizer", "bsam", "--opt", "splits=100"],
            "bsam splits 100 is more than the 64 examples of a batch; use splits <= 64",
        ),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite number >= 0"),
        # these trained to a NaN loss and blamed the learning rate ("training diverged")
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
        (["--optimizer", "lets", "--inner", "bsam"], "unknown LETS inner variant 'bsam'"),
        (
            ["--optimizer", "sam", "--rho", "1e39"],
            "rho = 1e+39 is larger than the parameters' float32",
        ),
        # the flag silently won over the data option (session 28's data round)
        (
            ["--samples", "64", "--data-opt", "samples=32"],
            "--samples 64 and --data-opt samples=32 disagree; give one",
        ),
        (
            ["--label-noise", "0.2", "--data-opt", "label_noise=0.4"],
            "--label-noise 0.2 and --data-opt label_noise=0.4 disagree",
        ),
        (["--lr", "1e39"], "lr = 1e+39 is larger than the parameters' float32"),
        (["--weight-decay", "1e39"], "--weight-decay = 1e+39 is larger"),
        (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0"),
        (["--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
        (["--optimizer", "sam", "--rho", "nan"], "--rho must be a number, got nan"),
        # inf trained to a NaN loss that blamed the learning rate, or (rho_lr) pinned rho
        # at 0 and trained SGD with exit 0; warmup inf was a traceback (session 27)
        (["--optimizer", "asam", "--eta", "inf"], "--eta must be a finite number, got inf"),
        (["--optimizer", "bsam", "--damping", "inf"], "--damping must be a finite number"),
        (["--optimizer", "lets", "--rho-lr", "inf"], "--rho-lr must be a finite number"),
        (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
        # a raw IndexError from torch's Adam, and a failure at the first step (session 15 F1)
        (["--optimizer", "adam", "--opt", "betas=[0.9]"], "betas must be two numbers in [0, 1)"),
        (
            ["--optimizer", "sam", "--base", "adam", "--opt", "betas=[0.9, 0.99, 0.5]"],
            "betas must be two numbers in [0, 1), got [0.9, 0.99, 0.5]",
        ),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    base = [a for a in TINY]
    result = runner.invoke(app, ["train", *base, *args, "--out", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert not (tmp_path / "x" / "config.json").exists()  # refused before anything is written
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_resume_without_an_out_folder_asks_for_one(tmp_path, monkeypatch):
    """It said "--resume needs OUT/last.pt from an earlier run; none found", after building
    the data and the model, though no folder was named (session 26)."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--resume"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --resume needs --out DIR, the folder of the run to continue"
    ]
    assert list(tmp_path.iterdir()) == []


def test_resume_takes_the_runs_settings_from_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [*TINY[: TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--batch-size") :]]
    first = runner.invoke(
        app,
        [
            "train",
            *args,
            "--optimizer",
            "sam",
            "--rho",
            "0.1",
            "--save-every",
            "1",
            "--out",
            str(out),
        ],
    )
    assert first.exit_code == 0, first.output
    final = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    (out / "epoch_001.pt").replace(out / "last.pt")
    # `--out DIR --resume` alone continues the SAM run, not a default SGD one
    again = runner.invoke(app, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert again.output.startswith("sam on mnist1d (mlp), 2 epochs")
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["optimizer"]["rho"] == 0.1
    assert all(torch.equal(final[k], resumed["state_dict"][k]) for k in final)
    # options that would change the run are refused, naming what differs
    changed = runner.invoke(app, ["train", "--out", str(out), "--resume", "--rho", "0.5"])
    assert changed.exit_code == 2 and "optimizer.rho 0.5 (checkpoint: 0.1)" in changed.output
    done = runner.invoke(app, ["train", "--out", str(out), "--resume", "--no-progress"])
    assert done.exit_code == 0 and done.output.startswith("nothing to do:")
    # the hint does not send the user to a refusal: cosine cannot grow, so it says so
    assert "its cosine schedule ended with the run: to train longer, start a new run" in (
        done.output
    )
    longer = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "3"])
    assert longer.exit_code == 2 and "schedule depends on the total" in longer.output


def test_model_option_none_and_help_defaults(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            *TINY,
            "--model",
            "cnn1d",
            "--model-opt",
            "norm=none",
            "--out",
            str(tmp_path / "n"),
        ],
    )
    assert result.exit_code == 0, result.output
    from sharpscope.io import load_checkpoint

    model = load_checkpoint(tmp_path / "n" / "last.pt").model
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "[default: 10]" in help_text and "[default: 128]" in help_text


def test_config_with_unknown_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "unknown training config key 'epochz'" in result.output


@pytest.mark.parametrize(("suffix", "text"), [(".toml", "# nothing yet\n"), (".json", "{}")])
def test_a_config_that_sets_nothing_is_named_and_the_flags_still_apply(tmp_path, suffix, text):
    config = tmp_path / f"empty{suffix}"
    config.write_text(text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    line = f"warning: {config} sets nothing: the run takes the defaults and its flags"
    assert line in result.output.splitlines()
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 1 and saved["model"]["name"] == "mlp"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path, suffix):
    config = tmp_path / f"binary{suffix}"
    config.write_bytes(b"\xff\xfe\x00garbage")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    kind = suffix[1:].upper()
    assert result.output == f"error: {config} is not a {kind} file (not UTF-8 text)\n"


def test_an_empty_out_is_refused_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--out", ""])
    assert result.exit_code == 2 and not list(tmp_path.iterdir())
    assert result.output == "error: --out must be a folder path, got an empty one\n"


def test_every_optimizer_flag_maps_to_a_real_optimizer_option():
    """A flag whose spec key no optimizer accepts would be refused at run time (bug: --form)."""
    from sharpscope.cli.train import OPTIMIZER_FLAGS
    from sharpscope.optim.factory import optimizer_options

    known = set()
    for name in ("sam", "asam", "vasso", "lets", "samon", "bsam"):
        known |= set(optimizer_options(name))
    assert set(OPTIMIZER_FLAGS.values()) <= known


def test_asam_form_flag(tmp_path):
    result = runner.invoke(
        app, ["train", *TINY, "--optimizer", "asam", "--form", "layerwise", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (
        torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]["adaptive"] == "layerwise"
    )


def test_out_that_is_a_file_is_refused_before_training(tmp_path):
    """It trained nothing and said "error: File exists: X" (or "Not a directory")."""
    (tmp_path / "a-file").write_text("")
    for out, message in (
        ("a-file", "--out {t}/a-file is a file; it must be a folder (new or existing)"),
        ("a-file/run", "{t}/a-file is a file, not a folder"),
    ):
        result = runner.invoke(app, ["train", *TINY, "--out", str(tmp_path / out)])
        assert result.exit_code == 2
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and message.format(t=tmp_path) in lines[0], result.output
    config = tmp_path / "c.toml"
    config.write_text(f'out = "{tmp_path / "a-file"}"\n')
    result = runner.invoke(app, ["train", *TINY, "--config", str(config)])
    assert result.exit_code == 2
    assert f"out (from {config}) {tmp_path / 'a-file'} is a file" in result.output


def test_epoch_lines_go_to_stderr_with_the_progress_bar_too(tmp_path):
    """With the bar on they went to stdout (tqdm.write's default), without it to stderr;
    stdout holds the summary line only."""
    args = [a for a in TINY if a != "--no-progress"]
    result = runner.invoke(app, ["train", *args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1  train loss " in result.stderr
    [line] = result.stdout.splitlines()
    assert "test accuracy" in line


def test_training_without_out_warns_that_nothing_is_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--no-progress"])
    assert result.exit_code == 0, result.output
    logged = result.stderr.splitlines()
    assert "warning: no --out: the trained model and its metrics are not saved" in logged[0]
    assert "epoch 1" in logged[1]  # before the training, not after it
    assert list(tmp_path.iterdir()) == []  # and indeed nothing was written


def test_samples_above_the_data_warn_once(tmp_path):
    """--samples beyond the training split used every example without a word."""
    at = TINY.index("--samples")
    args = [*TINY[:at], "--samples", "100000", *TINY[at + 2 :], "--out", str(tmp_path)]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    [warning] = warnings
    assert warning.startswith("warning: samples 100000 is more than the ")
    assert warning.endswith("examples of the train split; using all " + warning.split()[-1])


def test_sigterm_names_the_checkpoint_that_resumes_the_run(tmp_path):
    """Slurm's time limit or ``kill``: one line saying which epoch last.pt holds and how to
    go on, the shell's code for SIGTERM (143), and ``--resume`` then continues."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "sharpscope", "train", "--dataset", "mnist1d"]
    args += ["--samples", "256", "--model", "mlp", "--model-opt", "width=8", "--epochs", "500"]
    args += ["--schedule", "constant", "--no-progress", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: interrupted; {out / 'last.pt'} holds epoch "), stderr
    assert last.endswith("run the same command with --resume to continue")
    assert "Traceback" not in stderr


def test_a_runs_config_json_trains_the_same_run_again_and_a_study_file_is_named(tmp_path):
    """--config takes the OUT/config.json a run wrote (TOML is not JSON), and a study
    config, whose keys sit under [train], is pointed to `study run` instead."""
    first, second = tmp_path / "first", tmp_path / "second"
    result = runner.invoke(app, ["train", *TINY, "--out", str(first)])
    assert result.exit_code == 0, result.output
    args = ["train", "--config", str(first / "config.json"), "--out", str(second)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    a, b = (torch.load(p / "last.pt", weights_only=True)["state_dict"] for p in (first, second))
    assert all(torch.equal(a[k], b[k]) for k in a)

    study = tmp_path / "study.toml"
    study.write_text('[study]\nname = "s"\n[train]\nepochs = 1\n')
    result = runner.invoke(app, ["train", "--config", str(study)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {study} is a study config: run it with `sharpscope study run")


def test_an_interrupt_in_the_first_epoch_says_there_is_nothing_to_resume(tmp_path):
    """Ctrl-C before any checkpoint: --resume would only say 'none found', so say so now."""
    code = tmp_path / "stops.py"
    code.write_text(
        "import torch\n"
        "class Stops(torch.nn.Linear):\n"
        "    calls = 0\n"
        "    def forward(self, x):\n"
        "        Stops.calls += 1\n"
        "        if Stops.calls == 3:  # the check before training, then training steps\n"
        "            raise KeyboardInterrupt\n"
        "        return super().forward(x.flatten(1))\n"
        "def model():\n"
        "    return Stops(40, 10)\n"
    )
    args = ["train", "--dataset", "mnist1d", "--samples", "256", "--model", f"{code}:model"]
    result = runner.invoke(app, [*args, "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == (
        "error: interrupted before the first epoch ended, so there is no checkpoint to resume: "
        "run the same command again without --resume"
    )


def test_bsam_samples_flag_sets_the_model_average(tmp_path):
    """--bsam-samples reaches the run's settings (the model average's cost is one pass over
    the test split per sample, every epoch)."""
    args = ["train", *TINY, "--optimizer", "bsam", "--bsam-samples", "2", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "config.json").read_text())["bsam_samples"] == 2
    bad = runner.invoke(app, [*args[:-2], "--bsam-samples", "0"])
    assert bad.exit_code != 0 and "--bsam-samples must be a positive integer" in bad.output


def test_flags_over_a_config_keep_its_options_for_the_same_names_and_its_base_settings(tmp_path):
    """Acceptance report, session 15: `--dataset digits --model mlp` over a TOML with the
    same names dropped its samples and width, and `--optimizer sam` dropped the TOML's
    SGD settings (lr, momentum, weight decay) for the defaults, silently."""
    config = tmp_path / "shared.toml"
    config.write_text(
        'epochs = 1\nbatch_size = 32\ndevice = "cpu"\nprogress = false\n'
        'dataset = {name = "digits", samples = 128}\n'
        'model = {name = "mlp", width = 8, depth = 1}\n'
        'optimizer = {name = "sgd", lr = 0.01, momentum = 0.5, weight_decay = 0.0}\n'
    )
    same = ["--dataset", "digits", "--model", "mlp", "--optimizer", "sam"]
    result = runner.invoke(
        app, ["train", "--config", str(config), *same, "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert saved["dataset"]["samples"] == 128 and saved["model"]["width"] == 8
    base = saved["optimizer"]["base"]
    assert (base["name"], base["lr"], base["momentum"], base["weight_decay"]) == (
        "sgd",
        0.01,
        0.5,
        0.0,
    )
    other = ["--model", "cnn", "--optimizer", "adam"]
    result = runner.invoke(
        app, ["train", "--config", str(config), *other, "--out", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
    assert "warning: --model cnn replaces the config's mlp and its options (depth, width)" in (
        result.output
    )
    assert "warning: --optimizer adam replaces the config's sgd and its options (lr, momentum" in (
        result.output
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--label-noise", "1.5"], "--label-noise must be in [0, 1), got 1.5"),
        (["--optimizer", "sam", "--rho", "-0.1"], "--rho must be a finite number >= 0"),
        (["--optimizer", "asam", "--form", "bogus"], "--form must be one of elementwise"),
    ],
)
def test_errors_about_flags_name_the_flags(flags, message, tmp_path):
    """They named the config key ("epochs must be ...") where every other command names
    the flag; a value from --config keeps its key's name."""
    result = runner.invoke(app, ["train", *TINY, *flags])
    assert result.exit_code == 2
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(f"error: {message}")
    config = tmp_path / "c.toml"
    config.write_text("epochs = 0\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.output.strip().splitlines()[-1].startswith("error: epochs must be")


def test_resuming_a_run_folder_runs_its_factories_only_when_trusted_or_named(tmp_path):
    """Acceptance report, session 21: `train --out THEIRS --resume` imported and called the
    factories that THEIRS/last.pt names, code from the folder's author, with no flag, while
    the analysis commands refuse the same checkpoint. Now resume is gated alike."""
    marker = tmp_path / "imported"
    code = tmp_path / "theirs.py"
    code.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import torch\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(128, 20, generator=g), torch.randint(0, 4, (128,), generator=g)\n"
    )
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--model-opt", "width=8", "--batch-size", "64"]
    args += ["--schedule", "constant", "--no-progress", "--device", "cpu", "--out", str(out)]
    first = runner.invoke(app, [*args, "--dataset", f"{code}:make", "--epochs", "1"])
    assert first.exit_code == 0, first.output

    def forget_the_module() -> None:  # as in a fresh process
        marker.unlink(missing_ok=True)
        for key in [k for k, m in sys.modules.items() if getattr(m, "__file__", "") == str(code)]:
            del sys.modules[key]

    forget_the_module()
    resume = ["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]
    refused = runner.invoke(app, resume)
    assert refused.exit_code == 2 and not marker.exists()
    assert refused.output == (
        f"error: {out / 'last.pt'} names the data set factory '{code}:make', code that would "
        "run: pass --trust-factories if you trust the run folder, or name the data set "
        "yourself with --dataset\n"
    )
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1  # untouched
    trusted = runner.invoke(app, [*resume, "--trust-factories"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists() and torch.load(out / "last.pt", weights_only=True)["epoch"] == 2
    forget_the_module()
    again = ["train", "--out", str(out), "--resume", "--epochs", "3", "--no-progress"]
    named = runner.invoke(app, [*again, "--dataset", f"{code}:make"])
    assert named.exit_code == 0, named.output
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 3
    # a study's run folder is refused first, not after the user trusted its factories
    (out / "run.json").write_text("{}")
    study = runner.invoke(app, resume)
    assert study.exit_code == 2 and "is a run folder of a study (run.json)" in study.output


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("study.json", "is a study folder (study.json): train into another --out"),
        ("run.json", "is a run folder of a study (run.json): `sharpscope study run` on the"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_a_studys_folders_are_refused(tmp_path, marker, message, resume):
    """Acceptance report, session 21: `train --out STUDY/runs/<queued run>` trained another
    model there (the study failed on it later), and `train --out STUDY` wrote beside study.json."""
    out = tmp_path / "folder"
    out.mkdir()
    (out / marker).write_text("{}")
    result = runner.invoke(app, ["train", *TINY, "--out", str(out), *(["--resume"] * resume)])
    assert result.exit_code == 2 and result.output.startswith(f"error: {out} {message}")
    assert sorted(p.name for p in out.iterdir()) == [marker]


def test_the_optimizer_dependent_defaults_in_the_help_are_the_factorys():
    """--lr, --rho, --weight-decay, --eta, --normalize-bias and --perturbation showed no
    default, or SGD's alone (session 26); the help now lists them per optimizer."""
    from sharpscope.optim.factory import OPTIMIZER_NAMES, base_options, optimizer_options

    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "2000"})
    text = " ".join(result.output.split())

    def help_of(flag: str) -> str:
        start = text.index(f"{flag} <") if f"{flag} <" in text else text.index(f"{flag} /")
        return text[start : text.index("]", start)]

    def by_value(names, key, options=optimizer_options):
        groups: dict = {}
        for name in names:
            if key in options(name):
                groups.setdefault(options(name)[key], []).append(name)
        return groups

    rho = by_value(OPTIMIZER_NAMES, "rho")
    for value, names in rho.items():
        assert f"{value:g} for {', '.join(names)}" in help_of("--rho")
    for flag, key in (("--lr", "lr"), ("--weight-decay", "weight_decay")):
        for value, names in by_value(("sgd", "adam", "adamw"), key, base_options).items():
            assert f"{value} with {', '.join(names)}" in help_of(flag), (flag, value)
    assert f"{optimizer_options('bsam')['lr']} for bsam" in help_of("--lr")
    assert (
        optimizer_options("asam")["normalize_bias"]
        and not optimizer_options("samon")["normalize_bias"]
    )
    assert "on for asam, off for samon" in help_of("--normalize-bias")
    assert {optimizer_options(n)["eta"] for n in ("asam", "samon")} == {0.01}
    assert "[default: 0.01" in help_of("--eta")
    perturbation = by_value(OPTIMIZER_NAMES, "perturbation")
    assert perturbation["global"] == ["vasso"] and set(perturbation) == {"local", "global"}
    assert "[default: local; global for vasso" in help_of("--perturbation")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("missing.py:data", "error: data set factory file not found:"),
        ("floats.py:data", "error: training needs class labels (integer targets of shape (N,))"),
    ],
)
def test_a_bad_data_factory_is_one_line_without_the_test_set_warning(tmp_path, factory, message):
    """The 'it is also the test set' warning came first, before the factory was even
    imported, so a bad factory gave two lines (session 26)."""
    (tmp_path / "floats.py").write_text(
        "import torch\ndef data():\n    return torch.randn(10, 40), torch.randn(10)\n"
    )
    args = [*TINY[2:], "--dataset", str(tmp_path / factory), "--out", str(tmp_path / "x")]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(message), line


def test_b4_a_data_factory_parsing_the_command_line_is_one_error_line(tmp_path):
    """Bug B4, session 28: argparse in a data factory read sharpscope's arguments and
    printed its own usage and 'sharpscope: error: unrecognized arguments' (exit 2), as if
    sharpscope had refused them; now the last line names the factory."""
    import subprocess

    (tmp_path / "ap.py").write_text(
        "import argparse\nimport torch\n"
        "def make():\n"
        "    argparse.ArgumentParser().parse_args()\n"
        "    return torch.randn(8, 3), torch.zeros(8, dtype=torch.long)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sharpscope", "train", "--dataset", "ap.py:make", "--model", "mlp"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith(
        f"error: data factory '{tmp_path / 'ap.py'}:make' called sys.exit(2); a factory returns"
    )
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_stop_while_an_epoch_is_saved_keeps_that_epoch(tmp_path, monkeypatch, signum):
    """dist B3 (session 31): a Ctrl-C or SIGTERM during the end-of-epoch save cancelled the
    atomic write, so the finished epoch was lost, and after epoch 1 the line said
    "before the first epoch ended". The signal now stops the run once the epoch is saved."""
    import os
    import signal

    import sharpscope.trainer as trainer

    save = trainer.save_checkpoint

    def interrupted_save(path, payload):
        os.kill(os.getpid(), getattr(signal, signum))  # arrives in the middle of the write
        return save(path, payload)

    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_save)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *TINY, "--epochs", "3", "--out", str(out)])
    assert result.exit_code == (130 if signum == "SIGINT" else 143), result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: interrupted; {out / 'last.pt'} holds epoch 1: run the same command with "
        "--resume to continue"
    )
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines if '"eval"' in line] == [1]


def test_the_precision_help_says_that_fp16_needs_a_cuda_gpu():
    """Doubt 1 (session 31): --precision listed fp16 without saying it trains on CUDA only."""
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "2000"})
    assert "fp32, bf16 or fp16 (fp16 needs a CUDA GPU)" in " ".join(result.output.split())
