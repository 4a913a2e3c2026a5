"""The `train` section of params.yaml: presets, and one model's resolved settings.

A preset has three layers, applied in this order (a later one wins):

    train.presets.<preset>.defaults            every setting, for every model
    train.presets.<preset>.models.<model>      what differs for one model
    train.presets.<preset>.corpora.<corpus>    what differs on one corpus (all models)

Every model and every corpus has its entry in both layers ({} for no change):
dvc.yaml makes train@<corpus>-<model> depend on exactly `defaults`, its model's
entry and its corpus's entry, so a change reruns only the stages it concerns.

Each setting is a field of NetworkConfig or TrainConfig; the resolved mapping is
split between the two by field name, so a new field is declared once, in its
dataclass. See every resolved value and the layer it came from with

    python -m pipeline.presets show ptb lstm2 [--preset small]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.corpora import CORPUS_NAMES
from pipeline.errors import run_stage
from pipeline.model_spec import NETWORK_KEYS, TRAINING_KEYS, ModelSpec
from pipeline.networks import KINDS, NetworkConfig
from pipeline.params import PARAMS_FILE, ParamsError, build, load_section, require
from pipeline.precision import PRECISIONS
from pipeline.schedule import TrainConfig

LAYERS = ("defaults", "models", "corpora")


@dataclass(frozen=True)
class TrainParams:
    preset: str
    models: tuple[str, ...]  # the neural models every corpus gets (dvc.yaml expands them)
    device: Literal["auto", "cpu", "cuda", "mps"]
    cuda_precision: dict  # model -> fp32 | tf32 | bf16: its training steps on CUDA
    cuda_graphs: bool  # replay each training step as a CUDA graph (pipeline/graphed.py)
    cpu_precision: Literal["auto", "fp32", "bf16"]  # training steps on a CPU (precision.py)
    eval_chunk: int  # tokens per forward pass when scoring (does not change the result)
    checkpoint_every_s: float  # seconds between mid-epoch resume points; 0 = eval points only
    nproc: int  # data-parallel ranks on this machine (torchrun); 1 = one plain process
    presets: dict

    def validate(self, key: str) -> None:
        for model in self.models:
            require(model in KINDS, f"{key}.models",
                    f"unknown model {model!r}; known: {', '.join(KINDS)}")
        require(self.preset in self.presets, f"{key}.preset",
                f"unknown preset {self.preset!r}; defined: {', '.join(self.presets)}")
        require(self.eval_chunk > 0, f"{key}.eval_chunk",
                f"must be positive, got {self.eval_chunk}")
        require(self.checkpoint_every_s >= 0, f"{key}.checkpoint_every_s",
                f"must be >= 0, got {self.checkpoint_every_s}")
        require(self.nproc >= 1, f"{key}.nproc", f"must be >= 1, got {self.nproc}")
        require(isinstance(self.cuda_precision, dict)
                and sorted(self.cuda_precision) == sorted(KINDS), f"{key}.cuda_precision",
                f"expected a mapping with an entry for each of {', '.join(KINDS)}, got "
                f"{self.cuda_precision!r}")
        for model, precision in self.cuda_precision.items():
            require(precision in PRECISIONS, f"{key}.cuda_precision.{model}",
                    f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        for name in self.presets:
            self._check_layers(name)
        for model in self.models:  # every combination of the chosen preset must resolve
            for corpus in ("", *(self.presets[self.preset].get("corpora") or {})):
                self.spec(corpus, model)

    def _check_layers(self, preset: str) -> None:
        """All three layers, with an entry for every model and corpus ({} = no change):
        dvc.yaml tracks each train stage's own entries, so each must exist."""
        key = f"train.presets.{preset}"
        layers = self.presets[preset]
        require(isinstance(layers, dict), key, "expected a mapping of defaults/models/corpora")
        for name in layers:
            require(name in LAYERS, f"{key}.{name}",
                    f"unknown layer; a preset has {', '.join(LAYERS)}")
        require(isinstance(layers.get("defaults"), dict), f"{key}.defaults",
                "expected a mapping of every setting")
        for layer, known in (("models", KINDS), ("corpora", CORPUS_NAMES)):
            entries = layers.get(layer)
            require(isinstance(entries, dict), f"{key}.{layer}",
                    f"expected a mapping with an entry for each of {', '.join(known)}")
            for name in entries:
                require(name in known, f"{key}.{layer}.{name}",
                        f"unknown {layer[:-1] if layer == 'models' else 'corpus'}; known: "
                        f"{', '.join(known)}")
            for name in known:
                require(name in entries, f"{key}.{layer}",
                        f"no entry for {name!r}: write `{name}: {{}}` for no change (DVC "
                        "tracks each entry as a param of that model's or corpus's stages)")

    def resolve(self, corpus: str, model: str,
                preset: str | None = None) -> dict[str, tuple[Any, str]]:
        """setting -> (value, the params key it came from), layers applied in order."""
        preset = preset or self.preset
        if preset not in self.presets:
            raise ParamsError(f"unknown preset {preset!r}; defined: {', '.join(self.presets)}")
        layers = self.presets[preset]
        key = f"train.presets.{preset}"
        sources = [(f"{key}.defaults", layers.get("defaults")),
                   (f"{key}.models.{model}", (layers.get("models") or {}).get(model)),
                   (f"{key}.corpora.{corpus}", (layers.get("corpora") or {}).get(corpus))]
        resolved: dict[str, tuple[Any, str]] = {}
        for where, changes in sources:
            if changes is None:
                continue
            if not isinstance(changes, dict):
                raise ParamsError(f"{where}: expected a mapping, got {changes!r}")
            for name, value in changes.items():
                if name not in NETWORK_KEYS + TRAINING_KEYS:
                    raise ParamsError(f"unknown key {where}.{name} (settings: "
                                      f"{', '.join(NETWORK_KEYS + TRAINING_KEYS)})")
                resolved[name] = (value, where)
        return resolved

    def spec(self, corpus: str, model: str, preset: str | None = None) -> ModelSpec:
        """The typed, checked settings of `model` on `corpus` (the chosen preset by default)."""
        resolved = self.resolve(corpus, model, preset)
        missing = [k for k in NETWORK_KEYS + TRAINING_KEYS if k not in resolved]
        where = f"train.presets.{preset or self.preset}"
        if missing:
            raise ParamsError(f"missing key {where}.defaults.{missing[0]} (no layer sets it "
                              f"for {model} on {corpus or 'any corpus'})")
        values = {k: v for k, (v, _) in resolved.items()}
        try:
            network = build(NetworkConfig, {"kind": model, "vocab_size": 1,
                                            **{k: values[k] for k in NETWORK_KEYS}}, where)
            training = build(TrainConfig, {k: values[k] for k in TRAINING_KEYS}, where)
        except ParamsError as exc:  # name the layer that set the bad value
            name = str(exc).removeprefix(f"{where}.").split(":")[0].split("[")[0]
            if name not in resolved:
                raise
            raise ParamsError(str(exc).replace(f"{where}.", f"{resolved[name][1]}.", 1)) \
                from None
        for name, problem in network.check() + training.check():
            raise ParamsError(f"{resolved[name][1]}.{name}: {problem}")
        return ModelSpec(network, training)


def show(corpus: str, model: str, preset: str | None = None, path: Path = PARAMS_FILE) -> str:
    """The resolved settings of `model` on `corpus`, one per line with their source."""
    if corpus not in CORPUS_NAMES:
        raise ParamsError(f"unknown corpus {corpus!r}; known: {', '.join(CORPUS_NAMES)}")
    if model not in KINDS:
        raise ParamsError(f"unknown model {model!r}; known: {', '.join(KINDS)}")
    params = load_section("train", TrainParams, path)
    spec = params.spec(corpus, model, preset)  # checks every value
    resolved = params.resolve(corpus, model, preset)
    flat = spec.flat()
    width = max(map(len, flat))
    lines = [f"# {model} on {corpus}, preset {preset or params.preset}"]
    lines += [f"{name:<{width}}  {flat[name]!r:<12}  {resolved[name][1]}" for name in flat]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print resolved settings from params.yaml.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("show", help="a neural model's resolved training settings")
    cmd.add_argument("corpus")
    cmd.add_argument("model")
    cmd.add_argument("--preset", help="default: train.preset")
    args = parser.parse_args(argv)
    print(show(args.corpus, args.model, args.preset))  # a ParamsError: see run_stage


if __name__ == "__main__":
    run_stage(main)
