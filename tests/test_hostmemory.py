"""Reusing freed host memory (pipeline/hostmemory.py): no fresh pages per training step,
and the same numbers. Each run is its own process: the setting is process-wide."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

BLOCKS = """
import resource, sys, torch
from pipeline.hostmemory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
faults = []
for _ in range(15):  # a 45 MB tensor (the logits of a 16,000-word vocabulary), written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(20 * 35 * 16_000).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults)
"""

TRAINING = """
import hashlib, json, sys, torch
from pipeline.hostmemory import reuse_freed_memory
from pipeline.networks import LanguageModel, NetworkConfig
from pipeline.schedule import TrainConfig
from pipeline.steps import make_optimizer, train_step
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
torch.manual_seed(0)
net = NetworkConfig(kind="lstm2", vocab_size=10_000, embedding_size=200, hidden_size=200,
                    context=0, dropout=0.2, tie_weights=True, direct_connections=False,
                    init_range=0.1)
cfg = TrainConfig(batch_size=20, bptt=35, epochs=1, max_tokens=0, evals_per_epoch=1,
                  optimizer="sgd", lr=20.0, loss="token_mean", schedule="decay",
                  lr_decay=1.0, decay_after=0, plateau_threshold=0.0,
                  stop_after_plateaus=0, warmup=0.0, lr_min=0.0, clip=0.25, seed=0)
model = LanguageModel(net)
opt = make_optimizer(model, cfg)
ids = torch.randint(0, 10_000, (20, 36))
state, losses = None, []
for step in range(20):
    loss, _, state = train_step(model, opt, ids[:, :-1], ids[:, 1:], state, cfg=cfg,
                                autocast=False)
    losses.append(loss.item().hex())
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
print(json.dumps({"losses": losses, "weights": weights.hexdigest()}))
"""


def run(script: str, mode: str) -> str:
    """`script`'s output, run in a fresh process under glibc's default settings (none
    inherited from the environment) or after reuse_freed_memory()."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", script, mode], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


# with transparent huge pages always on, a fresh 45 MB block faults in 2 MB at a time
@pytest.mark.skipif(THP.exists() and "[always]" in THP.read_text(),
                    reason="page faults counted in 4 KiB pages")
def test_freed_blocks_are_reused_instead_of_faulted_in_afresh():
    pages = 20 * 35 * 16_000 * 4 // 4096  # per block
    default, reuse = json.loads(run(BLOCKS, "default")), json.loads(run(BLOCKS, "reuse"))
    # glibc's default gives a block above 32 MiB pages of its own, every time
    assert min(default) >= 0.9 * pages
    # the heap keeps it for the next one, once the heap has grown around the small
    # blocks Python takes in between (7 rounds, here)
    assert max(reuse[-5:]) <= 0.01 * pages


def test_reusing_freed_memory_changes_no_number():
    default = json.loads(run(TRAINING, "default"))
    reuse = json.loads(run(TRAINING, "reuse"))
    assert default == reuse  # the same losses and weights after twenty steps, bit for bit
    assert len(set(default["losses"])) == 20  # twenty real steps
