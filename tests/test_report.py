"""runs/<name>/report.md and the printed summary, from small result files in the formats the stages write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedkey import config as C
from fedkey.fl_stage import write_history
from fedkey.io import write_json
from fedkey.report import collect, print_report, render_markdown, write_report
from fedkey.stages import mark_done
from fedkey.tables import console
from fl_core.config import FleetConfig, FLConfig
from fl_core.privacy.config import PrivacyConfig
from personalization.report import count_changes, format_interval, mean_interval, text_bucket, top1_gains
from personalization.report import print_report as print_personal

USERS = {"u1": "US", "u2": "US", "g1": "GB", "g2": "GB"}
TEXT_OF = {"u1": 150, "u2": 40, "g1": 4000, "g2": 2500}  # train pieces
PNG = b"\x89PNG\r\n\x1a\n"  # the report only links figures, so a stub stands in for a plot


def _m(top1: float, regional: float | None = 0.5) -> dict:
    return {"top1": top1, "top3": top1 + 0.1, "perplexity": 1234.5, "ksr": 0.4, "regional_acc": regional,
            "n_words": 1500}


def _evaluation(top1: float, per_user_gain: dict[str, float] | None = None) -> dict:
    """keyboard.evaluate's result shape (pooled, mean over users, by region, per user)."""
    gain = per_user_gain or {}
    return {"pooled": _m(top1), "mean_over_users": _m(top1), "by_region": {"US": _m(top1), "GB": _m(top1 - 0.01, 0.25)},
            "per_user": {u: _m(top1 + gain.get(u, 0.0)) for u in USERS}, "ksr_messages": 10, "messages": 40,
            "users": len(USERS), "seconds": 1.0, "split": "test"}


def _prepare(run: Path) -> None:
    rows = [{"split": s, "region": g, "users": 2, "messages": 10 * n, "words": 100 * n, "tokens": 130 * n}
            for n, s in enumerate(("public_train", "train", "test", "heldout_train", "heldout_test"), 1)
            for g in ("US", "GB")]
    write_json(run / "data_stats.json", {"rows": rows, "skips": {"empty_text": 3, "too_long": 0}, "skipped": False,
                                         "seconds": 1.0, "tokenizer_sha256": "ab"})
    mark_done(run / "stages" / "prepare", "k", {"argv": ["prepare"]}, {}, seconds=16.3)


def _full_run(run: Path, dp: bool) -> None:
    _prepare(run)
    write_json(run / "central" / "eval_test.json", {**_evaluation(0.165), "baseline_ngram": _m(0.17)})
    mark_done(run / "central", "k", {}, {}, result={"tokens": 1_000_034, "seconds": 200.0, "pretrain_tokens": 345_629,
                                                    "pretrain_seconds": 80.0})
    write_json(run / "fl" / "eval_test.json", _evaluation(0.15))
    fcfg, fleet = FLConfig(max_tokens=50_000, clients_per_round=8, compress="topk", topk_frac=0.02), FleetConfig()
    cfgd = {"model": {"embed_dim": 16, "hidden": 32}, "fl": C.to_dict(fcfg), "fleet": C.to_dict(fleet)}
    result = {"rounds": 3, "tokens": 50_100, "seconds": 75.0, "up_bytes": 3 * 87_055_360, "down_bytes": 3 * 114_260_160,
              "sim_hours": 1.5, "clients_used": 24, "dropped": 1, "late": 0, "aborted": 5, "sat_out": 0,
              "skipped_rounds": 0, "loss": 5.1}
    if dp:
        cfgd["privacy"] = C.to_dict(PrivacyConfig(dp=True, noise_multiplier=1.1, clip=0.1, secagg=True))
        result.update(epsilon=4.257, delta=1e-5, dp_sampling="poisson", noise_multiplier=1.1,
                      stopped_at_target_epsilon=False)
    mark_done(run / "fl", "k", cfgd, {}, result=result)
    write_history(run / "fl", [{"round": r, "tokens_total": 16_700 * r, "up_total": 87_055_360 * r} for r in (1, 2, 3)])
    for name in ("accuracy_vs_round.png", "accuracy_vs_uplink.png"):
        (run / "fl" / "plots").mkdir(parents=True, exist_ok=True)
        (run / "fl" / "plots" / name).write_bytes(PNG)

    glob = _evaluation(0.15)
    pers = _evaluation(0.16, {"u1": 0.05, "g1": 0.08, "g2": -0.02})
    gains = top1_gains(glob, pers)
    reg = {k: {"US": {"acc": 0.9, "n": 40}, "GB": {"acc": acc, "n": 12}, "per_user": {}}
           for k, acc in (("global", 0.25), ("personalized", 0.75))}
    write_json(run / "personal" / "report.json", {
        "base_model": str(run / "fl"), "base_id": "ab", "users": 4, "gated_in": 3, "adapter_bytes_mean": 41_230.0,
        "adapter_bytes_max": 41_987, "use_adapter": {u: u != "u2" for u in USERS}, "region_of": USERS,
        "use_cache": {u: u.startswith("u") for u in USERS},
        "gated_in_by_region": {"GB": 2, "US": 1}, "seconds": {"personalize": 95.0, "evaluate": 12.0},
        "global": glob, "personalized": pers, "split": "test", "text_of": TEXT_OF,
        "changes": count_changes(gains, USERS, TEXT_OF),
        "regional_all_positions": reg, "top1_gain_per_user": gains})
    (run / "personal" / "gains.png").write_bytes(PNG)

    files = {"model.onnx": {"sha256": "a", "bytes": 3_400_000}, "model.int8.onnx": {"sha256": "b", "bytes": 900_000},
             "tokenizer.model": {"sha256": "c", "bytes": 250_000}, "adapters/g1.npz": {"sha256": "d", "bytes": 41_000}}
    write_json(run / "export" / "manifest.json", {
        "format": "fedkey-bundle/1", "files": files, "quantization": {"mode": "weights"},
        "parity": {"positions": 2000, "top1_agreement": 0.995, "torch_top1": 0.151, "exported_top1": 0.150}})
    write_json(run / "export" / "latency.json", {"p50_ms": 0.42, "p99_ms": 3.1, "load_ms": 120.0, "keystrokes": 9000,
                                                 "threads": 1, "messages": 200})
    for name, s in (("centralized_baseline", 209.7), ("federated_training", 3725.0), ("latency", 30.0)):
        mark_done(run / "stages" / name, "k", {"argv": []}, {}, seconds=s)


def test_full_report(tmp_path: Path) -> None:
    _full_run(tmp_path, dp=True)
    path = write_report(tmp_path)
    md = path.read_text()
    assert path == tmp_path / "report.md" and not list(tmp_path.glob(".report.md.*"))  # no temp file left behind
    for title in ("Data", "Next-word quality", "Federated training", "Personalization", "On-device export",
                  "Stage timings"):
        assert f"\n## {title}\n" in md
    for fig in ("fl/plots/accuracy_vs_round.png", "fl/plots/accuracy_vs_uplink.png", "personal/gains.png"):
        assert f"]({fig})" in md
    assert "| centralized | 16.5% | 26.5% | 1,234 | 40.0% | 50.0% | 1,500 |" in md
    assert "| GB: personalized |" in md and "| back-off trigram baseline |" in md
    assert "| users (US / GB) |" in md and "| public (tokenizer only) | 2 / 2 | 20 |" in md
    assert "epsilon 4.26 at delta 1.0e-05" in md and "secure aggregation" in md
    assert "| uplink, total | 261 MB (87.1 MB a round) |" in md
    assert "top-k (2.0% of coordinates" in md and "50,100 of a 50,000 budget" in md
    assert "| GB | 2 | 1 | 1 | 0 | +4.00 pt | -1.00 .. +9.00 pt | 2 | 25.0% -> 75.0% (12) |" in md
    # pooled over regions' words; the interval resamples the 4 users' gains (+6, +1, +9, -1 pt)
    assert "| all | 4 | 3 | 1 | 0 | +3.75 pt | +0.00 .. +7.50 pt | 3 | 75.0% -> 86.5% (52) |" in md
    # gains +6 (u1), +1 (u2), +9 (g1), -1 (g2) pt, one user in each of four bands of train text
    assert "| 3000+ | 1 | 1 | 0 | 0 | +9.00 pt | - |" in md and "| 1000-2999 | 1 | 0 | 1 | 0 | -1.00 pt | - |" in md
    assert md.index("| 0-99 |") < md.index("| 100-299 |") < md.index("| 1000-2999 |")
    assert "3 of 4 users (75.0%)" in md and "41.2 kB / 42.0 kB" in md
    assert "900 kB (26.5% of fp32, 3.8x smaller)" in md and "| adapters shipped | 1 |" in md
    assert "99.5%" in md and "0.42 ms (target <= 1 ms: met)" in md and "3.10 ms (target <= 5 ms: met)" in md
    assert "120 ms (target <= 300 ms: met)" in md
    assert "| federated training | 1 h 02 min |" in md and "| total | 1 h 06 min |" in md
    assert md.count("\n## ") == 6 and "skipped" not in md

    with console.capture() as cap:
        print_report(collect(tmp_path), tmp_path)
    out = cap.get()
    assert "Personalization" in out and "3.8x smaller" in out and str(tmp_path / "personal" / "gains.png") in out


def test_no_dp_no_privacy_rows(tmp_path: Path) -> None:
    _full_run(tmp_path, dp=False)
    md = render_markdown(collect(tmp_path), tmp_path)
    assert "epsilon" not in md and "secure aggregation" not in md


def test_quality_table_says_where_the_centralized_baseline_started(tmp_path: Path) -> None:
    _full_run(tmp_path, dp=False)
    md = render_markdown(collect(tmp_path), tmp_path)
    assert ("*centralized: 1,000,034 tokens of the training users' text, from the federated model's start "
            "(345,629 tokens of public users' text); personalized:") in md
    mark_done(tmp_path / "central", "k", {}, {}, result={"tokens": 3_000_000, "seconds": 900.0})
    md = render_markdown(collect(tmp_path), tmp_path)
    assert "*centralized: 3,000,000 tokens of the training users' text, from a random start; personalized:" in md


def test_prepare_only(tmp_path: Path) -> None:
    _prepare(tmp_path)
    md = write_report(tmp_path).read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## Data", "## Stage timings"]
    (tmp_path / "stages" / "prepare" / "stage.json").unlink()
    md = write_report(tmp_path).read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")] == ["## Data"]
    assert "dropped while preparing: empty text 3" in md and "too long" not in md


def test_empty_run_dir(tmp_path: Path) -> None:
    assert "No stage has finished yet." in write_report(tmp_path).read_text()


@pytest.mark.parametrize("broken, title", [("export/manifest.json", "On-device export"),
                                           ("personal/report.json", "Personalization")])
def test_corrupt_file_skips_its_section(tmp_path: Path, broken: str, title: str) -> None:
    _full_run(tmp_path, dp=False)
    (tmp_path / "export" / "latency.json").unlink()
    (tmp_path / broken).write_text('{"files": {"model.onn')  # a torn write
    md = write_report(tmp_path).read_text()
    section = md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    assert f"> skipped: {broken}: not valid JSON" in section and "|" not in section
    assert "## Data" in md and "## Stage timings" in md


def test_partial_files(tmp_path: Path) -> None:
    """A file that parses but lacks what the report reads, and a corrupt one beside a good one."""
    _full_run(tmp_path, dp=False)
    write_json(tmp_path / "data_stats.json", {"rows": [{"split": "train"}]})
    (tmp_path / "fl" / "eval_test.json").write_text("not json")
    (tmp_path / "fl" / "stage.json").unlink()
    md = write_report(tmp_path).read_text()
    data = md.split("## Data\n", 1)[1].split("\n## ", 1)[0]
    assert "> skipped: a result file lacks what the report needs (KeyError: 'region')" in data
    quality = md.split("## Next-word quality\n", 1)[1].split("\n## ", 1)[0]
    assert "| centralized |" in quality and "| federated |" not in quality
    assert "> left out fl/eval_test.json: not valid JSON" in quality
    assert "training has not finished (no fl/stage.json); figures as of round 3" in md
    assert "| rounds | 3 |" in md


def test_mean_gain_interval_shrinks_with_more_users() -> None:
    rng = np.random.default_rng(3)
    few = list(rng.normal(0.01, 0.05, 100))
    many = list(rng.normal(0.01, 0.05, 1600))
    lo, hi = mean_interval(few)
    assert lo < float(np.mean(few)) < hi and mean_interval(few[::-1]) == [lo, hi]  # seeded; the users' order does not matter
    lo2, hi2 = mean_interval(many)
    assert lo2 < float(np.mean(many)) < hi2
    assert (hi2 - lo2) < 0.4 * (hi - lo)  # 16x the users: about a quarter of the width
    assert mean_interval([0.02] * 30) == pytest.approx([0.02, 0.02])  # no spread, no uncertainty
    assert mean_interval([0.02]) is None and format_interval(None) == "-"
    ch = count_changes({"u1": 0.06, "u2": 0.01, "g1": 0.09, "g2": -0.01}, USERS)
    assert ch["mean_top1_gain_ci95"] == mean_interval([0.06, 0.01, 0.09, -0.01])
    assert ch["by_region"]["GB"]["mean_top1_gain_ci95"] == mean_interval([0.09, -0.01])


def test_gain_by_amount_of_text_puts_each_user_in_one_band() -> None:
    assert [text_bucket(n) for n in (0, 99, 100, 999, 1000, 2999, 3000, 10**6)] == [
        "0-99", "0-99", "100-299", "300-999", "1000-2999", "1000-2999", "3000+", "3000+"]
    gains = {"u1": 0.06, "u2": 0.01, "g1": 0.09, "g2": -0.01}
    ch = count_changes(gains, USERS, {"u1": 50, "u2": 5000, "g1": 80, "g2": 3000})
    assert list(ch["by_text"]) == ["0-99", "3000+"]  # bands without users are left out, the rest in order
    assert ch["by_text"]["0-99"]["mean_top1_gain"] == pytest.approx(0.075)
    assert ch["by_text"]["3000+"]["users"] == 2 and ch["by_text"]["3000+"]["hurt"] == 1
    assert "by_text" not in count_changes(gains, USERS)  # a report that did not record the amounts


def test_personalize_tables_fit_an_80_column_terminal(tmp_path: Path) -> None:
    _full_run(tmp_path, dp=False)
    rep = json.loads((tmp_path / "personal" / "report.json").read_text())
    con = Console(width=80, record=True)
    print_personal(rep, con)
    out = con.export_text()
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80  # nothing cut off or wrapped
    row = next(line for line in out.splitlines() if line.startswith("all "))
    assert row.split() == ["all", "4", "3", "1", "0", "+3.75", "pt", "+0.00..+7.50", "3", "2"]
    users = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["u1"], ["u2"], ["g1"])}
    # top-1 global -> personalized, and what the gate kept: adapter and cache, the cache alone, the adapter alone
    assert users["u1"][3] == "15.0→21.0" and users["u1"][-1] == "both"
    assert users["u2"][-1] == "cache" and users["g1"][-1] == "adapter"
