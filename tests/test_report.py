"""The results table rendering."""

from aelab.report import render_markdown


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
