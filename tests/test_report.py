"""The results table rendering, the accuracy-vs-compute answer, and the report step."""

import dataclasses

import pytest
import torch

from aelab.checkpoint import write_json
from aelab.history import write_history
from aelab.report import budget, pareto_front, render_markdown
from aelab.stats import summarise


def _results():
    modes = ["scratch", "linear_probe"]
    cell = lambda acc: {"test_acc": acc, "test_acc_std": 0.0, "train_seconds": 1.5}  # noqa: E731
    return {"dataset": "shapes", "seed": 0, "seeds": [0], "mask_ratio": 0.75, "modes": modes,
            "num_classes": 8, "chance_acc": 0.125,
            "selection": "on validation",
            "results": {"fc_l1": {"scratch": cell(0.25), "linear_probe": cell(0.5)},
                        "mae": {"scratch": cell(0.75), "linear_probe": cell(0.125)}},
            "pretrain": {v: {"arch": "fc", "params": 1234, "epochs": 2, "train_seconds": 3.0,
                             "train_gflops_per_image": 0.03, "encode_gflops_per_image": 0.01,
                             "train_tflops_total": 2.5, "peak_mem_mb": 100.0, "val_loss": 0.1}
                         for v in ("fc_l1", "mae")},
            "knn": {v: {"k": 20, "pretrained": {"val_acc": 0.3, "test_acc": 0.375},
                        "random_init": {"val_acc": 0.1, "test_acc": 0.0625}}
                    for v in ("fc_l1", "mae")}}


def test_table_has_seed_layout_and_bolds_row_best():
    lines = render_markdown(_results()).splitlines()
    assert "| variant | scratch | linear_probe | kNN |" in lines
    assert "| fc_l1 | 0.250 | **0.500** | 0.375 |" in lines
    assert "| mae | **0.750** | 0.125 | 0.375 |" in lines
    assert "| mae (random init) | 0.100 | 0.062 |" in lines
    assert any("on validation" in line for line in lines)
    assert any("Chance is 0.125 (8 classes)" in line for line in lines)
    assert "| fc_l1 | fc | 1,234 | 0.03 | 0.01 | 2.5 | 2 | 3.0 | 100 | 0.1000 |" in lines


def test_seed_numbers_only_when_the_dataset_matches():
    from aelab.seeds import reported

    results = _results()
    assert "Reported by the seeds" not in render_markdown(results)  # shapes: no seed used it
    results["dataset"] = "cifar100"
    results["seed_reported"] = reported("cifar100")
    text = render_markdown(results)
    assert "## Reported by the seeds (not measured here)" in text
    assert "| fc_l1 | 0.186 | 0.190 |" in text and "| mae | — | 0.088 |" in text


def test_mean_std_and_not_significant_marks():
    results = _results()
    results["seeds"] = [0, 1, 2]
    row = results["results"]["fc_l1"]
    row["scratch"].update(test_acc=0.48, test_acc_std=0.02)  # within 0.01 + 0.02 of the best
    row["linear_probe"].update(test_acc=0.5, test_acc_std=0.01)
    results["results"]["mae"]["linear_probe"]["test_acc_std"] = 0.01  # far from the best
    text = render_markdown(results)
    assert "| fc_l1 | 0.480 ± 0.020 ~ | **0.500 ± 0.010** | 0.375 ± 0.000 |" in text
    assert "| mae | **0.750 ± 0.000** | 0.125 ± 0.010 | 0.375 ± 0.000 |" in text
    assert "over 3 seeds" in text


def test_late_change_reads_a_plateau_and_a_rise():
    from aelab.stats import late_change

    flat = [{"seed": s, "epoch": e, "val_acc": 0.5} for s in (0, 1) for e in range(1, 11)]
    rising = [{"seed": 0, "epoch": e, "val_acc": e / 10} for e in range(1, 11)]
    assert late_change(flat, "val_acc") == 0.0
    assert abs(late_change(rising, "val_acc") - 0.2) < 1e-9  # (0.9 + 1.0)/2 - (0.7 + 0.8)/2
    loss = [{"seed": 0, "epoch": e, "val_loss": 1.0 if e < 9 else 0.5} for e in range(1, 11)]
    assert late_change(loss, "val_loss", relative=True) == -0.5
    assert late_change(rising[:1], "val_acc") == 0.0  # one epoch: nothing to compare


def test_undertrained_curves_are_named_and_plateaus_said():
    results = _results()
    results["results"]["mae"]["scratch"]["late_val_acc_gain"] = 0.05
    results["results"]["fc_l1"]["scratch"]["late_val_acc_gain"] = 0.0
    results["pretrain"]["fc_l1"]["late_val_loss_change"] = -0.10
    text = render_markdown(results)
    assert "mae scratch (+0.050)" in text and "fc_l1 scratch (" not in text
    assert "Pretraining loss still falling" in text and "fc_l1 (-10.0%)" in text
    for row in results["results"].values():
        for cell in row.values():
            cell["late_val_acc_gain"] = 0.0
    results["pretrain"]["fc_l1"]["late_val_loss_change"] = 0.0
    assert "had stopped moving by the end of training" in render_markdown(results)


def test_pareto_front_drops_dominated_points_and_keeps_ties():
    points = {"cheap": (1.0, 0.50), "dear_and_worse": (4.0, 0.40), "mid": (2.0, 0.60),
              "mid_twin": (2.0, 0.60), "same_cost_worse": (2.0, 0.55),
              "same_acc_dearer": (8.0, 0.60), "dearest": (16.0, 0.70)}
    assert pareto_front(points) == ["cheap", "mid", "mid_twin", "dearest"]
    assert pareto_front({"only": (3.0, 0.1)}) == ["only"]


def _budget_results(cheap_acc: float) -> dict:
    """Three seeds; pretraining cost rises 1 → 4 → 16 TFLOP from `cheap` to `dear`, and
    `dear` is best at 0.800 ± 0.020 in linear_probe; `cheap` scores `cheap_acc` there,
    `mid` 0.785 (within the best's std), and scratch tops out at 0.500 ± 0.010."""
    results = _results()
    results["seeds"] = [0, 1, 2]
    cell = lambda acc, std: {"test_acc": acc, "test_acc_std": std,  # noqa: E731
                             "train_seconds": 1.0}
    results["results"] = {
        "cheap": {"scratch": cell(0.40, 0.01), "linear_probe": cell(cheap_acc, 0.02)},
        "mid": {"scratch": cell(0.50, 0.01), "linear_probe": cell(0.785, 0.02)},
        "dear": {"scratch": cell(0.45, 0.01), "linear_probe": cell(0.80, 0.02)}}
    base = results["pretrain"]["fc_l1"]
    results["pretrain"] = {v: {**base, "train_tflops_total": t, "train_seconds": sec}
                           for v, t, sec in (("cheap", 1.0, 10.0), ("mid", 4.0, 20.0),
                                             ("dear", 16.0, 40.0))}
    results["knn"] = {v: results["knn"]["fc_l1"] for v in results["results"]}
    return results


def test_budget_names_the_cheapest_variant_within_one_std():
    lines = budget(_budget_results(cheap_acc=0.79))  # 0.79 >= 0.80 - 0.02
    scratch, probe = lines
    assert "best `scratch` variant is mid with 0.500 ± 0.010" in scratch
    assert "dear is best with 0.800 ± 0.020 (16 TFLOP per seed)" in probe
    assert "the cheapest within one std of it is cheap with 0.790 ± 0.020" in probe
    assert "16x less pretraining compute (1 TFLOP) and 4x less wall-clock" in probe
    assert "Pareto front by FLOPs, cheapest first: cheap, dear." in probe  # mid: dominated
    assert "gains +0.300, larger than the seeds' spread" in probe
    text = render_markdown(_budget_results(cheap_acc=0.79))
    assert "## Which pretraining for my budget?" in text
    assert "minus the best's std over seeds" in text


def test_budget_skips_a_cheap_variant_outside_one_std():
    probe = budget(_budget_results(cheap_acc=0.77))[1]  # 0.77 < 0.80 - 0.02
    assert "the cheapest within one std of it is mid with 0.785 ± 0.020" in probe
    assert "4x less pretraining compute (4 TFLOP) and 2x less wall-clock" in probe
    assert "Pareto front by FLOPs, cheapest first: cheap, mid, dear." in probe


def test_budget_when_nothing_cheaper_is_close():
    results = _budget_results(cheap_acc=0.70)
    results["results"]["mid"]["linear_probe"]["test_acc"] = 0.70
    probe = budget(results)[1]
    assert "dear is best" in probe and "no cheaper variant comes within one std of it" in probe


def _fake_pipeline(tmp_path, params_raw):
    """The files the report step reads, for three variants of params.yaml costing 1, 4 and
    16 TFLOP per seed (1000 images seen), three seeds, the modes scratch and linear_probe.
    In linear_probe the dearest is best (0.80 ± 0.02), the cheapest within its std (0.79)
    and the middle one below both (0.70): the cheapest is the answer, the middle one is off
    the Pareto front."""
    from aelab import layout
    from aelab.config import parse_config

    cfg = parse_config(params_raw, check_models=False)
    names = list(cfg.variants)[:3]
    cfg = dataclasses.replace(cfg, variants={v: cfg.variants[v] for v in names},
                              seeds=(0, 1, 2), modes=("scratch", "linear_probe"),
                              label_fraction=1.0)
    probe = dict(zip(names, ([0.77, 0.79, 0.81], [0.68, 0.70, 0.72], [0.78, 0.80, 0.82])))
    scratch = dict(zip(names, ([0.40, 0.41, 0.42], [0.50, 0.51, 0.52], [0.45, 0.46, 0.47])))
    seeds = [str(s) for s in cfg.seeds]
    results, cost, knn = {}, {}, {}
    for i, v in enumerate(names):
        for mode, accs in (("scratch", scratch[v]), ("linear_probe", probe[v])):
            results.setdefault(v, {})[mode] = {
                **summarise(dict(zip(seeds, accs)), "test_acc"),
                **summarise(dict(zip(seeds, [1.0, 1.0, 1.0])), "test_loss")}
        cost[v] = {"train_gflops_per_image": 4.0 ** i, "encode_gflops_per_image": 0.1}
        knn[v] = {"k": 20, "pretrained": {"val_acc": 0.3, "test_acc": 0.3},
                  "random_init": {"val_acc": 0.1, "test_acc": 0.1}}
        pretrain = tmp_path / "pretrain" / v
        write_json(pretrain / "metrics.json", {
            "params": 1000, "epochs": 2, "images_seen": 1000, "train_seconds": 10.0 * (i + 1),
            "peak_mem_mb": 1.0, "val_loss": 0.1, "device": "Test CPU, 2 threads"})
        write_history(pretrain / "history.csv", [
            {"seed": s, "epoch": e, "train_loss": 1.0 / e, "val_loss": 1.0 / e}
            for s in cfg.seeds for e in (1, 2)])
        images = torch.zeros(2, 3, 8, 8)
        torch.save({"originals": images, "reconstructions": images, "mask": None,
                    "title": v}, pretrain / "reconstructions.pt")
        for mode in cfg.modes:
            stage = layout.classify_reports_in(tmp_path / "classify", v, mode)
            write_json(stage / "metrics.json", {mode: {
                "best_val_acc": 0.5, "train_seconds": 1.0, "trainable_params": 10,
                "per_seed": {s: {"best_epoch": 1, "mlflow_run_id": "0" * 32} for s in seeds}}})
            write_history(layout.history_csv(stage, mode), [
                {"seed": s, "epoch": e, "train_acc": 0.5, "val_acc": 0.5}
                for s in cfg.seeds for e in (1, 2)])
    write_json(tmp_path / "test_metrics.json", {
        "results": results, "cost": cost, "knn": knn, "n_train_labelled": 100,
        "num_classes": 10})
    return cfg, names


def test_report_writes_and_logs_the_accuracy_vs_compute_answer(tmp_path, params_raw):
    from mlflow.tracking import MlflowClient

    from aelab import tracking
    from aelab.report import run_report

    cfg, (cheap, mid, dear) = _fake_pipeline(tmp_path, params_raw)
    figures = tmp_path / "figures"
    results = run_report(cfg, tmp_path / "test_metrics.json", tmp_path / "pretrain",
                         tmp_path / "classify", tmp_path / "results.json",
                         tmp_path / "results.md", figures)
    assert results["pretrain"][dear]["train_tflops_total"] == pytest.approx(16.0)
    assert results["pareto"] == {"linear_probe": [cheap, dear]}
    assert results["pareto_wallclock"] == {"linear_probe": [cheap, dear]}
    text = (tmp_path / "results.md").read_text()
    assert f"the cheapest within one std of it is {cheap} with 0.790 ± 0.020" in text
    assert f"best `scratch` variant is {mid} with 0.510 ± 0.010" in text
    assert "seconds per seed, on Test CPU, 2 threads" in text  # where the wall-clock was taken
    figure = figures / "accuracy_vs_compute.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 2000
    tracking.flush()
    client = MlflowClient(tracking.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("aelab").experiment_id],
                                "attributes.run_name = 'report'")
    assert "accuracy_vs_compute.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
