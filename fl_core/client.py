"""The client side of FedAvg as small functions, independent of how clients are executed.

A task (the only thing that knows what the data is) implements `ClientTask`:

    client_data(client, rng) -> ClientData    # this round's local batches (E epochs), example/token counts
    loss(params, batch) -> scalar             # mean loss of one batch under a {name: tensor} parameter dict
    lane_loss(params, batches) -> (L,)        # the same for L clients at once: params {name: (L, *shape)}
    client_size(client) -> int                # optional: examples the client holds (size-weighted selection)

`client_update` trains one client (SGD with per-step clipping, from the global parameters)
and is what a Flower ClientApp calls; `fl_core.executors.run_clients` trains a round's
clients with it on parallel worker threads, or many at once in lanes with `lane_loss`,
and gives the same result to float tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fl_core.params import ParamSpec


@dataclass
class ClientData:
    """One client's work for one round."""

    batches: list[Any]
    n_examples: int
    n_tokens: int                      # real tokens in one pass over the sample (the default FedAvg weight)
    work_tokens: int = 0               # tokens actually trained on (E passes): device time and budget

    def __post_init__(self) -> None:
        if not self.work_tokens:
            self.work_tokens = self.n_tokens


class ClientTask(Protocol):
    """What federated training needs from a task; see the module docstring."""

    def client_data(self, client: str, rng: Any) -> ClientData:
        """The client's batches for one round: a fresh sample of its data, drawn with `rng`."""
        ...

    def loss(self, params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """Mean loss of one batch under `params`."""
        ...

    def lane_loss(self, params: dict[str, torch.Tensor], batches: Sequence[Any]) -> torch.Tensor:
        """Per-lane mean loss of L clients at once (one batch each), `params` stacked along a leading lane axis."""
        ...


@dataclass
class ClientUpdate:
    """What a client returns: the delta of its shared parameters, its weight, and what stays on the device."""

    client: str
    delta: torch.Tensor               # (n_shared,) float32: trained minus global
    n_examples: int
    n_tokens: int
    loss: float                       # mean training loss over its local steps
    local: torch.Tensor | None = None  # FedPer parameters after training: never uploaded
    info: dict[str, Any] = field(default_factory=dict)

    def weight(self, how: str = "tokens") -> float:
        """The update's weight in the mean: tokens | examples | uniform."""
        return {"tokens": float(self.n_tokens), "examples": float(self.n_examples), "uniform": 1.0}[how]


def clip_scale(sq_norms: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-row factor that brings a gradient of the given squared norm under `clip` (torch's clip_grad_norm_ rule)."""
    if clip <= 0:
        return torch.ones_like(sq_norms)
    return (clip / (sq_norms.sqrt() + 1e-6)).clamp(max=1.0)


def client_init(spec: ParamSpec, global_shared: torch.Tensor, local: torch.Tensor | None,
                init_local: torch.Tensor | None) -> torch.Tensor:
    """The flat parameters a client starts from: the global shared ones plus its own local ones."""
    if spec.n_total == spec.n_shared:
        return global_shared.clone()
    own = local if local is not None else init_local
    if own is None:
        raise ValueError("FedPer: a client needs its local parameters or their initial values")
    return torch.cat([global_shared, own])


def subnormals_flushed() -> bool:
    """Whether this thread treats subnormal floats as zero (torch has no getter for the mode, so it is probed)."""
    return float((torch.tensor([1e-40]) * 1.0).item()) == 0.0


@contextmanager
def flushed_subnormals() -> Iterator[None]:
    """Treat subnormal floats as zero in this thread for the block, then put the thread's previous mode back."""
    # A cold model under bold server steps saturates its LSTM gates, and the backward pass fills with
    # subnormal floats, each op on which takes the CPU's slow path: a cold run of 4-client rounds at server
    # lr 0.08 went from 0.25 s a round to 1.77 s by round 140 (0.24 s throughout with them flushed).
    # Only values below 1.2e-38 change.
    was = subnormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def local_train(task: ClientTask, spec: ParamSpec, start: torch.Tensor, data: ClientData, lr: float,
                clip: float) -> tuple[torch.Tensor, float]:
    """SGD over the client's batches from flat parameters `start`; returns the trained flat parameters and mean loss."""
    params = {n: v.clone().requires_grad_() for n, v in spec.views(start).items()}
    total = 0.0
    with flushed_subnormals():
        for batch in data.batches:
            loss = task.loss(params, batch)
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                sq = sum(g.reshape(-1).pow(2).sum(dtype=torch.float64) for g in grads).float()
                step = lr * float(clip_scale(sq.view(1), clip)[0])
                for p, g in zip(params.values(), grads):
                    p.sub_(g, alpha=step)
            total += float(loss.detach())
    return spec.flatten(params), total / max(1, len(data.batches))


def client_update(task: ClientTask, spec: ParamSpec, global_shared: torch.Tensor, client: str, data: ClientData,
                  lr: float, clip: float, local: torch.Tensor | None = None,
                  init_local: torch.Tensor | None = None) -> ClientUpdate:
    """Train one client from the global parameters (plus its own local ones); return what it sends and keeps."""
    trained, loss = local_train(task, spec, client_init(spec, global_shared, local, init_local), data, lr, clip)
    return ClientUpdate(client, trained[:spec.n_shared] - global_shared, data.n_examples, data.n_tokens, loss,
                        trained[spec.n_shared:].clone() if spec.n_total > spec.n_shared else None)


def vmap_lane_loss(loss: Callable[[dict[str, torch.Tensor], Any], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A `lane_loss` for any task whose batches are equal-shaped tensor tuples: torch.func.vmap over `loss`."""

    def lane_loss(params: dict[str, torch.Tensor], batches: Sequence[Any]) -> torch.Tensor:
        stacked = tuple(torch.stack(parts) for parts in zip(*batches))
        return torch.func.vmap(loss)(params, stacked)

    return lane_loss
