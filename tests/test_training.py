"""The engine: batching, one loop for both kinds of model, NaN stop, selection, exact resume."""

import copy
import math
import platform
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import aelab.training
from aelab.config import AugmentConfig, TrainConfig
from aelab.models.base import Autoencoder, classification_loss
from aelab.training import (Batches, KeepBest, TrainingError, build_state, evaluate, fit,
                            seed_everything, to_unit_range, train_step)

CPU = torch.device("cpu")


def test_to_unit_range_maps_bytes_to_minus_one_one():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    y = to_unit_range(x).flatten()
    assert y[0] == -1 and y[1] == 1 and abs(y[2] - 0.0039) < 1e-3


def test_batches_cover_every_image_once_and_reshuffle():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    labels = torch.arange(10)
    batches = Batches(images, labels, 4, device=CPU, shuffle=True)
    assert len(batches) == 3
    first = torch.cat([y for _, y in batches])
    second = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert first.tolist() != second.tolist()  # a new order each epoch
    for x, y in batches:  # images stay paired with their labels
        assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5).round().long(), y)


class _TinyAE(Autoencoder):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(12, 4)
        self.dec = nn.Linear(4, 12)

    def forward(self, x):
        recon = self.dec(self.enc(x.flatten(1))).view_as(x)
        return (recon - x).pow(2).mean(), recon


class _TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))

    def forward(self, x):
        return self.net(x)

    def training_loss(self, x, y):
        return classification_loss(self(x), y)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8)


def _labelled(n=200):
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 2, 2), dtype=torch.uint8)
    return x, (x[:, 0, 0, 0] > 127).long()  # learnable from one pixel


def _run(model, cfg, train, val, epochs=None, state=None, hooks=()):
    batches = Batches(*train, cfg.batch_size, device=CPU, shuffle=True)
    val_b = Batches(*val, cfg.batch_size, device=CPU, shuffle=False)
    state = state or build_state(model, cfg, batches_per_epoch=len(batches), device=CPU)
    fit(state, batches, val_b, epochs=epochs or cfg.epochs, device=CPU, augment=cfg.augment,
        hooks=hooks, name="t")
    return state


def test_one_loop_trains_an_autoencoder_and_a_classifier():
    seed_everything(0)
    cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, optimizer="adam", schedule="cosine")
    seen = []
    state = _run(_TinyAE(), cfg, (_images(128), None), (_images(32, 1), None),
                 hooks=[lambda s, row: seen.append(row)])
    history = state.history
    assert [r["epoch"] for r in history] == list(range(1, 7)) and seen == history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert state.epoch == 6 and state.step == 6 * 8
    assert history[-1]["lr"] < history[0]["lr"]  # the schedule really moves

    seed_everything(0)
    x, y = _labelled()
    cfg = TrainConfig(epochs=5, batch_size=20, lr=0.05, optimizer="adam")
    state = _run(_TinyClassifier(), cfg, (x[:150], y[:150]), (x[150:], y[150:]))
    assert state.history[-1]["val_acc"] > 0.8 and 0 <= state.history[-1]["train_acc"] <= 1


def test_nan_loss_stops_training_with_a_clear_error():
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, optimizer="sgd")
    with pytest.raises(TrainingError, match="loss became .* in epoch 1"):
        _run(_TinyAE(), cfg, (_images(64), None), (_images(16), None))


def test_keep_best_holds_the_best_validation_epoch():
    seed_everything(0)
    x, y = _labelled()
    model = _TinyClassifier()
    cfg = TrainConfig(epochs=5, batch_size=20, lr=0.05, optimizer="adam")
    best = KeepBest(model)
    state = _run(model, cfg, (x[:150], y[:150]), (x[150:], y[150:]), hooks=[best])
    assert best.row["val_acc"] == max(r["val_acc"] for r in state.history)
    model.load_state_dict(best.state_dict)
    scores = evaluate(model, Batches(x[150:], y[150:], 50, device=CPU, shuffle=False), CPU)
    assert scores["acc"] == pytest.approx(best.row["val_acc"])


def _linear_after(cfg, n=40, epochs=2, compile=False):
    """A linear classifier's weights and history after `epochs` on n fixed images (no augmentation,
    no dropout: nothing but the batching and the optimiser differs between configurations)."""
    seed_everything(0)
    x, y = _labelled(n)
    model = _TinyClassifier()
    batches = Batches(x, y, cfg.batch_size, device=CPU, shuffle=True)
    state = build_state(model, cfg, batches_per_epoch=len(batches), device=CPU, compile=compile)
    fit(state, batches, None, epochs=epochs, device=CPU, name="t")
    return state, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_accumulating_batches_is_one_step_on_their_union():
    # 40 images: batches of 8 accumulated 3 at a time step on images 1-24 then 25-40 of each
    # epoch's order, exactly what batches of 24 do (the epoch's last step has fewer batches).
    base = dict(epochs=2, lr=0.05, optimizer="adam", schedule="cosine", warmup_epochs=1)
    acc, w_acc = _linear_after(TrainConfig(batch_size=8, accumulate=3, **base))
    big, w_big = _linear_after(TrainConfig(batch_size=24, **base))
    small, w_small = _linear_after(TrainConfig(batch_size=8, **base))
    assert acc.step == big.step == 4 and small.step == 10  # optimiser steps, not batches
    assert acc.schedule.total_steps == big.schedule.total_steps == 4
    torch.testing.assert_close(w_acc, w_big, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w_acc, w_small, atol=1e-3)  # not the same as not accumulating
    for a, b in zip(acc.history, big.history):  # the epoch's loss is over every image either way
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"]


def test_nan_loss_names_the_optimiser_step_when_accumulating():
    cfg = TrainConfig(epochs=3, batch_size=16, lr=1e30, optimizer="sgd", accumulate=2)
    with pytest.raises(TrainingError, match=r"at step \d+ \(batch \d+ of 4\)") as err:
        _run(_TinyAE(), cfg, (_images(64), None), (_images(16), None))
    step, batch = map(int, re.search(r"at step (\d+) \(batch (\d+)", str(err.value)).groups())
    assert step == (batch - 1) // 2 + 1  # epoch 1: two batches per optimiser step


def test_compiled_training_matches_eager():
    cfg = TrainConfig(batch_size=8, epochs=2, lr=0.05, optimizer="adam", accumulate=2)
    eager, w_eager = _linear_after(cfg)
    counters.clear()
    compiled, w_compiled = _linear_after(cfg, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did capture the step
    torch.testing.assert_close(w_compiled, w_eager, rtol=1e-4, atol=1e-5)
    assert [r["train_acc"] for r in compiled.history] == [r["train_acc"] for r in eager.history]


# Tensor -> Python conversions: on a GPU each one waits for the device (a host sync).
_HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("arch", ["fc", "conv", "mae", "mconv"])
@pytest.mark.parametrize("kind", ["autoencoder", "classifier"])
def test_training_steps_read_nothing_back_to_the_host(monkeypatch, arch, kind):
    """No per-step host sync (issue 11): an epoch of 6 batches makes exactly as many Tensor ->
    Python reads as an epoch of 2 (the epoch's one summary), with augmentation, gradient
    clipping and accumulation on, for every architecture pretraining and fine-tuning."""
    from aelab.models import Classifier, build_autoencoder
    from tests.test_models import SMALL

    def epoch_reads(n_batches: int) -> list[str]:
        seed_everything(0)
        model = build_autoencoder(arch, dict(SMALL[arch]))
        if kind == "classifier":
            model = Classifier(model, 3, head="mlp", hidden=8)
        x = torch.randint(0, 256, (4 * n_batches, 3, 32, 32), dtype=torch.uint8)
        y = torch.arange(len(x)) % 3 if kind == "classifier" else None
        cfg = TrainConfig(epochs=1, batch_size=4, lr=1e-3, optimizer="adamw", accumulate=2,
                          augment=AugmentConfig(crop="resized", flip=True))
        train = Batches(x, y, cfg.batch_size, device=CPU, shuffle=True)
        state = build_state(model, cfg, batches_per_epoch=len(train), device=CPU)
        return _host_reads(monkeypatch, lambda: fit(
            state, train, None, epochs=1, device=CPU, augment=cfg.augment, grad_clip=1.0,
            name="t"))

    assert epoch_reads(6) == epoch_reads(2)


def _host_reads(monkeypatch, run) -> list[str]:
    """The Tensor -> Python reads `run()` makes, sorted by name."""
    reads = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in _HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name))
        run()
    return sorted(reads)


def test_augmentation_runs_on_training_batches_only(monkeypatch):
    calls = []
    original = aelab.training.augment_batch

    def spy(x, cfg):
        calls.append((len(x), x.dtype))
        return original(x, cfg)

    monkeypatch.setattr(aelab.training, "augment_batch", spy)
    seed_everything(0)
    x, y = _labelled(100)
    cfg = TrainConfig(epochs=2, batch_size=25, lr=0.01,
                      augment=AugmentConfig(crop="pad", pad=1, flip=True))
    _run(_TinyClassifier(), cfg, (x[:75], y[:75]), (x[75:], y[75:]))
    # 3 training batches per epoch, none of validation; augmented as stored (bytes)
    assert calls == [(25, torch.uint8)] * 3 * 2


def test_resume_from_a_saved_state_ends_bit_identical(tmp_path):
    """Stop after 2 of 4 epochs, save the state with torch.save, load it into a fresh model
    and optimiser, finish: same weights and history as one uninterrupted run."""
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=1,
                      augment=AugmentConfig(crop="resized", flip=True))
    data = (_images(64), None), (_images(16, 1), None)

    seed_everything(3)
    whole = _run(_TinyAE(), cfg, *data)

    seed_everything(3)
    half = _run(_TinyAE(), cfg, *data, epochs=2)
    torch.save(half.state_dict(), tmp_path / "state.pt")
    seed_everything(99)  # whatever happened in between, the saved RNG state wins
    fresh = build_state(_TinyAE(), cfg, batches_per_epoch=4, device=CPU)
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed = _run(fresh.model, cfg, *data, state=fresh)

    def numbers(history):  # everything but the timings
        return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "img_s")}
                for row in history]

    assert numbers(resumed.history) == numbers(whole.history)
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not math.isnan(resumed.history[-1]["val_loss"])
    assert copy.deepcopy(resumed.step) == whole.step == 16


def test_a_state_saved_on_more_gpus_resumes_on_fewer(monkeypatch):
    """The saved CUDA generators are one per GPU the writer saw; a resume that sees fewer
    (CUDA_VISIBLE_DEVICES) restores those it has instead of failing. A CPU-only process on a
    GPU machine neither saves CUDA generators nor initialises CUDA to do so."""
    restored = {}

    def set_rng_state(new_state, device="cuda"):
        if device >= 1:  # as torch does for a GPU this process cannot see
            raise IndexError("list index out of range")
        restored[device] = new_state

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    saved = {"torch": torch.get_rng_state(),
             "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]}
    aelab.training._set_rng_state(saved)
    assert list(restored) == [0] and torch.equal(restored[0], saved["cuda"][0])

    def initialise(*args, **kwargs):
        raise AssertionError("CUDA initialised by a CPU run's checkpoint")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", initialise)
    assert set(aelab.training._rng_state()) == {"torch"}


_REUSE_SCRIPT = """
import resource, sys, torch
import aelab.training
from aelab.config import TrainConfig
# Activations of 64 MiB, over glibc's largest mmap threshold (32 MiB), as a ViT step has.
model = torch.nn.Sequential(torch.nn.Linear(256, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1))
if sys.argv[1] == "tuned":  # the stages' way in: build_state on a CPU tunes the allocator
    aelab.training.build_state(model, TrainConfig(epochs=1, batch_size=1, lr=0.1),
                               batches_per_epoch=1, device=torch.device("cpu"))
x = torch.randn(4096, 256)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps = []
for _ in range(6):
    before = faults()
    model(x).sum().backward()
    steps.append(faults() - before)
print(steps[0], sum(steps[2:]))  # the first step, and four steps once warm
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is for glibc")
def test_cpu_training_reuses_freed_memory_instead_of_faulting_it_in_again():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _REUSE_SCRIPT, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        return int(out[0]), int(out[1])

    first, warm = faults("tuned")
    assert first > 30_000  # the first step touches its activations' pages (4 KiB each)
    assert warm < first  # later steps reuse them: four steps fault in less than the first
    first, warm = faults("default")  # control: glibc maps and unmaps every such block
    assert warm > 2 * first


_TUNED_BY_SCRIPT = """
import sys, torch
import aelab.training as T
from aelab.config import TrainConfig
model, cpu = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.device("cpu")
model.encode = model.forward
images, labels = torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
if sys.argv[1] == "build_state":
    T.build_state(model, TrainConfig(epochs=1, batch_size=1, lr=0.1), batches_per_epoch=1,
                  device=cpu)
elif sys.argv[1] == "encode_images":
    T.encode_images(model, images, batch_size=2, device=cpu)
elif sys.argv[1] == "evaluate_classifier":
    from aelab.models.classifier import classification_loss
    model.training_loss = lambda x, y: classification_loss(model(x), y, 0.0)
    T.evaluate_classifier(model, images, labels, batch_size=2, device=cpu)
elif sys.argv[1] == "another device":
    assert not T.keep_freed_memory(torch.device("meta"))
print(T._ALLOCATOR_TUNED)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the allocator setting is for glibc")
@pytest.mark.parametrize("entry, tuned", [
    ("build_state", True), ("encode_images", True), ("evaluate_classifier", True),
    ("another device", False), ("nothing", False)])
def test_every_way_to_compute_on_the_cpu_tunes_the_allocator_first(entry, tuned):
    """Training, encoding (the probes' features, kNN) and scoring each set it up, whichever a
    process runs first: the evaluate stage never trains, and the committed mconv encodes at
    batch 256 about 1.5x slower without it."""
    out = subprocess.run([sys.executable, "-c", _TUNED_BY_SCRIPT, entry], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(tuned)


@pytest.mark.parametrize("capability, emulated_bf16, hip, expected", [
    ((7, 5), True, None, torch.float16),      # T4: bf16 only emulated, fp16 tensor cores
    ((7, 0), False, None, torch.float16),     # V100
    ((8, 0), True, None, torch.bfloat16),     # A100
    ((9, 0), True, None, torch.bfloat16),     # H100
    ((9, 4), True, "6.2", torch.bfloat16),    # ROCm reports what its device runs natively
])
def test_mixed_precision_uses_fp16_where_bf16_would_only_be_emulated(
        monkeypatch, capability, emulated_bf16, hip, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # What torch.cuda.is_bf16_supported() answers by default (emulation included) on that GPU.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated_bf16 or capability[0] >= 8)
    monkeypatch.setattr(torch.version, "hip", hip)
    cuda = torch.device("cuda")
    assert aelab.training.amp_dtype(cuda) == expected
    assert aelab.training.amp_dtype(torch.device("cpu")) is None


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_a_grad_scaler_steps_like_fp32_and_skips_overflowing_steps(grad_clip):
    """fp16 training (GPUs before the A100) runs the engine's optimiser through a
    torch.amp.GradScaler; on the CPU (GradScaler("cpu"), same code path) a scaled step equals
    the unscaled one, clipping included, and a step whose gradients overflow is skipped."""
    x, y = _labelled(40)
    x = x.float() / 127.5 - 1
    cfg = TrainConfig(epochs=1, batch_size=40, lr=1e-2, optimizer="adamw", weight_decay=0.05)
    seed_everything(0)
    plain = build_state(_TinyClassifier(), cfg, batches_per_epoch=3, device=CPU)
    scaled = build_state(copy.deepcopy(plain.model), cfg, batches_per_epoch=3, device=CPU)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for _ in range(2):
        for state in (plain, scaled):
            train_step(state, x, y, device=CPU, grad_clip=grad_clip)
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(a, b)
    assert scaled.step == plain.step == 2

    before = [p.clone() for p in scaled.model.parameters()]

    def overflowing(x, y):  # a finite loss whose scaled gradient is infinite
        loss, sums = scaled.model.training_loss(x, y)
        return loss * 1e36, sums

    train_step(scaled, x, y, device=CPU, grad_clip=grad_clip, loss_fn=overflowing)
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.model.parameters()))
    assert scaled.scaler.get_scale() == 2.0**11  # backed off, as it would on a GPU


@pytest.mark.parametrize("optimizer, grad_clip", [("adam", 0.0), ("adamw", 1.0)])
def test_fp16_steps_read_nothing_back_to_the_host(monkeypatch, optimizer, grad_clip):
    """With a grad scaler (fp16 GPUs), Adam and AdamW skip an overflowing step inside their
    fused kernel, not by reading the scaler's inf check back (GradScaler's default path): an
    epoch of 6 steps makes as many host reads as an epoch of 2."""
    x, y = _labelled(48)

    def epoch_reads(n_batches: int) -> list[str]:
        seed_everything(0)
        cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, optimizer=optimizer)
        train = Batches(x[:8 * n_batches], y[:8 * n_batches], 8, device=CPU, shuffle=True)
        state = build_state(_TinyClassifier(), cfg, batches_per_epoch=len(train), device=CPU)
        state.scaler = torch.amp.GradScaler("cpu")
        return _host_reads(monkeypatch, lambda: fit(state, train, None, epochs=1, device=CPU,
                                                    grad_clip=grad_clip, name="t"))

    assert epoch_reads(6) == epoch_reads(2)
