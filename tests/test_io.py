"""Checkpoints: round trip, atomic writes, safe loading, bare state_dicts, wrong architectures."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.io import FORMAT, VERSION, load_checkpoint, safe_load, save_checkpoint
from sharpscope.registry import build_model


def _payload(model, spec):
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": spec,
        "data": {"name": "mnist1d"},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "epoch": 3,
        "step": 90,
        "metrics": {"train_loss": 0.5, "train_acc": 0.8, "test_loss": 0.6, "test_acc": 0.7},
        "input_shape": [40],
        "num_classes": 10,
        "state_dict": model.state_dict(),
        "optimizer_state": {},
        "scheduler_state": {},
        "rng_state": {"cpu": torch.get_rng_state()},
    }


@pytest.fixture
def mlp_checkpoint(tmp_path):
    torch.manual_seed(0)
    spec = {"name": "mlp", "width": 16, "depth": 1}
    model = build_model(spec, (40,), 10)
    path = save_checkpoint(tmp_path / "ckpt.pt", _payload(model, spec))
    return path, model, spec


def test_round_trip_restores_weights_and_metadata(mlp_checkpoint):
    path, model, spec = mlp_checkpoint
    raw = torch.load(path, weights_only=True)  # the format promise of interface.md
    assert raw["format"] == "sharpscope-checkpoint" and raw["version"] == 1
    ckpt = load_checkpoint(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert ckpt.spec == spec and ckpt.metrics["test_acc"] == 0.7
    assert ckpt.epoch == 3 and ckpt.step == 90 and len(ckpt.sha256) == 64
    assert not ckpt.is_bare


def test_loading_leaves_the_global_random_state_alone(mlp_checkpoint):
    """The model's random initialisation, which the weights overwrite, drew from torch's
    global generator, so `manual_seed(0); load_checkpoint(...); randn()` depended on the
    architecture (s29 models D10)."""
    path, model, _ = mlp_checkpoint
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    ckpt = load_checkpoint(path)
    assert torch.equal(torch.randn(3), expected)
    assert torch.equal(next(ckpt.model.parameters()), next(model.parameters()))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, mlp_checkpoint, monkeypatch):
    path, model, spec = mlp_checkpoint
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_checkpoint(path, _payload(model, spec) | {"epoch": 4})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


def test_atomic_write_fsyncs_the_data_before_the_rename(tmp_path, mlp_checkpoint, monkeypatch):
    """'temporary file, fsync, rename': without the fsync a crash after the rename can leave
    an empty checkpoint where the old one was."""
    _, model, spec = mlp_checkpoint
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "c.pt", _payload(model, spec))
    assert events == ["fsync", "replace"]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    from sharpscope.results import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        (tmp_path / "b.json").write_bytes(b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "c.json", b"{}")
    finally:
        os.umask(old)
    mode = {
        name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.json", "b.json", "c.json")
    }
    assert mode == {"a.json": 0o644, "b.json": 0o644, "c.json": 0o600}
    with pytest.raises(SharpscopeError, match="is a folder; give a file name"):
        atomic_write_bytes(tmp_path, b"{}")
    # rewriting an existing file keeps its mode, as open(path, "w") would
    (tmp_path / "a.json").chmod(0o600)
    atomic_write_bytes(tmp_path / "a.json", b"[]")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o600


def test_bare_state_dict_loads_with_model_and_data(tmp_path, mlp_checkpoint):
    _, model, spec = mlp_checkpoint
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    ckpt = load_checkpoint(bare, model_spec=spec, data_spec="mnist1d")
    assert ckpt.is_bare
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), ckpt.model.state_dict().values())
    )
    with pytest.raises(SharpscopeError, match=r"bare state_dict: say which model.*model_spec="):
        load_checkpoint(bare)
    with pytest.raises(SharpscopeError, match="needs --data"):
        load_checkpoint(bare, model_spec=spec)


def test_legacy_torch_save_format_loads(tmp_path, mlp_checkpoint):
    """torch.save's legacy (non-zip) format is accepted on purpose and loads with
    weights_only=True, but no test loaded one."""
    _, model, spec = mlp_checkpoint
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(path, model_spec=spec, data_spec="mnist1d")
    for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_ddp_prefix_is_stripped_only_when_every_key_has_it():
    """DistributedDataParallel's ``module.`` goes only when every key has it (``any`` passed)."""
    from sharpscope.io import strip_ddp_prefix

    weight = torch.zeros(1)
    assert strip_ddp_prefix({"module.a": weight, "module.b": weight}).keys() == {"a", "b"}
    assert strip_ddp_prefix({"module.a": weight, "b": weight}).keys() == {"module.a", "b"}


def test_user_factory_model_from_file(tmp_path):
    source = tmp_path / "my_models.py"
    source.write_text(
        "import torch\n"
        "def tiny():\n"
        "    torch.manual_seed(1)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))\n"
    )
    namespace: dict = {}
    exec(source.read_text(), namespace)
    model = namespace["tiny"]()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    ckpt = load_checkpoint(tmp_path / "w.pt", model_spec=f"{source}:tiny")
    assert torch.equal(ckpt.model[1].weight, model[1].weight)


def test_wrong_architecture_lists_keys_in_one_line(tmp_path, mlp_checkpoint):
    path, _, _ = mlp_checkpoint
    with pytest.raises(SharpscopeError) as info:
        load_checkpoint(path, model_spec={"name": "mlp", "width": 16, "depth": 2})
    message = str(info.value)
    assert "do not fit the model" in message and "missing keys" in message
    assert "\n" not in message
    with pytest.raises(SharpscopeError, match="shape mismatches"):
        load_checkpoint(path, model_spec={"name": "mlp", "width": 8, "depth": 1})


def test_pickle_that_would_run_code_is_refused_and_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": Exploit()}, path)
    with pytest.raises(SharpscopeError, match="refusing to load"):
        load_checkpoint(path, model_spec="mlp")
    assert not marker.exists()
    # the plain pickle format is refused too, without torch's warning about its protocol
    # (a second stderr line before the refusal)
    with path.open("wb") as handle:
        pickle.dump(Exploit(), handle, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SharpscopeError, match="refusing to load"):
            safe_load(path)
    assert not marker.exists()


def test_a_model_factory_named_in_a_checkpoint_runs_only_when_trusted(tmp_path, mlp_checkpoint):
    """weights_only=True reads no code, but a spec naming module:function would import and
    call it on loading: someone else's checkpoint ran code. Now it must be trusted, or the
    model named by the caller."""
    path, model, spec = mlp_checkpoint
    marker = tmp_path / "ran"
    source = tmp_path / "theirs.py"
    source.write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from sharpscope.registry import build_model\n"
        f"def net():\n    return build_model({spec!r}, (40,), 10)\n"
    )
    payload = torch.load(path, weights_only=True)
    payload["model"] = {"factory": f"{source}:net"}
    theirs = save_checkpoint(tmp_path / "theirs.pt", payload)
    with pytest.raises(SharpscopeError) as info:
        load_checkpoint(theirs)
    assert str(info.value) == (
        f"{theirs} names the model factory '{source}:net', code that would run: pass "
        "--trust-factories if you trust the file (trust_factories=True in Python), or name "
        "the model yourself with --model (model_spec= in Python)"
    )
    assert not marker.exists()
    # a registry name in the 'name' key is no factory; a factory path there is one
    payload["model"] = {"name": "os:getcwd"}
    with pytest.raises(SharpscopeError, match="names the model factory 'os:getcwd'"):
        load_checkpoint(save_checkpoint(tmp_path / "named.pt", payload))
    # the caller's own spec, or trust, builds it
    own = load_checkpoint(theirs, model_spec=spec)
    assert all(torch.equal(a, b) for a, b in zip(own.model.parameters(), model.parameters()))
    assert not marker.exists()
    # a registry model without recorded shapes would read them off the file's data
    # factory: that is code too (review: it ran before the refusal)
    payload["model"] = spec
    payload["data"] = {"factory": f"{source}:net"}
    del payload["input_shape"], payload["num_classes"]
    shapeless = save_checkpoint(tmp_path / "shapeless.pt", payload)
    with pytest.raises(SharpscopeError, match="names the data set factory"):
        load_checkpoint(shapeless)
    assert not marker.exists()
    trusted = load_checkpoint(theirs, trust_factories=True)
    assert marker.exists()
    assert all(torch.equal(a, b) for a, b in zip(trusted.model.parameters(), model.parameters()))


def test_truncated_file_gives_one_line(tmp_path, mlp_checkpoint):
    path, _, _ = mlp_checkpoint
    data = path.read_bytes()
    broken = tmp_path / "broken.pt"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(SharpscopeError) as info:
        load_checkpoint(broken)
    assert "truncated" in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_newer_version(tmp_path, mlp_checkpoint):
    with pytest.raises(SharpscopeError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    if os.path.exists("/dev/null"):  # it exists: "not found" was wrong (session 27's round)
        with pytest.raises(SharpscopeError, match="/dev/null is not a regular file"):
            load_checkpoint("/dev/null")
    path, model, spec = mlp_checkpoint
    save_checkpoint(tmp_path / "future.pt", _payload(model, spec) | {"version": 99})
    with pytest.raises(SharpscopeError, match="checkpoint version 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_files_that_are_not_checkpoints_get_a_plain_message(tmp_path):
    from sharpscope.io import safe_load

    (tmp_path / "notes.txt").write_text("101 examples\n")
    (tmp_path / "result.json").write_text('{"a": 1}\n')
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, words in (
        ("notes.txt", "is not a torch checkpoint"),
        ("result.json", "is not a torch checkpoint"),
        ("empty.pt", "is empty"),
    ):
        with pytest.raises(SharpscopeError, match=words):
            safe_load(tmp_path / name)
    with pytest.raises(SharpscopeError, match="is a folder, not a checkpoint file"):
        safe_load(tmp_path)


def test_checkpoint_without_model_entry_says_to_pass_model(tmp_path, mlp_checkpoint):
    # raw["model"] raised KeyError: 'model', a traceback on the command line
    path, model, spec = mlp_checkpoint
    payload = _payload(model, spec)
    del payload["model"]
    save_checkpoint(tmp_path / "nomodel.pt", payload)
    with pytest.raises(SharpscopeError, match="records no model spec.*--model") as info:
        load_checkpoint(tmp_path / "nomodel.pt")
    assert "\n" not in str(info.value)
    loaded = load_checkpoint(tmp_path / "nomodel.pt", model_spec=spec)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.model.state_dict().values())
    )


@pytest.mark.parametrize(
    "change, message, not_said",
    [
        # was "is a bare state_dict: say which model ... with --model"
        (
            {"format": "lightning-checkpoint"},
            "has format 'lightning-checkpoint', not 'sharpscope-checkpoint'",
            "bare state_dict:",
        ),
        # was "has checkpoint version 1; this sharpscope reads versions 1..1 (upgrade ...)"
        ({"version": "1"}, "has checkpoint version '1' (str), not ", "upgrade"),
        ({"version": 1.0}, "has checkpoint version 1.0 (float), not ", "upgrade"),
        ({"version": True}, "has checkpoint version True (bool)", "upgrade"),
        # was "version None ... (upgrade sharpscope)"
        ({"version": None}, "records no checkpoint version", "upgrade"),
        # was accepted
        ({"version": 0}, "has checkpoint version 0; versions start at 1", "upgrade"),
        ({"version": -3}, "has checkpoint version -3; versions start at 1", "upgrade"),
        (
            {"version": VERSION + 1},
            f"version {VERSION + 1}; this sharpscope reads versions 1..{VERSION} (upgrade sharpscope)",
            "edited",
        ),
    ],
    ids=["format", "str", "float", "bool", "missing", "zero", "negative", "newer"],
)
def test_malformed_checkpoints_get_a_specific_message(
    tmp_path, mlp_checkpoint, change, message, not_said
):
    from sharpscope.io import load_training_state

    path, model, spec = mlp_checkpoint
    payload = {k: v for k, v in (_payload(model, spec) | change).items() if v is not None}
    save_checkpoint(tmp_path / "odd.pt", payload)
    for load in (load_checkpoint, load_training_state):
        with pytest.raises(SharpscopeError) as info:
            load(tmp_path / "odd.pt")
        text = str(info.value)
        assert message in text and not_said not in text and "\n" not in text, text


def test_checkpoint_without_weights_says_what_a_checkpoint_holds(tmp_path, mlp_checkpoint):
    path, model, spec = mlp_checkpoint
    payload = _payload(model, spec)
    del payload["state_dict"]
    save_checkpoint(tmp_path / "noweights.pt", payload)
    with pytest.raises(SharpscopeError, match="without a 'state_dict' entry.*--model"):
        load_checkpoint(tmp_path / "noweights.pt")


@pytest.mark.parametrize(
    "key",
    ["state_dict", "optimizer_state", "scheduler_state", "rng_state", "epoch", "step", "config"],
)
def test_resume_needs_every_training_state_key(tmp_path, mlp_checkpoint, key):
    """A checkpoint without one key train --resume reads is refused in one line (without
    rng_state in TRAINING_STATE_KEYS, resume ended in a KeyError traceback)."""
    from sharpscope.io import load_training_state

    _, model, spec = mlp_checkpoint
    full = _payload(model, spec) | {"config": {}}
    save_checkpoint(tmp_path / "full.pt", full)
    assert load_training_state(tmp_path / "full.pt")["epoch"] == 3
    save_checkpoint(tmp_path / "partial.pt", {k: v for k, v in full.items() if k != key})
    with pytest.raises(SharpscopeError, match=f"has no {key}: it can be analysed but not resumed"):
        load_training_state(tmp_path / "partial.pt")


def test_a_loaded_model_is_in_eval_mode_so_evaluating_it_keeps_its_batchnorm_statistics(
    tmp_path,
):
    """What the stored metrics measured: running statistics, not the batch's; a model left
    in train mode would give another accuracy and move its statistics on every call."""
    torch.manual_seed(0)
    spec = {"name": "cnn1d", "norm": "batch", "width": 4}
    model = build_model(spec, (40,), 10)
    path = save_checkpoint(tmp_path / "bn.pt", _payload(model, spec))
    ckpt = load_checkpoint(path)
    assert not any(module.training for module in ckpt.model.modules())
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    x = torch.randn(16, 40)
    with torch.no_grad():
        first, second = ckpt.model(x), ckpt.model(x[:3])
    torch.testing.assert_close(first[:3], second)  # no batch statistics
    for key, value in ckpt.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_atomic_writes_go_through_a_symlink_to_its_target(tmp_path):
    """``--json results.json`` where results.json links elsewhere: the target gets the data
    (as ``open(path, "w")`` would), and the link stays a link."""
    from sharpscope.results import atomic_write_bytes

    target = tmp_path / "store" / "r.json"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["r.json"]  # no temporary left


@pytest.mark.parametrize("through_link", [False, True])
def test_a_pipe_is_written_through_not_renamed_over(tmp_path, through_link):
    """Acceptance, session 22: ``--json`` naming a FIFO (or a device: ``/dev/null``) renamed
    a temporary file over it, replacing it with a plain file. It gets the data, as
    ``open(path, "w")`` would give it, and stays what it was."""
    import stat
    import threading

    from sharpscope.results import write_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    path = fifo
    if through_link:
        path = tmp_path / "r.json"
        path.symlink_to(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_json(path, {"lambda_max": 2.5})
    reader.join(timeout=30)
    assert received, "the pipe got nothing"
    assert json.loads(received[0]) == {"lambda_max": 2.5}
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"pipe", path.name})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_device_is_named_in_the_error():
    """Session 27's round: ``--json /dev/full`` said only "No space left on device"."""
    from sharpscope.results import write_json

    with pytest.raises(OSError) as info:
        write_json("/dev/full", {"a": 1})
    assert info.value.filename == "/dev/full" and "No space left" in str(info.value)


def test_dev_stdout_gets_the_json():
    """``--json /dev/stdout`` (a link to the process's pipe, which has no path to rename
    to) prints the JSON."""
    import subprocess
    import sys

    code = "from sharpscope.results import write_json; write_json('/dev/stdout', {'a': 1})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"a": 1}


def test_dev_stdout_appended_to_a_log_keeps_the_log(tmp_path):
    """Review, session 22: with stdout appended to a file (``>> run.log``), /dev/stdout leads
    to that file, and the atomic rename replaced the whole log with the JSON (reopening it
    would truncate it). The JSON goes to the process's own descriptor instead."""
    import subprocess
    import sys

    log = tmp_path / "run.log"
    log.write_text("earlier line\n")
    code = (
        "print('before', flush=True)\n"
        "from sharpscope.results import write_json\n"
        "write_json('/dev/stdout', {'a': 1}, indent=None)\n"
        "print('after')\n"
    )
    with log.open("a") as handle:
        done = subprocess.run([sys.executable, "-c", code], stdout=handle, text=True)
    assert done.returncode == 0
    assert log.read_text() == 'earlier line\nbefore\n{"a": 1}\nafter\n'


def test_a_write_that_runs_out_of_space_names_the_file(tmp_path):
    """A full disk or a file-size limit (here ``ulimit -f``, in a child process) names the
    file asked for, not our temporary one."""
    import subprocess
    import sys

    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))\n"
        "from sharpscope.results import atomic_write_bytes\n"
        "try:\n"
        "    atomic_write_bytes(sys.argv[1], b'x' * 100_000)\n"
        "except OSError as exc:\n"
        "    print(exc.filename)\n"
    )
    target = tmp_path / "big.json"
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == str(target), done.stderr
    assert list(tmp_path.iterdir()) == []  # the partial temporary file is gone


def test_bare_state_dict_of_a_cifar_model_needs_no_data_files(tmp_path):
    """The input shape and class count of a built-in data set are known without reading it:
    a CIFAR state_dict loads without --data-root (it was asked for, and ignored if given)."""
    torch.manual_seed(0)
    spec = {"name": "cnn", "width": 4}
    model = build_model(spec, (3, 32, 32), 100)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    ckpt = load_checkpoint(bare, model_spec=spec, data_spec="cifar100")
    assert ckpt.input_shape == (3, 32, 32) and ckpt.num_classes == 100
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt.model.state_dict()[key])


def test_a_file_size_limit_while_a_checkpoint_is_written_names_the_file(tmp_path):
    """torch.save wraps the OSError it meets (disk full, a file-size limit) in a RuntimeError:
    the OSError, naming the checkpoint, is what comes out, and the old file stays whole."""
    import subprocess
    import sys

    script = f"""
import errno, resource, signal, torch
from sharpscope.io import save_checkpoint
path = {str(tmp_path / "last.pt")!r}
save_checkpoint(path, {{"w": torch.zeros(10)}})
before = open(path, "rb").read()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint(path, {{"w": torch.zeros(100_000)}})
except OSError as exc:
    assert exc.errno == errno.EFBIG and exc.filename == path, (exc.errno, exc.filename)
    assert open(path, "rb").read() == before
    print("named")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "named", done.stderr[-1500:]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, "Terminated"])
def test_an_interrupt_while_a_checkpoint_is_written_comes_out_as_itself(
    tmp_path, monkeypatch, stop
):
    """Session 27: Ctrl-C or SIGTERM during torch.save came out as torch's RuntimeError
    ("unexpected pos"), a traceback and exit 1 instead of the line naming last.pt and exit
    130/143. The interrupt comes out now, and the old file stays whole."""
    from sharpscope.cli._common import Terminated
    from sharpscope.io import save_checkpoint

    stop = Terminated if stop == "Terminated" else stop
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(10)})
    before = path.read_bytes()
    real_save = torch.save

    class Stopping:  # a file that is interrupted after the first kilobyte
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 1000:
                raise stop()
            return self.handle.write(data)

        def flush(self):
            self.handle.flush()

    monkeypatch.setattr(torch, "save", lambda obj, handle: real_save(obj, Stopping(handle)))
    with pytest.raises(stop):
        save_checkpoint(path, {"w": torch.zeros(100_000)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


@pytest.mark.parametrize("config", ["x", [1, 2], 3])
def test_a_config_entry_that_is_not_a_table_is_one_line(tmp_path, config):
    """Session 27: the analyses and train --resume ended in an AttributeError traceback
    ('str' object has no attribute 'get')."""
    from sharpscope.io import load_checkpoint, load_training_state, save_checkpoint
    from sharpscope.registry import build_model

    spec = {"name": "mlp", "width": 4, "depth": 1}
    path = tmp_path / "last.pt"
    save_checkpoint(
        path,
        {"format": "sharpscope-checkpoint", "version": 1, "model": spec, "input_shape": [40],
         "num_classes": 10, "state_dict": build_model(spec, (40,), 10).state_dict(),
         "config": config},
    )  # fmt: skip
    for load in (load_checkpoint, load_training_state):
        with pytest.raises(SharpscopeError, match="has a config entry of type"):
            load(path)
