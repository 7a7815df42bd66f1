"""The personalization stage: per-user adapters on a run's global model, the gate, and the before/after report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedkey import config as C
from fedkey.errors import FedkeyError
from fedkey.io import read_json, write_json
from fedkey.progress import bar
from fedkey.stages import is_done, mark_done, stage_key
from personalization.config import PersonalConfig
from personalization.store import (GAINS_PNG, GATE, PERSONAL, REPORT, SENTINEL, base_id, default_base, read_gate,
                                   save_results)

TRAIN_SPLIT = {"train": "train", "heldout": "heldout_train"}
TEST_SPLIT = {"train": "test", "heldout": "heldout_test"}


def _users(shards, users: list[str] | None, max_users: int) -> list[str]:
    """The users to personalize: the named ones (training or held-out users), else every training user."""
    if not users:
        out = shards.users("train")
        return out[:max_users] if max_users else out
    known = set(shards.all_users())
    for u in users:
        if u not in known:
            raise FedkeyError(f"unknown user {u!r} in {shards.data_dir}: pick an id from "
                              f"{shards.data_dir / 'users.json'}")
        if shards.role(u) not in TRAIN_SPLIT:
            raise FedkeyError(f"user {u!r} is a public user (their text trained the tokenizer); pick a training "
                              "or held-out user")
    return list(users)


def _messages(shards, users: list[str]):
    """Each user's test messages (held-out users: their held-out test part) as evaluate() Messages."""
    from keyboard.evaluate import Message

    return [Message(u, shards.region(u), t) for u in users for t in shards.user_texts(TEST_SPLIT[shards.role(u)], u)]


def _sent(tok, msgs, users, max_len: int) -> dict[str, list[list[int]]]:
    """The framed messages of `users` among msgs, in order: what their phrase caches learn as they are sent."""
    from keyboard.batches import frame

    keep = [m for m in msgs if m.user in users]
    out: dict[str, list[list[int]]] = {u: [] for u in users}
    for m, ids in zip(keep, tok.encode_batch([m.text for m in keep])):
        out[m.user].append(frame(ids, max_len))
    return out


def _train_words(shards, users: list[str]) -> dict[str, set[str]]:
    from keyboard.words import WORD_RE, normalize

    return {u: {w for t in shards.user_texts(TRAIN_SPLIT[shards.role(u)], u) for w in WORD_RE.findall(normalize(t))}
            for u in users}


def _train_pieces(shards, tok, users: list[str], max_len: int) -> dict[str, int]:
    """Each user's framed train-split pieces, the validation slice included (as personalization.data frames them)."""
    from keyboard.batches import frame

    texts = [shards.user_texts(TRAIN_SPLIT[shards.role(u)], u) for u in users]
    flat = iter(tok.encode_batch([t for ts in texts for t in ts]))
    return {u: sum(len(frame(next(flat), max_len)) - 1 for _ in ts) for u, ts in zip(users, texts)}


def _gains_title(rep: dict[str, Any]) -> str:
    """The title of a report's histogram of per-user gains."""
    return f"per-user top-1 gain, {len(rep['top1_gain_per_user'])} users (gate kept {rep['gated_in']} adapters)"


def _sentinel(run_dir: Path, base, bid: str, data: list, pcfg: PersonalConfig, starts, cont, refit: bool,
              progress: bool) -> tuple[Any, dict]:
    """The cache's sentinel: fitted on every user's validation slice when all users are personalized (`refit`),
    else the run's saved one for this base model, if any."""
    from keyboard.sentinel import load_sentinel, save_sentinel
    from personalization.sentinel_fit import fit_sentinel

    path = run_dir / PERSONAL / SENTINEL
    if pcfg.cache_sentinel <= 0 or pcfg.cache_order < 2:
        if refit and path.exists():
            path.unlink()  # an earlier run's sentinel must not reach devices through `fedkey export`
        return None, {"used": False}
    if not refit:
        if not path.exists():
            return None, {"used": False, "why": f"no {path}: run `fedkey personalize --all` first"}
        return load_sentinel(path, bid), {"used": True, "file": str(path)}
    with bar(progress, f"fitting the cache sentinel on {len(data):,} validation slices", len(data),
             unit="users") as update:
        s, info = fit_sentinel(base, data, pcfg, starts.numpy(), cont.numpy(), progress=lambda d, n: update(d, ""))
    if s is None:
        if path.exists():
            path.unlink()  # a sentinel of another fit must not judge these caches
        return None, {"used": False, **info}
    return s, {"used": True, "file": str(path), "bytes": save_sentinel(path, s, bid), **info}


def personal_stage(run_dir: Path, model_dir: Path | None, pcfg: PersonalConfig, ecfg: C.EvalConfig,
                   users: list[str] | None = None, progress: bool = True, json_path: Path | None = None,
                   with_eval: bool = True) -> dict[str, Any]:
    """Personalize users on the base model, write adapters + gate.json, and compare with the global model.

    With `users` None every training user is personalized and the result is cached (skipped when
    nothing changed); named users are (re)personalized and merged into gate.json.
    """
    from data.british import REGIONAL_PAIRS
    from fedkey.pipeline import load_prepared
    from keyboard.adapter_file import AdapterArrays
    from keyboard.checkpoint import load_model
    from keyboard.words import PieceTable
    from personalization.batched import train_adapters
    from personalization.data import load_users
    from personalization.evaluate import AdapterBank, evaluate_users, regional_accuracy
    from personalization.report import count_changes, histogram, top1_gains
    from personalization.spelling import attach_spelling

    if pcfg.mode not in ("adapter", "bias"):
        raise FedkeyError(f"--mode {pcfg.mode}: whole-model fine-tuning makes no adapter files; compare it with "
                          "`fedkey bench personal_modes`")
    model_dir = Path(model_dir) if model_dir else default_base(run_dir)
    bid = base_id(model_dir)
    shards, prepared_tok = load_prepared(run_dir)
    names = _users(shards, users, pcfg.max_users)
    out_dir = run_dir / PERSONAL
    cfgd = {"personal": C.to_dict(pcfg), "eval": C.to_dict(ecfg) if with_eval else None}
    key = stage_key(cfgd, {"base": bid, "shards": shards.manifest.get("source_hash", "")})
    if users is None and is_done(out_dir, key, [REPORT]):
        rep = read_json(out_dir / REPORT)
        if rep.get("top1_gain_per_user"):
            # a pure function of the stored gains: a report cached by older code still gets today's figures
            if "text_of" not in rep:
                # a report of older code learns its users' amounts of text, and its plot shows the gain by them
                rep["text_of"] = _train_pieces(shards, prepared_tok, list(rep["region_of"]), pcfg.max_len)
                # the plot first: killed in between, the report still lacks text_of and both are redone next time
                histogram(rep["top1_gain_per_user"], rep["region_of"], out_dir / GAINS_PNG,
                          _gains_title(rep), rep["text_of"])
                write_json(out_dir / REPORT, rep)
            rep["changes"] = count_changes(rep["top1_gain_per_user"], rep["region_of"], rep["text_of"])
        # reports before use_cache was recorded: the gate's own file says which users keep a cache
        rep.setdefault("use_cache", {u: bool(e.get("use_cache")) for u, e in read_gate(run_dir).items()})
        if json_path:
            write_json(json_path, rep)
        return {**rep, "skipped": True}

    if pcfg.threads:
        torch.set_num_threads(pcfg.threads)
    torch.manual_seed(pcfg.seed)
    base, tok, _ = load_model(model_dir)
    table = PieceTable.from_tokenizer(tok)
    starts = torch.zeros(tok.vocab_size, dtype=torch.bool)
    starts[torch.from_numpy(table.start_space)] = True
    cont = torch.zeros(tok.vocab_size, dtype=torch.bool)
    cont[torch.from_numpy(table.cont)] = True

    t0 = time.perf_counter()
    data = []
    for role in ("train", "heldout"):
        group = [u for u in names if shards.role(u) == role]
        if group:
            data += load_users(shards, tok, group, pcfg.val_frac, pcfg.max_len, pcfg.max_train_tokens,
                               pcfg.max_val_tokens, split=TRAIN_SPLIT[role])
    attach_spelling(data, tok, base.out_bias.detach().numpy(), REGIONAL_PAIRS, pcfg)
    sentinel, sentinel_info = _sentinel(run_dir, base, bid, data, pcfg, starts, cont, refit=users is None,
                                        progress=progress)
    with bar(progress, f"personalizing {len(data):,} users", len(data), unit="users") as update:
        results = train_adapters(base, data, pcfg, starts, cont, progress=lambda d, n: update(d, ""),
                                 sentinel=sentinel)
    sizes = save_results(run_dir, results, bid, model_dir)
    t_train = time.perf_counter() - t0

    rep: dict[str, Any] = {
        "base_model": str(model_dir), "base_id": bid, "users": len(results),
        "gated_in": sum(r.use_adapter for r in results),
        "caches_kept": sum(r.cache is not None for r in results),
        "adapter_bytes_mean": sum(sizes.values()) / len(sizes) if sizes else None,
        "adapter_bytes_max": max(sizes.values()) if sizes else None,
        "cache_bytes_mean": (sum(r.extra["cache_bytes"] for r in results if r.cache) / max(1, sum(bool(r.cache) for r in results))),
        "cache_bytes_max": max([r.extra["cache_bytes"] for r in results if r.cache] + [0]),
        "use_adapter": {r.user: r.use_adapter for r in results},
        "use_cache": {r.user: r.cache is not None for r in results},
        "region_of": {r.user: r.region for r in results},
        # every framed train message, the validation slice included: what the user's device holds
        "text_of": {d.user: d.text_tokens for d in data},
        "gated_in_by_region": {reg: sum(r.use_adapter for r in results if r.region == reg)
                               for reg in sorted({r.region for r in results})},
        "sentinel": sentinel_info,
        "config": cfgd, "seconds": {"personalize": t_train, "evaluate": 0.0},
    }
    if with_eval:
        t1 = time.perf_counter()
        msgs = _messages(shards, names)
        if not msgs:
            raise FedkeyError(f"{run_dir}: the chosen users have no test messages to compare on")
        cached = {r.user for r in results if r.cache}
        bank = AdapterBank(base, {r.user: AdapterArrays(r.A, r.B, r.user_bias, bid, r.user, {})
                                  for r in results if r.use_adapter}, {r.user: r.cache for r in results if r.cache},
                           {r.user: r.extra.get("respell", {}) for r in results},
                           _sent(tok, msgs, cached, pcfg.max_len) if pcfg.cache_learn else None, sentinel)
        train_words = _train_words(shards, names)
        banks = [AdapterBank(base, {}), bank]
        with bar(progress, "evaluating global vs personalized", len(msgs), unit="msg") as update:
            glob, pers = evaluate_users(base, banks, tok, msgs, ecfg, REGIONAL_PAIRS, train_words,
                                        progress=lambda d, n: update(d, ""))
        # extra, clearly separate figures: the same positions once the variants' shared prefix is typed, and
        # at the first keystroke where the keyboard offers either variant
        (reg_g, reg_p), (pre_g, pre_p), (off_g, off_p) = regional_accuracy(
            base, banks, tok, msgs, ecfg, REGIONAL_PAIRS, train_words, typed_prefix=True)
        gains = top1_gains(glob, pers)
        ch = count_changes(gains, rep["region_of"], rep["text_of"])
        rep.update({"global": glob, "personalized": pers, "improved": ch["improved"], "hurt": ch["hurt"],
                    "unchanged": ch["unchanged"], "changes": ch, "split": "test",
                    "regional_all_positions": {"global": reg_g, "personalized": reg_p},
                    "regional_after_shared_prefix": {"global": pre_g, "personalized": pre_p},
                    "regional_as_typed": {"global": off_g, "personalized": off_p},
                    # where the own variant stood at each regional word, by region and pair (apart: the three
                    # tables above hold only accuracies)
                    "regional_outcomes": {form: {m: t.pop("outcomes_by_pair") for m, t in (("global", g), ("personalized", p))}
                                          for form, g, p in (("nothing_typed", reg_g, reg_p),
                                                             ("shared_prefix_typed", pre_g, pre_p),
                                                             ("first_offer_as_typed", off_g, off_p))},
                    "top1_gain_per_user": gains})
        rep["seconds"]["evaluate"] = time.perf_counter() - t1
        if gains:
            histogram(gains, rep["region_of"], out_dir / GAINS_PNG, _gains_title(rep), rep["text_of"])
            rep["histogram"] = str(out_dir / GAINS_PNG)
    if users is None:
        write_json(out_dir / REPORT, rep)
        mark_done(out_dir, key, cfgd, {"base": bid})
    if json_path:
        write_json(json_path, rep)
    return {**rep, "skipped": False}


def evaluate_user_stage(run_dir: Path, model_dir: Path | None, user: str, ecfg: C.EvalConfig, progress: bool = True,
                        json_path: Path | None = None) -> dict[str, Any]:
    """`fedkey evaluate --user`: the user's own model (adapter if their gate chose it) on their test messages."""
    from data.british import REGIONAL_PAIRS
    from fedkey.pipeline import load_prepared
    from keyboard.evaluate import evaluate
    from keyboard.phrase_cache import load_cache
    from keyboard.sentinel import load_sentinel
    from personalization.evaluate import AdapterBank, evaluate_users
    from personalization.model import PersonalizedLM
    from personalization.store import cache_path, gate_respelling, load_personalized

    shards, _ = load_prepared(run_dir)
    _users(shards, [user], 0)
    model, tok, info = load_personalized(run_dir, model_dir, user)
    msgs = _messages(shards, [user])
    if not msgs:
        raise FedkeyError(f"user {user!r} has no test messages in {shards.data_dir}")
    entry = read_gate(run_dir).get(user, {})
    respelling = gate_respelling(entry, str(run_dir / PERSONAL / GATE))
    info.update(phrase_cache=bool(entry.get("use_cache")), respell=len(respelling))
    t0 = time.perf_counter()
    with bar(progress, f"evaluating user {user}", len(msgs), unit="msg") as update:
        if entry.get("use_cache") or respelling:
            # the phrase cache and whole-word respelling live outside the torch model: the multi-user path applies them
            base = model.base if isinstance(model, PersonalizedLM) else model
            ads = {user: model.to_arrays("", user)} if isinstance(model, PersonalizedLM) else {}
            caches = {user: load_cache(cache_path(run_dir, user), base_id(Path(info["base_model"])))} \
                if entry.get("use_cache") else {}
            # the cache learns each test message once sent, as the runtime's learn() does
            spath = run_dir / PERSONAL / SENTINEL
            sentinel = load_sentinel(spath, base_id(Path(info["base_model"]))) if caches and spath.exists() else None
            bank = AdapterBank(base, ads, caches, {user: respelling},
                               _sent(tok, msgs, set(caches), PersonalConfig().max_len), sentinel)
            res = evaluate_users(base, [bank], tok, msgs, ecfg, REGIONAL_PAIRS, _train_words(shards, [user]),
                                 progress=lambda d, n: update(d, ""))[0]
        else:
            res = evaluate(model, tok, msgs, ecfg, REGIONAL_PAIRS, _train_words(shards, [user]),
                           progress=lambda d, n: update(d, ""))
    res.update({"seconds": time.perf_counter() - t0, "split": TEST_SPLIT[shards.role(user)], "user": user, **info})
    if json_path:
        write_json(json_path, res)
    return res
