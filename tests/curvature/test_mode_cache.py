"""The HVP mode chosen by timing is remembered on disk, so a later process skips the timing
(sharpscope.curvature.mode_cache)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from sharpscope.curvature import HessianOperator, clear_mode_cache
from sharpscope.curvature.mode_cache import ENV_SWITCH, FILE_NAME


def _case(samples: int = 16, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    return model, (torch.randn(samples, 4, dtype=dtype), torch.randint(0, 3, (samples,)))


def test_a_later_process_reuses_the_mode_an_earlier_one_timed(cache):
    """Two real processes: the first times both modes and writes the file, the second
    reads its choice and timings and times nothing."""
    script = textwrap.dedent(
        """
        import json, torch
        from torch import nn
        from sharpscope.curvature import HessianOperator
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
        op = HessianOperator(model, (x, y))
        print(json.dumps([op.hvp_mode, op.hvp_mode_cached, op.mode_timings]))
        """
    )
    env = {**os.environ, "SHARPSCOPE_CACHE": str(cache.parent)}
    runs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.splitlines()[-1]))
    (mode1, cached1, seconds1), (mode2, cached2, seconds2) = runs
    assert (cached1, cached2) == (False, True)
    assert mode2 == mode1 and seconds2 == seconds1 and set(seconds1) == {"forward", "reverse"}
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["mode"] == mode1
    configuration = entry["configuration"]
    assert configuration["torch"] == torch.__version__
    assert configuration["input"] == [[16, 4], "torch.float64"]
    assert configuration["device"].startswith("cpu ")


def test_the_remembered_choice_is_what_the_file_says(cache):
    """In one process with its own memory cleared, the mode comes from the file (an edited
    entry is followed; a damaged one is ignored and timed again)."""
    model, data = _case()
    first = HessianOperator(model, data)
    assert not first.hvp_mode_cached
    entries = json.loads(cache.read_text())
    (key,) = entries
    other = "reverse" if first.hvp_mode == "forward" else "forward"
    entries[key].update(mode=other, seconds={"forward": 7.0, "reverse": 8.0})
    cache.write_text(json.dumps(entries))
    clear_mode_cache()
    read = HessianOperator(model, data)
    assert read.hvp_mode_cached and read.hvp_mode == other
    assert read.describe()["hvp_mode_seconds"] == {"forward": 7.0, "reverse": 8.0}

    entries[key]["mode"] = "sideways"  # not a mode
    cache.write_text(json.dumps(entries))
    clear_mode_cache()
    timed = HessianOperator(model, data)
    assert not timed.hvp_mode_cached and timed.hvp_mode in ("forward", "reverse")
    assert json.loads(cache.read_text())[key]["mode"] == timed.hvp_mode  # rewritten


def test_a_damaged_file_is_ignored_and_replaced(cache):
    cache.write_text("{not json")
    model, data = _case()
    op = HessianOperator(model, data)
    assert not op.hvp_mode_cached
    assert len(json.loads(cache.read_text())) == 1


def test_another_configuration_is_timed_again(cache):
    """Other input shapes or dtype: a new entry, not the first one's choice."""
    model, data = _case()
    HessianOperator(model, data)
    clear_mode_cache()
    assert not HessianOperator(model, _case(samples=32)[1]).hvp_mode_cached
    clear_mode_cache()
    model32, data32 = _case(dtype=torch.float32)
    assert not HessianOperator(model32, data32).hvp_mode_cached
    assert len(json.loads(cache.read_text())) == 3


def test_switched_off_the_file_is_neither_read_nor_written(cache, monkeypatch):
    model, data = _case()
    HessianOperator(model, data)
    before = cache.read_text()
    clear_mode_cache()
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert not HessianOperator(model, data).hvp_mode_cached
    clear_mode_cache()
    assert not HessianOperator(model, _case(samples=32)[1]).hvp_mode_cached
    assert cache.read_text() == before


def test_a_callable_loss_and_an_explicit_mode_stay_off_the_disk(cache):
    """A callable has no name that means the same in another process; an explicit mode
    is not chosen by timing."""
    model, data = _case()

    def my_loss(out, y):
        return nn.functional.cross_entropy(out, y)

    op = HessianOperator(model, data, loss=my_loss)
    assert not op.hvp_mode_cached and not cache.exists()
    assert HessianOperator(model, data, loss=my_loss).hvp_mode_cached  # the process's
    HessianOperator(model, data, hvp_mode="reverse")
    assert not cache.exists()


def test_an_unwritable_cache_folder_only_costs_the_timing(tmp_path, monkeypatch):
    """A cache that cannot be written (its folder is a file) is no error."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SHARPSCOPE_CACHE", str(blocker))
    clear_mode_cache()
    model, data = _case()
    op = HessianOperator(model, data)
    assert not op.hvp_mode_cached and op.hvp_mode in ("forward", "reverse")
    clear_mode_cache()


class _NoForwardAD(torch.autograd.Function):
    """tanh as an old-style autograd.Function: reverse mode (and its double backward)
    works, forward-over-reverse through torch.func does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _Tanh(nn.Module):
    def forward(self, x):
        return _NoForwardAD.apply(x)


def _strict_json(path):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_remembered_mode_that_fails_for_this_model_is_timed_again(cache):
    """Review s23: a remembered mode ran no trial product, so a model sharing the key but
    lacking that mode's derivative (a model file edited since, a notebook class redefined)
    failed with PyTorch's traceback at the first product. Now it gets the trial product an
    explicit mode gets, and a failure there times both modes again, before any result
    records the operator's metadata (review2: spectrum() recorded a stale mode)."""
    from sharpscope.analysis.spectrum import spectrum

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Tanh(), nn.Linear(6, 3)).double()
    data = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    first = HessianOperator(model, data)
    assert first.hvp_mode == "reverse" and "forward" in first.mode_errors
    entries = _strict_json(cache)  # the failed mode's infinite time is written strictly
    (key,) = entries
    clear_mode_cache()
    assert HessianOperator(model, data).mode_timings["forward"] == float("inf")  # read back
    entries[key].update(mode="forward", errors={})  # as if another model had recorded it
    cache.write_text(json.dumps(entries))
    clear_mode_cache()
    with pytest.warns(RuntimeWarning, match="remembered for this configuration, 'forward'"):
        result = spectrum(model, data, k=2, num_probes=1, num_lanczos_steps=5, trace_probes=6)
    extra = result.meta.extra
    assert extra["hvp_mode"] == "reverse" and extra["hvp_mode_cached"] is False
    assert "forward" in extra["hvp_mode_errors"]
    assert _strict_json(cache)[key]["mode"] == "reverse"  # the file is mended
    v = torch.randn(first.dim, dtype=torch.float64)
    clear_mode_cache()
    again = HessianOperator(model, data)
    assert again.hvp_mode_cached and again.hvp_mode == "reverse"
    torch.testing.assert_close(again.hvp(v), first.hvp(v), rtol=1e-12, atol=1e-12)


def test_a_remembered_mode_costs_one_untimed_product(cache, monkeypatch):
    """A mode read from the file gets one untimed trial product (one remembered in the
    process, none); an error without a message (a bare raise) is named by its type
    (review2: it raised IndexError in the warning)."""
    model, data = _case()
    chosen = HessianOperator(model, data).hvp_mode
    clear_mode_cache()
    calls = []
    time_modes = HessianOperator._time_modes

    def counted(self, modes=("forward", "reverse"), timed=True):
        calls.append((modes, timed))
        return time_modes(self, modes, timed)

    monkeypatch.setattr(HessianOperator, "_time_modes", counted)
    assert HessianOperator(model, data).hvp_mode_cached  # read from the file
    assert calls == [((chosen,), False)]
    assert HessianOperator(model, data).hvp_mode_cached  # from the process's memory: no trial
    assert calls == [((chosen,), False)]
    clear_mode_cache()
    products = HessianOperator._batch_products

    def bare_failure(self, mode, *args, **kwargs):
        if mode == chosen:
            raise NotImplementedError
        return products(self, mode, *args, **kwargs)

    monkeypatch.setattr(HessianOperator, "_batch_products", bare_failure)
    with pytest.warns(RuntimeWarning, match=f"'{chosen}', failed .*NotImplementedError"):
        op = HessianOperator(model, data)
    assert not op.hvp_mode_cached and op.hvp_mode != chosen


def test_a_cache_that_cannot_be_placed_or_read_is_no_error(cache, monkeypatch, tmp_path):
    """Review s23: no home folder (HOME unset, no passwd entry) raised in every auto-mode
    operator; a deeply nested file raised RecursionError; a FIFO in its place would hang."""
    import pathlib
    import threading

    model, data = _case()
    monkeypatch.setenv("SHARPSCOPE_CACHE", "")  # empty: unset, so the home folder is asked
    monkeypatch.setattr(
        pathlib.Path,
        "home",
        classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError("no home"))),
    )
    assert not HessianOperator(model, data).hvp_mode_cached
    monkeypatch.setenv("SHARPSCOPE_CACHE", str(cache.parent))
    cache.write_text("[" * 100_000)
    clear_mode_cache()
    assert not HessianOperator(model, data).hvp_mode_cached
    cache.unlink()
    os.mkfifo(cache)
    clear_mode_cache()
    done = []
    worker = threading.Thread(target=lambda: done.append(HessianOperator(model, data)), daemon=True)
    worker.start()
    worker.join(60)
    assert done and not done[0].hvp_mode_cached


def test_false_switches_the_disk_cache_off(cache, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "false")
    model, data = _case()
    HessianOperator(model, data)
    assert not cache.exists()


def test_a_factory_files_class_has_the_same_name_in_every_process(tmp_path):
    """Review s23: a `file.py:function` model's module gets a new name in each process, so
    its entries never matched again; the key names the file instead."""
    import importlib.util

    from sharpscope.curvature.mode_cache import class_name

    source = tmp_path / "models.py"
    source.write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    names = set()
    for module_name in ("sharpscope_factory_1234", "sharpscope_factory_5678"):
        spec = importlib.util.spec_from_file_location(module_name, source)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
            names.add(class_name(module.Net))
        finally:
            del sys.modules[module_name]
    assert names == {f"{source}:Net"}


def test_the_spectrum_benchmark_times_each_kind_of_run_as_it_is(cache, tmp_path):
    """bench spectrum's timed calls: a first run times both modes (nothing remembered, the
    file untouched); a later process reads a private file and never the user's."""
    from sharpscope.bench.spectrum import first_run, later_process

    model, data = _case()
    with first_run():
        assert not HessianOperator(model, data).hvp_mode_cached
    assert not cache.exists()  # a first run's timing writes nothing to the user's file
    assert HessianOperator(model, data).hvp_mode_cached  # later, in the process
    private = tmp_path / "private"
    private.mkdir()
    with later_process(str(private)):
        assert not HessianOperator(model, data).hvp_mode_cached  # the private file is empty
    with later_process(str(private)):
        assert HessianOperator(model, data).hvp_mode_cached  # read from it
    assert (private / FILE_NAME).exists() and not cache.exists()
    assert os.environ["SHARPSCOPE_CACHE"] == str(cache.parent)


def test_processes_writing_at_once_keep_every_entry(cache):
    """Pool workers that time their configurations at the same moment each add an entry;
    before the lock, a read-modify-write could drop another process's entry."""
    script = textwrap.dedent(
        """
        import sys
        from sharpscope.curvature.mode_cache import remember
        worker = sys.argv[1]
        sys.stdin.readline()  # start together
        for i in range(25):
            remember(None, f"{worker}-{i}", ("forward", {"forward": 1.0}, {}))
        """
    )
    env = {**os.environ, "SHARPSCOPE_CACHE": str(cache.parent)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(w)], env=env, stdin=subprocess.PIPE, text=True
        )
        for w in range(4)
    ]
    for worker in workers:
        worker.stdin.write("go\n")
        worker.stdin.flush()
    for worker in workers:
        worker.stdin.close()
        assert worker.wait(timeout=120) == 0
    assert set(json.loads(cache.read_text())) == {f"{w}-{i}" for w in range(4) for i in range(25)}


def test_a_lock_that_cannot_be_had_lets_the_cache_write_unlocked(cache):
    """The lock only guards a cache: a holder that never lets go (Ctrl-Z) or a lock file
    that cannot be made costs the guard, never a wait or an error."""
    import fcntl

    from sharpscope.curvature.mode_cache import remember
    from sharpscope.locking import brief_lock

    lock = cache.with_name(cache.name + ".lock")
    with open(lock, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: flock conflicts in-process
        with brief_lock(lock, wait=0.05) as held:
            assert not held
        remember(None, "while-held", ("reverse", {"reverse": 1.0}, {}))
    assert json.loads(cache.read_text())["while-held"]["mode"] == "reverse"
    lock.unlink()
    lock.mkdir()  # a folder where the lock file belongs: no lock, still written
    remember(None, "no-lock-file", ("forward", {"forward": 1.0}, {}))
    assert set(json.loads(cache.read_text())) == {"while-held", "no-lock-file"}
    with brief_lock(cache.with_name("lock-file"), wait=0) as held:
        assert held
