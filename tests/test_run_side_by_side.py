"""`fedkey run` runs the centralized and the federated lanes side by side in child processes, one core each."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedkey.cli import main
from fedkey.side_by_side import split_cpus, usable_cpus
from tests.test_fl_fixtures import tiny_corpus

LANE_STAGES = ["prepare", "centralized baseline", "evaluate centralized", "federated training", "evaluate federated"]
CONFIG = """[prepare]
corpus = "{corpus}"
min_words = 5
vocab_size = 300
[model]
embed_dim = 8
hidden = 12
[central]
max_tokens = 3000
batch_size = {central_batch}
[fl]
max_tokens = {fl_tokens}
clients_per_round = 4
max_messages = 12
pretrain_epochs = 0.0
eval_every = 0
[eval]
max_positions = 200
ksr_messages = 5
"""

needs_two_cores = pytest.mark.skipif(len(usable_cpus()) < 2, reason="lanes need two cores")


def config(tmp_path: Path, central_batch: int = 16, fl_tokens: int = 3000) -> Path:
    corpus = tiny_corpus(tmp_path / "chat.jsonl")
    path = tmp_path / f"cfg_{central_batch}_{fl_tokens}.toml"
    path.write_text(CONFIG.format(corpus=corpus, central_batch=central_batch, fl_tokens=fl_tokens))
    return path


def lane_processes() -> list[str]:
    """Command lines of lane children still alive."""
    out = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmd.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "--lane-child" in text:
            out.append(text)
    return out


def test_cores_are_split_into_contiguous_shares():
    assert split_cpus([0, 1], 2) == [[0], [1]]
    assert split_cpus([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]


@needs_two_cores
def test_lanes_run_their_stages_in_children_and_a_rerun_skips_them(tmp_path, capsys):
    run, cfg = tmp_path / "run", config(tmp_path)
    argv = ["run", "--run-dir", str(run), "--config", str(cfg), "--no-progress", "--only", *LANE_STAGES]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "centralized lane: centralized baseline, evaluate centralized on core" in out
    assert "federated lane: federated training, evaluate federated on core" in out
    central_log, fl_log = (run / "logs" / "centralized.log").read_text(), (run / "logs" / "federated.log").read_text()
    assert "centralized model trained" in central_log and "fedkey train " not in central_log
    assert "fedkey train --resume" in fl_log and "train-central" not in fl_log
    for name in ("central/model.pt", "central/eval_test.json", "fl/model.pt", "fl/eval_test.json", "report.md"):
        assert (run / name).exists(), name
    report = (run / "report.md").read_text()
    assert "| centralized | " in report and "| federated | " in report
    # every lane stage is marked done with its span, so a rerun skips them all and starts no lane
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert again.count("inputs unchanged, skipped") == len(LANE_STAGES) and " lane: " not in again
    assert not lane_processes()


@needs_two_cores
def test_a_failing_lane_stops_the_other_and_names_its_error_and_log(tmp_path, capsys):
    run = tmp_path / "run"
    # the federated lane has far more work than the failing one: it must be stopped, not waited for
    cfg = config(tmp_path, central_batch=0, fl_tokens=10**7)
    code = main(["run", "--run-dir", str(run), "--config", str(cfg), "--no-progress", "--only", *LANE_STAGES])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "centralized lane" in err and "[central].batch_size must be at least 1" in err
    assert str(run / "logs" / "centralized.log") in err
    assert not (run / "fl" / "model.pt").exists() and not lane_processes()
