"""The results table rendering."""

from aelab.report import render_markdown


def _results():
    modes = ["scratch", "linear_probe"]
    cell = lambda acc: {"test_acc": acc, "train_seconds": 1.5}  # noqa: E731
    return {"dataset": "shapes", "seed": 0, "mask_ratio": 0.75, "modes": modes,
            "selection": "on validation",
            "results": {"fc_l1": {"scratch": cell(0.25), "linear_probe": cell(0.5)},
                        "mae": {"scratch": cell(0.75), "linear_probe": cell(0.125)}},
            "pretrain": {v: {"arch": "fc", "params": 1234, "epochs": 2, "train_seconds": 3.0,
                             "peak_mem_mb": 100.0, "val_loss": 0.1} for v in ("fc_l1", "mae")}}


def test_table_has_seed_layout_and_bolds_row_best():
    lines = render_markdown(_results()).splitlines()
    assert "| variant | scratch | linear_probe |" in lines
    assert "| fc_l1 | 0.250 | **0.500** |" in lines
    assert "| mae | **0.750** | 0.125 |" in lines
    assert any("on validation" in line for line in lines)
    assert any(line.startswith("| fc_l1 | fc | 1,234 | 2 |") for line in lines)
