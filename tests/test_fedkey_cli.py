"""Configs (defaults < preset < TOML < flags), --help of every subcommand, one-line errors, resume."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from fedkey import config as C
from fedkey.cli import build_parser, main
from fedkey.errors import FedkeyError
from keyboard.batches import frame
from keyboard.model import KeyboardLM
from keyboard.train import train_central


def test_config_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[central]\nlr = 0.5\nbatch_size = 16\n")
    args = build_parser().parse_args(["train-central", "--preset", "quick", "--config", str(toml), "--batch-size", "8"])
    cfg = C.from_args(C.CentralConfig, args)
    from fedkey.presets import PRESETS

    assert cfg.max_tokens == PRESETS["quick"]["central"]["max_tokens"] != C.CentralConfig().max_tokens  # preset
    assert cfg.lr == 0.5  # TOML beats default
    assert cfg.batch_size == 8  # flag beats TOML
    C.save(tmp_path / "saved.toml", cfg)
    assert C.build(C.CentralConfig, tmp_path / "saved.toml") == cfg  # saved configs reload as they were


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[central]\nlrr = 1\n")
    with pytest.raises(FedkeyError, match="unknown field 'lrr'"):
        C.build(C.CentralConfig, bad)
    bad.write_text("[central]\nlr = 'fast'\n")
    with pytest.raises(FedkeyError, match="expected float"):
        C.build(C.CentralConfig, bad)
    bad.write_text("[central\n")
    with pytest.raises(FedkeyError, match="not valid TOML"):
        C.build(C.CentralConfig, bad)


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"prepare", "train-central", "evaluate", "bench", "run"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert "usage" in p.format_help().lower(), name
    out = subprocess.run([sys.executable, "-m", "fedkey.cli", "train-central", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--max-tokens" in out.stdout


def test_cli_error_is_one_line_not_a_traceback(tmp_path, capsys):
    code = main(["evaluate", "--run-dir", str(tmp_path / "nothing"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "fedkey prepare" in err


def test_resume_continues_to_the_same_parameters(tiny_tok, tmp_path):
    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch(["how are you doing today", "i like the color blue"] * 20)]
    cfg = C.CentralConfig(lr=1e-2, batch_size=8, max_tokens=1500, warmup_tokens=200, seed=3)

    def fresh() -> KeyboardLM:
        torch.manual_seed(0)
        return KeyboardLM(tiny_tok.vocab_size, C.ModelConfig(embed_dim=8, hidden=16))

    straight = fresh()
    train_central(straight, seqs, cfg, tmp_path / "a")

    def kill_half_way(p) -> None:
        if p.tokens >= 700:
            raise KeyboardInterrupt  # as a user's Ctrl+C or a kill between checkpoints

    killed = fresh()
    with pytest.raises(KeyboardInterrupt):
        train_central(killed, seqs, cfg, tmp_path / "b", on_progress=kill_half_way, checkpoint_every_s=0)
    resumed = fresh()
    train_central(resumed, seqs, cfg, tmp_path / "b", resume=True)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_takes_other_threads_but_refuses_other_settings(tiny_tok, tmp_path, request):
    seqs = [frame(ids, 64) for ids in tiny_tok.encode_batch(["how are you doing today", "i like the color blue"] * 20)]
    cfg = C.CentralConfig(lr=1e-2, batch_size=8, max_tokens=600, warmup_tokens=0, seed=3, threads=1)

    def fresh() -> KeyboardLM:
        torch.manual_seed(0)
        return KeyboardLM(tiny_tok.vocab_size, C.ModelConfig(embed_dim=8, hidden=16))

    def stop_early(p) -> None:
        if p.tokens >= 300:
            raise KeyboardInterrupt

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    with pytest.raises(KeyboardInterrupt):
        train_central(fresh(), seqs, cfg, tmp_path, on_progress=stop_early, checkpoint_every_s=0)
    # a machine with more cores resumes the same run (the server's pretraining resumes this way on every call)
    done = train_central(fresh(), seqs, dataclasses.replace(cfg, threads=2), tmp_path, resume=True)
    assert done["tokens"] >= cfg.max_tokens
    with pytest.raises(FedkeyError) as err:
        train_central(fresh(), seqs, dataclasses.replace(cfg, lr=2e-2), tmp_path, resume=True)
    msg = str(err.value)
    assert "(lr)" in msg and str(tmp_path) in msg and "\n" not in msg


def test_prepare_cli_on_bad_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"user": "a", "text": "hi"}\n{not json\n')
    code = main(["prepare", "--run-dir", str(tmp_path / "run"), "--corpus", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jsonl" in err and "2" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "data").exists()
    json.dumps(err)


@pytest.mark.parametrize("flag, value, named", [("--batch-size", "0", "[central].batch_size"),
                                                 ("--max-len", "0", "[central].max_len"),
                                                 ("--lr", "0", "lr must be > 0")])
def test_train_central_refuses_impossible_settings_in_one_line(tmp_path, capsys, flag, value, named):
    code = main(["train-central", "--run-dir", str(tmp_path / "run"), flag, value, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and named in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "central").exists()
