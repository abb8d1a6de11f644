"""MLflow store location and first-contact safety."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aelab import tracking


def test_uri_defaults_to_sqlite_at_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_flatten_nested_params():
    assert tracking.flatten({"a": {"b": 1, "c": (1, 2)}, "d": "x"}) == {
        "a.b": 1, "a.c": [1, 2], "d": "x"}


def test_parallel_first_contact_creates_one_experiment(tmp_path, monkeypatch):
    """Several processes touching a fresh sqlite store at once all succeed (file lock)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    code = "from aelab import tracking; print(tracking.ensure_experiment())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-500:] for _, err in outputs]
    ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(ids) == 1
    assert (tmp_path / "mlflow.db").is_file()


def test_stage_run_tags_params_and_epochs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("DVC_EXP_NAME", "my-exp")
    tracking.start("pretrain@fc_l1")
    data = {"name": "shapes", "digest": "abc123", "source": str(tmp_path), "profile": "{}"}
    with tracking.stage_run("pretrain/fc_l1", stage="pretrain", dataset="shapes",
                            variant="fc_l1", params={"train": {"lr": 0.1}}, data=data) as run:
        when = {}  # the epochs' metrics carry when the stage logged them, not when written
        for epoch in (1, 2, 3):
            before = int(time.time() * 1000)
            run.log_epoch({"epoch": epoch, "train_loss": 1.0 / epoch, "val_acc": 0.5,
                           "img_s": 100.0, "lr": 0.1})
            when[epoch] = (before, int(time.time() * 1000))
        artifact = Path(tmp_path / "note.txt")
        artifact.write_text("hi")
        run.log_artifact(artifact)
    tracking.flush()  # the agent writes asynchronously
    client = MlflowClient(tracking.tracking_uri())
    got = client.get_run(run.run_id)
    assert got.info.run_name == "pretrain/fc_l1" and got.info.status == "FINISHED"
    assert got.data.tags["DVC_EXP_NAME"] == "my-exp" and got.data.tags["variant"] == "fc_l1"
    assert got.data.params["train.lr"] == "0.1"
    assert set(got.data.metrics) == {"train/loss", "val/acc", "throughput/img_s", "lr"}
    history = client.get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert all(when[m.step][0] <= m.timestamp <= when[m.step][1] for m in history), when
    (dataset,) = got.inputs.dataset_inputs
    assert dataset.dataset.name == "shapes" and dataset.dataset.digest == "abc123"
    assert tracking.log_to_run(run.run_id, {"test_acc": 0.5})()
    assert client.get_run(run.run_id).data.metrics["test/acc"] == 0.5
    assert not tracking.log_to_run("0" * 32, {"test_acc": 0.5})()  # unknown run: skipped

    # One pipeline execution, one group: experiment run > stage run > this run.
    tracking.close()
    stage = client.get_run(got.data.tags["mlflow.parentRunId"])
    assert stage.info.run_name == "pretrain@fc_l1" and stage.info.status == "FINISHED"
    pipeline = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert pipeline.info.run_name == "my-exp" and pipeline.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in pipeline.data.tags
    with tracking.stage_run("pretrain/fc_l1", stage="pretrain", dataset="shapes",
                            params={}) as second:  # a second stage of the same experiment
        pass
    tracking.close()
    parent = client.get_run(client.get_run(second.run_id).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["mlflow.parentRunId"] == pipeline.info.run_id


def test_training_process_does_not_import_mlflow(tmp_path):
    """MLflow loads in the agent process, beside the stage, not in it."""
    code = ("import sys; from aelab import tracking\n"
            "with tracking.stage_run('r', stage='s', dataset='d', params={'a': 1}) as run:\n"
            "    run.log_epoch({'epoch': 1, 'loss': 0.5})\n"
            "print(run.run_id); tracking.close(); print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    run_id, imported = out.stdout.split()
    assert imported == "False" and len(run_id) == 32


def test_preparing_a_registration_writes_nothing_and_does_not_delay_a_failure(tmp_path,
                                                                              monkeypatch):
    """`prepare` makes the agent import what registering needs (a conv and an MAE: torch,
    mlflow.pytorch) but records nothing: the store is not even opened, and a stage
    that fails right after it (abort) kills the agent instead of waiting for the imports."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    tracking.close()
    tracking.prepare_registration(["conv", "mae", "conv"])
    assert tracking._agent.sent == 0
    tracking.close()  # the agent carried it out and stopped cleanly
    tracking.prepare_registration(["mae"])
    agent = tracking._agent
    tracking.abort()
    assert agent.proc.returncode not in (None, 0)  # killed, not waited for
    assert not (tmp_path / "mlflow.db").exists()


def test_a_failing_store_is_one_clear_error(tmp_path, monkeypatch):
    """An unwritable store stops the stage with the agent's one-line reason, not silently."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/aelab-no-such-dir/mlflow.db")
    tracking.close()
    try:
        with tracking.stage_run("r", stage="s", dataset="d", params={}) as run:
            pass
        try:
            run.run_id
            tracking.close()
        except tracking.TrackingError as err:
            message = str(err)
        else:
            raise AssertionError("no TrackingError")
    finally:
        tracking._agent = None
    assert message.startswith("MLflow tracking failed (sqlite:////proc/aelab-no-such-dir")
    assert "\n" not in message


def _race_error():
    """What MLflow's sqlite store raises when another writer inserted the same dataset between
    its existence check and its insert (seen with `dvc queue start -j 2`)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import IntegrityError

    cause = IntegrityError("INSERT INTO datasets ...", {}, Exception(
        "UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest"))
    err = MlflowException(cause)
    err.__cause__ = cause
    return err


def test_dataset_logged_by_two_writers_at_once_is_retried_not_fatal(tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from aelab.tracking_agent import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(uri, "aelab", None, None)
    run_id = store.apply({"op": "create", "tags": {}, "name": "r", "time": 0})
    real, calls = store.client.log_inputs, []

    def racing(run, inputs):
        calls.append(run)
        if len(calls) == 1:
            raise _race_error()
        return real(run, inputs)

    store.client.log_inputs = racing
    data = {"name": "shapes", "digest": "abc123", "source": str(tmp_path)}
    store.apply({"op": "inputs", "run_id": run_id, "dataset": data})
    assert len(calls) == 2
    (got,) = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert got.dataset.digest == "abc123"

    def broken(run, inputs):  # any other failure is not retried
        calls.append(run)
        raise MlflowException("run is not active")

    store.client.log_inputs, calls[:] = broken, []
    with pytest.raises(MlflowException, match="not active"):
        store.apply({"op": "inputs", "run_id": run_id, "dataset": data})
    assert len(calls) == 1


def test_agent_takes_queued_metrics_as_one_batch_in_order():
    """Metrics requests that queued up while the agent was busy come as one batch (one store
    write per run); any other request ends a batch, so the order of writes is kept."""
    import json
    import threading

    from aelab.tracking_agent import requests

    reqs = [{"op": "start", "key": "a"}] + [
        {"op": "metrics", "key": k, "step": s, "metrics": {"x": s}} for s in (1, 2) for k in "ab"
    ] + [{"op": "end", "key": "a"}, {"op": "metrics", "key": "b", "step": 3, "metrics": {}}]
    all_read = threading.Event()

    def lines():
        yield from (json.dumps(r) for r in reqs)
        all_read.set()

    batches = requests(lines())
    assert next(batches) == [reqs[0]]
    assert all_read.wait(10)  # everything is queued when the agent takes the next request
    rest = list(batches)
    assert rest == [reqs[1:5], [reqs[5]], [reqs[6]]]


def test_a_batch_of_metrics_rows_is_written_with_each_rows_step(tmp_path):
    from mlflow.tracking import MlflowClient

    from aelab.tracking_agent import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(uri, "aelab", None, None)
    run_id = store.apply({"op": "create", "tags": {}, "name": "r", "time": 0})
    rows = [{"metrics": {"val/acc": 0.1 * s}, "step": s, "time": 1000 + s} for s in (1, 2, 3)]
    store.apply({"op": "metrics", "run_id": run_id, "rows": rows})
    store.apply({"op": "metrics", "run_id": run_id, "metrics": {"val/acc": 0.4}, "step": 4,
                 "time": 1004})  # the one-step form (spools written before batches)
    history = MlflowClient(uri).get_metric_history(run_id, "val/acc")
    assert [(m.step, m.timestamp, round(m.value, 3)) for m in history] == [
        (1, 1001, 0.1), (2, 1002, 0.2), (3, 1003, 0.3), (4, 1004, 0.4)]
