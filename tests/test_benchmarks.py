"""The throughput benchmark measures the train stage's own step and the one scorer."""

from __future__ import annotations

import torch

import benchmarks.throughput as throughput
from pipeline import perplexity, training


def test_throughput_times_the_train_stages_own_step_and_scorer(monkeypatch):
    calls = {"train_step": 0, "score_stream": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    # the stage's step and the one scorer, not copies
    assert throughput.train_step is training.train_step
    assert throughput.score_stream is perplexity.score_stream
    monkeypatch.setattr(throughput, "train_step", counted("train_step", training.train_step))
    monkeypatch.setattr(throughput, "score_stream",
                        counted("score_stream", throughput.score_stream))
    row = throughput.measure("quick", "lstm", vocab=300, steps=10, eval_tokens=700,
                             device="cpu", bf16=False)
    assert calls == {"train_step": 3 + 10, "score_stream": throughput.EVAL_PASSES}
    assert row["model"] == "lstm" and row["precision"] == "fp32"
    assert row["batch"] == "20x35"  # the quick preset's resolved batch and unroll
    assert row["train_tok_s"] > 0 and row["eval_tok_s"] > 0 and row["peak_mib"] > 0
    # 6 x the parameters in matrix products per token: all of them, the embedding being
    # tied to the output projection
    assert row["gflop_s"] == 6 * row["parameters"] * row["train_tok_s"] / 1e9


def test_matrix_product_peak_and_profile_are_real_measurements():
    assert throughput.matmul_peak("cpu", torch.float32, size=256, seconds=0.2) > 0.1
    shares = throughput.profile_step("quick", "window", vocab=300, device="cpu", bf16=False,
                                     steps=2, top=5)
    assert len(shares) == 5 and all(0 < share <= 1 for _, share in shares)
    assert sum(share for _, share in shares) <= 1 + 1e-9
    assert any("mm" in name for name, _ in shares)  # the window model's products
