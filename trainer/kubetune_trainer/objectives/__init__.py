"""Objectives beyond SFT: dpo, orpo, kto (preference) and grpo (verifiable rewards).

`data`: the row formats and their checks; `rewards`: the built-in reward functions;
`training`: TRL's trainer for each objective; `evaluation`: preference accuracy and mean
reward of the base and the tuned model.
"""
