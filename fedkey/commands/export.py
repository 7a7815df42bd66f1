"""fedkey export: the on-device bundle (fp32 + int8 ONNX, tokenizer, a few users' adapters and phrase caches) and its parity."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedkey.commands.common import add_common, add_parser
from fedkey.errors import FedkeyError
from fedkey.io import read_json, write_json
from fedkey.progress import bar
from fedkey.tables import console

PERSONAL, GATE, ADAPTERS = "personal", "gate.json", "adapters"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the subcommand."""
    p = add_parser(sub, "export", "Export the model as an on-device bundle (fp32 and int8 ONNX) and check int8 parity.")
    add_common(p, preset=False)
    p.add_argument("--model", type=Path, help="model folder (default: the model the run's adapters were trained on, "
                                              "else the federated fl/ model, else central/)")
    p.add_argument("--user", nargs="+", metavar="ID", help="ship these users' adapters (default: per region, the "
                                                            "users whose adapter lowered validation loss most)")
    p.add_argument("--per-region", type=int, default=3, help="users per region shipped by default")
    p.add_argument("--out", type=Path, help="bundle folder (default: RUN_DIR/export)")
    p.add_argument("--quant", choices=["weights", "dynamic"], default="weights",
                   help="int8 method: per-channel int8 weights (default) or onnxruntime dynamic quantization")
    p.add_argument("--parity-positions", type=int, default=10000,
                   help="seeded sample of test word positions for int8-vs-torch parity (0: skip); at a 99%% "
                        "agreement 2,000 positions leave a standard error of 0.22 points, 10,000 of 0.1")
    p.add_argument("--seed", type=int, default=0, help="seed of the parity sample")
    p.add_argument("--lexicon-min-count", type=int, default=1,
                   help="ship as the lexicon the words seen this often in public users' text (0: ship none)")


def default_model(run_dir: Path) -> Path:
    """The model personalization used (its adapters name it by hash), else the federated one, else the centralized."""
    from fedkey.stages import file_hash
    from keyboard.adapter_file import load_adapter

    adapters = sorted((run_dir / PERSONAL / ADAPTERS).glob("*.npz"))
    if adapters:
        base = load_adapter(adapters[0]).base_id
        for cand in sorted(run_dir.glob("*/model.pt")):
            if file_hash(cand) == base:
                return cand.parent
    # the federated model is what this tool ships; the centralized one is only a baseline
    return run_dir / "fl" if (run_dir / "fl" / "model.pt").is_file() else run_dir / "central"


def choose_adapters(run_dir: Path, base_id: str, users: list[str] | None, per_region: int,
                    gate: dict | None = None) -> dict[str, tuple[Path, str]]:
    """user -> (adapter file, region) to ship: the named users, or a few per region whose gate chose the adapter.

    `gate`: gate.json already read (it holds every user's spelling map: megabytes on a large run)."""
    from keyboard.adapter_file import load_adapter
    from personalization.store import read_gate

    adir = run_dir / PERSONAL / ADAPTERS
    gate_path = run_dir / PERSONAL / GATE
    gate = read_gate(run_dir) if gate is None else gate
    region_of = _regions(run_dir)
    if users:
        out = {}
        for u in users:
            path, entry = adir / f"{u}.npz", gate.get(u, {})
            if entry.get("use_cache") and not entry.get("use_adapter"):
                out[u] = (None, region_of.get(u) or entry.get("region", "?"))  # their phrase cache alone
                continue
            kept_global = bool(gate) and not entry.get("use_adapter", False)
            # a user the gate judged may have no file at all (e.g. too little text to judge anything by)
            if not path.is_file() and not (kept_global and u in gate):
                raise FedkeyError(f"{path}: no adapter for user {u!r}; run `fedkey personalize` (or pick another user)")
            if kept_global:
                why = entry.get("reason") or "neither the adapter nor the phrase cache helped on their validation text"
                raise FedkeyError(f"{gate_path}: the gate kept the global model for user {u!r} ({why}); ship another user")
            ad = load_adapter(path, expect_base_id=base_id)
            out[u] = (path, region_of.get(u) or ad.meta.get("region", "?"))
        return out
    if not adir.is_dir() or per_region <= 0:
        return {}
    ranked = []
    for path in sorted(adir.glob("*.npz")):
        u, entry = path.stem, gate.get(path.stem, {})
        if gate and not entry.get("use_adapter", False):
            continue
        made_for = entry.get("base_id") or load_adapter(path).base_id
        if made_for != base_id:
            continue  # made for another model: never shipped with this one
        region = region_of.get(u) or entry.get("region") or load_adapter(path).meta.get("region", "?")
        vg, vp = entry.get("val_global"), entry.get("val_personal")
        gain = (vg - vp) / vg if vg and vp is not None else 0.0  # relative drop of validation loss
        ranked.append((-gain, u, path, region))
    picked: dict[str, tuple[Path, str]] = {}
    counts: dict[str, int] = {}
    for _, u, path, region in sorted(ranked):  # the users the adapter helped most, per region
        if counts.get(region, 0) < per_region:
            counts[region] = counts.get(region, 0) + 1
            picked[u] = (path, region)
    return picked


def public_lexicon(run_dir: Path, min_count: int) -> dict | None:
    """The words of public users' text (what the tokenizer was trained on; never a training user's text)."""
    from fedkey import pipeline as P
    from keyboard.words import collect_words

    if min_count <= 0:
        return None
    if not (run_dir / P.DATA).exists():
        console.print(f"[yellow]no lexicon shipped: no prepared data in {run_dir / P.DATA} (suggestions are unfiltered)[/]")
        return None
    shards, _ = P.load_prepared(run_dir)
    words = collect_words(shards.dataset("public_train")["text"], min_count)
    if not words:
        console.print("[yellow]no lexicon shipped: no public users' text (suggestions are unfiltered)[/]")
        return None
    return {"words": with_spelling_variants(words), "min_count": min_count,
            "source": "public users' text (public_train) + the other spelling of its American/British words"}


def with_spelling_variants(words: list[str]) -> list[str]:
    """The words plus the other half of every American/British pair among them.

    Public text is mostly American: without this, a British user's own "colour" would be filtered
    out of their suggestions, the very habit personalization exists to keep.
    """
    from data.british import REGIONAL_PAIRS

    have = set(words)
    extra = {gb for us, gb in REGIONAL_PAIRS.items() if us in have} | {us for us, gb in REGIONAL_PAIRS.items() if gb in have}
    return sorted(have | extra)


def shipped_caches(run_dir: Path, users: list[str], gate: dict) -> dict[str, Path]:
    """user -> phrase cache file, for the shipped users whose gate kept their cache."""
    from personalization.store import cache_path

    out = {u: cache_path(run_dir, u) for u in users if gate.get(u, {}).get("use_cache")}
    for u, path in out.items():
        if not path.is_file():
            raise FedkeyError(f"{path}: missing, though {run_dir / PERSONAL / GATE} kept a phrase cache for {u!r}; "
                              "re-run `fedkey personalize`")
    return out


def _regions(run_dir: Path) -> dict[str, str]:
    users = run_dir / "data" / "users.json"
    if not users.exists():
        return {}
    from data.shards import Shards

    shards = Shards.load(run_dir / "data")
    return {u: shards.region(u) for u in shards.all_users()}


def shipped_sentinel(run_dir: Path) -> Path | None:
    """The run's cache sentinel (personalize's), shipped beside any phrase cache; None if it has none."""
    from personalization.store import PERSONAL, SENTINEL

    path = run_dir / PERSONAL / SENTINEL
    return path if path.is_file() else None


def run(args: argparse.Namespace) -> None:
    """Export, check parity on the test split, print sizes and agreement."""
    from fedkey import pipeline as P
    from fedkey.stages import file_hash
    from keyboard.bundle import FP32, INT8, MANIFEST, adapter_name, cache_name
    from keyboard.checkpoint import MODEL_FILE, load_model
    from keyboard.evaluate import Message
    from keyboard.export import QuantSettings, build_bundle, measure_parity
    from keyboard.onnx_backend import OnnxBackend, make_session
    from data.british import REGIONAL_PAIRS
    from personalization.store import gate_respelling, read_gate

    run_dir: Path = args.run_dir
    model_dir = args.model or default_model(run_dir)
    if not (model_dir / MODEL_FILE).is_file():
        raise FedkeyError(f"{model_dir / MODEL_FILE}: no model; train one (`fedkey train --run-dir {run_dir}`) "
                          "or pass --model")
    out = args.out or run_dir / "export"
    gate = read_gate(run_dir)
    adapters = choose_adapters(run_dir, file_hash(model_dir / MODEL_FILE), args.user, args.per_region, gate)
    lexicon = public_lexicon(run_dir, args.lexicon_min_count)
    respellings = {u: gate_respelling(gate.get(u, {}), str(run_dir / PERSONAL / GATE)) for u in adapters}
    with bar(not args.no_progress, "exporting fp32 + int8 ONNX", None):
        man = build_bundle(model_dir, out, adapters, QuantSettings(mode=args.quant), lexicon, respellings,
                           shipped_caches(run_dir, list(adapters), gate), shipped_sentinel(run_dir), REGIONAL_PAIRS)
    fp32_b, int8_b = man["files"][FP32]["bytes"], man["files"][INT8]["bytes"]
    res = {"bundle": str(out), "model": str(model_dir), "fp32_bytes": fp32_b, "int8_bytes": int8_b,
           "int8_ratio": int8_b / fp32_b, "users": {u: r for u, (_, r) in adapters.items()},
           "user_files": {u: {n: man["files"][n]["bytes"] for n in (adapter_name(u), cache_name(u)) if n in man["files"]}
                          for u in adapters},
           "quantization": man["quantization"]["mode"], "lexicon_words": (man["lexicon"] or {}).get("words", 0),
           **man["export_check"]}
    if args.parity_positions > 0 and (run_dir / P.DATA).exists():
        shards, _ = P.load_prepared(run_dir)
        ds = shards.dataset("test")
        msgs = [Message(u, r, t) for u, r, t in zip(ds["user"], ds["region"], ds["text"])]
        model, tok, _ = load_model(model_dir)
        backend = OnnxBackend(make_session(str(out / INT8)))
        with bar(not args.no_progress, f"int8 vs torch on {args.parity_positions:,} test positions", None):
            parity = measure_parity(model, tok, backend, msgs, args.parity_positions, args.seed)
        res.update(parity)
        man["parity"] = parity
        write_json(out / MANIFEST, man)  # hashes unchanged: the parity figures travel with the bundle
    elif args.parity_positions > 0:
        console.print(f"[yellow]parity not measured: no prepared data in {run_dir / P.DATA}[/]")
    console.print(_table(res))
    if args.json:
        write_json(args.json, res)


def _table(res: dict):
    from rich.table import Table

    t = Table(title=f"export -> {res['bundle']}", show_header=True)
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")

    def ok(flag: bool) -> str:
        return "[green]ok[/]" if flag else "[red]missed[/]"

    t.add_row("model.onnx (fp32)", f"{res['fp32_bytes'] / 1e6:.2f} MB", "")
    t.add_row("model.int8.onnx", f"{res['int8_bytes'] / 1e6:.2f} MB ({100 * res['int8_ratio']:.1f}% of fp32)",
              f"<= 30% {ok(res['int8_ratio'] <= 0.30)}")
    t.add_row("max |log-prob| diff fp32 / int8", f"{res['fp32_max_abs_logp_diff']:.1e} / {res['int8_max_abs_logp_diff']:.3f}", "")
    if "top1_agreement" in res and res["top1_agreement"] is not None:
        t.add_row(f"top-1 agreement int8 vs torch ({res['positions']:,} test positions, seed {res['seed']})",
                  f"{100 * res['top1_agreement']:.2f}%", f">= 99% {ok(res['top1_agreement'] >= 0.99)}")
        if res.get("midword_top1_agreement") is not None:
            t.add_row(f"  mid-word top-1 agreement ({res['midword_queries']:,} keystrokes)",
                      f"{100 * res['midword_top1_agreement']:.2f}%", "")
        t.add_row("  top-3 list agreement (same three words)", f"{100 * res['top3_set_agreement']:.2f}%", "")
        t.add_row("top-1 accuracy torch -> int8", f"{100 * res['torch_top1']:.2f}% -> {100 * res['exported_top1']:.2f}%",
                  f"loss <= 0.3 pt {ok(res['top1_loss_points'] <= 0.3)}")
    t.add_row("lexicon (words of public users' text the runtime suggests)", f"{res['lexicon_words']:,} words", "")
    t.add_row("users shipped (adapter + phrase cache)", ", ".join(
        f"{u} ({r}, {sum(res['user_files'].get(u, {}).values()) / 1e3:.1f} kB)" for u, r in res["users"].items()) or "none", "")
    return t
