"""Muon (MomentUm Orthogonalized by Newton-schulz), as airbench94 uses it for the conv filters.

Each filter bank's momentum-smoothed gradient, flattened to (out, in*k*k), is replaced by an approximately
orthogonal matrix of the same shape (singular values pushed towards 1), so every direction of the update gets a
similar step size whatever the gradient's scale or conditioning.
"""

import contextlib
import functools
from collections.abc import Callable, Iterable

import torch

from fasttrain.errors import ConfigError

# Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T. The coefficients maximise the slope at 0, so small
# singular values grow fast; the price is that they end in a band around 1 rather than at 1 (see tests).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Approximately orthogonalise the matrix `G` (the U V^T of its SVD, up to a band of singular values), in bf16.

    G is first divided by its Frobenius norm (an upper bound on the top singular value), so the result does not
    depend on G's scale. The iteration runs on the wide orientation (rows <= columns), where X X^T is the smaller
    product. Returns bf16.
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz orthogonalises a matrix, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.bfloat16()
    X = X / (X.norm() + 1e-7)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


# Graphs Dynamo may keep for `newton_schulz` (one per filter-bank shape) while Muon steps. Its default limit (8)
# is below a ResNet-18's 11 shapes, and past it the remaining shapes would quietly run uncompiled.
NS_RECOMPILE_LIMIT = 64


@functools.cache
def compiled_newton_schulz() -> Callable[..., torch.Tensor]:
    """`newton_schulz` through torch.compile, made once per process, so repeated runs reuse its graphs. Uncompiled,
    each filter bank's 3 steps launch dozens of small kernels (about 240 per airbench94 step on a GPU); compiled,
    the elementwise work fuses around the matmuls. Compiled on first use: in a run, its compile warm-up."""
    return torch.compile(newton_schulz, dynamic=False)  # one static graph per filter-bank shape


def newton_schulz_compile_headroom() -> contextlib.AbstractContextManager:
    """Lets Dynamo keep a graph for every filter-bank shape (up to NS_RECOMPILE_LIMIT) inside the block, without
    changing the limit for anything compiled outside it. Dynamo reads the limit only when it compiles."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=max(NS_RECOMPILE_LIMIT, dynamo_config.recompile_limit))


class Muon(torch.optim.Optimizer):
    """Muon for conv filters (and other matrices): per parameter p with gradient g,

        buf = momentum * buf + g             (g + weight_decay * p first, if weight_decay > 0)
        u   = g + momentum * buf if nesterov else buf
        p  *= sqrt(out_channels) / ||p||     (renormalise the weight before the step)
        p  -= lr * newton_schulz(u reshaped to (out, in*k*k)), reshaped back

    The renormalisation makes decoupled weight decay (scaling p) a no-op, so `weight_decay` is the coupled L2 kind
    of torch.optim.SGD, added to the gradient; 0 (the default) is airbench94's setting.

    Under DDP it works as-is: the step reads only `p.grad`, which DDP has already all-reduced, and every operation
    is deterministic, so all ranks apply the same update to the same weights. No value is read back to the host
    (no .item(), no tensor in an `if`), so a step adds no device synchronisation.

    `compile_newton_schulz`: run the iteration through torch.compile (`compiled_newton_schulz`). The run decides it
    once (fasttrain.loop.resolve.RunPlan.compile); it is not optimiser state, so a checkpoint does not carry it.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        ns_steps: int = 3,
        compile_newton_schulz: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ConfigError(f"Muon: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum <= 0.0:
            raise ConfigError("Muon: nesterov needs a momentum > 0; set a momentum or turn nesterov off")
        if weight_decay < 0.0:
            raise ConfigError(f"Muon: weight_decay must be >= 0, got {weight_decay}")
        if ns_steps < 1:
            raise ConfigError(f"Muon: ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.orthogonalise = compiled_newton_schulz() if compile_newton_schulz else newton_schulz
        self.compile_headroom = newton_schulz_compile_headroom if compile_newton_schulz else contextlib.nullcontext
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ConfigError(
                        f"Muon updates matrices and conv filters, got a parameter of shape {tuple(p.shape)}; "
                        "give biases and norm parameters to the SGD/AdamW group instead"
                    )

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self.compile_headroom():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        grad = p.grad
        if group["weight_decay"] != 0.0:
            grad = grad.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        direction = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf

        out_channels = p.size(0)
        p.mul_(out_channels**0.5 / p.norm())
        update = self.orthogonalise(direction.reshape(out_channels, -1), steps=group["ns_steps"])
        p.add_(update.reshape(p.shape), alpha=-group["lr"])  # the bf16 update is widened inside the add
