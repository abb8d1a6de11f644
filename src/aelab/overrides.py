"""`-S key=value` overrides applied to params.yaml the way DVC (hydra) applies them.

`key=value` must name an existing key, `++key=value` may add one; values are parsed as YAML
(plus floats such as 1e-3, which YAML 1.1 leaves as text). Used to read the demo's settings
(the Makefile's DEMO_SET) outside DVC: the demo test and the learning-curve study.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from aelab.config import ConfigError


def _value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_override(raw: dict, override: str) -> None:
    """Apply one `key=value` / `++key=value` to the params mapping `raw`, in place."""
    upsert = override.startswith("++")
    key, sep, text = override.removeprefix("++").partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"override {override!r}: params.yaml has no key {part!r}")
        node = node[part]
        if node is None and upsert:  # an empty section, e.g. `classify: {}` written as null
            node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"override {override!r}: {'.'.join(parents)!r} is not a mapping")
    if not upsert and leaf not in node:
        raise ConfigError(f"override {override!r}: params.yaml has no {key!r} (use ++ to add)")
    node[leaf] = _value(text)


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """A copy of `raw` with every override applied in order."""
    raw = copy.deepcopy(raw)
    for override in overrides:
        apply_override(raw, override)
    return raw


def makefile_variable(makefile: Path, name: str) -> str:
    """The value of a `NAME ?=` / `NAME :=` / `NAME =` Makefile variable, continuations joined."""
    text = Path(makefile).read_text().replace("\\\n", " ")
    match = re.search(rf"^{name}\s*[:?]?=(.*)$", text, flags=re.M)
    if not match:
        raise ConfigError(f"{makefile}: no variable {name}")
    return match.group(1).strip()


def demo_overrides(makefile: Path) -> list[str]:
    """The `-S` overrides of `make demo` (DEMO_SET, with DEMO_SEEDS substituted)."""
    demo_set = makefile_variable(makefile, "DEMO_SET").replace(
        "$(DEMO_SEEDS)", makefile_variable(makefile, "DEMO_SEEDS"))
    return [o.strip('"') for o in re.findall(r'-S\s+("[^"]*"|\S+)', demo_set)]
