"""aelab.distributed in a real two-process gloo group on the CPU (torch.multiprocessing)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aelab import distributed
from aelab.config import TrainConfig
from aelab.training import Batches, build_state, fit, seed_everything

CPU = torch.device("cpu")


class _Stop(Exception):
    pass


def _rank_draws(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        seed_everything(0)
        alike = torch.rand(8)  # what every rank draws after seeding alike
        seed_everything(0)
        distributed.decorrelate_ranks()
        own = torch.rand(8)

        # fit decorrelates before its first batch: the generator state it trains from.
        seed_everything(0)
        model = torch.nn.Linear(12, 2)
        model.training_loss = lambda x, y: (model(x.flatten(1)).sum(), {})
        state = build_state(model, TrainConfig(epochs=1, batch_size=4, lr=0.1),
                            batches_per_epoch=1, device=CPU)
        seen = {}

        def record(module):
            seen["rng"] = torch.get_rng_state()
            raise _Stop

        distributed.data_parallel = record  # called by fit right after decorrelating
        x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
        try:
            fit(state, Batches(x, None, 4, device=CPU, shuffle=True), None, epochs=1,
                device=CPU, name="t")
        except _Stop:
            pass
        torch.save({"alike": alike, "own": own, "fit_rng": seen["rng"]}, f"{out}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_draws_its_own_augmentation_randomness(tmp_path):
    """Ranks seed alike (and a resume gives them rank 0's state), so without decorrelation
    rank r's k-th image gets every other rank's draws; with it each rank > 0 has its own
    stream, derived from the seed, and rank 0 keeps the stream a seed gives it."""
    mp.spawn(_rank_draws, args=(str(tmp_path / "store"), str(tmp_path / "rank")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["alike"], r1["alike"])  # the problem
    assert not torch.equal(r0["own"], r1["own"])
    assert not torch.equal(r0["fit_rng"], r1["fit_rng"])  # fit does it

    seed_everything(0)  # what each rank's stream must be: deterministic in the seed
    base = int(torch.randint(0, 2**62, (1,)).item())
    assert torch.equal(r0["own"], torch.rand(8))
    torch.manual_seed(base + 1)
    assert torch.equal(r1["own"], torch.rand(8))
