"""CI's regression check (tests/regression.py): the shared pipeline run matches the
committed baseline, and real regressions fail it with a table of what moved."""

from __future__ import annotations

import json
import shutil

import yaml

from pipeline.references import REFERENCES
from tests import regression


def baseline() -> dict:
    return json.loads(regression.BASELINE.read_text())


def test_small_pipeline_matches_the_baseline(pipeline_run):
    passed, text = regression.report(pipeline_run.values, baseline())
    print(text)
    assert passed, text
    values = pipeline_run.values
    assert {"synthetic/floor", "synthetic/kn3", "custom/lstm2"} <= set(values)


def test_the_check_covers_characters_orders_samples_references_and_sizes(pipeline_run):
    """What the regression configuration must keep exercising, whatever the baseline says."""
    values = pipeline_run.values
    # a character corpus, compared in bits per character too
    assert values["tinyshakespeare/lstm"]["level"] == "char"
    assert {"valid_bpc", "test_bpc"} <= set(values["tinyshakespeare/kn5"])
    # an n-gram order above 3
    assert values["custom/kn5"]["test_ppl"] > 1
    # samples under a seed, a temperature and a prompt that are not the defaults
    settings = values["custom/samples"]
    assert settings["prompt"] and settings["temperature"] != 1.0
    assert values["custom/lstm"]["sample"].startswith(settings["prompt"])
    # a row with a matching published reference: "ours - published" rendered, in the
    # leaderboard and in the report alike
    kn5 = values["ptb/kn5"]
    assert "Mikolov" in kn5["leaderboard_published"]
    published = next(r.test for r in REFERENCES if (r.corpus, r.model) == ("ptb", "kn5"))
    assert kn5["leaderboard_difference"] == round(kn5["test_ppl"] - published, 2)
    assert kn5["report_difference"] == kn5["leaderboard_difference"]
    # sizes: parameter counts of neural models, n-gram counts
    assert values["custom/lstm"]["size_unit"] == "parameters" and values["custom/lstm"]["size"]
    assert values["ptb/kn5"]["size_unit"] == "n-grams"


def test_dropped_end_of_sentence_fails_with_a_table(pipeline_run, tmp_path):
    repo, env = pipeline_run.clone(tmp_path / "repo", f"sqlite:///{tmp_path / 'mlflow.db'}")
    prepare = repo / "pipeline" / "encoding.py"
    # both passes of prepare: the count of tokens per split, and the encoding
    text = prepare.read_text()
    for correct, broken in (
            ("        return self.words + self.lines  # + <eos> after every line\n",
             "        return self.words\n"),
            ("        for chunk in token_chunks(lines, eos=EOS, bar=bar):\n",
             "        for chunk in token_chunks(lines, eos=None, bar=bar):\n")):
        assert correct in text
        text = text.replace(correct, broken)
    prepare.write_text(text)
    shutil.rmtree(repo / "reports" / "metrics")  # as in a fresh run: no stale metrics
    # the stages behind the rows checked below (and prepare@custom, download@custom)
    regression.repro(repo, env, "prepare@synthetic", "ngram@custom-3", "train@custom-lstm")
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
    corpora = regression.configuration()["corpora"]
    # the window model of every corpus, and one corpus's samples (their other readers,
    # downstream, would only repeat them)
    done = regression.repro(repo, env, *(f"train@{c}-window" for c in corpora),
                            "sample@custom")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    passed, text = regression.report(regression.collect(repo), baseline())
    print(text)
    assert not passed
    moved = regression.compare(regression.collect(repo), baseline())
    # exactly the retrained models moved: window where its lr comes from the model layer;
    # where a corpus layer sets every model's lr (params.yaml: synthetic, tinyshakespeare)
    # window did not change; everything else still matches
    layers = regression.configuration()["train"]["presets"]["quick"]["corpora"]
    retrained = {f"{c}/window" for c in corpora if "lr" not in (layers.get(c) or {})}
    assert "custom/window" in retrained
    assert {m.row for m in moved} == retrained
    assert {m.value for m in moved} <= {"valid_ppl", "test_ppl", "sample"}
    assert "±1%" in text


def test_neural_samples_are_compared_on_the_baseline_machine_only(pipeline_run):
    import copy

    now = pipeline_run.values
    recorded = copy.deepcopy(now)
    for row in ("custom/lstm", "custom/kn3"):
        recorded[row]["sample"] = "another sample"
    moved = {(m.row, m.value) for m in regression.compare(now, recorded)}
    assert moved == {("custom/lstm", "sample"), ("custom/kn3", "sample")}  # same machine
    recorded[regression.MACHINE] = {**now[regression.MACHINE], "cpu_capability": "other"}
    moved = {(m.row, m.value) for m in regression.compare(now, recorded)}
    assert moved == {("custom/kn3", "sample")}  # an n-gram's sample does not depend on it
    passed, text = regression.report(now, recorded)
    assert not passed and "neural samples not compared" in text and "'other'" in text
