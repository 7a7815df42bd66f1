"""The stages of a run, each reading and writing under one run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedkey import config as C
from fedkey.errors import FedkeyError
from fedkey.io import read_json, write_json
from fedkey.progress import bar
from fedkey.stages import file_hash, is_done, mark_done, stage_key

if TYPE_CHECKING:
    from data.shards import Shards
    from keyboard.model import KeyboardLM
    from keyboard.tokenizer import Tokenizer

DATA, TOKENIZER, CENTRAL = "data", "tokenizer", "central"
PRETRAIN = "pretrain"


def prepare_stage(run_dir: Path, cfg: C.PrepareConfig, progress: bool = True) -> dict[str, Any]:
    """Shards (data/prepare) and the tokenizer trained on public users' train text."""
    from data.prepare import prepare, stats_rows
    from data.shards import Shards
    from keyboard.tokenizer import Tokenizer, train_tokenizer

    res = prepare(cfg, run_dir / DATA, progress=progress)
    shards = Shards.load(run_dir / DATA)
    tok_dir = run_dir / TOKENIZER
    tok_cfg = {"vocab_size": cfg.vocab_size, "seed": cfg.seed}
    key = stage_key(tok_cfg, {"shards": shards.manifest.get("content_hash", res.source_hash), "prepare": C.to_dict(cfg)})
    if not is_done(tok_dir, key, ["tokenizer.model"]):
        with bar(progress, "training tokenizer on public users", None):
            tok = train_tokenizer(shards.dataset("public_train")["text"], cfg.vocab_size, cfg.seed)
        tok.save(tok_dir / "tokenizer.model")
        mark_done(tok_dir, key, tok_cfg, {"shards": res.source_hash}, sha256=tok.sha256)
    tok = Tokenizer.load(tok_dir / "tokenizer.model")
    rows = stats_rows(res)
    tokens = _token_counts(shards, tok)
    for r in rows:
        r["tokens"] = tokens.get((r["split"], r["region"]))
    out = {"rows": rows, "skips": res.skips, "skipped": res.skipped, "seconds": res.seconds, "tokenizer_sha256": tok.sha256}
    write_json(run_dir / "data_stats.json", out)  # read by the report
    return out


def _token_counts(shards, tok) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for split in shards.SPLITS:
        ds = shards.dataset(split)
        if len(ds) == 0:
            continue
        lens = [len(x) + 1 for x in tok.encode_batch(ds["text"])]  # + end of message
        for region, n in zip(ds["region"], lens):
            out[(split, region)] = out.get((split, region), 0) + n
        out[(split, "all")] = sum(lens)
    return out


def load_prepared(run_dir: Path) -> tuple[Shards, Tokenizer]:
    """Shards and tokenizer of a prepared run, or a one-line error saying to prepare first."""
    from data.shards import Shards
    from keyboard.tokenizer import Tokenizer

    if not (run_dir / DATA).exists():
        raise FedkeyError(f"{run_dir / DATA}: no prepared data; run `fedkey prepare --run-dir {run_dir}` first")
    return Shards.load(run_dir / DATA), Tokenizer.load(run_dir / TOKENIZER / "tokenizer.model")


def encode_split(shards: Shards, tok: Tokenizer, split: str, max_len: int) -> list[list[int]]:
    """Framed piece ids (BOS ... EOS) of every message in a split."""
    from keyboard.batches import frame

    return [frame(ids, max_len) for ids in tok.encode_batch(shards.dataset(split)["text"])]


def public_seqs(shards: Shards, tok: Tokenizer, max_len: int) -> list[list[int]]:
    """Framed messages of the public (tokenizer) users, [] when a run has none."""
    return encode_split(shards, tok, "public_train", max_len) if shards.users("public_train") else []


def public_start(run_dir: Path, mcfg: C.ModelConfig, shards: Shards, tok: Tokenizer, epochs: float, seed: int,
                 max_len: int, threads: int = 0, progress: bool = False) -> tuple[KeyboardLM, dict[str, Any] | None]:
    """The starting model of a training stage: built from `seed` with the public users' unigram output bias, then
    trained on `epochs` passes over their text (no training user's text either way); and that training's result.

    Gboard's federated models start from a server-pretrained one, and the centralized baseline may start
    from the same model so the two are compared from one start. The pretraining lives in
    run_dir/pretrain/<key>/, keyed by everything that shapes it, so the stage that comes second (or a
    resumed one) loads it instead of training it again. The result is None when nothing was pretrained.
    """
    import torch

    from keyboard.model import KeyboardLM
    from keyboard.train import train_central

    torch.manual_seed(seed)
    model = KeyboardLM(tok.vocab_size, mcfg)
    pub = public_seqs(shards, tok, max_len)
    model.init_output_bias(pub)
    if not epochs or not pub:
        if epochs:  # a run prepared without public users (--public-frac 0) starts cold
            print(f"{run_dir / DATA}: no public users' text, so no pretraining (the start is random)", flush=True)
        return model, None
    tokens = int(epochs * sum(len(s) - 1 for s in pub))
    ccfg = C.CentralConfig.short(tokens, seed=seed, max_len=max_len, threads=threads)
    # threads are left out of the key: both stages share the start whatever cores each was given
    key = stage_key({"model": model.describe(), "epochs": epochs, "seed": seed, "max_len": max_len},
                    {"tokenizer": tok.sha256, "shards": shards.manifest.get("source_hash", "")})
    out_dir = run_dir / PRETRAIN / key[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    with bar(progress, "pretraining on public users", tokens, unit="tok") as update:
        result = train_central(model, pub, ccfg, out_dir, resume=True,
                               on_progress=lambda p: update(p.tokens, f"loss {p.loss:.3f}  {p.tokens_per_s:,.0f} tok/s"))
    model.train()
    write_json(out_dir / "result.json", result)
    return model, result


def central_stage(run_dir: Path, mcfg: C.ModelConfig, ccfg: C.CentralConfig, resume: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Train the centralized baseline on all training users' train splits (skipped if already done)."""
    from keyboard.checkpoint import save_model
    from keyboard.train import train_central

    shards, tok = load_prepared(run_dir)
    out = run_dir / CENTRAL
    cfgd = {"model": C.to_dict(mcfg), "central": C.to_dict(ccfg)}
    inputs = {"tokenizer": tok.sha256, "shards": shards.manifest.get("source_hash", "")}
    key = stage_key(cfgd, inputs)
    if is_done(out, key, ["model.pt"]):
        return {**read_json(out / "stage.json").get("result", {}), "skipped": True}
    C.save(out / "config.toml", mcfg, ccfg)
    seqs = encode_split(shards, tok, "train", ccfg.max_len)
    if not seqs:
        raise FedkeyError(f"{run_dir / DATA}: the train split is empty; prepare with more users or a lower --min-words")
    model, pre = public_start(run_dir, mcfg, shards, tok, ccfg.pretrain_epochs, ccfg.seed, ccfg.max_len,
                              ccfg.threads, progress)
    with bar(progress, "centralized training", ccfg.max_tokens, unit="tok") as update:
        result = train_central(model, seqs, ccfg, out, resume=resume,
                               on_progress=lambda p: update(p.tokens, f"loss {p.loss:.3f}  {p.tokens_per_s:,.0f} tok/s"))
    if pre:
        result.update(pretrain_tokens=pre["tokens"], pretrain_seconds=pre["seconds"])
    save_model(out, model, tok, config=cfgd, result=result)
    mark_done(out, key, cfgd, inputs, result=result)
    return {**result, "skipped": False}


def evaluate_stage(run_dir: Path, model_dir: Path, ecfg: C.EvalConfig, progress: bool = True,
                   json_path: Path | None = None, with_ngram: bool = True) -> dict[str, Any]:
    """Evaluate a model on a prepared split; writes eval.json beside the model (and to json_path)."""
    from data.british import REGIONAL_PAIRS
    from keyboard.checkpoint import load_model
    from keyboard.evaluate import Message, evaluate
    from keyboard.ngram import BackoffNgram
    from keyboard.words import WORD_RE, normalize

    shards, _ = load_prepared(run_dir)
    model, tok, _ = load_model(model_dir)
    if ecfg.split not in ("test", "heldout_test"):
        raise FedkeyError(f"--split {ecfg.split!r}: choose test or heldout_test")
    inputs = {"model": file_hash(model_dir / "model.pt"), "shards": shards.manifest.get("source_hash", "")}
    key = stage_key({"eval": C.to_dict(ecfg), "ngram": with_ngram}, inputs)
    out_file = model_dir / f"eval_{ecfg.split}.json"
    if is_done(model_dir / f"eval_{ecfg.split}", key, []) and out_file.exists():
        res = read_json(out_file)
    else:
        ds = shards.dataset(ecfg.split)
        msgs = [Message(u, r, t) for u, r, t in zip(ds["user"], ds["region"], ds["text"])]
        train_split = "train" if ecfg.split == "test" else "heldout_train"
        tds = shards.dataset(train_split)
        train_words: dict[str, set[str]] = {}
        for u, t in zip(tds["user"], tds["text"]):
            train_words.setdefault(u, set()).update(WORD_RE.findall(normalize(t)))
        ngram = BackoffNgram(shards.dataset("train")["text"]) if with_ngram else None
        t0 = time.perf_counter()
        with bar(progress, f"evaluating on {ecfg.split}", len(msgs), unit="msg") as update:
            res = evaluate(model, tok, msgs, ecfg, REGIONAL_PAIRS, train_words, ngram,
                           progress=lambda d, n: update(d, ""))
        res["seconds"] = time.perf_counter() - t0
        res["split"] = ecfg.split
        res["config"] = C.to_dict(ecfg)
        write_json(out_file, res)
        mark_done(model_dir / f"eval_{ecfg.split}", key, C.to_dict(ecfg), inputs)
    if json_path:
        write_json(json_path, res)
    return res
