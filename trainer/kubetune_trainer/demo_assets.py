"""A tiny random base model and a learnable instruction dataset, made on the spot.

Used by the quickstart, the tests and the benchmark, so that a full fine-tuning run needs no
model hub: `python -m kubetune_trainer.demo_assets DIR` writes `DIR/model/` and
`DIR/train.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# Roles are spelled out as plain text so the byte-level tokenizer needs no special tokens
# beyond bos/eos/pad; the end of each turn is the eos token, so generation stops there.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

_NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
_CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Quito", "Porto", "Cairo", "Riga", "Hanoi"]
_JOBS = ["baker", "pilot", "nurse", "welder", "tailor", "farmer", "lawyer", "chemist"]
_FILLERS = [
    "on most days",
    "since last spring",
    "with two cats",
    "near the old harbour",
    "and enjoys long walks by the river",
    "after moving there from the coast",
    "while learning to play the violin in the evenings",
    "and volunteers at the library every weekend",
]


@dataclass(frozen=True)
class TinyModelShape:
    """Size of the random Llama model; the defaults train in seconds on a CPU."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 768
    max_position_embeddings: int = 2048


def filler_count(rng: random.Random, long_tail: bool) -> int:
    """How many extra clauses pad the sentence. `long_tail`: log-normal, like the lengths of
    real instruction data (most rows short, a few several times longer), capped at 60."""
    if long_tail:
        return min(60, int(rng.lognormvariate(1.0, 1.2)))
    return rng.randint(0, 4)


def demo_example(rng: random.Random, *, long_tail: bool = False) -> dict[str, str]:
    """One alpaca row: a sentence about a person; the answer is always the same JSON shape."""
    name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
    extras = rng.choices(_FILLERS, k=filler_count(rng, long_tail))
    sentence = f"{name} is a {job} who lives in {city}" + "".join(f" {e}" for e in extras) + "."
    return {
        "instruction": "Extract the person's name, city and job as JSON.",
        "input": sentence,
        "output": json.dumps({"name": name, "city": city, "job": job}),
    }


def demo_rows(n_rows: int, seed: int, *, long_tail: bool = False) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [demo_example(rng, long_tail=long_tail) for _ in range(n_rows)]


def write_demo_dataset(
    path: Path, n_rows: int = 256, seed: int = 0, *, long_tail: bool = False
) -> Path:
    """Write `n_rows` alpaca-style JSON lines of variable length to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in demo_rows(n_rows, seed, long_tail=long_tail):
            out.write(json.dumps(row) + "\n")
    return path


def _tokenizer_corpus(seed: int) -> Iterator[str]:
    # The tokenizer learns merges from the same kind of text it will see, plus the chat markers
    # and the alpaca prompt wording, so sequences stay short.
    for row in demo_rows(2000, seed + 1):
        yield row["instruction"] + "\n" + row["input"] + "\n" + row["output"]
    yield "### user:\n### assistant:\n### system:\n### Instruction:\n### Input:\n### Response:\n"
    yield 'The quick brown fox jumps over the lazy dog. 0123456789 {}[]":,.'


def build_tokenizer(vocab_size: int, *, seed: int = 0, chat_template: bool = True):
    """A byte-level BPE tokenizer (any text encodes) trained on demo-like text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_model(
    directory: Path,
    *,
    seed: int = 0,
    chat_template: bool = True,
    shape: TinyModelShape | None = None,
) -> Path:
    """Save a random `LlamaForCausalLM` and its tokenizer (safetensors) under `directory`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    shape = shape or TinyModelShape()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.vocab_size, seed=seed, chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_trainer.demo_assets",
        description="Write a tiny random model (DIR/model) and a demo dataset (DIR/train.jsonl).",
    )
    parser.add_argument("directory", type=Path)
    parser.add_argument("--rows", type=int, default=256, help="dataset rows (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model_dir = write_tiny_model(args.directory / "model", seed=args.seed)
    data_path = write_demo_dataset(args.directory / "train.jsonl", args.rows, args.seed)
    print(f"model:   {model_dir}")
    print(f"dataset: {data_path} ({args.rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
