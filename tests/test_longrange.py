"""The long-range corpus (pipeline/longrange.py): its exact entropy against enumeration
and sampling, its dependent positions recovered from prepared ids, and the floor."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from pipeline.dataset import PreparedCorpus
from pipeline.encoding import prepare_corpus
from pipeline.fetch import download_corpus
from pipeline.longrange import LongRangeParams, LongRangeSource
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.recall import dependency_losses, dependent_positions
from pipeline.synthetic import SOURCE_FILE
from tests.conftest import PREPARE_PARAMS, download_params

TINY = LongRangeParams(keys=3, fillers=2, alpha=1.0, copy_prob=0.7, gaps=(2, 3, 5),
                       tokens=(3000, 400, 400), seed=4)


def entropy_by_enumeration(source: LongRangeSource) -> float:
    """Every possible line, its probability written out from the generative story, and
    H = E[-log P(line)] / E[tokens per line]; independent of the closed form."""
    P, pf = source.params, source.filler_probs
    nll = length = 0.0
    for d in P.gaps:
        for x, y in itertools.product(range(P.keys), repeat=2):
            answer = P.copy_prob if x == y else (1 - P.copy_prob) / (P.keys - 1)
            for fill in itertools.product(range(P.fillers), repeat=d - 2):
                p = (1 / len(P.gaps)) * (1 / P.keys) * answer * math.prod(pf[f] for f in fill)
                nll -= p * math.log(p)
                length += p * (d + 2)
    return nll / length


def test_entropy_rate_matches_enumeration_and_sampling():
    source = LongRangeSource(TINY)
    exact = source.entropy_rate()
    assert exact == pytest.approx(entropy_by_enumeration(source), abs=1e-12)
    lines, nll = source.sample(200_000, np.random.default_rng(0))
    tokens = sum(len(line) + 1 for line in lines)
    assert nll / tokens == pytest.approx(exact, abs=0.01)
    # the answer repeats the key at the rate the floor assumes
    copies = np.mean([line[-1] == line[0] for line in lines])
    assert copies == pytest.approx(TINY.copy_prob, abs=0.01)


def test_dependent_positions_and_the_floor_from_prepared_ids(tmp_path):
    params = dataclasses.replace(download_params(), longrange=TINY)
    raw = download_corpus("longrange", tmp_path / "raw", params)
    source = json.loads((raw / SOURCE_FILE).read_text())
    meta = prepare_corpus("longrange", raw, tmp_path / "prepared", PREPARE_PARAMS)
    assert meta["source"]["dependencies"]["gaps"] == [2, 3, 5]
    prepared = PreparedCorpus(tmp_path / "prepared")
    vocab = prepared.vocabulary()
    ids = np.asarray(prepared.ids("valid"))
    positions, gaps = dependent_positions(ids, query_id=vocab.tokens.index("q"),
                                          eos_id=vocab.eos_id)
    lines = (raw / "valid.txt").read_text().splitlines()
    assert len(positions) == len(lines)  # one dependency per line
    assert [g for g in gaps] == [len(line.split()) - 1 for line in lines]
    # the answer sits exactly `gap` tokens after the line's first token, a key
    assert all(vocab.tokens[ids[p - g]].startswith("k") for p, g in zip(positions, gaps,
                                                                        strict=True))

    torch.manual_seed(0)
    model = LanguageModel(NetworkConfig(kind="gru", vocab_size=len(vocab), embedding_size=4,
                                        hidden_size=4, context=0, dropout=0.0,
                                        tie_weights=False, direct_connections=False,
                                        init_range=0.1))
    losses = dependency_losses({"gru": model}, ids, vocab=vocab, source=meta["source"])
    assert losses["floor_nats"] == pytest.approx(
        -0.7 * math.log(0.7) - 0.3 * math.log(0.15))
    assert losses["forget_nats"] == pytest.approx(math.log(3) - losses["floor_nats"])
    assert sum(losses["positions"].values()) == len(lines)
    assert source["splits"]["valid"]["tokens"] == len(ids)
    gru = losses["models"]["gru"]
    # an untrained model is near uniform: about log V at the answers, far above the floor
    assert gru["loss_nats"] == pytest.approx([math.log(len(vocab))] * 3, rel=0.05)
    assert np.allclose(np.array(gru["loss_nats"]) - losses["floor_nats"], gru["excess_nats"])
    assert gru["carried_gap"] is None  # an untrained model carries nothing


def test_the_largest_carried_gap_is_the_largest_below_half_a_nat():
    from pipeline.recall import carried_gap

    assert carried_gap([5, 10, 20, 50], [0.1, 0.6, 0.45, 1.9]) == 20  # not only a prefix
    assert carried_gap([5, 10], [0.5, 1.2]) is None  # "below": 0.5 is not carried
    assert carried_gap([5, 10, 100], [0.0, 0.2, 0.3]) == 100


def test_the_report_table_names_each_model_s_largest_carried_gap():
    from pipeline.page import dependencies_table

    record = {"floor_nats": 1.089, "forget_nats": 1.906, "carried_below_nats": 0.5,
              "split": "valid",
              "models": {"gru": {"gaps": [5, 50], "excess_nats": [0.1, 0.2], "carried_gap": 50},
                         "rnn": {"gaps": [5, 50], "excess_nats": [1.9, 1.9],
                                 "carried_gap": None}}}
    page = dependencies_table(record)
    assert "<th>largest gap carried</th>" in page and "below 0.5 nats" in page
    assert "<td>gru</td><td>0.100</td><td>0.200</td><td>50</td>" in page
    assert "<td>rnn</td><td>1.900</td><td>1.900</td><td>none</td>" in page
