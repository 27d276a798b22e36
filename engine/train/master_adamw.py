"""AdamW over fp32 master weights for a model whose parameters are bf16 — Megatron-LM's bf16
numerics, what `precision: bf16-master` (the default under DDP) trains with (docs/training.md: a
little faster a step than autocast over fp32 weights, the same 300-step loss curve within
run-to-run spread).

Under autocast over fp32 weights every micro-batch casts each weight to bf16 in the forward and
each bf16 weight gradient back to fp32 in the backward. Here the model holds the bf16 weights
and neither cast happens: the update reads the bf16 gradient and writes the new bf16 weight in
the same pass that updates the fp32 master and moments (fused kernels once compiled,
`compile=True`). Each micro-batch's gradient is bf16, as under autocast (the weight-gradient
GEMM's output); summing several micro-batches happens in fp32 (`accumulate_grads`), and so does
their mean over data-parallel ranks (`all_reduce_grads`, one collective a step).

The state keeps torch.optim.AdamW's layout (`step`, `exp_avg`, `exp_avg_sq` per parameter) and
the masters live beside it: `masters_in_model()` swaps them into the parameters, so that a
checkpoint saved or loaded inside it holds fp32 weights and fp32 moments, the same checkpoint as
autocast training writes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist


def _update(masters: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
            exp_avg_sqs: list[torch.Tensor], scalars: torch.Tensor, beta1: float, beta2: float,
            eps: float, weight_decay: float, lows: list[torch.Tensor],
            low_masters: list[torch.Tensor]) -> None:
    """torch.optim.AdamW's update of the fp32 masters from bf16 (or fp32) gradients, then the
    bf16 parameters `lows` rounded from their masters. `scalars` = [lr, lr / bias_correction1,
    1 / sqrt(bias_correction2), gradient scale] as one tensor, so that a compiled update is not
    rebuilt when they change."""
    grads = torch._foreach_mul([g.float() for g in grads], scalars[3])
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    if weight_decay:
        torch._foreach_mul_(masters, 1 - scalars[0] * weight_decay)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_mul_(denom, scalars[2])
    torch._foreach_add_(denom, eps)
    steps = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(steps, scalars[1])
    torch._foreach_sub_(masters, steps)
    for p, w in zip(lows, low_masters):
        p.copy_(w)


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The gradients' global L2 norm, computed in fp32."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def norm_gains(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The norm layers' gains (`*norm.weight`): what the training loop keeps fp32."""
    return [p for name, p in model.named_parameters() if name.endswith("norm.weight")]


@functools.cache
def _compiled_update():
    return torch.compile(_update, fullgraph=True, dynamic=False)


class MasterAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) for fp32 parameters that it turns into
    bf16 ones: at construction each matrix's fp32 value becomes its master and the parameter
    itself its bf16 rounding. Build it before wrapping the model for data parallelism, so that
    the wrapper sees bf16 parameters.

    `keep_fp32`: parameters that stay fp32 in the model, their own masters. The training loop
    passes the norm gains: they are tiny, and autocast never rounds them in a compiled block
    either (inductor multiplies the fp32 gain inside the fused norm kernel), so in bf16 they
    would make the model compute differently from autocast's. (Biases feed matmuls, which
    autocast rounds: they go bf16.)"""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, dtype: torch.dtype = torch.bfloat16,
                 keep_fp32: Iterable[torch.Tensor] = (), compile: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.compile = compile
        self.masters: dict[torch.Tensor, torch.Tensor] = {}
        self._flat_sum: torch.Tensor | None = None  # fp32 gradient sums, one buffer (made on first use)
        self._sum_of: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its view of that buffer
        self._summed: set[torch.Tensor] = set()  # parameters with a sum in this step
        keep = set(keep_fp32)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"MasterAdamW takes fp32 parameters (their masters), got {p.dtype}")
                if p in keep:
                    self.masters[p] = p
                    continue
                self.masters[p] = p.detach().clone()
                p.data = p.data.to(dtype)

    @contextlib.contextmanager
    def masters_in_model(self) -> Iterator[None]:
        """The fp32 masters in place of the bf16 parameters (to save or load them); on exit the
        parameters are again bf16, rounded from the masters (which a load may have changed)."""
        low = {p: p.data for p, w in self.masters.items() if w is not p}
        for p in low:
            p.data = self.masters[p]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, data in low.items():
                    p.data = data
                    data.copy_(self.masters[p])

    @torch.no_grad()
    def accumulate_grads(self) -> None:
        """Move the parameters' gradients into fp32 sums (call after each micro-batch's backward):
        the gradients of several micro-batches add up in fp32, not in bf16. The sums live in one
        flat buffer, so that `all_reduce_grads` reduces them in one collective."""
        if self._flat_sum is None:
            params = list(self.masters)
            device = params[0].device
            self._flat_sum = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
            views = self._flat_sum.split([p.numel() for p in params])
            self._sum_of = {p: v.view(p.shape) for p, v in zip(params, views)}
        for p in self.masters:
            if p.grad is None:
                continue
            if p in self._summed:
                self._sum_of[p].add_(p.grad)
            else:
                self._sum_of[p].copy_(p.grad)
                self._summed.add(p)
            p.grad = None

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        """The mean over data-parallel ranks of every rank's fp32 sums (the current gradients
        folded in first), as one fp32 all-reduce; nothing in a single process. Every rank must
        hold gradients for the same parameters (it does in data parallelism)."""
        self.accumulate_grads()
        if not (dist.is_initialized() and dist.get_world_size() > 1) or not self._summed:
            return
        dist.all_reduce(self._flat_sum)  # views of parameters without a sum are reduced unused
        self._flat_sum.div_(dist.get_world_size())

    def _grad(self, p: torch.Tensor) -> torch.Tensor | None:
        return self._sum_of[p] if p in self._summed else p.grad

    def grads(self) -> list[torch.Tensor]:
        """The gradients the next step applies: each parameter's current gradient plus its fp32
        sum of earlier micro-batches (folded into the sum)."""
        if self._summed:
            self.accumulate_grads()
        return [g for g in map(self._grad, self.masters) if g is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._summed.clear()

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | None = None) -> None:
        """One update from the gradients (`grads()`), each multiplied by `grad_scale` (a scalar
        tensor: gradient clipping's coefficient, applied in fp32 inside the update)."""
        if closure is not None:
            raise ValueError("MasterAdamW takes no closure")
        if self._summed:
            self.accumulate_grads()
        for group in self.param_groups:
            params = [p for p in group["params"] if self._grad(p) is not None]
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(self.masters[p])
                    state["exp_avg_sq"] = torch.zeros_like(self.masters[p])
                state["step"] += 1
            step = self.state[params[0]]["step"].item()  # every parameter steps together
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            device = params[0].device
            scalars = torch.tensor([lr, lr / (1 - beta1 ** step), 1 / math.sqrt(1 - beta2 ** step), 1.0],
                                   dtype=torch.float32).to(device, non_blocking=True)
            if grad_scale is not None:
                scalars[3] = grad_scale
            update = _compiled_update() if self.compile else _update
            lows = [p for p in params if self.masters[p] is not p]
            update([self.masters[p] for p in params], [self._grad(p) for p in params],
                   [self.state[p]["exp_avg"] for p in params],
                   [self.state[p]["exp_avg_sq"] for p in params], scalars,
                   beta1, beta2, group["eps"], group["weight_decay"],
                   lows, [self.masters[p] for p in lows])
