"""Many users' adapters trained at once on a frozen base: one batched computation over a user dimension.

The base is frozen, so each user's LSTM outputs are computed once (big batches) and everything after
is small: per user, a residual adapter and an output bias. Two things keep it cheap on 2 cores:
- users of similar data size are packed into groups and trained together with batched matmuls over
  (user, position) tensors, full-batch per user (Adam is elementwise, so users stay independent);
- the softmax during training runs over a per-user shortlist of pieces (the user's own pieces plus
  the base model's likeliest ones for that user) exactly, and the rest of the vocabulary as one tail
  term per position computed exactly from the base model (its first-order change under the adapter
  included), so a training step costs ~shortlist/vocab of a full-softmax step.
The gate decision uses the exact full-vocabulary validation loss of the chosen step.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from keyboard.model import KeyboardLM
from keyboard.tokenizer import PAD
from personalization.config import PersonalConfig
from personalization.data import UserData
from keyboard.phrase_cache import PhraseCache, ReplayCache, histories, mix_logp
from keyboard.sentinel import Sentinel
from personalization.gate import decide, decide_cache, spelling_only_ok

TOPK_CANDIDATES = 8  # base-model candidates per position that vote for the user's shortlist
CHUNK = 256  # positions per full-vocabulary block
MAX_BIAS_STEP = 1.0  # Newton on a log-count overshoots from far below; a bias moves at most this per step


@dataclass
class UserResult:
    """A user's trained adapter (full-vocabulary bias) and the gate's evidence."""

    user: str
    region: str
    A: np.ndarray
    B: np.ndarray
    user_bias: np.ndarray
    train_tokens: int
    val_tokens: int
    val_global: float | None  # exact per-piece NLL of the global model on the validation slice
    val_personal: float | None
    best_step: int
    use_adapter: bool
    reason: str
    extra: dict = field(default_factory=dict)
    cache: PhraseCache | None = None  # the user's phrase cache, if their gate kept one


def user_seed(user: str, seed: int) -> int:
    """A seed per user that does not depend on which other users are trained with it."""
    return (zlib.crc32(user.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def init_adapter(user: str, seed: int, d: int, rank: int) -> torch.Tensor:
    """A's random start (B starts at zero, so the adapter starts as the identity)."""
    g = torch.Generator().manual_seed(user_seed(user, seed))
    return torch.randn(d, rank, generator=g) * d**-0.5


def pack_groups(users: list[UserData], group_tokens: int) -> list[list[UserData]]:
    """Users sorted by data size, cut into groups of similar size whose padded size fits group_tokens."""
    order = sorted(users, key=lambda u: (u.train_tokens + u.val_tokens, u.user))
    groups: list[list[UserData]] = []
    cur: list[UserData] = []
    for u in order:
        n = u.train_tokens + u.val_tokens
        first = cur[0].train_tokens + cur[0].val_tokens if cur else 0
        # similar sizes in a group keep the padding small
        if cur and ((len(cur) + 1) * n > group_tokens or n > 1.5 * first + 16):
            groups.append(cur)
            cur = []
        cur.append(u)
    if cur:
        groups.append(cur)
    return groups


def base_features(base: KeyboardLM, seqs: list[list[int]], max_batch_tokens: int = 16384) -> list[torch.Tensor]:
    """The frozen base's LSTM outputs (len-1, d) for each framed message, run in length-sorted batches."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    i = 0
    with torch.inference_mode():
        while i < len(order):
            T = len(seqs[order[i]]) - 1
            j = i
            while j < len(order) and (j - i + 1) * (len(seqs[order[j]]) - 1) <= max(max_batch_tokens, T):
                j += 1
            idx = order[i:j]
            T = max(len(seqs[k]) - 1 for k in idx)
            x = torch.full((len(idx), T), PAD, dtype=torch.long)
            for r, k in enumerate(idx):
                x[r, : len(seqs[k]) - 1] = torch.tensor(seqs[k][:-1])
            feats, _ = base.features(x)
            for r, k in enumerate(idx):
                out[k] = feats[r, : len(seqs[k]) - 1].clone()
            i = j
    return out  # type: ignore[return-value]


@dataclass
class Positions:
    """Per-position tensors of a group (users x positions), everything a training step reads."""

    F: torch.Tensor  # (U, T, d) frozen LSTM outputs
    mask: torch.Tensor  # (U, T) real positions
    base_S: torch.Tensor  # (U, T, K) base logits of the user's shortlist
    y_pos: torch.Tensor  # (U, T) target's index in the shortlist, -1 outside it
    base_y: torch.Tensor  # (U, T) base logit of the target
    E_y: torch.Tensor  # (U, T, d) target's output embedding (for targets outside the shortlist)
    tail: torch.Tensor  # (U, T) log of the base's probability mass outside the shortlist (times Z)
    tail_mean: torch.Tensor  # (U, T, d) the tail's probability-weighted mean output embedding
    logZ: torch.Tensor  # (U, T) the base's exact log-partition

    def take(self, idx: torch.Tensor, valid: torch.Tensor) -> "Positions":
        """The positions idx (U, M) of each user; `valid` (U, M) marks real ones."""
        g2 = lambda x: x.gather(1, idx)  # noqa: E731
        g3 = lambda x: x.gather(1, idx[..., None].expand(-1, -1, x.shape[2]))  # noqa: E731
        return Positions(g3(self.F), g2(self.mask) & valid, g3(self.base_S), g2(self.y_pos), g2(self.base_y),
                         g3(self.E_y), g2(self.tail), g3(self.tail_mean), g2(self.logZ))


def _positions(base: KeyboardLM, F: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor, S: torch.Tensor | None,
               cfg: PersonalConfig) -> tuple[Positions, torch.Tensor]:
    """Base statistics of padded positions: one exact full-vocabulary pass, then the shortlist's logits.

    With S None the shortlist is chosen here (from train positions); returns (positions, shortlist).
    """
    E, ob = base.embed.weight.detach(), base.out_bias.detach()
    V, d = E.shape
    U, T = Y.shape
    flat_f, flat_y = F[mask], Y[mask]
    logZ, tgt, mu, top = [], [], [], []
    with torch.inference_mode():
        # chunks of 256 positions keep each (chunk x vocab) block in cache through its five passes: this
        # machine's memory bandwidth, not its arithmetic, set the pace at 4,096 (1.2 s vs 0.8 s per 16k positions)
        for s in range(0, len(flat_f), CHUNK):
            lg = torch.addmm(ob, flat_f[s:s + CHUNK], E.t())
            tgt.append(lg.gather(1, flat_y[s:s + CHUNK, None])[:, 0])
            if S is None:  # the validation pass reuses the train pass's shortlist
                top.append(lg.topk(TOPK_CANDIDATES, -1).indices)
            # one exp pass gives both the log-partition and the softmax (logsumexp + softmax took two)
            m = lg.amax(-1, keepdim=True)
            P = lg.sub_(m).exp_()
            Z = P.sum(-1, keepdim=True)
            logZ.append((m + Z.log())[:, 0])
            mu.append((P @ E) / Z)

    def scatter(xs: list[torch.Tensor], shape: tuple, dtype=torch.float32) -> torch.Tensor:
        out = torch.zeros(U, T, *shape, dtype=dtype)
        if xs:
            out[mask] = torch.cat(xs).to(dtype)
        return out

    logZ_t, base_y, mu_t = scatter(logZ, ()), scatter(tgt, ()), scatter(mu, (d,))
    if S is None:
        S = _shortlists(Y, mask, scatter(top, (TOPK_CANDIDATES,), torch.long), ob, min(cfg.shortlist, V))
    ES = E[S]
    base_S = torch.baddbmm(ob[S][:, None, :], F, ES.transpose(1, 2))
    lookup = torch.full((U, V), -1, dtype=torch.long)
    lookup.scatter_(1, S, torch.arange(S.shape[1]).expand(U, -1).contiguous())
    y_pos = lookup.gather(1, Y)
    # the tail: what lies outside the shortlist, as one log-mass and one mean embedding per position
    mass_S = torch.exp(torch.logsumexp(base_S, -1).double() - logZ_t.double()).clamp(max=1.0)
    tail_p = (1.0 - mass_S).clamp(min=1e-9)
    tail = (logZ_t.double() + torch.log(tail_p)).float()
    p_S = torch.exp(base_S - logZ_t[..., None])
    tail_mean = (mu_t - torch.bmm(p_S, ES)) / tail_p.float()[..., None]
    # a mean of embeddings is no longer than the longest one; beyond that (a tail of almost no mass)
    # it is rounding noise divided by ~0, and a negligible tail needs no first-order term at all
    longest = E.norm(dim=1).max()
    tail_mean = tail_mean * (longest / tail_mean.norm(dim=-1, keepdim=True).clamp(min=longest)) * (tail_p > 1e-4)[..., None]
    return Positions(F, mask, base_S, y_pos, base_y, E[Y], tail, tail_mean, logZ_t), S


def _shortlists(Y: torch.Tensor, mask: torch.Tensor, top: torch.Tensor, ob: torch.Tensor, K: int) -> torch.Tensor:
    """Per user: own train pieces by count, then the base's most frequent top candidates, then by output bias."""
    filler = torch.argsort(-ob).tolist()
    out = []
    for u in range(Y.shape[0]):
        ids: list[int] = []
        seen: set[int] = set()
        for pool in (Y[u][mask[u]].numpy(), top[u][mask[u]].reshape(-1).numpy()):
            vals, cnt = np.unique(pool, return_counts=True)
            for v in vals[np.lexsort((vals, -cnt))].tolist():
                if len(ids) < K and v not in seen:
                    ids.append(v); seen.add(v)
        for v in filler:
            if len(ids) >= K:
                break
            if v not in seen:
                ids.append(v); seen.add(v)
        out.append(ids)
    return torch.tensor(out, dtype=torch.long)


def _padded(users: list[UserData], feats: list[torch.Tensor], which: str, d: int):
    """(F, Y, mask) of each user's `which` ("train" or "val") messages, padded over users."""
    per = [getattr(u, which) for u in users]
    T = max([sum(len(s) - 1 for s in ss) for ss in per] + [1])
    F = torch.zeros(len(users), T, d)
    Y = torch.zeros(len(users), T, dtype=torch.long)
    mask = torch.zeros(len(users), T, dtype=torch.bool)
    it = iter(feats)
    for ui, ss in enumerate(per):
        t = 0
        for s in ss:
            n = len(s) - 1
            F[ui, t:t + n] = next(it)
            Y[ui, t:t + n] = torch.tensor(s[1:])
            mask[ui, t:t + n] = True
            t += n
    return F, Y, mask


def step_nll(pos: Positions, ES: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ub: torch.Tensor,
             weight: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Per-position NLL (U, T) of the adapted model (exact over the shortlist, first-order tail).

    With `weight` (U, T), also the gradients of sum(weight * nll) w.r.t. A, B and ub and the weighted
    expected count of each shortlist piece, written out by hand: autograd would keep several
    (users x positions x shortlist) tensors alive, this keeps one.
    """
    a = torch.bmm(pos.F, A)  # (U, T, r)
    W = torch.bmm(B, ES.transpose(1, 2))  # (U, r, K): the adapter's effect on shortlist logits
    logits = torch.baddbmm(pos.base_S + ub[:, None, :], a, W)
    g = torch.bmm(a, B)  # (U, T, d): the change of the LSTM output
    tail = pos.tail + (g * pos.tail_mean).sum(-1)
    in_S = pos.y_pos >= 0
    tgt = torch.where(in_S, logits.gather(2, pos.y_pos.clamp(min=0)[..., None])[..., 0],
                      pos.base_y + (g * pos.E_y).sum(-1))
    shift = torch.maximum(logits.amax(-1), tail)
    P = logits.sub_(shift[..., None]).exp_()  # reuses the logits' memory
    Pt = torch.exp(tail - shift)
    Z = P.sum(-1) + Pt
    nll = (shift + torch.log(Z) - tgt) * pos.mask
    if weight is None:
        return nll, None
    w = weight * pos.mask
    G = P.mul_((w / Z)[..., None])  # d loss / d shortlist logits, before the target's -1
    expected = G.sum(1)  # weighted expected count of each shortlist piece: the bias's curvature
    G.scatter_add_(2, pos.y_pos.clamp(min=0)[..., None], -(w * in_S)[..., None])
    Gg = (w * Pt / Z)[..., None] * pos.tail_mean - (w * ~in_S)[..., None] * pos.E_y  # d loss / d g
    d_ub = G.sum(1)
    d_a = torch.bmm(G, W.transpose(1, 2)) + torch.bmm(Gg, B.transpose(1, 2))
    d_B = torch.bmm(torch.bmm(a.transpose(1, 2), G), ES) + torch.bmm(a.transpose(1, 2), Gg)
    d_A = torch.bmm(pos.F.transpose(1, 2), d_a)
    return nll, (d_A, d_B, d_ub, expected)


def _exact_val(base: KeyboardLM, F: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor, A: torch.Tensor,
               B: torch.Tensor, ub_full: torch.Tensor, starts: torch.Tensor | None,
               cont: torch.Tensor | None = None, caches: list[PhraseCache | None] | None = None,
               hists: list[tuple[np.ndarray, np.ndarray]] | None = None,
               sentinel: Sentinel | None = None) -> dict[str, torch.Tensor]:
    """Exact full-vocabulary validation figures per user: mean piece NLL of the adapted model, and top-1
    piece accuracy at word starts (where the keyboard predicts the next word) of the global and adapted model;
    with `caches` (and each user's validation (histories, message numbers) `hists`), also of the global model
    mixed with the user's cache."""
    E, ob = base.embed.weight.detach(), base.out_bias.detach()
    U = len(F)
    out = {k: torch.zeros(U) for k in ("nll", "top1_global", "top1_personal", "n_words", "nll_cache",
                                       "top1_cache")}
    with torch.inference_mode():
        Fp = F + torch.bmm(torch.bmm(F, A), B)
        for ui in range(U):
            m = mask[ui]
            if not m.any():
                continue
            y = Y[ui][m]
            lg0 = F[ui][m] @ E.t() + ob
            lg = Fp[ui][m] @ E.t() + ob + ub_full[ui]
            out["nll"][ui] = (torch.logsumexp(lg, -1) - lg.gather(1, y[:, None])[:, 0]).mean()
            w = starts[y] if starts is not None else torch.ones_like(y, dtype=torch.bool)
            if cont is not None:
                # only one-piece words: a right first piece of a longer word is not yet a right suggestion,
                # and lifting such pieces can cost the common one-piece words the keyboard shows most
                w = w & ~cont[torch.roll(y, -1)]
            out["n_words"][ui] = w.sum()
            out["top1_global"][ui] = ((lg0.argmax(-1) == y) & w).sum()
            out["top1_personal"][ui] = ((lg.argmax(-1) == y) & w).sum()
            if caches is not None and caches[ui] is not None:
                lp0 = torch.log_softmax(lg0, -1)
                hist, before = hists[ui]
                mixed = torch.from_numpy(mix_logp(lp0.numpy(), [caches[ui]] * len(y), hist, before, sentinel,
                                                  F[ui][m].numpy()))
                out["nll_cache"][ui] = -mixed.gather(1, y[:, None]).mean()
                out["top1_cache"][ui] = ((mixed.argmax(-1) == y) & w).sum()
    return out


def gate_cache(u: UserData, cfg: PersonalConfig, judged: list[list[int]] | None = None) -> PhraseCache:
    """The user's cache as of their validation slice: their earlier messages, then (cache_learn) each message
    judged (the latest of the slice; default u.val) learned once sent."""
    judged = u.val if judged is None else judged
    # learning, the device also has the validation messages older than the ones judged
    before = len(u.history) - (len(judged) if cfg.cache_learn else u.n_val_messages)
    cache = PhraseCache.build(u.history[:before], cfg.cache_order, cfg.cache_lam, cfg.cache_m0, cfg.cache_max_pieces)
    return ReplayCache.replay(cache, judged) if cfg.cache_learn else cache


def train_group(base: KeyboardLM, users: list[UserData], cfg: PersonalConfig,
                starts: torch.Tensor | None = None, cont: torch.Tensor | None = None,
                sentinel: Sentinel | None = None) -> list[UserResult]:
    """Train the adapters of one group of users together; keep each user's best validation check; gate."""
    U, d, V = len(users), base.cfg.embed_dim, base.vocab_size
    feats = base_features(base, [s for u in users for s in u.train] + [s for u in users for s in u.val])
    n_train_msgs = sum(len(u.train) for u in users)
    Ftr, Ytr, Mtr = _padded(users, feats[:n_train_msgs], "train", d)
    Fva, Yva, Mva = _padded(users, feats[n_train_msgs:], "val", d)
    tr, S = _positions(base, Ftr, Ytr, Mtr, None, cfg)
    va, _ = _positions(base, Fva, Yva, Mva, S, cfg)
    ES = base.embed.weight.detach()[S]
    n_tr, n_va = Mtr.sum(1), Mva.sum(1)

    rank = 0 if cfg.mode == "bias" else cfg.rank
    A = torch.stack([init_adapter(u.user, cfg.seed, d, rank) for u in users])
    B = torch.zeros(U, rank, d)
    ub = torch.zeros(U, S.shape[1])
    opt = torch.optim.Adam([A, B], lr=cfg.lr) if rank else None
    best = [A.clone(), B.clone(), ub.clone()]
    best_val = torch.full((U,), float("inf"))
    best_step = torch.zeros(U, dtype=torch.long)
    gen = torch.Generator().manual_seed(user_seed(users[0].user, cfg.seed))
    M = min(cfg.batch_tokens, Ftr.shape[1])
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.inference_mode():
                val = step_nll(va, ES, A, B, ub)[0].sum(1) / n_va.clamp(min=1)
            better = val < best_val
            best_val = torch.where(better, val, best_val)
            best_step[better] = step
            for b, p in zip(best, (A, B, ub)):
                b[better] = p[better]
        if step == cfg.steps:
            break
        # each user's minibatch: all their positions, or M sampled from them
        idx = torch.argsort(torch.rand(U, Ftr.shape[1], generator=gen) + (~Mtr).float(), dim=1)[:, :M]
        batch = tr.take(idx, torch.ones_like(idx, dtype=torch.bool))
        m_eff = batch.mask.sum(1).clamp(min=1)
        # MAP per user: mean train NLL plus a Gaussian prior worth `prior` pseudo-tokens of that user
        _, (d_A, d_B, d_ub, expected) = step_nll(batch, ES, A, B, ub, weight=(1.0 / m_eff)[:, None].expand(-1, M))
        # the bias by damped diagonal Newton on the MAP objective (sums over the user's train pieces):
        # its curvature is the expected count, so a piece the user types far more than the base
        # expects moves fast and an irrelevant one barely moves (Adam would move all K alike).
        # Prior: exp(bias) ~ Gamma(k, k), i.e. bias -> log((count + k) / (expected + k)): a piece never
        # typed goes down only when the base expected it several times, unlike a Gaussian prior
        k, n = cfg.prior_bias, n_tr.clamp(min=1)[:, None]
        grad = n * d_ub + k * (ub.exp() - 1)
        curv = n * expected + k * ub.exp()
        ub -= (cfg.bias_lr * grad / curv).clamp_(-MAX_BIAS_STEP, MAX_BIAS_STEP)
        if opt is not None:
            A.grad = d_A
            B.grad = d_B + 2 * cfg.prior_adapter * B / n_tr.clamp(min=1)[:, None, None]
            opt.step()

    A_b, B_b, ub_b = best
    # the spelling preference is fixed (not trained): it joins the trained bias, and is also a candidate alone
    sp = torch.zeros(U, V)
    for ui, u in enumerate(users):
        for piece, v in u.spelling.items():
            sp[ui, piece] = v
    ub_full = torch.zeros(U, V).scatter_(1, S, ub_b) + sp
    val_g = ((va.logZ - va.base_y) * Mva).sum(1) / n_va.clamp(min=1)
    # the phrase cache is judged as the user would get it on their validation slice: built from the
    # messages before it (the kept cache is built from all train messages),
    # messages before it, learning each validation message once sent when the runtime would (cache_learn)
    gate_caches = [gate_cache(u, cfg) if cfg.cache_order > 1 and u.val else None for u in users]
    rows_of = [[(b, t) for b, s in enumerate(u.val) for t in range(len(s) - 1)] for u in users]
    hists = [(histories(u.val, rows, cfg.cache_order - 1), np.array([b for b, _ in rows], dtype=np.int64))
             for u, rows in zip(users, rows_of)] if cfg.cache_order > 1 else None
    ex = _exact_val(base, Fva, Yva, Mva, A_b, B_b, ub_full, starts, cont, gate_caches, hists, sentinel)
    has_sp = torch.tensor([bool(u.spelling) for u in users])
    ex_sp = _exact_val(base, Fva[has_sp], Yva[has_sp], Mva[has_sp], torch.zeros_like(A_b[has_sp]),
                       torch.zeros_like(B_b[has_sp]), sp[has_sp], starts, cont) if has_sp.any() else None
    sp_row = (torch.cumsum(has_sp, 0) - 1).tolist()
    out = []
    for ui, u in enumerate(users):
        nv = int(n_va[ui])
        r = UserResult(u.user, u.region, A_b[ui].numpy().copy(), B_b[ui].numpy().copy(), ub_full[ui].numpy().copy(),
                       u.train_tokens, nv, float(val_g[ui]) if nv else None, float(ex["nll"][ui]) if nv else None,
                       int(best_step[ui]), False, "",
                       {"val_words": int(ex["n_words"][ui]), "val_top1_global": int(ex["top1_global"][ui]),
                        "val_top1_personal": int(ex["top1_personal"][ui]), "spelling_pieces": len(u.spelling), "respell": dict(u.respell),
                        "text_tokens": u.text_tokens})
        if ex_sp is not None and has_sp[ui] and nv:
            r.extra["val_spelling"] = float(ex_sp["nll"][sp_row[ui]])
            r.extra["val_top1_spelling"] = int(ex_sp["top1_personal"][sp_row[ui]])
        if gate_caches is not None and gate_caches[ui] is not None and nv:
            r.extra.update({"val_nll_cache": float(ex["nll_cache"][ui]), "val_top1_cache": int(ex["top1_cache"][ui])})
        if cfg.cache_order > 1:
            keep, r.extra["cache_reason"] = decide_cache(r, cfg)
            if keep:
                r.cache = PhraseCache.build(u.history, cfg.cache_order, cfg.cache_lam, cfg.cache_m0, cfg.cache_max_pieces)
        r.use_adapter, r.reason = decide(r, cfg)
        if not r.use_adapter and spelling_only_ok(r, cfg):
            # the trained adapter did not help, but the user's own spelling still should not be overruled
            r.A, r.B, r.user_bias = np.zeros_like(r.A), np.zeros_like(r.B), sp[ui].numpy().copy()
            r.use_adapter, r.reason = True, f"spelling preference only ({r.reason})"
        out.append(r)
    return out


def train_adapters(base: KeyboardLM, users: list[UserData], cfg: PersonalConfig, starts: torch.Tensor | None = None,
                   cont: torch.Tensor | None = None, progress: Callable[[int, int], None] | None = None,
                   sentinel: Sentinel | None = None) -> list[UserResult]:
    """Adapters and gate decisions for every user, group by group (results in the input order).

    `starts` (vocab,) marks pieces that begin a word; the gate compares top-1 accuracy there (with `cont`,
    the pieces that continue a word, only where the word is one piece). A `sentinel` checks each cache's changes
    on the validation slice as it will on the device.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base.eval()
    by_user: dict[str, UserResult] = {}
    done = 0
    for grp in pack_groups(users, cfg.group_tokens):
        for r in train_group(base, grp, cfg, starts, cont, sentinel):
            by_user[r.user] = r
        done += len(grp)
        if progress:
            progress(done, len(users))
    return [by_user[u.user] for u in users]
