"""CI's regression check (tests/regression.py): the shared pipeline run matches the
committed baseline, and real regressions fail it with a table of what moved."""

from __future__ import annotations

import json
import shutil

import yaml

from tests import regression


def baseline() -> dict:
    return json.loads(regression.BASELINE.read_text())


def test_small_pipeline_matches_the_baseline(pipeline_run):
    passed, text = regression.report(pipeline_run.values, baseline())
    print(text)
    assert passed, text
    assert {"synthetic/floor", "synthetic/kn3", "custom/lstm2"} <= set(pipeline_run.values)


def test_dropped_end_of_sentence_fails_with_a_table(pipeline_run, tmp_path):
    repo, env = pipeline_run.clone(tmp_path / "repo", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepare = repo / "pipeline" / "prepare.py"
    correct = "        ids[pos] = eos\n        pos += 1\n    return ids, oov\n"
    assert correct in prepare.read_text()
    prepare.write_text(prepare.read_text().replace(correct, "    return ids[:pos], oov\n"))
    shutil.rmtree(repo / "reports" / "metrics")  # as in a fresh run: no stale metrics
    regression.repro(repo, env)
    passed, text = regression.report(regression.collect(repo), baseline())
    print(text)
    assert not passed
    moved = {(m.row, m.value): m for m in regression.compare(regression.collect(repo),
                                                             baseline())}
    # the neural models now predict fewer tokens; the n-grams refuse the data outright,
    # and so does the synthetic corpus, whose source no longer matches its tokens
    lstm = moved["custom/lstm", "test_tokens"]
    assert lstm.now < lstm.baseline
    assert moved["custom/kn3", "metrics file"].now is None
    assert moved["synthetic/floor", "metrics file"].now is None
    assert "| custom/lstm " in text and "test_tokens" in text and "missing" in text


def test_changed_learning_rate_fails_with_a_table(pipeline_run, tmp_path):
    repo, env = pipeline_run.clone(tmp_path / "repo", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["presets"]["quick"]["models"]["window"]["lr"] *= 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = regression.repro(repo, env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    passed, text = regression.report(regression.collect(repo), baseline())
    print(text)
    assert not passed
    moved = regression.compare(regression.collect(repo), baseline())
    # exactly the retrained model moved; on synthetic the corpus layer sets every model's
    # lr (params.yaml), so its window did not change; everything else still matches
    assert {m.row for m in moved} == {"custom/window"}
    assert {m.value for m in moved} <= {"valid_ppl", "test_ppl"}
    assert "±1%" in text
