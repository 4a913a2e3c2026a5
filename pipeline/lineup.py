"""Which models the configured pipeline builds for each corpus.

Decided by the params that expand dvc.yaml (`corpora`, `ngram.orders`,
`train.models`); the leaderboard and the sample stage both ask here, so a file
left behind by a model no longer configured is never reported.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.ngram import NgramParams, model_name
from pipeline.params import PARAMS_FILE, load_section, read_params
from pipeline.train import TrainParams


def configured_models(path: Path = PARAMS_FILE) -> dict[str, list[str]]:
    """corpus -> model names (`kn<order>` for n-grams, then the neural models)."""
    orders = load_section("ngram", NgramParams, path).orders
    neural = load_section("train", TrainParams, path).models
    corpora = read_params(path).get("corpora") or []
    return {corpus: [*(model_name(order) for order in orders), *neural] for corpus in corpora}


def is_ngram(model: str) -> bool:
    return model.startswith("kn")
