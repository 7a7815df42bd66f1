"""Server optimizers over the averaged client delta (Reddi et al. 2021, "Adaptive Federated Optimization").

Pure functions: `server_init(flat_params, cfg)` and `server_update(state, mean_delta, cfg, lr)`.
The mean delta Δ (client minus global, weighted-averaged) acts as a negative gradient:

    sgd:      m = μ m + Δ;                         x += lr m      (lr 1, μ 0: plain FedAvg)
    adagrad:  v = v + Δ²;                          x += lr Δ / (√v + τ)
    adam:     m = β1 m + (1-β1) Δ;  v = β2 v + (1-β2) Δ²;              x += lr m / (√v + τ)
    yogi:     m = β1 m + (1-β1) Δ;  v = v - (1-β2) Δ² sign(v - Δ²);    x += lr m / (√v + τ)

As in the paper there is no bias correction; v starts at τ² so the first steps are not huge.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fl_core.config import FLConfig


@dataclass
class ServerState:
    """Global shared parameters (flat float32), optimizer slots and the round counter."""

    params: torch.Tensor
    slots: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0

    def state_dict(self) -> dict:
        """For checkpoints."""
        return {"params": self.params, "slots": self.slots, "round": self.round}

    @classmethod
    def from_state_dict(cls, st: dict) -> "ServerState":
        """Inverse of state_dict."""
        return cls(st["params"], dict(st["slots"]), int(st["round"]))


def server_init(params: torch.Tensor, cfg: FLConfig) -> ServerState:
    """A fresh server state around the initial shared parameters."""
    params = params.detach().clone().float()
    slots: dict[str, torch.Tensor] = {}
    if cfg.server_opt == "sgd" and cfg.server_momentum:
        slots["m"] = torch.zeros_like(params)
    if cfg.server_opt in ("adam", "yogi"):
        slots["m"] = torch.zeros_like(params)
    if cfg.server_opt in ("adam", "yogi", "adagrad"):
        slots["v"] = torch.full_like(params, cfg.tau ** 2)
    return ServerState(params, slots, 0)


def server_update(state: ServerState, delta: torch.Tensor, cfg: FLConfig, lr: float | None = None) -> ServerState:
    """Apply one round's averaged delta; returns a new state (the input is not modified)."""
    lr = cfg.server_lr if lr is None else lr
    delta = delta.to(torch.float32)
    slots = {k: v.clone() for k, v in state.slots.items()}
    if cfg.server_opt == "sgd":
        step = delta
        if "m" in slots:
            step = slots["m"].mul_(cfg.server_momentum).add_(delta)
        return ServerState(state.params + lr * step, slots, state.round + 1)
    d2 = delta * delta
    v = slots["v"]
    if cfg.server_opt == "adagrad":
        v.add_(d2)
        m = delta
    else:
        m = slots["m"].mul_(cfg.beta1).add_(delta, alpha=1 - cfg.beta1)
        if cfg.server_opt == "adam":
            v.mul_(cfg.beta2).add_(d2, alpha=1 - cfg.beta2)
        else:  # yogi: v moves towards Δ² additively, so a large Δ² raises v slowly
            v.sub_((1 - cfg.beta2) * d2 * torch.sign(v - d2))
    return ServerState(state.params + lr * m / (v.sqrt() + cfg.tau), slots, state.round + 1)
