"""Which tokens carry loss under real chat templates (tests/trainer/chat_templates/), how a
template's own refusal is reported, and tool-calling rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest

from kubetune_trainer.chat_masks import turn_end_marker
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.modeling import load_tokenizer
from kubetune_trainer.tokens import row_tokens, tokenize_split

TEMPLATES = Path(__file__).parent / "chat_templates"
# The special tokens of the families under test, added to the tiny tokenizer so that each
# marker is one token as in the real tokenizers.
FAMILY_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "[INST]",
    "[/INST]",
    "[TOOL_CALLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
]

TWO_TURNS = {
    "messages": [
        {"role": "system", "content": "SYSTEM-TEXT be brief"},
        {"role": "user", "content": "USER-ONE what is two plus two"},
        {"role": "assistant", "content": "ANSWER-ONE four"},
        {"role": "user", "content": "USER-TWO and three plus three"},
        {"role": "assistant", "content": "ANSWER-TWO six"},
    ]
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "USER-ASK weather in Oslo"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call12345",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call12345", "content": "TOOL-RESULT minus three"},
        {"role": "assistant", "content": "ANSWER-WEATHER it is cold"},
    ],
    "tools": json.dumps([WEATHER_TOOL]),
}


@pytest.fixture(scope="module")
def base_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    return tokenizer


def with_template(tokenizer, name: str):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = (TEMPLATES / name).read_text()
    return tokenizer


def trained_runs(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive tokens that carry loss."""
    ids, mask = row_tokens(row, tokenizer)
    runs: list[list[int]] = []
    for position, (token, keep) in enumerate(zip(ids, mask, strict=True)):
        if keep:
            if position == 0 or not mask[position - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def test_mistral_v03_trains_both_answers_and_no_user_turn(base_tokenizer):
    tokenizer = with_template(base_tokenizer, "mistral_v0.3.jinja")
    # The template puts the system text into the last user turn only: rendering a prefix of
    # the conversation differs from the conversation.
    assert turn_end_marker(tokenizer) == "</s>"
    # (The space after [/INST] is its own token in the tiny vocabulary and stays prompt; in
    # Mistral's own vocabulary "▁ANSWER" is one token overlapping the answer, so it trains.)
    assert trained_runs(tokenizer, TWO_TURNS) == ["ANSWER-ONE four</s>", "ANSWER-TWO six</s>"]


def test_qwen3_trains_every_answer_and_no_think_block(base_tokenizer):
    tokenizer = with_template(base_tokenizer, "qwen3.jinja")
    runs = trained_runs(tokenizer, TWO_TURNS)
    assert runs == ["ANSWER-ONE four<|im_end|>", "ANSWER-TWO six<|im_end|>"]
    # The last turn's empty <think> block is rendered (as the served prompt has it) but
    # never a training target.
    ids, _ = row_tokens(TWO_TURNS, tokenizer)
    assert "<think>" in tokenizer.decode(ids)


def test_generation_markers_are_used_when_the_template_has_them(base_tokenizer):
    tokenizer = with_template(base_tokenizer, "qwen3_training.jinja")
    runs = trained_runs(tokenizer, TWO_TURNS)
    # TRL's training variant wraps the whole assistant turn, reasoning block included.
    assert runs == [
        "<think>\n\n</think>\n\nANSWER-ONE four<|im_end|>\n",
        "<think>\n\n</think>\n\nANSWER-TWO six<|im_end|>\n",
    ]


@pytest.mark.parametrize("template", ["qwen3_training.jinja", "qwen3.jinja", "mistral_v0.3.jinja"])
def test_tool_calls_are_trained_and_tool_results_are_not(base_tokenizer, template):
    tokenizer = with_template(base_tokenizer, template)
    ids, _ = row_tokens(TOOL_ROW, tokenizer)
    assert "get_weather" in tokenizer.decode(ids).split("Oslo")[0], "tools reach the template"
    runs = trained_runs(tokenizer, TOOL_ROW)
    assert len(runs) == 2, runs
    call, answer = runs
    assert "get_weather" in call and "Oslo" in call and "TOOL-RESULT" not in call
    assert "ANSWER-WEATHER it is cold" in answer
    for run in runs:
        assert "USER-ASK" not in run and "TOOL-RESULT" not in run


def test_a_template_refusal_is_bad_input_naming_the_row(base_tokenizer):
    tokenizer = with_template(base_tokenizer, "gemma.jinja")
    rows = datasets.Dataset.from_list([{"messages": m} for m in (TWO_TURNS["messages"][1:3],)])
    tokenize_split(rows, ["chat.jsonl: row 1"], tokenizer, max_length=64, train_on_prompt=False)
    with_system = datasets.Dataset.from_list([{"messages": TWO_TURNS["messages"][:3]}] * 2)
    with pytest.raises(BadInputError) as refused:
        tokenize_split(
            with_system,
            ["chat.jsonl: row 1", "chat.jsonl: row 2"],
            tokenizer,
            max_length=64,
            train_on_prompt=False,
        )
    assert str(refused.value) == (
        "chat.jsonl: row 1: the chat template refuses this conversation: System role not supported"
    )


def test_a_template_that_hides_the_answer_is_refused(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    # Renders a summary instead of the answer and has no {% generation %} markers.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    )
    with pytest.raises(BadInputError, match="cannot tell which tokens of assistant message 2"):
        row_tokens({"messages": TWO_TURNS["messages"][1:3]}, tokenizer, where="d.jsonl: row 4")


def test_tool_calling_rows_load_as_chat_and_keep_their_tools(base_tokenizer, tmp_path):
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.data import load_training_data

    as_written = copy.deepcopy(TOOL_ROW)
    as_written["tools"] = [WEATHER_TOOL]  # a list in the file, arguments as an object
    as_written["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Oslo"}
    as_written["messages"][1]["content"] = None
    plain = {"messages": TWO_TURNS["messages"][1:3]}
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in (as_written, plain)) + "\n")
    data = load_training_data(
        DatasetSpec(uri=path.as_uri(), validationSplit=0), seed=0, cache_dir=tmp_path / "cache"
    )
    assert data.format == "chat"
    tokenizer = with_template(base_tokenizer, "qwen3.jinja")
    tool_row, plain_row = data.train.to_list()
    call = trained_runs(tokenizer, tool_row)[0]
    assert '{"name": "get_weather", "arguments": {"city": "Oslo"}}' in call
    assert trained_runs(tokenizer, plain_row) == ["ANSWER-ONE four<|im_end|>"]


def test_a_custom_templates_turn_end_stops_generation(base_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.chat_masks import register_turn_end
    from kubetune_trainer.evaluate.inference import stop_token_ids, until_stop

    tokenizer = with_template(base_tokenizer, "qwen3.jinja")  # a base model given ChatML
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    old_eos = tokenizer.eos_token_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in stop_token_ids(model, tokenizer)
    assert register_turn_end(model, tokenizer) is None
    assert tokenizer.eos_token == "<|im_end|>"  # saved with the tokenizer: servers stop too
    assert set(stop_token_ids(model, tokenizer)) >= {im_end, old_eos}
    answer = tokenizer.encode("four<|im_end|>\n<|im_start|>user", add_special_tokens=False)
    assert tokenizer.decode(until_stop(answer, stop_token_ids(model, tokenizer))) == "four"


def test_a_turn_end_of_several_tokens_is_reported(base_tokenizer, tiny_model_dir):
    from types import SimpleNamespace

    from kubetune_trainer.chat_masks import register_turn_end

    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} END-OF-TURN\n{% endfor %}"
    )
    note = register_turn_end(SimpleNamespace(generation_config=None), tokenizer)
    assert note and "'END-OF-TURN'" in note and "cannot stop" in note


def test_an_answer_quoted_in_the_system_prompt_is_not_trained_there(base_tokenizer):
    tokenizer = with_template(base_tokenizer, "qwen3.jinja")
    row = {
        "messages": [
            {"role": "system", "content": "Always reply with OK."},
            {"role": "user", "content": "USER-ONE ping"},
            {"role": "assistant", "content": "OK."},
        ]
    }
    ids, mask = row_tokens(row, tokenizer)
    assert trained_runs(tokenizer, row) == ["OK.<|im_end|>"]
    first_trained = mask.index(1)
    assert "USER-ONE" in tokenizer.decode(ids[:first_trained])
