"""Reusing freed host memory (pipeline/hostmemory.py): no fresh pages per training step,
and the same numbers. Each run is its own process: the setting is process-wide."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

TRAINING = """
import hashlib, json, resource, sys, torch
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.training import TrainConfig, make_optimizer, train_step
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.manual_seed(0)
net = NetworkConfig(kind="lstm2", vocab_size=3000, embedding_size=64, hidden_size=64,
                    context=0, dropout=0.2, tie_weights=True, direct_connections=False,
                    init_range=0.1)
cfg = TrainConfig(batch_size=20, bptt=35, epochs=1, max_tokens=0, evals_per_epoch=1,
                  optimizer="sgd", lr=20.0, loss="token_mean", schedule="decay",
                  lr_decay=1.0, decay_after=0, warmup=0.0, lr_min=0.0, clip=0.25, seed=0)
model = LanguageModel(net)
opt = make_optimizer(model, cfg)
ids = torch.randint(0, 3000, (20, 36))
state, losses = None, []
for step in range(10):
    if step == 5:  # steady state: the last five steps
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    loss, _, state = train_step(model, opt, ids[:, :-1], ids[:, 1:], state, cfg=cfg,
                                autocast=False)
    losses.append(loss.item().hex())
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
print(json.dumps({"losses": losses, "weights": weights.hexdigest(), "faults": faults}))
"""


def train(mode: str) -> dict:
    """Ten training steps of a small lstm2 in a fresh process: {losses, weights, faults}."""
    done = subprocess.run([sys.executable, "-c", TRAINING, mode], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout)


def test_reusing_freed_memory_saves_the_page_faults_and_changes_no_number():
    default, reuse = train("default"), train("reuse")
    # glibc's default hands the step's freed activations back to the kernel, so every
    # step faults fresh pages in (about 2,000 per step here; 12,000 for the quick preset)
    assert default["faults"] >= 5 * 500
    assert reuse["faults"] <= default["faults"] / 20
    # the same losses and weights, bit for bit, after ten real steps
    assert (default["losses"], default["weights"]) == (reuse["losses"], reuse["weights"])
    assert len(set(default["losses"])) == 10
