"""The demo's overrides (Makefile DEMO_SET) apply to params.yaml and give a valid config.

`make demo` takes ~13 minutes, so CI does not run it; this catches a renamed key or a bad value
in DEMO_SET in a second. Override syntax as DVC (hydra) applies it: `key=value` must name an
existing key, `++key=value` may add one.
"""

import re

import yaml

from aelab.config import parse_config
from tests.conftest import ROOT


def _make_variable(name: str) -> str:
    """The value of a `NAME ?=` / `NAME :=` Makefile variable, continuation lines joined."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*[:?]?=(.*)$", text, flags=re.M)
    assert match, f"{name} not found in the Makefile"
    return match.group(1).strip()


def _value(text: str):
    """Hydra-like scalar parsing: YAML, plus floats such as 1e-3 that YAML 1.1 leaves as text."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _apply(raw: dict, override: str) -> None:
    upsert = override.startswith("++")
    key, _, text = override.removeprefix("++").partition("=")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        assert part in node, f"demo override {override!r}: no key {part!r} in params.yaml"
        node = node[part]
    assert upsert or leaf in node, f"demo override {override!r}: params.yaml has no {key!r}"
    node[leaf] = _value(text)


def demo_params(raw: dict) -> dict:
    """params.yaml as `make demo` runs it."""
    demo_set = _make_variable("DEMO_SET").replace("$(DEMO_SEEDS)", _make_variable("DEMO_SEEDS"))
    overrides = re.findall(r'-S\s+("[^"]*"|\S+)', demo_set)
    assert overrides, "DEMO_SET has no -S overrides"
    for override in overrides:
        _apply(raw, override.strip('"'))
    return raw


def test_demo_overrides_give_a_valid_two_seed_config(params_raw):
    cfg = parse_config(demo_params(params_raw))  # builds every variant on the meta device
    assert cfg.dataset == "shapes"
    assert len(cfg.seeds) >= 2  # every cell of the demo's table is mean ± std
    assert cfg.variant("mae").model["patch_size"] == 8
    assert cfg.variant("fc_l1").classify.lr == 5e-4
    assert cfg.variant("conv_192").classify.lr == 2e-3
