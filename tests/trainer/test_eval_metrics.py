"""Evaluation metrics, format checks, gates and report rendering on hand-made inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import EvalThresholds, FormatCheck, Metrics
from kubetune.report import render_report_markdown, render_report_table
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.evaluate.formats import build_format_checker
from kubetune_trainer.evaluate.gates import check_thresholds
from kubetune_trainer.evaluate.metrics import (
    exact_match,
    lcs_length,
    mean,
    perplexity,
    rouge_l,
    squad_tokens,
    token_f1,
    unsupported_content,
    unsupported_content_rate,
)
from kubetune_trainer.evaluate.report import loss_curves, write_report_files
from kubetune_trainer.evaluate.scoring import score_outputs
from kubetune_trainer.evaluate.stage import headline_metrics, regression_summary

# --- exact match -------------------------------------------------------------------------


def test_exact_match_ignores_whitespace_differences_only():
    assert exact_match('  {"a":  1}\n', '{"a": 1}') == 1.0
    assert exact_match("Paris", "paris") == 0.0  # case matters
    assert exact_match("Paris.", "Paris") == 0.0  # punctuation matters
    assert exact_match("", "") == 1.0


# --- token F1 ----------------------------------------------------------------------------


def test_squad_tokens_drop_case_punctuation_and_articles():
    assert squad_tokens("The Cat, sat on a mat!") == ["cat", "sat", "on", "mat"]


def test_token_f1_known_values():
    # pred {cat, sat}, ref {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)  # bag, not set
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0


# --- ROUGE-L -----------------------------------------------------------------------------


def test_lcs_length_known_values():
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook example (BCBA)
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_known_values():
    # LCS(police killed the gunman, police kill the gunman) = police the gunman: P = R = 3/4
    assert rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # LCS = 2 of 2 predicted and 4 reference tokens: P = 1, R = 0.5, F = 2/3
    assert rouge_l("a d", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("Same Words", "same, words") == 1.0
    assert rouge_l("x", "y") == 0.0


# --- unsupported content -----------------------------------------------------------------


def test_unsupported_content_counts_content_in_neither_prompt_nor_reference():
    found = unsupported_content(
        "In Paris there are 3 museums and Bob owns 2,000 cats.",
        "Tell me about paris.",
        "There are 3 museums and 2000 cats.",
    )
    # content: paris, 3, museums, bob, owns, 2,000, cats (function words do not count);
    # "bob" and "owns" are in no source; words match case-insensitively, numbers by value
    assert found.claims == 7
    assert sorted(found.unsupported) == ["bob", "owns"]
    assert found.rate == pytest.approx(2 / 7)


def test_list_numbering_is_layout_not_a_claim():
    prompt = "Name the two largest cities of Norway."
    reference = "Oslo and Bergen."
    numbered = unsupported_content("1. Oslo\n2. Bergen", prompt, reference)
    prose = unsupported_content("Oslo and Bergen.", prompt, reference)
    assert numbered.unsupported == prose.unsupported == ()
    assert numbered.rate == prose.rate == 0.0
    invented = unsupported_content("1) Oslo\n2) Trondheim", prompt, reference)
    assert invented.unsupported == ("trondheim",)


def test_answers_without_numbers_or_names_are_measured():
    # Lower-case prose with no number and no capitalised word still states things.
    found = unsupported_content("she sells seashells by the seashore", "Who sells what?", "")
    assert found.unsupported == ("seashells", "seashore")  # "sells" is in the prompt
    assert found.rate == pytest.approx(2 / 3)
    assert unsupported_content_rate([found]) == pytest.approx(2 / 3)


def test_unsupported_content_rate_averages_answers():
    first = unsupported_content("She met Alice at 30", "Alice", "")  # met, alice, 30: 2 of 3
    second = unsupported_content("zed and quinn", "", "")  # zed, quinn: 2 of 2
    assert unsupported_content_rate([first, second]) == pytest.approx((2 / 3 + 1) / 2)
    # An answer without content (empty, function words only) states nothing to check.
    assert unsupported_content_rate([unsupported_content("it is", "")]) is None


# --- format compliance -------------------------------------------------------------------


def test_json_format_check():
    check = build_format_checker(FormatCheck(type="json"))
    assert check(' {"a": 1} ')
    assert check("[1, 2]")
    assert not check('{"a": 1')
    assert not check("sure, here it is")


def test_json_schema_format_check():
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    check = build_format_checker(
        FormatCheck.model_validate({"type": "jsonSchema", "schema": schema})
    )
    assert check('{"name": "Ada", "age": 36}')
    assert not check('{"name": "Ada"}')  # missing field
    assert not check('{"name": "Ada", "age": "36"}')  # wrong type
    assert not check("not json")


def test_regex_format_check_is_a_full_match():
    check = build_format_checker(FormatCheck(type="regex", pattern=r"(yes|no)"))
    assert check("yes")
    assert check(" no\n")  # surrounding whitespace is ignored
    assert not check("yes, certainly")
    assert not check("maybe")


def test_bad_regex_and_bad_schema_are_bad_input_naming_the_field():
    with pytest.raises(BadInputError, match=r"^spec\.evaluation\.format\.pattern: invalid"):
        build_format_checker(FormatCheck(type="regex", pattern="(unclosed"))
    bad_schema = FormatCheck.model_validate({"type": "jsonSchema", "schema": {"type": "nonsense"}})
    with pytest.raises(BadInputError, match=r"^spec\.evaluation\.format\.schema: invalid JSON"):
        build_format_checker(bad_schema)


# --- scoring a set of outputs ------------------------------------------------------------


def test_score_outputs_averages_per_example_metrics():
    scored = score_outputs(
        outputs=['{"city": "Oslo"}', "no idea"],
        references=['{"city": "Oslo"}', '{"city": "Lima"}'],
        prompts=["City: Oslo", "City: Lima"],
        checker=build_format_checker(FormatCheck(type="json")),
    )
    assert scored.exactMatch == 0.5
    assert scored.formatCompliance == 0.5
    assert scored.format_ok == (True, False)
    assert scored.tokenF1 == pytest.approx(0.5)  # 1.0 and 0.0
    assert scored.rougeL == pytest.approx(0.5)
    # "city" and "oslo" are in the prompt; "idea" of "no idea" is in no source
    assert scored.unsupportedContentRate == pytest.approx(0.5)


def test_score_outputs_without_examples_measures_nothing():
    scored = score_outputs([], [], [], checker=None)
    assert scored.metrics() == dict.fromkeys(scored.metrics())
    assert mean([]) is None


# --- gates -------------------------------------------------------------------------------


def test_check_thresholds_names_each_missed_threshold_with_its_value():
    metrics = {"exactMatch": 0.12, "evalLoss": 2.5, "formatCompliance": 0.95, "tokenF1": 0.7}
    thresholds = EvalThresholds(
        minExactMatch=0.5, maxEvalLoss=2.0, minFormatCompliance=0.9, minTokenF1=0.6
    )
    passed, missed = check_thresholds(metrics, thresholds)
    assert passed is False
    assert missed == ["evalLoss 2.5 > maxEvalLoss 2", "exactMatch 0.12 < minExactMatch 0.5"]


def test_check_thresholds_passes_on_the_boundary_and_without_thresholds():
    assert check_thresholds({"exactMatch": 0.5}, EvalThresholds(minExactMatch=0.5)) == (True, [])
    assert check_thresholds({"exactMatch": 0.5}, None) == (None, [])
    assert check_thresholds({"exactMatch": 0.5}, EvalThresholds()) == (None, [])


def test_threshold_on_an_unmeasured_metric_is_missed():
    passed, missed = check_thresholds(
        {"regressionPerplexityIncrease": None}, EvalThresholds(maxRegressionPerplexityIncrease=0.1)
    )
    assert passed is False
    assert missed == [
        "regressionPerplexityIncrease not measured (maxRegressionPerplexityIncrease 0.1 is set)"
    ]


def test_unsupported_content_and_regression_gates_are_upper_bounds():
    thresholds = EvalThresholds(maxUnsupportedContentRate=0.2, maxRegressionPerplexityIncrease=0.1)
    metrics = {"unsupportedContentRate": 0.25, "regressionPerplexityIncrease": 0.05}
    assert check_thresholds(metrics, thresholds) == (
        False,
        ["unsupportedContentRate 0.25 > maxUnsupportedContentRate 0.2"],
    )


# --- regression, headline metrics --------------------------------------------------------


def test_regression_summary_relative_perplexity_change():
    summary = regression_summary(tuned_loss=1.1, base_loss=1.0, rows=4, source="file:///r.jsonl")
    assert summary["basePerplexity"] == pytest.approx(2.718281828)
    assert summary["relativeIncrease"] == pytest.approx(perplexity(1.1) / perplexity(1.0) - 1)
    assert regression_summary(None, 1.0, 0, None)["relativeIncrease"] is None


def test_headline_metrics_use_status_metric_names_and_skip_unmeasured():
    report = {
        "tuned": {"evalLoss": 0.5, "perplexity": 1.65, "exactMatch": 0.9, "formatCompliance": None},
        "base": {"evalLoss": 3.0, "exactMatch": 0.0, "formatCompliance": None},
        "gates": {"passed": True, "missed": []},
    }
    metrics = headline_metrics(report)
    assert set(metrics) <= set(Metrics.model_fields)
    assert metrics == {
        "evalLoss": 0.5,
        "perplexity": 1.65,
        "baseEvalLoss": 3.0,
        "exactMatch": 0.9,
        "baseExactMatch": 0.0,
        "evalPassed": True,
    }
    Metrics.model_validate(metrics)  # what the pipeline merges into the status


# --- report rendering --------------------------------------------------------------------

REPORT = {
    "method": "lora",
    "dataFormat": "prompt-completion",
    "examples": 2,
    "generation": {"maxNewTokens": 32},
    "tuned": {"evalLoss": 0.5, "exactMatch": 0.75, "formatCompliance": 1.0, "tokenF1": None},
    "base": {"evalLoss": 3.0, "exactMatch": 0.0, "formatCompliance": 0.25, "tokenF1": None},
    "regression": {"basePerplexity": 10.0, "tunedPerplexity": 11.0, "relativeIncrease": 0.1},
    "gates": {"passed": False, "missed": ["exactMatch 0.75 < minExactMatch 0.8"]},
    "samples": [{"prompt": "p", "reference": "r", "base": "b ```x```", "tuned": "t"}],
}


def test_render_report_table_rows_and_deltas():
    table = render_report_table(REPORT).splitlines()
    assert table[0] == "| Metric | Base | Tuned | Delta |"
    assert "| Eval loss | 3 | 0.5 | -2.5 (better) |" in table
    assert "| Exact match | 0.0% | 75.0% | +75.0 pp (better) |" in table
    assert "| Format compliance | 25.0% | 100.0% | +75.0 pp (better) |" in table
    assert "| Regression perplexity | 10 | 11 | +10.0% |" in table
    assert not any(line.startswith("| Token F1") for line in table)  # not measured


def test_render_report_markdown_has_gates_and_samples_that_cannot_break_fences():
    text = render_report_markdown(REPORT)
    assert "Thresholds: MISSED: exactMatch 0.75 < minExactMatch 0.8" in text
    assert "````text\nb ```x```\n````" in text  # fence longer than the output's backticks
    assert "hallucination proxy" in text


def test_report_rendering_imports_without_torch(tmp_path: Path):
    # The operator's CLI install has no torch: block it and render a report.
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    code = (
        "import sys, json; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from kubetune_trainer.evaluate.report import render_report_table\n"
        f"print(render_report_table(json.load(open({str(path)!r}))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "| Exact match | 0.0% | 75.0% |" in result.stdout


def test_write_report_files_and_loss_curves(tmp_path: Path):
    history = [
        {"step": 10, "loss": 2.0},
        {"step": 20, "loss": 1.0},
        {"step": 20, "eval_loss": 1.2},
        {"step": 20, "train_runtime": 3.0},
    ]
    assert loss_curves(history) == ([(10.0, 2.0), (20.0, 1.0)], [(20.0, 1.2)])
    report = {**REPORT, "tuned": {**REPORT["tuned"], "perplexity": float("inf")}}
    files = write_report_files(report, tmp_path, history)
    assert [f.name for f in files] == ["report.json", "report.md", "eval_loss_curve.png"]
    assert json.loads(files[0].read_text())["tuned"]["perplexity"] is None  # valid JSON
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [f.name for f in write_report_files(REPORT, tmp_path / "no-log", [])] == [
        "report.json",
        "report.md",
    ]


def test_report_md_states_usage_and_where_all_attempts_are_summed():
    report = {
        **REPORT,
        "usage": {"gpus": 2, "trainSeconds": 90.4, "tokensTrained": 123456},
    }
    text = render_report_markdown(report)
    assert (
        "Usage: 123,456 tokens trained (all attempts); this attempt trained for 90 s on 2 GPU(s) "
        "(181 GPU-seconds); status.usage sums the GPU time of every attempt."
    ) in text
    assert "Usage:" not in render_report_markdown({k: v for k, v in REPORT.items() if k != "usage"})
