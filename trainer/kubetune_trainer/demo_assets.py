"""A tiny random base model and a learnable instruction dataset, made on the spot.

Used by the quickstart, the tests and the benchmark, so that a full fine-tuning run needs no
model hub: `python -m kubetune_trainer.demo_assets DIR` writes `DIR/model/` and
`DIR/train.jsonl`.

A purely random base barely learns in a short LoRA run: its frozen output layer is noise, so
no adapter can make it confident. `write_tiny_model(..., pretrain_steps=N)` first gives it a
brief real pre-training on generic text about the same people, cities and jobs (prose and
unrelated JSON records, never the instruction format), like a real base model knows the
language but not the task. The quickstart and `kubetune demo` use it; the tests use the
random model, which is faster to make.
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


# Enough generic pre-training for the quickstart's LoRA to learn the answer format: ~10 s on
# two CPU cores.
DEMO_PRETRAIN_STEPS = 200


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


def generic_document(rng: random.Random) -> str:
    """A few sentences and JSON records about random people: pre-training text."""

    def prose() -> str:
        name, city, job = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_JOBS)
        extras = "".join(f" {e}" for e in rng.choices(_FILLERS, k=rng.randint(0, 2)))
        return rng.choice(
            [
                f"{name} is a {job} who lives in {city}{extras}. Ask {name} about {city}.",
                f"In {city}, {name} works as a {job}{extras}. {name} likes {city}.",
                f"The {job} {name} moved to {city}{extras}. {name} is still a {job} there.",
                f"Every {job} in {city} knows {name}.",
            ]
        )

    def record() -> str:
        fields = [("name", rng.choice(_NAMES)), ("city", rng.choice(_CITIES))]
        fields.append(("job", rng.choice(_JOBS)))
        rng.shuffle(fields)
        return json.dumps(dict(fields[: rng.randint(1, 3)]))

    return " ".join(prose() if rng.random() < 0.6 else record() for _ in range(rng.randint(2, 6)))


@dataclass(frozen=True)
class PretrainSettings:
    """The brief pre-training of `write_tiny_model(pretrain_steps=...)`."""

    batch_size: int = 16
    max_length: int = 128
    learning_rate: float = 3e-3


def pretrain(model, tokenizer, steps: int, *, seed: int, settings: PretrainSettings | None = None):
    """Train every weight of `model` on `steps` batches of generic text (plain AdamW loop)."""
    import torch

    settings = settings or PretrainSettings()
    rng = random.Random(seed + 2)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    model.train()
    for _ in range(steps):
        texts = [
            tokenizer.bos_token + generic_document(rng) + tokenizer.eos_token
            for _ in range(settings.batch_size)
        ]
        batch = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=settings.max_length,
            add_special_tokens=False,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


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
    pretrain_steps: int = 0,
) -> Path:
    """Save a random `LlamaForCausalLM` and its tokenizer (safetensors) under `directory`;
    with `pretrain_steps`, pre-trained that many batches on generic text first."""
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
    if pretrain_steps:
        pretrain(model, tokenizer, pretrain_steps, seed=seed)
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
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEMO_PRETRAIN_STEPS,
        help="batches of generic pre-training of the base model (default %(default)s; 0: random)",
    )
    args = parser.parse_args(argv)
    model_dir = write_tiny_model(
        args.directory / "model", seed=args.seed, pretrain_steps=args.pretrain_steps
    )
    data_path = write_demo_dataset(args.directory / "train.jsonl", args.rows, args.seed)
    print(f"model:   {model_dir}")
    print(f"dataset: {data_path} ({args.rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
