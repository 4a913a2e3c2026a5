"""Which models the configured pipeline builds for each corpus, and their names.

Decided by the params that expand dvc.yaml (`corpora`, `ngram.orders`,
`train.models`); the leaderboard and the sample stage both ask here, so a file
left behind by a model no longer configured is never reported. (The stages that
own those keys validate them; this module only reads them.)
"""

from __future__ import annotations

from pathlib import Path

from pipeline.params import PARAMS_FILE, ParamsError, read_params

NGRAM_PREFIX = "kn"


def ngram_name(order: int) -> str:
    return f"{NGRAM_PREFIX}{order}"


def is_ngram(model: str) -> bool:
    return model.startswith(NGRAM_PREFIX)


def configured_models(path: Path = PARAMS_FILE) -> dict[str, list[str]]:
    """corpus -> model names (`kn<order>` for n-grams, then the neural models)."""
    params = read_params(path)
    orders = params["ngram"]["orders"]
    neural = params["train"]["models"]
    return {corpus: [*(ngram_name(o) for o in orders), *neural]
            for corpus in params.get("corpora") or []}


def models_of(corpus: str, path: Path = PARAMS_FILE) -> list[str]:
    """configured_models()[corpus], or a ParamsError for a corpus the params do not list."""
    models = configured_models(path)
    if corpus not in models:
        raise ParamsError(f"corpora: {corpus!r} is not listed in {path} (listed: "
                          f"{', '.join(models)})")
    return models[corpus]
