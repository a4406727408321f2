"""Packed-row attention: a padding-free row gives every example exactly what it gets alone,
gradients included, and everything that is not a packed row is plain SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune_trainer.modeling import VARLEN_SDPA, Hardware, build_model, packed_attention

CPU = Hardware("cpu", bf16_supported=False)
LENGTHS = [7, 12, 3, 9]


def _model(model_dir: Path, attention: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attention)
    # As in training: TRL passes use_cache=False (with a cache, transformers does not look for
    # packed sequences in the position ids). Dropout is 0 in the tiny model.
    model.config.use_cache = False
    return model.train()


def _examples(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab_size, (n,), generator=generator) for n in LENGTHS]


def _packed_batch(examples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What TRL's padding-free collator produces for these examples."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    return collate([{"input_ids": example.tolist()} for example in examples])


def test_packed_row_matches_examples_run_alone(tiny_model_dir: Path):
    model = _model(tiny_model_dir, VARLEN_SDPA)
    examples = _examples(model.config.vocab_size)
    batch = _packed_batch(examples)
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 22, 31]

    packed_logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    alone = torch.cat([model(input_ids=example[None]).logits[0] for example in examples])
    torch.testing.assert_close(packed_logits, alone, atol=1e-5, rtol=1e-4)

    # Gradients too: the packed loss equals the sum of per-example losses (token-weighted).
    model.zero_grad()
    model(**batch).loss.backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    predicted = sum(n - 1 for n in LENGTHS)
    for example in examples:
        out = model(input_ids=example[None], labels=example[None])
        (out.loss * (len(example) - 1) / predicted).backward()
    alone_grad = model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(packed_grad, alone_grad, atol=1e-6, rtol=1e-4)


def test_packed_row_matches_sdpa_with_block_diagonal_mask(tiny_model_dir: Path):
    """Same numbers as transformers' own packed-sequence path (dense block-diagonal mask)."""
    ours, reference = _model(tiny_model_dir, VARLEN_SDPA), _model(tiny_model_dir, "sdpa")
    batch = _packed_batch(_examples(ours.config.vocab_size))
    torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits)
    # Without the per-example split (one causal row), the result differs: the test can fail.
    unsplit = {"input_ids": batch["input_ids"]}
    assert not torch.allclose(ours(**unsplit).logits, ours(**batch).logits, atol=1e-3)


def test_padded_batch_and_generation_fall_back_to_sdpa(tiny_model_dir: Path):
    ours, reference = _model(tiny_model_dir, VARLEN_SDPA), _model(tiny_model_dir, "sdpa")
    ids = torch.randint(
        3, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5)
    )
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    torch.testing.assert_close(
        ours(input_ids=ids, attention_mask=mask).logits,
        reference(input_ids=ids, attention_mask=mask).logits,
    )
    ours.eval(), reference.eval()
    prompt = ids[:1, :5]
    generated = ours.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected = reference.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize(("packing", "expected"), [(True, VARLEN_SDPA), (False, "sdpa")])
def test_build_model_picks_attention_for_the_batch_layout(
    packing, expected, tiny_job, tiny_model_dir, tmp_path
):
    manifest = tiny_job((tmp_path / "out").as_uri(), method="lora", training={"packing": packing})
    built = build_model(FineTuneJob.model_validate(manifest).spec, tiny_model_dir, hardware=CPU)
    assert built.model.config._attn_implementation == expected


def test_packed_attention_per_device(monkeypatch):
    import kubetune_trainer.modeling as modeling

    gpu = Hardware("cuda", bf16_supported=True)
    # Without flash-attn: PyTorch's own varlen kernel, never the dense block-diagonal mask
    # (which computes attention over the whole flattened batch) while torch has one.
    assert modeling.torch_varlen_available()  # torch >= 2.9 is a dependency
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: False)
    assert packed_attention(gpu) == VARLEN_SDPA
    monkeypatch.setattr(modeling, "torch_varlen_available", lambda: False)
    assert packed_attention(gpu) == "sdpa"
    monkeypatch.setattr(modeling, "is_flash_attn_2_available", lambda: True)
    assert packed_attention(gpu) == "flash_attention_2"
    assert packed_attention(CPU) == VARLEN_SDPA
