"""Training loops: schedules step, data batching, NaN detection, classifier selection."""

import math

import pytest
import torch
from torch import nn

from aelab.config import TrainConfig
from aelab.training import (Batches, TrainingError, build_optimizer, build_scheduler, lr_factor,
                            to_unit_range, train_autoencoder, train_classifier)

CPU = torch.device("cpu")


def test_to_unit_range_maps_bytes_to_minus_one_one():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = to_unit_range(x).flatten()
    assert y[0] == -1 and y[1] == 1 and abs(y[2] - 0.0039) < 1e-3


def test_batches_cover_every_image_once_and_reshuffle():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10)
    batches = Batches(images, labels, 4, device=CPU, shuffle=True, seed=0)
    assert len(batches) == 3
    first = torch.cat([y for _, y in batches])
    second = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # a new order each epoch
    for x, y in batches:  # images stay paired with their labels
        assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), y)


def test_cosine_schedule_warms_up_then_decays_to_floor():
    kw = dict(total_steps=100, warmup_steps=10, schedule="cosine", min_ratio=0.1)
    values = [lr_factor(s, **kw) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay
    assert values[-1] == pytest.approx(0.1, abs=0.01)


def test_scheduler_really_moves_the_learning_rate():
    model = nn.Linear(2, 2)
    cfg = TrainConfig(epochs=2, batch_size=1, lr=0.1, schedule="cosine", warmup_epochs=0)
    opt = build_optimizer(model.parameters(), cfg, CPU)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.1) and seen[-1] < 0.01


class _TinyAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(12, 4)
        self.dec = nn.Linear(4, 12)

    def forward(self, x):
        recon = self.dec(self.enc(x.flatten(1))).view_as(x)
        return (recon - x).pow(2).mean(), recon


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8)


def test_autoencoder_loss_decreases_and_history_is_complete():
    model = _TinyAE()
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, optimizer="adam")
    seen = []
    history, stats = train_autoencoder(model, _images(128), _images(32, 1), cfg, device=CPU,
                                       seed=0, name="t", on_epoch=seen.append)
    assert [r["epoch"] for r in history] == list(range(1, 7)) and seen == history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert stats.seconds > 0 and stats.peak_mem_mb > 0


def test_nan_loss_stops_training_with_a_clear_error():
    model = _TinyAE()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, optimizer="sgd")
    with pytest.raises(TrainingError, match="loss became"):
        train_autoencoder(model, _images(64), _images(16), cfg, device=CPU, seed=0, name="t")


def test_classifier_keeps_best_validation_epoch():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (200, 3, 2, 2), dtype=torch.uint8)
    y = (x[:, 0, 0, 0] > 127).long()  # learnable from one pixel
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
    cfg = TrainConfig(epochs=5, batch_size=20, lr=0.05, optimizer="adam")
    history, best_state, best, _ = train_classifier(model, (x[:150], y[:150]), (x[150:], y[150:]),
                                                    cfg, device=CPU, seed=0, name="t")
    assert best["val_acc"] == max(r["val_acc"] for r in history)
    assert best["val_acc"] > 0.8
    assert set(best_state) == set(model.state_dict())
    assert not math.isnan(history[-1]["train_loss"])


def test_frozen_probe_trains_on_cached_features_and_matches_the_whole_model():
    """A probe trains its head on features computed once; the recorded validation accuracy
    must be what the whole classifier (encoder + norm + head) scores with the kept weights,
    and the encoder's weights and their eval mode are untouched."""
    from aelab.models import Classifier, build_autoencoder
    from aelab.training import evaluate_classifier

    torch.manual_seed(0)
    y = torch.randint(0, 2, (240,))
    x = torch.randint(0, 128, (240, 3, 16, 16), dtype=torch.uint8)
    x[:, 0] += (y * 120).to(torch.uint8)[:, None, None]  # class 1 is redder
    encoder = build_autoencoder("conv", {"channels": [4, 8], "image_size": 16})
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    model = Classifier(encoder, num_classes=2, head="mlp", hidden=16, freeze=True)
    calls = []  # one entry per encoder batch: its training flag
    encoder.encoder.register_forward_pre_hook(lambda m, _: calls.append(m.training))
    cfg = TrainConfig(epochs=6, batch_size=40, lr=0.01, optimizer="adam")
    history, best_state, best, _ = train_classifier(model, (x[:180], y[:180]),
                                                    (x[180:], y[180:]), cfg, device=CPU,
                                                    seed=0, name="t")
    # 180 + 60 images encoded once (batches of 40): 5 + 2 batches, all in eval mode.
    assert calls == [False] * 7
    assert all(torch.equal(best_state[f"backbone.{k}"], v) for k, v in before.items())
    model.load_state_dict(best_state)
    scored = evaluate_classifier(model, x[180:], y[180:], batch_size=60, device=CPU)
    assert scored["acc"] == pytest.approx(best["val_acc"])
    assert best["val_acc"] > 0.7
