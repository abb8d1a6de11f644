"""Where one pretraining step's time goes, module by module, timed inside the step.

    python benchmarks/breakdown.py [--variant mae] [--steps 4]

Runs the engine's `train_step` on `variant`'s autoencoder (the MAE: seed 000's ViT-Tiny at the
`make bench` batch, 64 on a CPU; others: their pretraining batch) and times every module's
forward and backward with module hooks (each module's own time: its total less its
submodules'), summed per module class, beside the FLOPs each class does (FlopCounterMode,
attention in its explicit form) and the matmul peak measured in the same run. Use it instead
of `torch.profiler` for this question: under the profiler the step's large element-wise calls
ran 4-7x slower than in the step itself on the 2-core CPU (4 December), which made them look
like its bottleneck. On a CPU only: a CUDA op returns before it runs.
"""

from __future__ import annotations

import collections
import time
import warnings

import click
import torch

from aelab.config import load_config
from aelab.models import build_autoencoder, build_from_meta, model_meta
from aelab.training import as_float, build_state, seed_everything, train_step
from bench import counting_flops, fmt, mae_setup, matmul_peak

BATCHED = {"aten.bmm", "aten.baddbmm"}  # in these models, only attention multiplies batches


def build(cfg, variant: str, quick: bool):
    """(model, batch, pretrain config) of the step to break down."""
    cpu = torch.device("cpu")
    seed_everything(0)
    if variant == "mae":
        options, batch, pre = mae_setup(cfg, cpu, quick)
        return build_autoencoder("mae", options, mask_ratio=cfg.mask_ratio), batch, pre
    pre = cfg.variant(variant).pretrain
    model = build_from_meta(model_meta(cfg, variant, {"image_size": 32, "num_classes": 10}))
    return model, 8 if quick else pre.batch_size, pre


def timed(module: torch.nn.Module) -> bool:
    """Modules the clock times: the leaves, and the attention modules (their own work, the
    attention kernel, sits between their qkv and output projections). Containers are not
    timed: the backward hook of a module whose inputs need no gradient (the first one, on the
    images) fires when its outputs' gradients arrive, so a container's backward would be cut
    short; what a container does itself (residual sums) stays in the rest of the step. Nor
    is `nn.Identity`: it does nothing, and since its output is its input, the FLOP counter
    files under it the backward of everything before it."""
    if isinstance(module, torch.nn.Identity):
        return False
    return not any(True for _ in module.children()) or hasattr(module, "fused_attn")


class ModuleClock:
    """The forward and backward wall time of every timed module (`timed`) while attached, each
    module's own (less its timed children's). A leaf whose inputs need no gradient (the first
    layer, on the images) has its backward hook fire early too: its backward is not timed (its
    weight gradient falls in the rest of the step), and it is listed in `cut_short`."""

    def __init__(self, model: torch.nn.Module):
        self.total = collections.defaultdict(float)  # (module name, "fwd"/"bwd") -> seconds
        self.handles, self.cut_short = [], set()
        # A full backward hook's outputs may not be changed in place: in-place activations
        # (mconv's ReLUs) run out of place while attached (the same values; one more tensor).
        self.inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
        for m in self.inplace:
            m.inplace = False
        self.modules = {n: m for n, m in model.named_modules() if n and timed(m)}
        for name, module in self.modules.items():
            self._attach(name, module)

    def _attach(self, name: str, module: torch.nn.Module) -> None:
        start = {}

        def begin(key):
            def hook(_, args):
                if key == "fwd" and not any(isinstance(a, torch.Tensor) and a.requires_grad
                                            for a in args):
                    self.cut_short.add(name)
                start[key] = time.perf_counter()
            return hook

        def end(key):
            def hook(*_):
                self.total[(name, key)] += time.perf_counter() - start.pop(key)
            return hook

        self.handles += [module.register_forward_pre_hook(begin("fwd")),
                         module.register_forward_hook(end("fwd")),
                         module.register_full_backward_pre_hook(begin("bwd")),
                         module.register_full_backward_hook(end("bwd"))]

    def own(self, key: str) -> dict[str, float]:
        """Seconds of each timed module's own `key` ("fwd" or "bwd") work."""
        return {name: self.total.get((name, key), 0.0) - sum(
                    self.total.get((f"{name}.{c}", key), 0.0) for c, _ in m.named_children())
                for name, m in self.modules.items()}

    def reset(self) -> None:
        self.total.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for m in self.inplace:
            m.inplace = True


def module_flops(model: torch.nn.Module, step, per: int) -> tuple[dict[str, float], float, float]:
    """FLOPs per `per` images of one step: each timed module's own (backward included), the
    batched products (attention's), and the whole step's, counted with attention in its
    explicit form. The counter files an explicit attention's backward products under no
    module, so they are returned apart, for the class that owns `fused_attn`."""
    with counting_flops(model) as counter:
        step()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = {}
    for name, m in model.named_modules():
        if not name or not timed(m):
            continue
        ops = counts.get(f"{root}.{name}", {})
        out[name] = sum(n - sum(counts.get(f"{root}.{name}.{c}", {}).get(op, 0)
                                for c, _ in m.named_children())
                        for op, n in ops.items() if str(op) not in BATCHED) / per
    glob = counts.get("Global", {})
    batched = sum(n for op, n in glob.items() if str(op) in BATCHED) / per
    return out, batched, sum(glob.values()) / per


def class_rows(clock: ModuleClock, flops: dict[str, float], batched: float, steps: int,
               batch: int) -> list[dict]:
    """Per module class: own forward / backward seconds per step, FLOPs per step, and the
    FLOP rate over its modules whose backward was timed."""
    fwd, bwd = clock.own("fwd"), clock.own("bwd")
    rows = {}
    for name, module in clock.modules.items():
        cls = type(module).__name__
        r = rows.setdefault(cls, {"name": cls, "fwd": 0.0, "bwd": 0.0, "flops": 0.0,
                                  "rate_flops": 0.0, "rate_s": 0.0, "untimed": 0})
        f = flops.get(name, 0.0) * batch
        r["fwd"] += fwd[name] / steps
        r["bwd"] += bwd[name] / steps
        r["flops"] += f
        if name in clock.cut_short:
            r["untimed"] += 1
        else:
            r["rate_flops"] += f
            r["rate_s"] += (fwd[name] + bwd[name]) / steps
    for r in rows.values():
        if r["untimed"]:
            r["name"] += f" ({r['untimed']} on the images: backward untimed)"
    attention = next((type(m).__name__ for m in clock.modules.values()
                      if hasattr(m, "fused_attn")), None)
    if attention:
        rows[attention]["flops"] += batched * batch
        rows[attention]["rate_flops"] += batched * batch
    return sorted((r for r in rows.values() if r["fwd"] + r["bwd"] > 0 or r["flops"]),
                  key=lambda r: -(r["fwd"] + r["bwd"]))  # (uncalled ones, a ParameterList: out)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--variant", default="mae", show_default=True)
@click.option("--steps", default=4, show_default=True, help="Timed steps (after 3 warm-up).")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks the script, measures nothing.")
def main(params_path: str, variant: str, steps: int, quick: bool) -> None:
    # The first layer's backward hook fires early (see ModuleClock), and torch says so each step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cfg = load_config(params_path)
    if variant not in cfg.variants:
        raise click.BadParameter(f"unknown variant {variant!r}; params.yaml has "
                                 f"{', '.join(cfg.variants)}", param_hint="--variant")
    cpu = torch.device("cpu")
    model, batch, pre = build(cfg, variant, quick)
    state = build_state(model, pre, batches_per_epoch=1000, device=cpu)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)

    def step() -> None:
        train_step(state, as_float(images), None, device=cpu)

    flops, batched, total_flops = module_flops(model, lambda: train_step(
        state, as_float(images[:2]), None, device=cpu), per=2)
    clock = ModuleClock(model)
    for _ in range(1 if quick else 3):
        step()
    clock.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    clock.remove()
    peak = matmul_peak(cpu, quick)

    rows = []
    for r in class_rows(clock, flops, batched, steps, batch):
        rate = r["rate_flops"] / r["rate_s"] if r["rate_s"] > 0 and r["rate_flops"] else None
        rows.append({"name": r["name"], "fwd_ms": r["fwd"] * 1e3, "bwd_ms": r["bwd"] * 1e3,
                     "share": (r["fwd"] + r["bwd"]) / seconds, "gflop": r["flops"] / 1e9,
                     "gflop_s": None if rate is None else rate / 1e9,
                     "of_peak": None if rate is None else rate / peak})
    rest_s = seconds - sum(r["fwd_ms"] + r["bwd_ms"] for r in rows) / 1e3
    rest_gflop = total_flops * batch / 1e9 - sum(r["gflop"] for r in rows)
    rows.append({"name": "rest of the step (masking, loss, residual sums, optimiser, ...)",
                 "fwd_ms": None, "bwd_ms": None, "share": rest_s / seconds,
                 "gflop": rest_gflop if abs(rest_gflop) > 1e-9 else 0.0,  # (rounding: 0)
                 "gflop_s": None, "of_peak": None})
    keys = ("fwd_ms", "bwd_ms", "share", "gflop", "gflop_s", "of_peak")
    click.echo("| module class (own time) | forward ms | backward ms | share of the step | GFLOP "
               "| GFLOP/s | of the peak |\n|---|---|---|---|---|---|---|")
    for r in rows:
        click.echo(f"| {r['name']} | " + " | ".join(fmt(r[k]) for k in keys) + " |")
    click.echo(f"\n{variant} pretraining step, batch {batch}: {seconds * 1e3:.0f} ms "
               f"({batch / seconds:.1f} img/s with the hooks), {total_flops * batch / 1e9:.1f} "
               f"GFLOP: {total_flops * batch / seconds / 1e9:.0f} GFLOP/s, "
               f"{total_flops * batch / seconds / peak:.3f} of the {peak / 1e9:.0f} GFLOP/s "
               f"matmul peak ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
