"""Data and rewards of the preference and reward objectives: pure checks, no model.

Bad rows fail as BadInputError (the trainer's exit code 3, as for SFT data) naming the file
and the row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api.v1alpha1 import DatasetSpec, RewardSpec
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.objectives.data import load_objective_data
from kubetune_trainer.objectives.evaluation import pairs_of
from kubetune_trainer.objectives.rewards import RewardModel, check_reference_columns
from tests.fixtures.preference_data import preference_rows, write_jsonl


def load(tmp_path: Path, rows: list[Any], objective: str, **spec: Any):  # noqa: ANN201
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    dataset = DatasetSpec(uri=path.as_uri(), **{"validationSplit": 0.0, **spec})
    return load_objective_data(dataset, objective, seed=7, cache_dir=tmp_path / "cache")


def error(tmp_path: Path, rows: list[Any], objective: str) -> str:
    with pytest.raises(BadInputError) as caught:
        load(tmp_path, rows, objective)
    assert "\n" not in str(caught.value)
    return str(caught.value)


GOOD = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
CHAT_PROMPT = [{"role": "user", "content": "Q"}]


@pytest.mark.parametrize(
    ("objective", "bad", "message"),
    [
        ("dpo", {"prompt": "Q", "chosen": "yes"}, "data.jsonl: objective dpo needs"),
        ("dpo", {**GOOD, "rejected": None}, "row 2: missing field 'rejected'"),
        ("orpo", {**GOOD, "chosen": "   "}, "row 2: field 'chosen' is empty"),
        ("dpo", {**GOOD, "rejected": "yes"}, "row 2: chosen and rejected are the same"),
        (
            "dpo",
            {"prompt": CHAT_PROMPT, "chosen": "yes", "rejected": [{"role": "assistant"}]},
            "row 2: field 'chosen' must be a list of assistant messages",
        ),
        (
            "dpo",
            {"prompt": CHAT_PROMPT, "chosen": CHAT_PROMPT, "rejected": CHAT_PROMPT},
            "row 2: chosen message 1: chosen holds assistant messages only",
        ),
        (
            "kto",
            {"prompt": "Q", "completion": "A", "label": "maybe"},
            "row 2: field 'label' must be true or false, got 'maybe'",
        ),
        (
            "kto",
            {"prompt": "Q", "completion": "A", "label": 1},
            "row 2: field 'label' must be true or false, got 1",
        ),
        ("grpo", {"prompt": " "}, "row 2: field 'prompt' is empty"),
        ("grpo", {"answer": "4"}, "objective grpo needs prompt (prompt-only) columns"),
    ],
)
def test_a_bad_row_is_refused_naming_file_and_row(tmp_path, objective, bad, message):
    first = {
        "dpo": GOOD,
        "orpo": GOOD,
        "kto": {"prompt": "Q", "completion": "A", "label": True},
        "grpo": {"prompt": "Q"},
    }[objective]
    if "needs" in message:  # a missing column everywhere: the format is not recognised
        first = bad
    assert message in error(tmp_path, [first, bad], objective)


def test_conversational_pairs_load_and_kto_unpairs_them_mixed(tmp_path):
    chat = {
        "prompt": CHAT_PROMPT,
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    data = load(tmp_path, [chat] * 3, "dpo")
    assert data.format == "preference" and data.train[0] == chat

    rows = preference_rows(20)
    kto = load(tmp_path, rows, "kto", validationSplit=0.2)
    assert kto.format == "unpaired-preference"
    assert kto.train_rows == 32 and kto.validation_rows == 4  # pairs held out whole
    labels = kto.train["label"]
    assert sorted(labels) == [False] * 16 + [True] * 16
    # TRL's KTO reads rows in order: chosen and rejected must not simply alternate.
    assert labels != [i % 2 == 0 for i in range(32)]
    assert all(r.endswith(("(chosen)", "(rejected)")) for r in kto.train_refs)
    assert len(pairs_of(kto.validation.to_list())) == 4


def test_kto_labels_from_csv_text(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion,label\nQ,A,true\nQ,B,False\n")
    data = load_objective_data(
        DatasetSpec(uri=path.as_uri(), validationSplit=0.0), "kto", seed=1, cache_dir=tmp_path
    )
    assert sorted(data.train["label"]) == [False, True]
    assert len(pairs_of(data.train.to_list())) == 1


def test_rewards_score_completions_and_combine_by_weight():
    rewards = RewardModel(
        [
            RewardSpec(type="json", weight=3),
            RewardSpec(type="exactMatch"),
        ]
    )
    row = {"answer": '{"a": 1}'}
    assert rewards.combined('{"a": 1}', row) == 1.0
    assert rewards.combined('{"a": 2}', row) == 0.75
    assert rewards.combined("prose", row) == 0.0
    # Conversational completions: the assistant's text.
    assert rewards.combined([{"role": "assistant", "content": ' {"a": 1} '}], row) == 1.0

    length = RewardModel([RewardSpec(type="length", targetLength=10)])
    assert length.combined("x" * 10, {}) == 1.0
    assert length.combined("x" * 15, {}) == 0.5
    assert length.combined("x" * 30, {}) == 0.0

    contains, schema = RewardModel(
        [RewardSpec(type="contains", column="city"), RewardSpec(type="regex", pattern="[A-Z].*")]
    ).trl_functions()
    scores = contains(prompts=["p", "p"], completions=["in Paris", "Lima"], city=["Paris", "X"])
    assert scores == [1.0, 0.0]
    assert schema(prompts=["p"], completions=["Fine"], city=["-"]) == [1.0]


def test_reward_problems_name_the_reward(tmp_path):
    with pytest.raises(BadInputError, match=r"spec.rewards\[1\].pattern: invalid regular"):
        RewardModel([RewardSpec(type="json"), RewardSpec(type="regex", pattern="(")])
    spec = RewardSpec.model_validate({"type": "jsonSchema", "schema": {"type": "nope"}})
    with pytest.raises(BadInputError, match=r"spec.rewards\[0\].schema: invalid JSON Schema"):
        RewardModel([spec])
    with pytest.raises(BadInputError, match=r"data.jsonl: row 2: missing field 'answer'"):
        check_reference_columns(
            [RewardSpec(type="exactMatch")],
            [{"prompt": "a", "answer": "1"}, {"prompt": "b"}],
            ["data.jsonl: row 1", "data.jsonl: row 2"],
        )


def test_a_checkpoint_resumes_only_under_the_same_objective_settings():
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.checkpoints import training_fingerprint

    base = {
        "model": {"uri": "hf://org/m"},
        "dataset": {"uri": "s3://d/x.jsonl"},
        "output": {"uri": "s3://o/"},
    }

    def digest(**spec: Any) -> str:
        return training_fingerprint(FineTuneJobSpec.model_validate({**base, **spec}), "sha256:x")

    sft = digest()
    assert digest(objective="sft") == sft  # existing SFT checkpoints keep resuming
    dpo = digest(objective="dpo")
    assert len({sft, dpo, digest(objective="orpo"), digest(objective="kto")}) == 4
    assert digest(objective="dpo", preference={"beta": 0.5}) != dpo
