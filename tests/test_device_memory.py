"""Vectorized analyses that run out of device memory split their chunks and go on
(landscape, m-sharpness, average-case sharpness, PAC-Bayes flatness).

The out-of-memory errors here are injected (the CPU has none to run out of) at the
vectorized call; tests/test_cuda.py runs the real thing against a capped CUDA allocator.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from sharpscope.analysis.landscape import landscape
from sharpscope.analysis.measures import average_sharpness, pac_bayes_flatness
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.device_memory import FittingRows

F64 = torch.float64
# the modules themselves (sharpscope.analysis exports functions of the same names)
landscape_module = importlib.import_module("sharpscope.analysis.landscape")
msharpness_module = importlib.import_module("sharpscope.analysis.msharpness")
measures_module = importlib.import_module("sharpscope.analysis.measures")


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_fitting_rows_halve_until_a_call_fits_and_keep_that_size():
    seen: list[tuple[int, int]] = []

    def compute(rows: slice) -> int:
        seen.append((rows.start, rows.stop))
        if rows.stop - rows.start > 3:
            raise out_of_memory()
        return rows.stop - rows.start

    fit = FittingRows("points")
    with pytest.warns(RuntimeWarning) as record:
        parts = fit.run(compute, 0, 10)
    assert [str(w.message) for w in record] == [
        "out of device memory with 10 points per call; 5 per call from now on",
        "out of device memory with 5 points per call; 3 per call from now on",
    ]
    assert [(s.start, s.stop) for s, _ in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert seen[:2] == [(0, 10), (0, 5)] and fit.most == 3 and fit.halvings == 2
    assert [(s.start, s.stop) for s, _ in fit.run(compute, 10, 14)] == [(10, 13), (13, 14)]


def test_a_single_row_that_does_not_fit_is_final():
    def compute(rows: slice) -> None:
        raise out_of_memory()

    with pytest.raises(torch.OutOfMemoryError), pytest.warns(RuntimeWarning):
        FittingRows("subsets").run(compute, 0, 4)


def net_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)
    gen = torch.Generator().manual_seed(1)
    return net, torch.randn(48, 5, generator=gen, dtype=F64), torch.randint(0, 3, (48,))


def test_a_landscape_block_that_does_not_fit_is_split(monkeypatch):
    net, x, y = net_and_data()
    kwargs = {"grid": 5, "vectorize": True, "chunk_size": 25}
    whole = landscape(net, (x, y), 2, **kwargs)
    evaluate = landscape_module.evaluate_parameter_sets
    calls: list[int] = []

    def small_device(model, layout, flat, *args, **kw):
        calls.append(len(flat))
        if len(flat) > 6:
            raise out_of_memory()
        return evaluate(model, layout, flat, *args, **kw)

    monkeypatch.setattr(landscape_module, "evaluate_parameter_sets", small_device)
    with pytest.warns(RuntimeWarning, match="grid points per call"):
        split = landscape(net, (x, y), 2, **kwargs)
    assert calls[:4] == [25, 13, 7, 4] and max(calls[4:]) <= 4
    assert split.complete
    torch.testing.assert_close(split.loss, whole.loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(split.accuracy, whole.accuracy, rtol=0, atol=0)


def test_an_m_sharpness_chunk_that_does_not_fit_is_split(monkeypatch):
    net, x, y = net_and_data()
    kwargs = {"m": 4, "rho": 0.1, "steps": 3, "random_start": True, "chunk_size": 12}
    whole = m_sharpness(net, (x, y), **kwargs)
    ascend = msharpness_module._ascend
    rows_per_call: list[int] = []

    def small_device(oracle, rows, *args, **kw):
        rows_per_call.append(rows)
        if rows > 3:
            raise out_of_memory()
        return ascend(oracle, rows, *args, **kw)

    monkeypatch.setattr(msharpness_module, "_ascend", small_device)
    with pytest.warns(RuntimeWarning, match="subsets per call"):
        split = m_sharpness(net, (x, y), **kwargs)
    assert rows_per_call[:3] == [12, 6, 3] and max(rows_per_call[3:]) <= 3
    torch.testing.assert_close(split.per_subset, whole.per_subset, rtol=1e-12, atol=1e-15)
    assert split.sharpness == pytest.approx(whole.sharpness, rel=1e-12)
    assert split.num_gradient_passes == pytest.approx(whole.num_gradient_passes, rel=1e-12)


def test_average_sharpness_chunks_that_do_not_fit_are_split(monkeypatch):
    net, x, y = net_and_data()
    kwargs = {"rho": 0.2, "m": 4, "num_draws": 3, "chunk_size": 12, "seed": 1}
    whole = average_sharpness(net, (x, y), **kwargs)
    vmap = measures_module.vmap
    rows_per_call: list[int] = []

    def small_device_vmap(fn):
        vectorized = vmap(fn)

        def call(deltas, xs, ys):
            rows_per_call.append(len(deltas))
            if len(deltas) > 9:  # 3 subsets x 3 draws
                raise out_of_memory()
            return vectorized(deltas, xs, ys)

        return call

    monkeypatch.setattr(measures_module, "vmap", small_device_vmap)
    with pytest.warns(RuntimeWarning, match="subsets per call"):
        split = average_sharpness(net, (x, y), **kwargs)
    assert max(rows_per_call[-4:]) <= 9  # 12 subsets, then 6, then 3 at a time
    torch.testing.assert_close(split.per_subset, whole.per_subset, rtol=1e-12, atol=1e-15)
    assert split.error_increase == whole.error_increase


def test_pac_bayes_draws_that_do_not_fit_are_split(monkeypatch):
    net, x, y = net_and_data()
    kwargs = {"num_draws": 8, "num_halvings": 4, "seed": 2}
    whole = pac_bayes_flatness(net, (x, y), **kwargs)
    evaluate = measures_module.evaluate_parameter_sets
    calls: list[int] = []

    def small_device(model, layout, flat, *args, **kw):
        calls.append(len(flat))
        if len(flat) > 3:
            raise out_of_memory()
        return evaluate(model, layout, flat, *args, **kw)

    monkeypatch.setattr(measures_module, "evaluate_parameter_sets", small_device)
    with pytest.warns(RuntimeWarning, match="draws per call"):
        split = pac_bayes_flatness(net, (x, y), **kwargs)
    assert calls[1:4] == [8, 4, 2] and max(calls[4:]) <= 2  # calls[0]: θ itself
    assert split.search == whole.search and split.sigma == whole.sigma


# ------------------------------------------------------------- memory cgroup limits
def write_tree(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


GIB = 2**30


def headroom(proc, root):
    from sharpscope.device_memory import cgroup_memory

    found = cgroup_memory(proc, root)
    return None if found is None else found.headroom


def test_cgroup_v2_headroom_is_the_tightest_limit_up_the_tree(tmp_path):
    """A Slurm job or a container: the limit can sit on the job's cgroup or an ancestor."""
    from sharpscope.device_memory import cgroup_memory

    root = tmp_path / "cgroup"
    write_tree(
        root,
        {
            "cgroup.controllers": "cpu memory pids\n",
            "job/memory.max": f"{8 * GIB}\n",
            "job/memory.current": f"{3 * GIB}\n",
            "job/memory.stat": f"anon {2 * GIB}\nfile {GIB}\nshmem {GIB // 4}\n",
            "job/step/memory.max": "max\n",
            "job/step/memory.current": f"{3 * GIB}\n",
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    # 8 GiB limit, 3 GiB used, of which the page cache less shared memory can be dropped
    assert headroom(proc, root) == 8 * GIB - (3 * GIB - (GIB - GIB // 4))
    write_tree(root, {"job/step/memory.max": f"{4 * GIB}\n"})  # a tighter inner limit
    assert headroom(proc, root) == GIB
    assert cgroup_memory(proc, root).limit == 4 * GIB
    # a container sees its own cgroup as the mount's root
    inside = tmp_path / "container"
    write_tree(
        inside,
        {
            "cgroup.controllers": "memory\n",
            "memory.max": f"{2 * GIB}\n",
            "memory.current": f"{GIB}\n",
        },
    )
    proc.write_text("0::/kubepods/pod1/abc\n")
    assert headroom(proc, inside) == GIB
    # never read above the mount: not by "..", nor through a link that leads out of it
    outside = {"memory.max": f"{GIB // 8}\n", "memory.current": "0\n"}
    write_tree(tmp_path / "outside", outside)
    proc.write_text("0::/../outside\n")
    assert headroom(proc, inside) == GIB
    (inside / "escape").symlink_to(tmp_path / "outside")
    proc.write_text("0::/escape\n")
    assert headroom(proc, inside) == GIB
    write_tree(inside, {"memory.max": "max\n"})
    assert headroom(proc, inside) is None


def test_a_cgroup_full_of_page_cache_still_has_room(tmp_path):
    """Review: with only the inactive cache counted as free, a job that had read its data
    (active page cache up to the limit) got 0 bytes, and every landscape grid was refused."""
    root = tmp_path / "cgroup"
    write_tree(
        root,
        {
            "cgroup.controllers": "memory\n",
            "job/memory.max": f"{4 * GIB}\n",
            "job/memory.current": f"{4 * GIB}\n",
            "job/memory.stat": f"anon {GIB}\nfile {3 * GIB}\nactive_file {3 * GIB}\n"
            "inactive_file 0\nshmem 0\n",
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job\n")
    assert headroom(proc, root) == 3 * GIB


def test_cgroup_v1_walks_up_to_the_limit_and_its_usage(tmp_path):
    """Review: an ancestor's limit was set against this cgroup's own usage alone (a Slurm
    step using 1 GiB of a job's 8, whose other steps use 6: 7 GiB free, not 1)."""
    root = tmp_path / "cgroup"
    unlimited = "9223372036854771712\n"
    write_tree(
        root,
        {
            "memory/slurm/job_1/memory.limit_in_bytes": f"{8 * GIB}\n",
            "memory/slurm/job_1/memory.usage_in_bytes": f"{7 * GIB}\n",
            "memory/slurm/job_1/memory.stat": "total_cache 0\n",
            "memory/slurm/job_1/step_0/memory.limit_in_bytes": unlimited,
            "memory/slurm/job_1/step_0/memory.usage_in_bytes": f"{GIB}\n",
            "memory/slurm/job_1/step_0/memory.stat": f"hierarchical_memory_limit {8 * GIB}\n"
            f"total_cache {GIB // 2}\ntotal_shmem 0\n",
        },
    )
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:pids:/slurm/job_1/step_0\n4:memory:/slurm/job_1/step_0\n0::/\n")
    assert headroom(proc, root) == GIB
    # inside a container only the own folder is visible: the ancestors' limit comes from
    # hierarchical_memory_limit, set against the usage that can be seen
    container = tmp_path / "container"
    write_tree(
        container,
        {
            "memory/memory.limit_in_bytes": unlimited,
            "memory/memory.usage_in_bytes": f"{2 * GIB}\n",
            "memory/memory.stat": f"hierarchical_memory_limit {6 * GIB}\ntotal_cache {GIB}\n",
        },
    )
    proc.write_text("4:memory:/docker/abc\n")
    assert headroom(proc, container) == 6 * GIB - (2 * GIB - GIB)
    # shared memory (tmpfs) in the cache cannot be dropped; a line that is no number is skipped
    shared = f"bad line\nhierarchical_memory_limit {6 * GIB}\ntotal_cache {GIB}\n"
    write_tree(container, {"memory/memory.stat": shared + f"total_shmem {GIB // 4}\n"})
    assert headroom(proc, container) == 6 * GIB - (2 * GIB - (GIB - GIB // 4))
    write_tree(container, {"memory/memory.stat": f"hierarchical_memory_limit {unlimited}"})
    assert headroom(proc, container) is None
    assert headroom(tmp_path / "missing", root) is None


def test_free_memory_is_lowered_to_the_cgroup_headroom(monkeypatch):
    """MemAvailable is the whole machine's: a job limited to less is killed at its limit,
    and the messages say that the cgroup set the figure."""
    from sharpscope import device_memory
    from sharpscope.device_memory import CgroupMemory

    monkeypatch.setattr(device_memory, "cgroup_memory", lambda: None)
    machine = device_memory.available_memory_bytes()
    assert machine is not None and machine > 2**20
    assert device_memory.free_memory_note(machine) == ""
    monkeypatch.setattr(device_memory, "cgroup_memory", lambda: CgroupMemory(4 * GIB, 12345))
    assert device_memory.available_memory_bytes() == 12345
    assert device_memory.free_memory_note(12345) == (
        " under this process's memory cgroup limit of 4 GiB"
    )
    assert device_memory.free_memory_note(12345, "GB") == (
        " under this process's memory cgroup limit of 4.29 GB"
    )
    roomy = CgroupMemory(4 * GIB, 2 * machine)
    monkeypatch.setattr(device_memory, "cgroup_memory", lambda: roomy)
    assert device_memory.available_memory_bytes() < 2 * machine  # the machine's own


def test_a_grid_refused_under_a_cgroup_limit_names_the_cgroup(monkeypatch):
    from sharpscope import device_memory
    from sharpscope.device_memory import CgroupMemory
    from sharpscope.errors import SharpscopeError

    monkeypatch.setattr(device_memory, "cgroup_memory", lambda: CgroupMemory(GIB, 1000))
    model = nn.Linear(3, 2).double()
    data = (torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,)))
    with pytest.raises(
        SharpscopeError, match="free under this process's memory cgroup limit of 1 GiB"
    ):
        landscape(model, data, 2, grid=50)


def test_a_batch_split_under_a_cgroup_limit_names_the_cgroup(monkeypatch):
    from sharpscope import device_memory
    from sharpscope.curvature import HessianOperator
    from sharpscope.device_memory import CgroupMemory

    monkeypatch.setattr(device_memory, "cgroup_memory", lambda: CgroupMemory(2 * GIB, 1000))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = (torch.randn(40, 4, dtype=F64), torch.randint(0, 3, (40,)))
    with pytest.warns(
        RuntimeWarning, match=r"GB free under this process's memory cgroup limit of 2.15 GB"
    ):
        HessianOperator(model, data, dtype="float64")
