"""The vLLM teacher backend (`--backend vllm`), for teachers too big or slow for transformers.

Written against vLLM's documented offline API: `LLM(model, tensor_parallel_size,
max_logprobs, ...)`, `SamplingParams(max_tokens, temperature, seed, prompt_logprobs=k)` and
`TokensPrompt(prompt_token_ids=...)`. It mirrors the hf backend: generate the answer tokens,
then score prompt + answer in one prefill-only request whose `prompt_logprobs` give, at every
answer token, the top-k of the full-vocabulary log-softmax. The scoring request runs at
temperature 1, so the stored log-probs are T=1 whatever the sampling temperature was.
vLLM indexes prompt log-probs by the token they score (entry p is the distribution that
predicts token p; entry 0 is None), so answer token t is entry len(prompt) + t.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from primekd.errors import PrimekdError
from primekd.models import ModelSource, load_tokenizer
from primekd.teacher_hf import Generation, TopK


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise PrimekdError(
            "--backend vllm needs vLLM, which is not installed: pip install 'primekd[vllm]' "
            "on a machine with a supported GPU, or use --backend hf"
        ) from None
    return vllm


class VLLMTeacher:
    name = "vllm"

    def __init__(self, source: ModelSource, top_k: int, tensor_parallel_size: int = 1,
                 seed: int = 0) -> None:
        vllm = _import_vllm()
        self.tokenizer = load_tokenizer(source)
        self.llm = vllm.LLM(
            model=source.path,
            tokenizer=source.path,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            max_logprobs=max(20, top_k),
            # Prompt log-probs and prefix caching have a history of failing or returning
            # stale values together (vllm-project/vllm#13409, #42019): scoring must be exact.
            enable_prefix_caching=False,
        )
        self._params = vllm.SamplingParams
        from vllm.inputs import TokensPrompt

        self._prompt = TokensPrompt

    def generate(
        self,
        prompts: Sequence[list[int]],
        max_new_tokens: int,
        temperature: float,
        seed: int,
    ) -> list[Generation]:
        requests = [self._prompt(prompt_token_ids=list(p)) for p in prompts]
        # One seed per request: a sample does not depend on what else is in the batch.
        params = [
            self._params(max_tokens=max_new_tokens, temperature=temperature,
                         seed=zlib.crc32(f"{seed}:{i}".encode()), skip_special_tokens=True)
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [_generation(output.outputs[0]) for output in outputs]

    def score(
        self, prompts: Sequence[list[int]], answers: Sequence[list[int]], top_k: int
    ) -> list[TopK]:
        requests = [self._prompt(prompt_token_ids=list(p) + list(a))
                    for p, a in zip(prompts, answers, strict=True)]
        params = self._params(max_tokens=1, temperature=1.0, prompt_logprobs=top_k)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [
            _topk(output.prompt_logprobs[len(p):], top_k)
            for output, p in zip(outputs, prompts, strict=True)
        ]


def _generation(completion: Any) -> Generation:
    finish = "stop" if completion.finish_reason == "stop" else "length"
    return Generation(list(completion.token_ids), finish)


def _topk(positions: Sequence[dict[int, Any]], top_k: int) -> TopK:
    """Top-k arrays from vLLM's per-position {token id: Logprob} dicts.

    Each dict holds the top k plus, when it fell outside them, the scored token itself;
    keeping the k largest drops that extra entry.
    """
    ids = np.zeros((len(positions), top_k), dtype=np.int32)
    logprobs = np.zeros((len(positions), top_k), dtype=np.float32)
    for t, candidates in enumerate(positions):
        best = sorted(candidates.items(), key=lambda item: -item[1].logprob)[:top_k]
        ids[t] = [token for token, _ in best]
        logprobs[t] = [entry.logprob for _, entry in best]
    return TopK(ids, logprobs)
