"""Per-user fine-tuning of model weights (the last layers or all of them), the comparison arms of the adapters.

Each user gets a copy of the global model trained on their own train split only, with the adapters'
early stopping (best validation loss, checked every `eval_every` steps) and the same gate
(personalization.gate.decide on the latest-10% validation slice). What it costs is a whole model per
user: 5.4 MB instead of an adapter of a few kB, and no shared base on the device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from keyboard.batches import pad_batch
from keyboard.model import KeyboardLM
from keyboard.tokenizer import PAD
from personalization.batched import user_seed
from personalization.config import PersonalConfig
from personalization.data import UserData
from personalization.gate import decide

# what "last" trains: the LSTM's projection to the embedding and the output bias (the embedding itself
# is tied to the input, so training it would also change how every typed piece is read)
LAST_PARAMS = ("lstm.weight_hr_l0", "out_bias")
FINETUNE_LR = {"last": 1e-3, "full": 3e-4}  # Adam; the global model was trained at 5e-3 peak


@dataclass
class FinetuneResult:
    """One user's fine-tuned model, the gate's decision (use_adapter) and its evidence."""

    user: str
    region: str
    model: KeyboardLM | None  # the best validation checkpoint, whatever the gate said (None: nothing trained)
    train_tokens: int
    val_tokens: int
    val_global: float | None
    val_personal: float | None
    best_step: int
    use_adapter: bool  # named as the adapters' result so the same gate reads both
    reason: str
    extra: dict = field(default_factory=dict)


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the mask of real targets for framed messages."""
    x, y = pad_batch(seqs)
    return x, y, y != PAD


def _val_figures(model: KeyboardLM, val: tuple, starts: torch.Tensor, cont: torch.Tensor) -> tuple[float, int, int]:
    """Mean piece NLL on the validation slice, one-piece words at word starts, and how many of them top-1 gets."""
    x, y, m = val
    with torch.inference_mode():
        logits, _ = model(x)
        nll = F.cross_entropy(logits[m], y[m]).item()
        nxt = torch.roll(y, -1, dims=1)
        nxt[:, -1] = 0
        words = m & starts[y] & ~(cont[nxt] & torch.roll(m, -1, dims=1))
        right = int(((logits.argmax(-1) == y) & words).sum())
    return nll, int(words.sum()), right


def finetune_user(base: KeyboardLM, u: UserData, cfg: PersonalConfig, mode: str, starts: torch.Tensor,
                  cont: torch.Tensor, lr: float | None = None) -> FinetuneResult:
    """Fine-tune a copy of `base` on one user's train split ("last" or "full"), early-stopped and gated."""
    if mode not in FINETUNE_LR:
        raise ValueError(f"fine-tuning mode {mode!r}: last or full")
    train_tokens, val_tokens = u.train_tokens, u.val_tokens
    res = FinetuneResult(u.user, u.region, None, train_tokens, val_tokens, None, None, 0, False, "")
    if not u.train or not u.val:
        res.use_adapter, res.reason = decide(res, cfg)
        return res
    model = copy.deepcopy(base).train()
    params = [p for n, p in model.named_parameters() if mode == "full" or n in LAST_PARAMS]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr or FINETUNE_LR[mode])
    val = _pad(u.val)
    glob_nll, n_words, glob_right = _val_figures(base, val, starts, cont)
    best = (float("inf"), 0, None, 0)
    gen = torch.Generator().manual_seed(user_seed(u.user, cfg.seed))
    lengths = [len(s) - 1 for s in u.train]
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            nll, _, right = _val_figures(model, val, starts, cont)
            if nll < best[0]:
                best = (nll, step, copy.deepcopy(model.state_dict()), right)
            model.train()
        if step == cfg.steps:
            break
        # about batch_tokens pieces of the user's messages a step, in a seeded random order
        order = torch.randperm(len(u.train), generator=gen).tolist()
        pick, n = [], 0
        for i in order:
            pick.append(u.train[i])
            n += lengths[i]
            if n >= cfg.batch_tokens:
                break
        x, y, m = _pad(pick)
        logits, _ = model(x)
        loss = F.cross_entropy(logits[m], y[m])
        opt.zero_grad()
        loss.backward()
        opt.step()
    nll, step, state, right = best
    res.val_global, res.val_personal, res.best_step = glob_nll, nll, step
    res.extra = {"val_words": n_words, "val_top1_global": glob_right, "val_top1_personal": right}
    res.use_adapter, res.reason = decide(res, cfg)
    model.load_state_dict(state)
    res.model = model.eval()
    return res
