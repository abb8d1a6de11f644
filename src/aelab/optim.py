"""Adam, AdamW and SGD with momentum, and the learning-rate schedule, for the training engine.

Why not `torch.optim`: its first `step()` (and constructor) imports `torch._dynamo`, which costs
about 1.4 s per process on a 2-core CPU, more than half of a stage's whole start-up budget, in
every one of the pipeline's stages. Adam and AdamW call the same fused kernels that
`torch.optim.Adam(fused=True)` runs (`torch._fused_adam_` / `torch._fused_adamw_`, one pass over
parameters, gradients and both moments, on CPU and CUDA): on 2 CPU cores they update a 1.3 M
parameter model ~6x faster than the multi-tensor `_foreach` ops, which for the demo's small
models was a third of every training step. SGD uses the `_foreach` ops. A plain state dict
serves resume. `tests/test_optim.py` checks every kind step for step against `torch.optim`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("adam", "adamw", "sgd")


class Optimizer:
    """One parameter group; `lr` is set by the engine before every step (see `LRSchedule`).

    `param_groups` is kept in torch's shape so `torch.amp.GradScaler` can unscale gradients.
    Adam and AdamW also take the scaler's protocol for fused optimisers
    (`_step_supports_amp_scaling`): the scaler hands `grad_scale` and `found_inf` to `step()`,
    whose kernel unscales and, on an overflow, skips the update on the device, so fp16 training
    reads nothing back to the host per step (GradScaler's default path reads `found_inf`).
    """

    def __init__(self, params, *, kind: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.9) -> None:
        if kind not in KINDS:
            raise ValueError(f"optimizer must be one of {', '.join(KINDS)}, got {kind!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimizer got no trainable parameters")
        self.kind = kind
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay
        self.momentum = momentum
        self.param_groups = [{"params": self.params, "lr": lr}]
        self.steps = 0  # step() calls (with fp16, a step the grad scaler skipped counts too)
        # lazily created, one per param: exp_avg, exp_avg_sq (Adam), momentum (SGD), and `step`,
        # each parameter's own update count as a float32 scalar (what the fused kernels read
        # for bias correction; a parameter without a gradient in a step keeps its count)
        self.buffers: dict[str, list[torch.Tensor]] = {}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        return self.kind != "sgd"  # SGD's _foreach ops cannot skip a step on the device

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _buffer(self, name: str) -> list[torch.Tensor]:
        if name not in self.buffers:
            if name == "step":
                self.buffers[name] = [torch.zeros((), dtype=torch.float32, device=p.device)
                                      for p in self.params]
            else:
                self.buffers[name] = [torch.zeros_like(p, memory_format=torch.preserve_format)
                                      for p in self.params]
        return self.buffers[name]

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (others keep their state)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [self.params[i].grad for i in live]
        self.steps += 1
        lr, wd = self.lr, self.weight_decay
        if self.kind == "sgd":
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if self.momentum:
                first = "momentum" not in self.buffers
                bufs = [self._buffer("momentum")[i] for i in live]
                if first:  # torch starts the buffer at the first gradient, not at zero
                    torch._foreach_copy_(bufs, grads)
                else:
                    torch._foreach_mul_(bufs, self.momentum)
                    torch._foreach_add_(bufs, grads)
                grads = bufs
            torch._foreach_add_(params, grads, alpha=-lr)
            return
        beta1, beta2 = self.betas
        exp_avg = [self._buffer("exp_avg")[i] for i in live]
        exp_avg_sq = [self._buffer("exp_avg_sq")[i] for i in live]
        steps = [self._buffer("step")[i] for i in live]
        torch._foreach_add_(steps, 1.0)
        # Set by torch.amp.GradScaler.step for this call (fp16): the scale to divide the
        # gradients by (None once unscaled) and a 0/1 tensor that makes the kernel skip.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Adam adds the L2 penalty to the gradient; AdamW decays the weights (decoupled,
        # Loshchilov & Hutter). Both kernels compute the bias-corrected update in one pass.
        fused = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
        fused(params, grads, exp_avg, exp_avg_sq, [], steps, amsgrad=False, lr=lr, beta1=beta1,
              beta2=beta2, weight_decay=wd, eps=self.eps, maximize=False, grad_scale=grad_scale,
              found_inf=found_inf)
        if found_inf is not None:  # a skipped step does not count for bias correction
            torch._foreach_sub_(steps, [found_inf] * len(steps))

    def state_dict(self) -> dict:
        """Steps, lr and every buffer (tensors are referenced, not copied)."""
        return {"kind": self.kind, "steps": self.steps, "lr": self.lr,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["kind"] != self.kind:
            raise ValueError(f"optimizer state is for {state['kind']}, not {self.kind}")
        self.steps, self.lr = int(state["steps"]), float(state["lr"])
        self.buffers = {}
        for name, tensors in state["buffers"].items():
            if len(tensors) != len(self.params):
                raise ValueError(f"optimizer state has {len(tensors)} '{name}' buffers for "
                                 f"{len(self.params)} parameters")
            self.buffers[name] = [t.to(p.device, torch.float32 if name == "step" else p.dtype)
                                  .clone() for t, p in zip(tensors, self.params)]


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate at optimizer step `step`: linear warmup, then constant or cosine to a floor.

    A pure function of the step, so a resumed run needs no scheduler state.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "constant"  # constant | cosine
    min_lr: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.base_lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
