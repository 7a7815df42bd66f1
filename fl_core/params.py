"""Model parameters as one flat float32 vector: shared parameters first, then FedPer-local ones.

The server, the aggregator and the wire only ever see the shared prefix; local parameters
live with their client.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedkey.errors import FedkeyError


@dataclass(frozen=True)
class Entry:
    """One parameter's place in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a module's parameters; `n_shared` is where local ones start."""

    entries: tuple[Entry, ...]
    n_shared: int
    n_total: int

    @classmethod
    def of(cls, module: torch.nn.Module, local: Iterable[str] = ()) -> "ParamSpec":
        """The spec of a module's trainable parameters; names matching a `local` glob are client-local."""
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        local = list(local)
        for pat in local:
            if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
                raise FedkeyError(f"[fl].local_params: {pat!r} matches no parameter; "
                                  f"parameters are: {', '.join(n for n, _ in named)}")
        is_local = [any(fnmatch.fnmatchcase(n, pat) for pat in local) for n, _ in named]
        if all(is_local):
            raise FedkeyError("[fl].local_params: every parameter would be local; nothing left to federate")
        ordered = [x for x, loc in zip(named, is_local) if not loc] + [x for x, loc in zip(named, is_local) if loc]
        entries, off = [], 0
        for n, p in ordered:
            entries.append(Entry(n, tuple(p.shape), off, p.numel()))
            off += p.numel()
        n_shared = sum(p.numel() for (_, p), loc in zip(named, is_local) if not loc)
        return cls(tuple(entries), n_shared, off)

    @property
    def names(self) -> list[str]:
        """Parameter names in flat order."""
        return [e.name for e in self.entries]

    @property
    def shared(self) -> list[Entry]:
        """Entries that are federated."""
        return [e for e in self.entries if e.offset < self.n_shared]

    @property
    def local(self) -> list[Entry]:
        """Entries that stay on the client (FedPer)."""
        return [e for e in self.entries if e.offset >= self.n_shared]

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One float32 vector of every parameter (shared then local)."""
        return torch.cat([params[e.name].detach().reshape(-1).float() for e in self.entries])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector (..., n_total): a leading lane dimension is kept."""
        lead = flat.shape[:-1]
        return {e.name: flat[..., e.offset:e.offset + e.numel].view(*lead, *e.shape) for e in self.entries}

    def load_into(self, module: torch.nn.Module, flat: torch.Tensor) -> torch.nn.Module:
        """Copy a flat vector into a module's parameters."""
        views = self.views(flat)
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in views:
                    p.copy_(views[n])
        return module

    def segments(self, shared_only: bool = True) -> list[tuple[int, int]]:
        """(offset, numel) per tensor: compression quantizes each tensor with its own scale."""
        return [(e.offset, e.numel) for e in (self.shared if shared_only else self.entries)]
