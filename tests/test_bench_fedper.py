"""`fedkey bench fedper` end to end on a real (tiny) prepared run: every arm, the same budget, a table and a plot."""

from __future__ import annotations

import json
import shutil

from fedkey.cli import main
from fedkey.pipeline import load_prepared
from keyboard.checkpoint import save_model
from tests.test_fl_fixtures import one_torch_thread, tiny_run, tiny_task  # noqa: F401  (fixtures)


def test_fedper_bench_runs_every_arm_on_the_same_budget(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _, model = tiny_task(run)
    save_model(run / "fl", model, load_prepared(run)[1])
    out = tmp_path / "fedper.json"
    assert main(["bench", "fedper", "--run-dir", str(run), "--users", "6", "--tokens", "20000", "--clients-per-round", "3", "--client-lr", "1.0", "--server-lr", "0.1",
                 "--rank", "2", "--eval-positions", "0", "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["rows"]) == ["fedavg (global)", "fedavg + fine-tuned output bias", "fedavg + personalization (default)",
                                 "fedper (shared part, no local bias)", "fedper (shared + own local bias)",
                                 "fedper + adapter (shared part, no local layer)",
                                 "fedper + adapter (shared + own adapter and bias)"]
    assert len(set(res["rounds"].values())) == 1 and len(set(res["tokens"].values())) == 1  # one budget for every arm
    assert res["tokens"]["fedavg"] >= 20000
    ref = res["rows"]["fedavg (global)"]
    assert set(ref["gain_per_user"]) <= set(res["users"]) and all(g == 0 for g in ref["gain_per_user"].values())
    moved = res["rows"]["fedper + adapter (shared + own adapter and bias)"]["gain_per_user"]
    assert any(g != 0 for g in moved.values())  # each user's own local layer changes their suggestions
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| fedper + adapter (shared + own adapter and bias) |" in capsys.readouterr().out
