"""Typed settings of federated training ([fl]) and of the simulated device fleet ([fleet])."""

from __future__ import annotations

from dataclasses import dataclass

from fedkey.errors import FedkeyError
from fedkey.fields import option as _f


SERVER_OPTS = ("sgd", "adam", "yogi", "adagrad")
COMPRESSORS = ("none", "int8", "topk")


@dataclass
class FLConfig:
    """Federated averaging: budget, client and server optimizers, communication, evaluation."""

    SECTION = "fl"
    seed: int = _f(0, "seed for init, client sampling, local batch order, fleet and compression")
    max_tokens: int = _f(3_000_000, "stop after clients trained on this many real (non-padding) tokens")
    max_rounds: int = _f(0, "also stop after this many rounds (0: no limit)")
    # few clients a round and a bold server step: a short budget buys rounds, not wider averages
    # (300k-token sweep on chitchat, top-1: N=16 lr .01 3.1%, lr .05 7.4%, lr .1 9.5%, lr .2 diverged;
    # N=8 lr .07 11.5%, lr .1 11.5%; N=4 lr .1 diverged; more local data per client or warm-up: worse)
    # at 3M tokens small rounds win: 4 clients of at most 16 messages reach 18.15% top-1 on 50k test positions
    # against 16.72% for 8 x 64 (six times the server steps), and with checkpoints written by time they train
    # at 0.73 of centralized speed (8 x 64: 0.97; `fedkey bench fl`)
    clients_per_round: int = _f(4, "reports the server waits for each round (N)")
    local_epochs: int = _f(1, "passes a client makes over its (capped) data per round (E)")
    batch_size: int = _f(16, "messages per local step (B)")
    max_messages: int = _f(16, "a client trains on a fresh random sample of at most this many messages per round")
    max_len: int = _f(64, "longer messages are cut to this many pieces")
    # chitchat's senders are skewed (median 20 train messages, the largest 20k; a tenth of the users
    # write 81% of the text): uniform selection with a per-round cap trains mostly on light users'
    # text, while the test positions (and the central baseline's batches) follow the text itself
    client_sampling: str = _f("size", "who is selected: uniform | size (odds proportional to max(messages, "
                                      "max_messages), so each message is trained on about equally often)")
    weighting: str = _f("tokens", "weight of a client's update in the mean: tokens | examples | uniform")
    client_lr: float = _f(1.0, "client SGD learning rate (cosine decay to lr_floor over max_tokens)")
    lr_floor: float = _f(0.1, "the client and adaptive server learning rates end at this fraction of their start")
    client_clip: float = _f(1.0, "per-step gradient norm clip on the client (0: off)")
    server_opt: str = _f("adam", "server optimizer: sgd (lr 1 = plain FedAvg) | adam | yogi | adagrad")
    # 3M tokens with size selection, top-1 on 50k test positions: lr .03 15.6% (worse than at 1M), .02 15.9%,
    # .01 16.5%, .005 16.7%
    server_lr: float = _f(0.005, "server learning rate (the quick preset's 300k tokens take 0.08)")
    server_momentum: float = _f(0.0, "heavy-ball momentum of the sgd server optimizer")
    beta1: float = _f(0.9, "first-moment decay of adam/yogi")
    beta2: float = _f(0.99, "second-moment decay of adam/yogi")
    tau: float = _f(1e-3, "adaptivity (epsilon) of adam/yogi/adagrad, Reddi et al. 2021")
    warmup_rounds: int = _f(0, "linear server learning-rate warm-up over this many rounds")
    # a pretrained start is worth more than any server-optimizer setting (1M-token runs on chitchat,
    # top-1 on 50k test positions: cold start 14.4%; 1 pass 14.9%, server lr .02 15.0%; 2 passes 15.1%)
    pretrain_epochs: float = _f(2.0, "passes of server-side pretraining over public (non-client) data before round 1 "
                                     "(0: off; the task supplies the data)")
    local_params: str = _f("", "comma-separated parameter names/globs kept on each client, never averaged (FedPer)")
    client_store: str = _f("memory", "where per-client state lives: memory | disk (FedPer params, error feedback)")
    compress: str = _f("none", "uplink compression: none | int8 (stochastic rounding) | topk (error feedback)")
    topk_frac: float = _f(0.01, "fraction of coordinates a topk client uploads")
    sit_out_norm: float = _f(0.0, "a client whose update norm is below this does not upload (0: off)")
    executor: str = _f("threads", "how clients run: threads (one client per core) | sequential | lanes (batched)")
    workers: int = _f(0, "worker threads of the threads executor (0: one per core)")
    lanes: int = _f(8, "clients stacked in one batched computation by the lanes executor")
    # a small round trains ~800 tokens in ~0.3 s and a check on 2,000 positions takes seconds: every 10 rounds
    # made a 3M-token run three times slower
    eval_every: int = _f(200, "evaluate every this many rounds (0: only at the end)")
    eval_positions: int = _f(2000, "word positions sampled for the evaluations during training")
    threads: int = _f(0, "torch threads (0: all cores)")
    # a checkpoint is the whole server state (params + optimizer moments + history): ~0.1-0.25 s on this
    # model, more than a small round's training, so it is written by time, not by round
    checkpoint_every_s: float = _f(30.0, "write the checkpoint (and history.jsonl) once this many seconds have "
                                         "passed since the last, and after the last round (0: every round); "
                                         "a resume replays the rounds since, bitwise")

    def __post_init__(self) -> None:
        if self.server_opt not in SERVER_OPTS:
            raise FedkeyError(f"[fl].server_opt {self.server_opt!r}: choose one of {', '.join(SERVER_OPTS)}")
        if self.compress not in COMPRESSORS:
            raise FedkeyError(f"[fl].compress {self.compress!r}: choose one of {', '.join(COMPRESSORS)}")
        if self.executor not in ("threads", "sequential", "lanes"):
            raise FedkeyError(f"[fl].executor {self.executor!r}: choose threads, sequential or lanes")
        if self.client_sampling not in ("uniform", "size"):
            raise FedkeyError(f"[fl].client_sampling {self.client_sampling!r}: choose uniform or size")
        if self.weighting not in ("tokens", "examples", "uniform"):
            raise FedkeyError(f"[fl].weighting {self.weighting!r}: choose tokens, examples or uniform")
        if self.client_store not in ("memory", "disk"):
            raise FedkeyError(f"[fl].client_store {self.client_store!r}: choose memory or disk")
        if self.checkpoint_every_s < 0:
            raise FedkeyError(f"[fl].checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        for name in ("clients_per_round", "local_epochs", "batch_size", "max_messages", "lanes", "max_len"):
            if getattr(self, name) < 1:
                raise FedkeyError(f"[fl].{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.topk_frac <= 1:
            raise FedkeyError(f"[fl].topk_frac must be in (0, 1], got {self.topk_frac}")
        if not 0 <= self.lr_floor <= 1:
            raise FedkeyError(f"[fl].lr_floor must be in [0, 1], got {self.lr_floor}")

    def local_patterns(self) -> list[str]:
        """The FedPer local-parameter patterns as a list."""
        return [p.strip() for p in self.local_params.split(",") if p.strip()]


@dataclass
class FleetConfig:
    """What real device fleets do to a round: availability, speed, deadline, over-selection, dropouts."""

    SECTION = "fleet"
    availability: bool = _f(True, "clients are eligible only while charging on unmetered network (diurnal trace)")
    overselect: float = _f(1.3, "select this many times N clients; keep the first N that report in time")
    dropout: float = _f(0.0, "probability a selected client drops out mid-round")
    deadline_s: float = _f(600.0, "round deadline in simulated seconds (reports after it are late)")
    device_tokens_per_s: float = _f(300.0, "median on-device training speed (tokens/s)")
    speed_sigma: float = _f(0.6, "log-normal spread of device speeds")
    uplink_mbps: float = _f(5.0, "median uplink bandwidth (Mbit/s)")
    downlink_mbps: float = _f(20.0, "median downlink bandwidth (Mbit/s)")
    bandwidth_sigma: float = _f(0.8, "log-normal spread of bandwidths")
    night_hours: float = _f(8.0, "mean length of the nightly charging window (hours)")
    day_plug_prob: float = _f(0.05, "chance a device is charging on wifi in any given daytime hour")
    min_clients: int = _f(1, "a round with fewer usable reports is skipped (the model is unchanged)")

    def __post_init__(self) -> None:
        if self.overselect < 1.0:
            raise FedkeyError(f"[fleet].overselect must be >= 1.0, got {self.overselect}")
        if not 0.0 <= self.dropout < 1.0:
            raise FedkeyError(f"[fleet].dropout must be in [0, 1), got {self.dropout}")
        if self.deadline_s <= 0:
            raise FedkeyError(f"[fleet].deadline_s must be positive, got {self.deadline_s}")
