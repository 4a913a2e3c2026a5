"""`make run`'s clock (pipeline/timings.py): stages timed from DVC's own lines."""

import json
import sys

import pytest

from pipeline import timings

FAKE_DVC = """
import time
for stage, seconds in [("download@ptb", 0.0), ("prepare@ptb", 0.2), ("train@ptb-lstm2", 0.6),
                       ("train@tinyshakespeare-gru", 0.3), ("analyse@ptb", 0.0),
                       ("report", 0.0)]:
    print(f"Running stage '{stage}':", flush=True)
    print("some output of the stage", flush=True)
    time.sleep(seconds)
"""


def test_groups_follow_the_pipeline_order():
    assert timings.group_of("train@ptb-lstm2") == "train ptb"
    assert timings.group_of("ngram@tinyshakespeare-5") == "ngram"
    assert timings.group_of("prepare@longrange") == "download/prepare"
    assert timings.group_of("leaderboard") == "report"
    groups = timings.grouped({"report": 1.0, "train@ptb-gru": 2.0, "train@ptb-rnn": 3.0,
                              "sample@ptb": 0.5, "download@ptb": 4.0}, setup_s=10.0)
    assert groups == {"set-up": 10.0, "download/prepare": 4.0, "train ptb": 5.0,
                      "sample": 0.5, "report": 1.0}


def test_each_stage_is_timed_to_the_next_stage_line_and_output_passes_through(
        tmp_path, capsys):
    out = tmp_path / "timings.json"
    with pytest.raises(SystemExit) as exited:
        timings.main(["--out", str(out), "--", sys.executable, "-c", FAKE_DVC])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.count("some output of the stage") == 6  # echoed, line by line
    written = json.loads(out.read_text())
    stages = written["stages_s"]
    assert 0.5 <= stages["train@ptb-lstm2"] < 5 and 0.2 <= stages["prepare@ptb"] < 5
    assert written["groups_s"]["train tinyshakespeare"] >= 0.2
    assert list(written["groups_s"]) == ["set-up", "download/prepare", "train ptb",
                                         "train tinyshakespeare", "analyse", "report"]
    assert "train ptb" in printed and "total" in printed


def test_a_failed_run_keeps_its_status_and_writes_nothing(tmp_path):
    out = tmp_path / "timings.json"
    code = "print(\"Running stage 'train@ptb-rnn':\"); raise SystemExit(3)"
    with pytest.raises(SystemExit) as exited:
        timings.main(["--out", str(out), "--", sys.executable, "-c", code])
    assert exited.value.code == 3
    assert not out.exists()


def test_a_run_with_nothing_to_do_keeps_the_last_times(tmp_path, capsys):
    out = tmp_path / "timings.json"
    out.write_text('{"total_s": 2323.5}')
    code = "print('Data and pipelines are up to date.')"
    with pytest.raises(SystemExit) as exited:
        timings.main(["--out", str(out), "--", sys.executable, "-c", code])
    assert exited.value.code == 0
    assert json.loads(out.read_text()) == {"total_s": 2323.5}
    assert "no stage ran" in capsys.readouterr().out
