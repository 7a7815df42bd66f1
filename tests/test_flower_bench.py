"""`fedkey bench engines` writes its DESIGN.md keys (the in-process engine and the compute floor; the Flower
engines run the same code path as tests/test_flower_deploy.py and test_flower_sim.py, which time them)."""

from __future__ import annotations

import json

from fedkey.cli import main
from tests.test_flower_deploy import make_run


def test_bench_engines_local_writes_its_keys_and_a_plot(tmp_path):
    run = make_run(tmp_path / "run", n_users=10, n_msgs=8)
    out = tmp_path / "engines.json"
    code = main(["bench", "engines", "--run-dir", str(run), "--engines", "local", "--clients", "3", "--rounds", "2", "--floor-steps", "5",
                 "--batch-size", "4", "--embed-dim", "8", "--hidden", "16", "--json", str(out), "--no-progress"])
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("local_round_s", "local_total_s", "local_peak_mib", "compute_floor_round_s"):
        assert res[key] > 0, key
    assert res["local_rounds"] == 2 and res["local_total_s"] > res["local_round_s"]
    assert len(res["local_mem_after_round_mib"]) == 2 and res["local_procs"] >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
