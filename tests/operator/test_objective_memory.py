"""The GPU memory check counts the reference model of dpo and kto with full fine-tuning."""

from __future__ import annotations

from kubetune_operator import validation
from tests.operator.test_builders import SETTINGS, make_ftj

FULL70_ON_16 = {
    "model": {"uri": "hf://meta-llama/Llama-2-70b-hf"},
    "method": "full",
    "resources": {"gpus": 8, "nodes": 2},
}
H100 = SETTINGS.model_copy(update={"gpu_memory_gib": 80.0})


def test_a_full_fine_tune_with_a_live_reference_needs_room_for_its_copy() -> None:
    # SFT fits (~78 GiB per GPU sharded over 16); a live reference copy adds ~10 GiB.
    assert validation.check_gpus(make_ftj(**FULL70_ON_16).spec, H100) is None
    dpo = make_ftj(**FULL70_ON_16, objective="dpo")
    problem = validation.check_gpus(dpo.spec, H100)
    assert problem is not None
    assert "with objective dpo's reference copy" in problem.message
    assert "needs about 88 GiB per GPU" in problem.message, problem.message
    # Precomputed reference log-probabilities keep no copy; orpo has no reference at all.
    precomputed = make_ftj(
        **FULL70_ON_16, objective="kto", preference={"referenceModel": "precomputed"}
    )
    assert validation.check_gpus(precomputed.spec, H100) is None
    assert validation.check_gpus(make_ftj(**FULL70_ON_16, objective="orpo").spec, H100) is None


def test_an_adapter_reference_is_its_base_with_the_adapter_off() -> None:
    lora = {**FULL70_ON_16, "method": "lora", "model": {"uri": "hf://org/llama-8b"}}
    assert not validation.holds_reference_copy(make_ftj(**lora, objective="dpo").spec)
    grpo = {"objective": "grpo", "rewards": [{"type": "json"}], "grpo": {"beta": 0.04}}
    assert validation.holds_reference_copy(make_ftj(**FULL70_ON_16, **grpo).spec)
