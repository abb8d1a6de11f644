"""The demo's overrides (Makefile DEMO_SET) apply to params.yaml and give a valid config.

`make demo` takes minutes, so CI does not run it; this catches a renamed key or a bad value in
DEMO_SET in a second. Override syntax as DVC (hydra) applies it: `key=value` must name an
existing key, `++key=value` may add one (aelab.overrides).
"""

import pytest

from aelab.config import ConfigError, parse_config
from aelab.overrides import apply_override, apply_overrides, demo_overrides
from tests.conftest import ROOT


def demo_params(raw: dict) -> dict:
    """params.yaml as `make demo` runs it."""
    overrides = demo_overrides(ROOT / "Makefile")
    assert overrides, "DEMO_SET has no -S overrides"
    return apply_overrides(raw, overrides)


def test_demo_overrides_give_a_valid_two_seed_config(params_raw):
    cfg = parse_config(demo_params(params_raw))  # builds every variant on the meta device
    assert cfg.dataset == "shapes"
    assert len(cfg.seeds) >= 2  # every cell of the demo's table is mean ± std


def test_overrides_follow_hydra_rules(params_raw):
    raw = apply_overrides(params_raw, ["mask_ratio=0.9", "++variants.mae.classify.epochs=3",
                                       "variants.fc_l1.model.hidden=[8,4]", "classify.lr=1e-3"])
    assert raw["mask_ratio"] == 0.9 and raw["variants"]["mae"]["classify"]["epochs"] == 3
    assert raw["variants"]["fc_l1"]["model"]["hidden"] == [8, 4]
    assert raw["classify"]["lr"] == 1e-3 and isinstance(raw["classify"]["lr"], float)
    assert params_raw["mask_ratio"] == 0.75  # a copy: the original is untouched
    with pytest.raises(ConfigError, match="no 'classify.nope'"):
        apply_override(raw, "classify.nope=1")  # a new key needs ++
    with pytest.raises(ConfigError, match="no key 'nothere'"):
        apply_override(raw, "++nothere.x=1")
    with pytest.raises(ConfigError, match="not key=value"):
        apply_override(raw, "mask_ratio")
