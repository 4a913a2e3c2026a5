"""Text from every model of one corpus, side by side (the `sample` stage's work,
pipeline/stages/sample.py).

Every model continues the same prompt with the same seed and temperature.
N-grams are sampled from KenLM's conditional distribution over the whole
prepared vocabulary (</s> standing for <eos>, after which the context restarts
at <s>); neural models from their softmax, with their state carried along.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.dataset import EOS, PreparedCorpus, Vocabulary
from pipeline.kneser_ney import kenlm_word
from pipeline.lineup import is_ngram
from pipeline.params import require


@dataclass(frozen=True)
class SampleParams:
    seed: int
    temperature: float
    words: int  # tokens to generate on word corpora
    chars: int  # tokens to generate on character corpora
    prompt: str  # "" = start after an end of line

    def validate(self, key: str) -> None:
        require(0 < self.temperature < math.inf, f"{key}.temperature",
                f"must be a positive finite number, got {self.temperature}")
        require(self.seed >= 0, f"{key}.seed", f"must be >= 0, got {self.seed}")
        for name in ("words", "chars"):
            require(getattr(self, name) > 0, f"{key}.{name}",
                    f"must be positive, got {getattr(self, name)}")


def encode_prompt(prompt: str, vocab: Vocabulary) -> list[int]:
    """The prompt's ids; tokens outside the vocabulary become <unk>, with a warning on
    stderr that shows the prompt the models actually continue."""
    index = {tok: i for i, tok in enumerate(vocab.tokens)}
    index["\n"] = vocab.eos_id  # a line break in a character prompt is an end of line
    pieces = list(prompt) if vocab.level == "char" else prompt.split()
    unknown = list(dict.fromkeys(p for p in pieces if p not in index))
    ids = [index.get(p, vocab.unk_id) for p in pieces]
    if unknown:
        print(f"warning: sample.prompt: {', '.join(map(repr, unknown))} not in the vocabulary; "
              f"the models continue {vocab.decode(ids)!r}", file=sys.stderr, flush=True)
    return ids


def _draw(logp: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One id from log-probabilities sharpened or flattened by `temperature`."""
    z = logp / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def sample_ngram(model_path: Path, vocab: Vocabulary, prompt: list[int], length: int,
                 temperature: float, seed: int) -> list[int]:
    import kenlm

    model = kenlm.Model(str(model_path))
    rng = np.random.default_rng(seed)
    words = ["</s>" if t == EOS else kenlm_word(i) for i, t in enumerate(vocab.tokens)]
    known = [i for i, w in enumerate(words) if w == "</s>" or w in model]
    state = kenlm.State()
    model.BeginSentenceWrite(state)

    def advance(state, token_id):
        out = kenlm.State()
        model.BaseScore(state, words[token_id], out)
        if token_id == vocab.eos_id:
            model.BeginSentenceWrite(out)
        return out

    for token_id in prompt:
        state = advance(state, token_id)
    generated: list[int] = []
    scratch = kenlm.State()
    for _ in range(length):
        log10p = np.array([model.BaseScore(state, words[i], scratch) for i in known])
        token_id = known[_draw(log10p * math.log(10.0), temperature, rng)]
        generated.append(token_id)
        state = advance(state, token_id)
    return generated


def sample_neural(model_path: Path, vocab: Vocabulary, prompt: list[int], length: int,
                  temperature: float, seed: int) -> list[int]:
    import torch

    from pipeline.checkpoints import load_model

    model = load_model(model_path, "cpu", vocab.digest()).eval()
    rng = np.random.default_rng(seed)
    history = [vocab.eos_id, *prompt]  # start after an end of line, like the scorer
    generated: list[int] = []
    with torch.no_grad():
        logits, _, state = model(torch.tensor([history]))
        for _ in range(length):
            logp = torch.log_softmax(logits[0, -1].double(), -1).numpy()
            token_id = _draw(logp, temperature, rng)
            generated.append(token_id)
            logits, _, state = model(torch.tensor([[token_id]]), state=state)
    return generated


def render_markdown(record: dict) -> str:
    """The sample report of one corpus (the record `sample_corpus` returns)."""
    prompt = record["prompt"]
    lines = [f"# Samples: {record['corpus']}", "",
             f"seed {record['seed']}, temperature {record['temperature']}, "
             f"{record['length']} tokens, prompt {prompt!r}"
             + (" (empty: each model starts after an end of line)" if not prompt else ""), ""]
    for model, text in record["samples"].items():
        lines += [f"## {model}", "", "```text", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def sample_corpus(corpus: str, data_dir: Path, models_dir: Path, models: list[str],
                  params: SampleParams) -> dict:
    """Every model's continuation of the prompt: {corpus, seed, ..., samples: {model: text}}."""
    vocab = PreparedCorpus(data_dir).vocabulary()
    prompt = encode_prompt(params.prompt, vocab)
    length = params.chars if vocab.level == "char" else params.words
    samples: dict[str, list[int]] = {}
    for model in models:
        if is_ngram(model):
            samples[model] = sample_ngram(models_dir / f"{model}.bin", vocab, prompt, length,
                                          params.temperature, params.seed)
        else:
            samples[model] = sample_neural(models_dir / f"{model}.pt", vocab, prompt, length,
                                           params.temperature, params.seed)
    return {"corpus": corpus, "seed": params.seed, "temperature": params.temperature,
            "length": length, "prompt": params.prompt,
            "samples": {m: vocab.decode(prompt + ids) for m, ids in samples.items()}}
