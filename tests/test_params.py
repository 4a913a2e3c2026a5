"""params.yaml validation: every bad value is an error naming its key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.encoding import PrepareParams
from pipeline.fetch import DownloadParams
from pipeline.kneser_ney import NgramParams
from pipeline.params import ParamsError, load_section

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path, **changes) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def as_loaded(value):
    """A params.yaml value as a typed section holds it: lists become tuples."""
    if isinstance(value, dict):
        return {key: as_loaded(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(as_loaded(item) for item in value)
    return value


def test_repository_params_load_as_written():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, cls in [("download", DownloadParams), ("prepare", PrepareParams),
                         ("ngram", NgramParams)]:
        loaded = load_section(section, cls, REPO / "params.yaml")
        assert isinstance(loaded, cls)
        assert dataclasses.asdict(loaded) == as_loaded(raw[section]), section


@pytest.mark.parametrize("changes, message", [
    ({"ngram__ordres": [3]}, r"unknown key ngram\.ordres \(known keys of ngram: orders,"),
    ({"ngram__orders": "5"}, r"ngram\.orders: expected a list, got '5'"),
    ({"ngram__orders": [2, "x"]}, r"ngram\.orders\[1\]: expected an integer, got 'x'"),
    ({"ngram__orders": [1, 3]}, r"ngram\.orders: each order must be 2\.\.6, got 1"),
    ({"ngram__discount_fallback": True}, r"ngram\.discount_fallback: expected a list"),
    ({"ngram__memory": "lots"}, r"ngram\.memory: expected a size like 1G"),
    ({"ngram__orders": [5, 5]}, r"ngram\.orders: each order once, got \[5, 5\]"),
    ({"ngram__discount_fallback": ["ptbx"]},
     r"ngram\.discount_fallback: unknown corpus 'ptbx'; known: ptb, "),
])
def test_bad_ngram_params_name_the_key(tmp_path, changes, message):
    with pytest.raises(ParamsError, match=message):
        load_section("ngram", NgramParams, write_params(tmp_path, **changes))


@pytest.mark.parametrize("custom, message", [
    ({"level": "byte"}, r"prepare\.custom\.level: 'byte' is not one of 'word', 'char'"),
    ({"ratios": [0.5, 0.5]}, r"prepare\.custom\.ratios: expected three positive shares"),
    ({"ratios": [0.8, 0.1, 0.2]}, r"prepare\.custom\.ratios: shares must sum to 1"),
    ({"min_count": 0}, r"prepare\.custom\.min_count: must be >= 1"),
    ({"min_count": True}, r"prepare\.custom\.min_count: expected an integer, got True"),
    ({"extra": 1}, r"unknown key prepare\.custom\.extra"),
])
def test_bad_prepare_params_name_the_key(tmp_path, custom, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["custom"].update(custom)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=message):
        load_section("prepare", PrepareParams, path)


def test_missing_key_is_named(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["download"]["mirror"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError, match=r"missing key download\.mirror"):
        load_section("download", DownloadParams, path)


@pytest.mark.parametrize("section, key, value, message", [
    # nan slips past every `x < 0` refusal; clip nan would silently turn clipping off
    ("train", "clip", float("nan"), r"train\.presets\.quick\.defaults\.clip: expected a "
     r"finite number, got nan"),
    ("train", "lr", float("inf"), r"train\.presets\.quick\.defaults\.lr: expected a finite"),
    ("sample", "seed", -1, r"sample\.seed: must be >= 0, got -1"),
])
def test_values_every_check_would_let_through_are_refused(tmp_path, section, key, value,
                                                          message):
    from pipeline.presets import TrainParams
    from pipeline.sampling import SampleParams

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    target = params["train"]["presets"]["quick"]["defaults"] if section == "train" \
        else params[section]
    target[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cls = {"train": TrainParams, "sample": SampleParams}[section]
    with pytest.raises(ParamsError, match=message):
        load_section(section, cls, path)


def test_a_broken_or_misspelt_params_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  preset: [quick\n")
    with pytest.raises(ParamsError, match=r"params\.yaml line 3, column 1: not valid YAML "):
        load_section("train", dict, path)
    path.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "params.yaml").read_text()),
                                    "trian": {"preset": "small"}}))
    with pytest.raises(ParamsError, match=r"unknown section 'trian' \(known: corpora, "):
        load_section("train", dict, path)


def test_gradient_windows_longer_than_the_split_name_the_key():
    from pipeline.analysis import AnalyseParams

    params = load_section("analyse", AnalyseParams, REPO / "params.yaml")
    g = params.gradients
    params.check_split(g.warmup + g.distance + 2)  # just fits
    with pytest.raises(ParamsError, match=r"analyse\.gradients\.distance: a window of "):
        params.check_split(g.warmup + g.distance + 1)


def test_a_stage_for_a_corpus_the_params_do_not_list_names_the_list(tmp_path):
    from pipeline.lineup import models_of

    assert models_of("ptb", REPO / "params.yaml")[0] == "kn2"
    listed = ", ".join(yaml.safe_load((REPO / "params.yaml").read_text())["corpora"])
    with pytest.raises(ParamsError, match=r"corpora: 'wikitext2' is not listed in .* \(listed: "
                                          + re.escape(listed) + r"\)$"):
        models_of("wikitext2", REPO / "params.yaml")
