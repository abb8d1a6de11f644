"""Seed workers (aelab.parallel): results in seed order, failures raised in the stage."""

import os

import pytest
import torch

from aelab.config import ConfigError, parse_config
from aelab.parallel import WorkerError, map_seeds, worker_count


def _square_and_threads(seed):
    return seed * seed, torch.get_num_threads(), os.getpid()


def test_workers_return_every_seed_in_order_from_other_processes():
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        got = map_seeds(_square_and_threads, [3, 1, 2], workers=2)
    finally:
        torch.set_num_threads(threads)
    assert list(got) == [3, 1, 2]
    assert [v[0] for v in got.values()] == [9, 1, 4]
    assert {v[1] for v in got.values()} == {2}  # 4 threads shared by 2 workers
    assert os.getpid() not in {v[2] for v in got.values()}
    assert map_seeds(_square_and_threads, [3], workers=1)[3][2] == os.getpid()


class _Refused(ValueError):
    pass


def _fail_on_one(seed):
    if seed == 1:
        raise _Refused(f"seed {seed} refused")
    return seed


def test_a_workers_exception_is_raised_in_the_stage_process():
    with pytest.raises(_Refused, match="seed 1 refused"):
        map_seeds(_fail_on_one, [0, 1, 2], workers=2)


class _TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}: {b}")


def _unpicklable_error(seed):
    raise _TwoArgs("disk", "full")


def _die(seed):
    os._exit(3)


def test_an_exception_that_cannot_travel_or_a_dead_worker_is_one_line():
    with pytest.raises(WorkerError, match="seed 0: disk: full"):
        map_seeds(_unpicklable_error, [0, 1], workers=2)
    with pytest.raises(WorkerError, match=r"seed \d died \(exit code 3\)"):
        map_seeds(_die, [0, 1], workers=2)


def test_worker_count_is_one_off_the_cpu_or_with_one_seed():
    cpu = torch.device("cpu")
    assert worker_count(4, [0, 1, 2], cpu) == 3
    assert worker_count(2, [0], cpu) == 1
    assert worker_count(2, [0, 1], torch.device("cuda")) == 1


def test_seed_workers_and_ddp_devices_exclude_each_other(params_raw):
    params_raw["runtime"] = {"seed_workers": 2, "devices": 2}
    with pytest.raises(ConfigError, match="choose one"):
        parse_config(params_raw)
    params_raw["runtime"] = {"seed_workers": 0}
    with pytest.raises(ConfigError, match="seed_workers"):
        parse_config(params_raw)


def _tracked(seed):
    import time

    from aelab import tracking

    with tracking.stage_run(f"run/seed{seed}", stage="test", dataset="shapes", seed=seed,
                            params={"seed": seed}):
        time.sleep(1.5 if seed == 1 else 60)
        if seed == 1:
            raise _Refused("seed 1 refused")


def test_a_failure_stops_the_other_workers_and_ends_their_runs():
    from mlflow.tracking import MlflowClient

    from aelab import tracking

    with pytest.raises(_Refused):
        map_seeds(_tracked, [0, 1], workers=2)  # seed 0 would sleep a minute
    tracking.flush()
    client = MlflowClient(tracking.tracking_uri())
    runs = client.search_runs([tracking.ensure_experiment()])
    assert {r.data.tags["seed"]: r.info.status for r in runs} == {"0": "KILLED", "1": "FAILED"}


def test_timing_line_breaks_the_stage_down_with_the_seed_workers_averaged(monkeypatch, capsys):
    """The stage's timing line (README per-stage table, `make bench`): start-up, training,
    wind-down, then the part that went to data load, validation (two workers at once: their
    mean) and waiting for MLflow."""
    import time

    from aelab import cli, parallel, timeline

    # the stage process's own phases (its MLflow wait first: the line still ends with it)
    monkeypatch.setattr(timeline, "TIMELINE", {"MLflow wait": 0.75, "data load": 0.5})
    now = time.time()
    parallel._merge_timeline({"first_batch": now - 10, "last_batch": now - 2, "validation": 1.0})
    parallel._merge_timeline({"first_batch": now - 9, "last_batch": now - 1, "validation": 3.0})
    cli.report_timing("stage.py")
    line = capsys.readouterr().err.strip()
    assert line.startswith("stage.py timing: start-up ") and "training 9.00 s, wind-down 1." in line
    assert line.endswith("; of which data load 0.50 s, validation 2.00 s, MLflow wait 0.75 s")
