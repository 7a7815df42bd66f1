"""A frozen global model plus one user's adapter: f' = f + (f A) B, logits = f' E^T + out_bias + user_bias."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from keyboard.adapter_file import AdapterArrays
from keyboard.model import KeyboardLM, State


class PersonalizedLM(nn.Module):
    """One user's view of the global model; TorchBackend and evaluate() run it like the base.

    TorchBackend applies `adapt` to LSTM outputs and then `logits`, so `logits` must not adapt again.
    """

    def __init__(self, base: KeyboardLM, A: torch.Tensor, B: torch.Tensor, user_bias: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(A.detach().clone().float())
        self.B = nn.Parameter(B.detach().clone().float())
        self.user_bias = nn.Parameter(user_bias.detach().clone().float())

    @classmethod
    def fresh(cls, base: KeyboardLM, rank: int = 8, seed: int = 0) -> "PersonalizedLM":
        """An adapter that changes nothing yet: A random, B and the bias zero (LoRA's start)."""
        d = base.cfg.embed_dim
        g = torch.Generator().manual_seed(seed)
        return cls(base, torch.randn(d, rank, generator=g) * d**-0.5, torch.zeros(rank, d), torch.zeros(base.vocab_size))

    @classmethod
    def from_arrays(cls, base: KeyboardLM, ad: AdapterArrays) -> "PersonalizedLM":
        """The personalized model of an adapter file's arrays."""
        return cls(base, torch.from_numpy(np.asarray(ad.A)), torch.from_numpy(np.asarray(ad.B)),
                   torch.from_numpy(np.asarray(ad.user_bias)))

    def to_arrays(self, base_id: str, user: str, meta: dict | None = None) -> AdapterArrays:
        """The adapter as the arrays an adapter file stores."""
        as_np = lambda t: t.detach().cpu().numpy().astype(np.float32)  # noqa: E731
        return AdapterArrays(as_np(self.A), as_np(self.B), as_np(self.user_bias), base_id, user, dict(meta or {}))

    @property
    def rank(self) -> int:
        """Rank of the residual adapter."""
        return self.A.shape[1]

    def features(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The frozen base's LSTM outputs (not yet adapted) and state."""
        return self.base.features(ids, state)

    def adapt(self, feats: torch.Tensor) -> torch.Tensor:
        """The user's residual adapter on LSTM outputs."""
        return feats + (feats @ self.A) @ self.B

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of adapted features: the base's tied output layer plus the user's bias."""
        return self.base.logits(feats) + self.user_bias

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """(batch, time) piece ids -> personalized logits and the LSTM state."""
        feats, state = self.features(ids, state)
        return self.logits(self.adapt(feats)), state
