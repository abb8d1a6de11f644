"""`benchmarks/breakdown.py`: where a pretraining step's time goes, module by module. Speed is
never asserted; what is checked is the bookkeeping (every FLOP filed under one class, own times
that add up, the hooks leave the model as they found it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import breakdown  # noqa: E402
from aelab.config import load_config  # noqa: E402
from aelab.training import as_float, build_state, train_step  # noqa: E402

CPU = torch.device("cpu")
# torch warns each step that the first layer's backward hook fires early (it is on the images)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _step(variant: str):
    model, batch, pre = breakdown.build(load_config(ROOT / "params.yaml"), variant, quick=True)
    state = build_state(model, pre, batches_per_epoch=10, device=CPU)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    return model, lambda: train_step(state, as_float(images), None, device=CPU)


def test_every_flop_of_the_mae_step_is_filed_under_one_module_class():
    model, step = _step("mae")
    flops, batched, total = breakdown.module_flops(model, step, per=1)
    assert batched > 0  # the attention's products, forward and backward
    assert sum(flops.values()) + batched == pytest.approx(total, rel=1e-9)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(flops[n] > 0 for n in linears)
    assert all(getattr(m, "fused_attn", True) for m in model.modules())  # fused again after


def test_module_clock_times_each_module_once_and_cuts_the_first_layer_short():
    model, step = _step("mae")
    flops, batched, _ = breakdown.module_flops(model, step, per=4)
    clock = breakdown.ModuleClock(model)
    step()
    clock.remove()
    fwd, bwd = clock.own("fwd"), clock.own("bwd")
    assert all(v >= 0 for v in (*fwd.values(), *bwd.values()))
    # an attention module's own time excludes its projections', which are timed apart
    attn = next(n for n, m in model.named_modules() if hasattr(m, "fused_attn"))
    assert {f"{attn}.qkv", f"{attn}.proj"} <= set(clock.modules)
    assert clock.total[(attn, "fwd")] > fwd[attn] > 0
    assert clock.cut_short == {"patch_embed.proj"}  # the conv on the images
    rows = {r["name"].split(" (")[0]: r for r in
            breakdown.class_rows(clock, flops, batched, steps=1, batch=4)}
    assert {"Linear", "Attention", "GELU", "LayerNorm", "Conv2d"} <= set(rows)
    assert rows["Attention"]["rate_flops"] > 0 and rows["Conv2d"]["rate_s"] == 0
    hooks_left = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks)
                     + len(m._backward_pre_hooks) for m in model.modules())
    assert hooks_left == 0


def test_in_place_activations_run_out_of_place_while_timed_and_come_back():
    model, step = _step("mconv")
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    assert inplace  # mconv's ReLUs: a full backward hook forbids changing its outputs in place
    clock = breakdown.ModuleClock(model)
    step()  # raises under the hooks if an in-place op is left
    clock.remove()
    assert all(m.inplace is True for m in inplace)


def test_the_script_prints_its_table_and_rejects_an_unknown_variant():
    script = [sys.executable, str(ROOT / "benchmarks" / "breakdown.py"), "--quick"]
    proc = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| Linear |" in proc.stdout and "| rest of the step" in proc.stdout
    assert "mae pretraining step, batch 4" in proc.stdout
    bad = subprocess.run(script + ["--variant", "vgg"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "unknown variant 'vgg'" in bad.stderr


def test_an_identity_module_is_not_filed_the_backward_of_what_came_before_it():
    """The FLOP counter files the backward of everything before an nn.Identity under it (its
    output is its input): the classifiers' `feature_norm` of the fine-tuned modes is one."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Identity(),
                                torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    flops, batched, total = breakdown.module_flops(
        model, lambda: model(x).square().sum().backward(), per=1)
    assert "1" not in flops and batched == 0
    assert sum(flops.values()) == pytest.approx(total, rel=1e-9)
