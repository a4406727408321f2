"""Mixture-of-experts weights for LoRA: fused expert parameters, not linear layers.

In transformers 5 the experts of Mixtral, Qwen2/3-MoE, DeepSeek-V3, gpt-oss and others are
one module holding every expert's weights as 3-D `nn.Parameter`s (`experts.gate_up_proj`,
`experts.down_proj`: experts x out x in), so `all-linear` (linear layers only) would adapt
attention and leave every expert frozen. peft adapts such parameters with
`LoraConfig.target_parameters` (`lora.ParamWrapper`); this module finds them and says what
is adapted and what is not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# peft's ParamWrapper cannot apply dropout: x cannot be factored out of B(A(dropout(x))).
DROPOUT_NOTE = (
    "spec.lora.dropout {dropout} applies to no layer: peft adapts fused expert parameters "
    "without dropout, and one LoRA config holds one dropout, so it is 0 for the whole adapter"
)


def expert_parameters(model: Any) -> list[str]:
    """Fused expert weights of `model` (a meta model will do), as peft's target_parameters
    names them: '<module>.<parameter>' (e.g. 'experts.gate_up_proj'), matched as a suffix.
    A fused expert weight is a parameter of three dimensions (experts x out x in) held by a
    module directly; biases (two dimensions) and routers stay as they are."""
    found = set()
    for name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim == 3:
                found.add(f"{name.rsplit('.', 1)[-1]}.{parameter_name}")
    return sorted(found)


@dataclass
class AdapterTargets:
    """What the adapter covers: linear modules (peft target_modules), fused expert parameters
    (peft target_parameters) and the expert parameters left frozen."""

    modules: list[str] | None  # None: resolved by modeling.resolve_target_modules
    parameters: list[str] = field(default_factory=list)
    not_adapted: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)  # names for target_modules

    def document(self, modules: list[str]) -> dict[str, Any]:
        return {
            "modules": modules,
            "expertParameters": self.parameters,
            "expertParametersNotAdapted": self.not_adapted,
        }


def split_targets(targets: list[str], model: Any) -> AdapterTargets:
    """Split spec.lora.targetModules into linear-module names and fused expert parameters.

    'all-linear' adapts every fused expert weight too (they are the experts' linear layers);
    a name that is an expert parameter ('gate_up_proj' or 'experts.gate_up_proj') adapts it.
    """
    experts = expert_parameters(model)
    chosen: set[str] = set()
    remaining: list[str] = []
    for target in targets:
        matches = [p for p in experts if p == target or p.endswith("." + target)]
        if target == "all-linear":
            chosen.update(experts)
            remaining.append(target)
        elif matches:
            chosen.update(matches)
        else:
            remaining.append(target)
    parameters = sorted(chosen)
    return AdapterTargets(
        modules=None,
        parameters=parameters,
        not_adapted=[p for p in experts if p not in chosen],
        remaining=remaining,
    )


def not_adapted_warning(not_adapted: list[str], model_type: str) -> str:
    return (
        f"spec.lora.targetModules: the experts of this {model_type} model are not adapted "
        f"({', '.join(not_adapted)} stay frozen); add all-linear or name them"
    )
