"""What the evaluation's numbers are computed over: loss over every held-out example,
generation over the first maxSamples."""

from __future__ import annotations

import pytest

from kubetune_trainer.evaluate import EvalInputs, evaluate_after_training
from kubetune_trainer.evaluate.examples import build_example
from kubetune_trainer.evaluate.inference import token_loss
from tests.trainer.test_eval_e2e import job_spec, load_tiny, person_rows


def test_eval_loss_and_its_gate_cover_the_whole_validation_set(tiny_model_dir, tmp_path):
    model, tokenizer = load_tiny(tiny_model_dir)
    rows = person_rows()[:10]
    examples = [build_example(row, tokenizer) for row in rows]
    whole = token_loss(model, examples, pad_id=0, batch_size=4, max_length=2048)
    first_two = token_loss(model, examples[:2], pad_id=0, batch_size=4, max_length=2048)
    assert whole.loss != pytest.approx(first_two.loss, rel=1e-3)
    # A gate between the two losses: only the whole set's loss decides it.
    gate = (whole.loss + first_two.loss) / 2
    outcome = evaluate_after_training(
        EvalInputs(
            spec=job_spec("lora", maxSamples=2, maxNewTokens=2, thresholds={"maxEvalLoss": gate}),
            model=model,
            tokenizer=tokenizer,
            base_model_path=tiny_model_dir,
            eval_rows=rows,
            data_format="prompt-completion",
            out_dir=tmp_path / "eval",
        )
    )
    report = outcome.report
    assert report["tuned"]["evalLoss"] == pytest.approx(whole.loss, rel=1e-5)
    assert report["tuned"]["lossTokens"] == whole.tokens
    assert outcome.metrics["evalLoss"] == pytest.approx(whole.loss, rel=1e-5)
    assert (report["lossExamples"], report["examples"], report["generatedExamples"]) == (10, 2, 2)
    assert outcome.passed is (whole.loss <= gate)
    assert "of all 10 examples" in (tmp_path / "eval" / "report.md").read_text()
