"""The search's StepBackend over onnxruntime: the exported step graph, with a user's adapter as inputs.

No torch on this import path: it runs on devices.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from fedkey.errors import FedkeyError
from keyboard.tokenizer import BOS

if TYPE_CHECKING:
    from keyboard.search import StepBackend


def make_session(model: bytes | str, threads: int = 1, source: str = "model") -> ort.InferenceSession:
    """A CPU session; one intra-op thread by default, as a keyboard process on a phone gets."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # the int8 model keeps weights as int8 + per-channel scales (DequantizeLinear on constants): this lets
    # onnxruntime fold them to float once at load instead of dequantizing 1.3M weights on every step
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types for a truncated or foreign file
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise FedkeyError(f"{source}: not a loadable ONNX model ({msg}); re-run `fedkey export`") from None


class OnnxBackend:
    """StepBackend over an exported step graph; the adapter inputs are zeros for the global model."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        shapes = {i.name: i.shape for i in session.get_inputs()}
        want = {"ids", "h", "c", "A", "B", "user_bias"}
        if set(shapes) != want:
            raise FedkeyError(f"model inputs {sorted(shapes)} are not fedkey's step graph {sorted(want)}; re-run `fedkey export`")
        self.embed_dim, self.hidden, self.vocab_size = shapes["h"][1], shapes["c"][1], shapes["user_bias"][0]
        self.steps = 0  # session runs: lets benchmarks count model calls per keystroke
        self.rows = 0
        self.clear_adapter()

    def clear_adapter(self) -> None:
        """Use the global model: f' = f, no user bias."""
        d = self.embed_dim
        self.set_adapter(np.zeros((d, 1), np.float32), np.zeros((1, d), np.float32), np.zeros(self.vocab_size, np.float32))

    def set_adapter(self, A: np.ndarray, B: np.ndarray, user_bias: np.ndarray) -> None:  # noqa: N803
        """Apply a user's adapter, f' = f + (f @ A) @ B and logits + user_bias, on every following step."""
        d, V = self.embed_dim, self.vocab_size
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != d or B.shape != (A.shape[1], d) or user_bias.shape != (V,):
            raise FedkeyError(f"adapter shapes A{A.shape} B{B.shape} bias{user_bias.shape} do not fit this model "
                              f"(embed_dim {d}, vocab {V})")
        self._adapter = {"A": np.ascontiguousarray(A, np.float32), "B": np.ascontiguousarray(B, np.float32),
                         "user_bias": np.ascontiguousarray(user_bias, np.float32)}

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed one piece per row; return log-probabilities of the next piece and the new state."""
        self.steps += 1
        self.rows += len(ids)
        logp, h2, c2 = self.session.run(None, {"ids": np.ascontiguousarray(ids, np.int64),
                                               "h": np.ascontiguousarray(h, np.float32),
                                               "c": np.ascontiguousarray(c, np.float32), **self._adapter})
        return logp, h2, c2

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """State after the begin-of-message piece, for n rows."""
        h = np.zeros((n, self.embed_dim), np.float32)
        c = np.zeros((n, self.hidden), np.float32)
        return self.step(np.full(n, BOS, np.int64), h, c)


def _keys(ids: np.ndarray, h: np.ndarray) -> list[tuple[int, bytes]]:
    """(piece, bytes of h) per row; one bytes object sliced per row costs less than a view per row."""
    raw = np.ascontiguousarray(h).tobytes()
    w = len(raw) // max(1, len(ids))
    return [(i, raw[j * w:(j + 1) * w]) for j, i in enumerate(np.asarray(ids).tolist())]


class StepCache:
    """A StepBackend that remembers recent steps by (piece, h), so keystrokes reuse earlier work.

    Typing one more character re-runs a search whose beams mostly start from the same states with the
    same pieces as the previous keystroke's; finishing a word steps pieces that search already ran.
    A hit returns the stored rows, so results match running the same steps again (up to the last bits
    of float rounding, which can differ when a row is computed in a batch of another size).
    Rows live in preallocated arrays (one slot per remembered step): storing a run and answering hits
    are one vectorized copy per output instead of one small array per row.
    """

    def __init__(self, backend: StepBackend, capacity: int = 128) -> None:
        self.backend, self.capacity = backend, capacity
        self._slot: OrderedDict[tuple, int] = OrderedDict()  # key -> slot, least recently used first
        self._store: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.hits = self.misses = self.ahead = 0
        self._ahead: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def step_ahead(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        """Rows the search may expand next: computed in the next run that happens anyway, and stored.

        A run's fixed cost (weights streamed through the cache, per-node overhead) is several times
        the cost of one more row, so waiting prefixes ride along instead of costing a run of their own.
        """
        if self.capacity > 0:
            self._ahead = (ids, h, c)

    def clear(self) -> None:
        """Forget every stored step (after the adapter changes)."""
        self._slot.clear()

    def _put(self, keys: list[tuple], logp: np.ndarray, h: np.ndarray, c: np.ndarray) -> None:
        if self._store is None:
            self._store = tuple(np.empty((self.capacity,) + a.shape[1:], a.dtype) for a in (logp, h, c))
        keys = keys[: self.capacity]  # a run larger than the cache keeps its first rows
        slots = []
        for key in keys:
            if len(self._slot) < self.capacity:
                slot = len(self._slot)
            else:
                _, slot = self._slot.popitem(last=False)  # reuse the least recently used slot
            self._slot[key] = slot
            slots.append(slot)
        for store, rows in zip(self._store, (logp, h, c)):
            store[slots] = rows[: len(slots)]

    def step(self, ids: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stored rows where this (piece, h) was stepped before; one backend run for the rest."""
        if self.capacity <= 0:
            return self.backend.step(ids, h, c)
        slot_of = self._slot
        # h (the projected output) identifies the state: two paths with bit-identical h and different c
        # would need identical o * tanh(c) projections, and hashing h is 7x cheaper than hashing c too
        keys = _keys(ids, h)
        miss = [j for j, key in enumerate(keys) if key not in slot_of]
        self.hits += len(keys) - len(miss)
        self.misses += len(miss)
        ahead, self._ahead = self._ahead, None
        if not miss:
            for key in keys:
                slot_of.move_to_end(key)
            slots = [slot_of[key] for key in keys]
            return tuple(store[slots] for store in self._store)
        miss_keys = list(dict.fromkeys(keys[j] for j in miss))  # a row asked twice is run once
        first = {key: j for j, key in reversed(list(enumerate(keys)))}
        m = [first[key] for key in miss_keys]
        run_ids, run_h, run_c = np.asarray(ids)[m], np.asarray(h)[m], np.asarray(c)[m]
        if ahead is not None:
            seen = set(miss_keys)
            extra = []
            for j, key in enumerate(_keys(ahead[0], ahead[1])):
                if key not in slot_of and key not in seen:
                    seen.add(key)
                    extra.append(j)
                    miss_keys.append(key)
            if extra:
                run_ids = np.concatenate([run_ids, ahead[0][extra]])
                run_h = np.concatenate([run_h, ahead[1][extra]])
                run_c = np.concatenate([run_c, ahead[2][extra]])
                self.ahead += len(extra)
        logp, h2, c2 = self.backend.step(run_ids, run_h, run_c)
        n = len(keys)
        if len(m) == n:  # nothing stored was asked: the run is the answer
            out = (logp[:n], h2[:n], c2[:n])
        else:  # stored rows and fresh ones, in the order asked
            row = {key: r for r, key in enumerate(miss_keys)}
            fresh = [j for j, key in enumerate(keys) if key in row]
            old = [j for j, key in enumerate(keys) if key not in row]
            out = []
            for store, run in zip(self._store, (logp, h2, c2)):
                o = np.empty((n,) + run.shape[1:], run.dtype)
                o[fresh] = run[[row[keys[j]] for j in fresh]]
                o[old] = store[[slot_of[keys[j]] for j in old]]
                out.append(o)
            for j in old:
                slot_of.move_to_end(keys[j])
            out = tuple(out)
        self._put(miss_keys, logp, h2, c2)
        return out

    def initial(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The wrapped backend's initial state."""
        return self.backend.initial(n)
