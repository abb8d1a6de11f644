"""aelab.optim against torch.optim, step for step, and the learning-rate schedule."""

import copy

import pytest
import torch
from torch import nn

from aelab.optim import LRSchedule, Optimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("kind,kwargs,reference", [
    ("adam", {"weight_decay": 0.0}, lambda p, lr: torch.optim.Adam(p, lr=lr)),
    ("adam", {"weight_decay": 0.1}, lambda p, lr: torch.optim.Adam(p, lr=lr, weight_decay=0.1)),
    ("adamw", {"weight_decay": 0.05, "betas": (0.9, 0.95)},
     lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.05, betas=(0.9, 0.95))),
    ("sgd", {"momentum": 0.9, "weight_decay": 1e-3},
     lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3)),
])
def test_same_updates_as_torch_optim(kind, kwargs, reference):
    ours, theirs = _model(), _model()
    opt = Optimizer(ours.parameters(), kind=kind, lr=0.01, **kwargs)
    ref = reference(theirs.parameters(), 0.01)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for step in range(6):
        for model, o in ((ours, opt), (theirs, ref)):
            for group in o.param_groups:  # a moving lr, as the schedule sets it
                group["lr"] = 0.01 / (step + 1)
            o.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    x = torch.randn(8, 6)
    a = _model()
    opt = Optimizer(a.parameters(), kind="adamw", lr=0.01, weight_decay=0.05)

    def step(model, o):
        o.zero_grad()
        model(x).pow(2).mean().backward()
        o.step()

    step(a, opt)
    b = copy.deepcopy(a)
    opt_b = Optimizer(b.parameters(), kind="adamw", lr=0.5, weight_decay=0.05)
    opt_b.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt_b.lr == 0.01 and opt_b.steps == 1
    for _ in range(3):
        step(a, opt)
        step(b, opt_b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="for adamw, not sgd"):
        Optimizer(b.parameters(), kind="sgd", lr=0.1).load_state_dict(opt.state_dict())


def test_frozen_parameters_are_left_alone():
    model = _model()
    model[0].requires_grad_(False)
    before = model[0].weight.clone()
    opt = Optimizer(model.parameters(), kind="adam", lr=0.1)
    assert len(opt.params) == 2
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    assert torch.equal(model[0].weight, before)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Optimizer(model[0].parameters(), kind="adam", lr=0.1)


def test_schedule_warms_up_then_decays_to_the_floor():
    schedule = LRSchedule(0.1, total_steps=100, warmup_steps=10, kind="cosine", min_lr=0.01)
    values = [schedule(s) for s in range(100)]
    assert values[0] == pytest.approx(0.01) and values[9] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay
    assert values[-1] == pytest.approx(0.01, abs=1e-3)
    constant = LRSchedule(0.1, total_steps=100, warmup_steps=0, kind="constant")
    assert {constant(s) for s in range(0, 100, 7)} == {0.1}


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_a_parameter_without_gradient_keeps_its_state_like_torch(kind):
    """Each parameter counts its own updates (bias correction), as torch.optim does: one that
    got no gradient in a step is neither moved nor aged."""
    ours, theirs = _model(), _model()
    opt = Optimizer(ours.parameters(), kind=kind, lr=0.01, weight_decay=0.01)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    ref = cls(theirs.parameters(), lr=0.01, weight_decay=0.01)
    x = torch.randn(16, 6)
    for step in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            if step in (1, 2):  # the first layer sits out two steps
                model[0].weight.grad = None
                model[0].bias.grad = None
            o.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [int(s) for s in opt.state_dict()["buffers"]["step"]] == [3, 3, 5, 5]
