"""One model's settings: its network and its training configuration, as a preset resolves
them (pipeline/presets.py) and as the training loop takes them (pipeline/training.py).

Apart from presets.py so that the training loop does not import the params machinery:
a resume point's fingerprint hashes every module the loop imports (pipeline/resume.py),
and a change to how params are read or which corpora exist moves no training number.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.networks import NetworkConfig
from pipeline.schedule import TrainConfig

# NetworkConfig's kind and vocab_size come from the stage and the corpus, not params
NETWORK_KEYS = tuple(f.name for f in dataclasses.fields(NetworkConfig)
                     if f.name not in ("kind", "vocab_size"))
TRAINING_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


@dataclass(frozen=True)
class ModelSpec:
    """One model's settings in a preset, on one corpus: what the training loop trains."""

    network: NetworkConfig  # vocab_size is 1 until the corpus's vocabulary is known
    training: TrainConfig

    def for_vocabulary(self, vocab_size: int) -> NetworkConfig:
        return dataclasses.replace(self.network, vocab_size=vocab_size)

    def flat(self) -> dict[str, Any]:
        """The settings as params.yaml spells them (for MLflow and metrics files)."""
        net = dataclasses.asdict(self.network)
        return {**{k: net[k] for k in NETWORK_KEYS}, **dataclasses.asdict(self.training)}
