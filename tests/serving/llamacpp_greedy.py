"""Greedy decoding with llama.cpp (llama-cpp-python), run by the llama.cpp environment's
interpreter (hack/llamacpp.sh), not the project's.

  python llamacpp_greedy.py MODEL.gguf [--lora ADAPTER.gguf] --tokens N < prompts.json

stdin: a JSON list of prompts as token ids (the HF tokenizer's, so both sides see the same
input); stdout: a JSON list of N generated token ids per prompt. Each step takes the argmax of
llama.cpp's logits for the last position; end-of-sequence is masked, as HF's
`min_new_tokens=N` masks it, so both sides decode exactly N tokens.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--lora")
    parser.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    prompts = json.load(sys.stdin)
    llm = Llama(
        model_path=args.model,
        lora_path=args.lora,
        n_ctx=256,
        n_batch=256,
        n_threads=2,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    eos = llm.token_eos()
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        generated: list[int] = []
        for _ in range(args.tokens):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            logits[eos] = -np.inf
            token = int(np.argmax(logits))
            generated.append(token)
            llm.eval([token])
        out.append(generated)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
