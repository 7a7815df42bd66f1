"""`fedkey bench latency` runs end to end on a tiny bundle and writes the DESIGN.md keys (no timing asserted)."""

from __future__ import annotations

import json

from fedkey.cli import main
from tests.conftest import tiny_texts
from tests.test_export_bundle import make_bundle


def test_bench_latency_writes_its_keys(tmp_path, tiny_model, tiny_tok):
    bundle, _ = make_bundle(tmp_path, tiny_model, tiny_tok)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(tiny_texts(20, seed=9)))
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--run-dir", str(tmp_path), "--bundle", str(bundle), "--texts", str(texts),
            "--messages", "6", "--loads", "2", "--check-messages", "3", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    for key in ("p50_ms", "p99_ms", "load_ms", "int8_bytes", "fp32_bytes", "top1_agreement"):
        assert key in res, key
    assert 0 < res["p50_ms"] <= res["p99_ms"] and res["load_ms"] > 0
    assert res["int8_bytes"] < res["fp32_bytes"] and res["keystrokes"] > 6 * 10
    assert res["cache_same_top1"] == 1.0 and res["runs_per_keystroke"] > 0
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_latency_needs_a_bundle(tmp_path, capsys):
    assert main(["bench", "latency", "--run-dir", str(tmp_path), "--no-progress"]) == 2
    assert "fedkey export" in capsys.readouterr().err


def test_bench_latency_takes_its_sample_size_from_the_preset_unless_given(tmp_path, tiny_model, tiny_tok):
    from fedkey.bench.latency import resolve_sizes
    from fedkey.cli import build_parser

    def sizes(*extra: str) -> tuple[int, int]:
        args = build_parser().parse_args(["bench", "latency", "--run-dir", str(tmp_path), *extra])
        resolve_sizes(args)
        return args.messages, args.check_messages

    assert sizes() == (200, 50)
    assert sizes("--preset", "quick") == (100, 25)
    assert sizes("--preset", "quick", "--messages", "7", "--check-messages", "0") == (7, 0)
    assert sizes("--preset", "full") == (200, 50)
    # and the run replays that sample
    bundle, _ = make_bundle(tmp_path, tiny_model, tiny_tok)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(tiny_texts(120, seed=3)))
    out = tmp_path / "quick.json"
    assert main(["bench", "latency", "--run-dir", str(tmp_path), "--bundle", str(bundle), "--texts", str(texts),
                 "--preset", "quick", "--loads", "1", "--repeats", "1", "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["messages"] == 100
