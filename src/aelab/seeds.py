"""The seeds' published numbers, printed beside ours when the dataset matches.

These are reported by the seed write-ups (../shared/seeds/), not measured here. Seed 003 picked
the max *test* accuracy over 40 epochs (selection on test, optimistic) and its code had bugs
that sank the MAE and frozen columns; seed 000 / IcarusWizard report validation accuracy.
"""

from __future__ import annotations

# dataset -> where the numbers come from, and {variant: {mode: accuracy or None}}
SEED_RESULTS = {
    "cifar100": {
        "source": "seed 003 (johanDDC/MIL_autoencoder), max test accuracy over 40 epochs",
        "results": {
            "fc_l1": {"scratch": .186, "mlp_finetune": .200, "mlp_probe": .206,
                      "linear_finetune": .245, "linear_probe": .190},
            "fc_l2": {"scratch": .187, "mlp_finetune": .193, "mlp_probe": .204,
                      "linear_finetune": .235, "linear_probe": .187},
            "conv_192": {"scratch": .169, "mlp_finetune": .168, "mlp_probe": .160,
                         "linear_finetune": .198, "linear_probe": .134},
            "conv_256": {"scratch": .191, "mlp_finetune": .191, "mlp_probe": .210,
                         "linear_finetune": .214, "linear_probe": .186},
            "mae": {"scratch": None, "mlp_finetune": .151, "mlp_probe": .082,
                    "linear_finetune": .219, "linear_probe": .088},
        },
    },
    "cifar10": {
        "source": ("seed 000 / IcarusWizard MAE ViT-T, validation accuracy with a linear head "
                   "(their 'scratch' is a ViT-T trained from scratch with a linear head)"),
        "results": {"mae": {"scratch": .7413, "linear_finetune": .8977}},
    },
}


def reported(dataset: str) -> dict | None:
    """The seeds' numbers for `dataset`, or None when no seed used it."""
    return SEED_RESULTS.get(dataset)
