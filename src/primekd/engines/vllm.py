"""The vLLM engine: a vLLM (or SGLang) OpenAI-compatible server, reached over HTTP.

primekd either starts the server itself (`engines.vllm_server`: one alive at a time, stopped
with its whole process group when primekd exits or another model needs the server) or uses a
running one at `base_url` after checking that it tokenizes like the model. A server primekd
started that dies or stops answering mid-call is restarted once, and only the requests that
had not finished are sent again.

Requests go to `/v1/completions` with token-id prompts (primekd renders the chat template, so
both engines see the same ids), concurrently (bounded), and come back as they finish:

- generation: `logprobs=k` gives the top-k of the raw (T=1, full-vocabulary) log-softmax at
  every generated token (vLLM's default `raw_logprobs` mode), `return_token_ids` the ids;
- scoring: `prompt_logprobs=k` on prompt + continuation, `max_tokens=1`. Prompt log-probs are
  a [tokens, vocabulary] tensor that vLLM does not count when it sizes its memory, so the
  tokens of scoring requests in flight are bounded (`score_tokens`), and prefix caching is
  off on servers primekd starts (cached prefixes have returned stale prompt log-probs).

Sampling parameters are sent in full (`--generation-config vllm` too), so a model's
generation_config (repetition penalty, top-k, ...) never changes what greedy means.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from primekd.core.errors import PrimekdError
from primekd.core.models import adapter_hash, cache_dir, load_model, load_tokenizer, resolve
from primekd.engines.base import Generation, SamplingParams, TopK, finish
from primekd.engines.hf import stop_token_ids
from primekd.engines.vllm_server import (  # noqa: F401  VLLMServer, vllm_python re-exported
    SERVER_FLAGS,
    VLLMServer,
    discard,
    running_server,
    shutdown,
    vllm_python,
)

# Options primekd itself reads.
CLIENT_OPTIONS = {
    "python": "Python of the vLLM environment (default: .venv-vllm/bin/python, "
              "$PRIMEKD_VLLM_PYTHON, or this Python when it has vllm)",
    "command": "full server command instead of `<python> -m vllm.entrypoints.openai."
               "api_server` (a list or a string; primekd appends --host/--port/--model/...)",
    "extra_args": "more server arguments (a list or a string)",
    "kv_cache_space": "CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, default 2)",
    "startup_timeout": "seconds to wait for the server to answer (default 900)",
    "request_timeout": "seconds one request may take (default: no limit, the server's "
                       "/health is watched instead; on CPU vLLM's execute timeout of one "
                       "model step is this or 1800)",
    "health_interval": "seconds between checks of the server's /health while requests are "
                       "in flight (default 30); 3 failed checks in a row: the server is lost",
    "concurrency": "generation requests in flight (default: --batch-size, else 64)",
    "score_tokens": "tokens of scoring requests in flight (default 8192)",
    "lora": "serve adapters with vLLM's LoRA support instead of a merged model "
            "(pays on GPU; on CPU it was 8x slower)",
    "served_model": "with --base-url: the model name to request (default: the first served)",
}
_CLIENT_ONLY = ("concurrency", "score_tokens", "health_interval")
HEALTH_MISSES = 3  # failed /health checks in a row that make a server lost
PROBE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
         "clips in May. How many clips did Natalia sell altogether?  12 + 3.5 = 15.5\n"
         "Ünïcödé «quotes» — 数学 😀 <|im_start|>assistant\n<|im_end|>\tTHE ANSWER IS 72.")


def check_options(options: dict[str, Any]) -> None:
    known = set(SERVER_FLAGS) | set(CLIENT_OPTIONS)
    for key in options:
        if key not in known:
            raise PrimekdError(f"unknown vllm engine option {key!r}; known: "
                               f"{', '.join(sorted(known))}")
    for key in ("concurrency", "score_tokens", "startup_timeout", "request_timeout",
                "health_interval"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise PrimekdError(f"vllm engine option {key} must be a positive number")


def merged_path(source: Any, adapter: str) -> Path:
    """Where `merged_model` keeps a merged copy (keyed by the model and the adapter's hash)."""
    key = hashlib.sha256(f"{source.path}:{adapter_hash(adapter)}".encode()).hexdigest()[:16]
    return cache_dir() / "merged" / f"{Path(source.path).name}-{key}"


def drop_merged(model: str, adapter: str) -> None:
    """Delete the merged copy of `adapter` once it is no longer needed (a full model each)."""
    shutil.rmtree(merged_path(resolve(model), adapter), ignore_errors=True)


def merged_model(source: Any, adapter: str) -> str:
    """The model with `adapter` merged into its weights, saved once in primekd's cache (keyed
    by the model and the adapter's hash): vLLM serves it like any model."""
    target = merged_path(source, adapter)
    if (target / "config.json").exists():
        return str(target)
    # in the checkpoint's dtype ("auto"): a float32 copy of a bf16 8B model is 32 GB
    model = load_model(source, adapter=adapter, device="cpu", dtype="auto").merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        load_tokenizer(source).save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# ---------------------------------------------------------------------- the engine


class VLLMEngine:
    name = "vllm"

    def __init__(self, url: str, served: str, tokenizer: Any, stop_ids: list[int],
                 options: dict[str, Any], server: VLLMServer | None = None,
                 batch_size: int | None = None) -> None:
        self.url, self.served, self.tokenizer = url.rstrip("/"), served, tokenizer
        self.stop_ids, self.options, self.server = stop_ids, options, server
        self.concurrency = int(options.get("concurrency") or batch_size or 64)
        self.score_tokens = int(options.get("score_tokens", 8192))
        self._loop = asyncio.new_event_loop()
        self._client: Any = None
        self.adapter: str | None = None  # a LoRA adapter loaded into `server` at run time

    @classmethod
    def open(cls, model: str, adapter: str | None = None, base_url: str | None = None,
             options: dict[str, Any] | None = None, batch_size: int | None = None
             ) -> VLLMEngine:
        options = dict(options or {})
        check_options(options)
        source = resolve(model)
        tokenizer = load_tokenizer(source)
        stop_ids = _stop_ids(source, tokenizer)
        if base_url:
            if adapter and not options.get("served_model"):
                raise PrimekdError("--adapter with --base-url: serve the adapter as a LoRA "
                                   "module there and name it with --engine-option "
                                   "served_model=NAME")
            served = served_model(base_url, options.get("served_model"),
                                  model=(model, source.path))
            check_tokenizer(base_url, served, tokenizer, model)
            return cls(base_url, served, tokenizer, stop_ids, options, batch_size=batch_size)
        lora = bool(adapter and options.get("lora"))
        path = merged_model(source, adapter) if adapter and not lora else source.path
        server = running_server(path, {k: v for k, v in options.items()
                                       if k not in _CLIENT_ONLY}, lora)
        served = server.load_adapter(str(adapter)) if lora else served_model(server.url)
        engine = cls(server.url, served, tokenizer, stop_ids, options, server, batch_size)
        engine.adapter = str(adapter) if lora else None
        return engine

    def close(self) -> None:
        """Closes the connection; the server stays up for the next stage (see `shutdown`)."""
        self._drop_client()
        self._loop.close()

    # ------------------------------------------------------------------ requests

    def generate(self, prompts: Sequence[list[int]], sampling: SamplingParams
                 ) -> Iterator[tuple[int, Generation]]:
        sampling.validate()
        limit = asyncio.Semaphore(self.concurrency)

        def job(i: int) -> Callable[[], Awaitable[Generation]]:
            async def run() -> Generation:
                async with limit:
                    body = self._generation_body(prompts[i], sampling, i)
                    return self._generation(await self._post(body), sampling)
            return run

        yield from self._resilient(job, len(prompts))

    def score(self, prompts: Sequence[list[int]], continuations: Sequence[list[int]], k: int
              ) -> Iterator[tuple[int, TopK]]:
        budget = _TokenBudget(self.score_tokens)

        def job(i: int) -> Callable[[], Awaitable[TopK]]:
            async def run() -> TopK:
                ids = list(prompts[i]) + list(continuations[i])
                async with budget.take(len(ids)):
                    body = {"model": self.served, "prompt": ids, "max_tokens": 1,
                            "temperature": 0.0, "prompt_logprobs": k,
                            "return_tokens_as_token_ids": True}
                    response = await self._post(body)
                entries = response["choices"][0]["prompt_logprobs"][len(prompts[i]):]
                return topk_arrays(entries, k)
            return run

        if any(not c for c in continuations):
            raise ValueError("every answer needs at least one token to score")
        yield from self._resilient(job, len(prompts))

    def _generation_body(self, prompt: list[int], sampling: SamplingParams, i: int
                         ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served, "prompt": list(prompt),
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0, "top_k": -1,
            "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
            "frequency_penalty": 0.0, "stop_token_ids": self.stop_ids,
            "ignore_eos": False, "skip_special_tokens": True, "return_token_ids": True,
            "return_tokens_as_token_ids": True,
        }
        if sampling.temperature > 0:  # one seed per request: independent of batching
            body["seed"] = zlib.crc32(f"{sampling.seed}:{i}".encode())
        if sampling.stop:  # stop early, keep the stop string: `finish` cuts as hf does
            body.update(stop=list(sampling.stop), include_stop_str_in_output=True)
        if sampling.logprobs:
            body["logprobs"] = sampling.logprobs
        return body

    def _generation(self, response: dict[str, Any], sampling: SamplingParams) -> Generation:
        choice = response["choices"][0]
        ids = [int(t) for t in choice.get("token_ids") or []]
        topk = None
        if sampling.logprobs:
            topk = topk_arrays(choice["logprobs"]["top_logprobs"], sampling.logprobs)
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        generation = finish(self.tokenizer, ids, reason, sampling, set(self.stop_ids), topk)
        if reason == "stop" and generation.finish_reason == "length":
            generation = replace(generation, finish_reason="stop")
        return generation

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is None:
            # No read limit by default: a request waits behind everything in flight (on 2
            # CPU cores, 64 answers of 384 tokens from a 1.5B model took over 30 minutes),
            # so a timeout would call a busy server dead; `_watch` checks that it lives.
            limit = self.options.get("request_timeout")
            timeout = httpx.Timeout(float(limit) if limit else None, connect=60.0)
            # no pool limit: `concurrency` (or the scoring budget) bounds what is in flight,
            # and httpx's default of 100 connections silently held back the rest
            self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                             limits=httpx.Limits(max_connections=None))
        try:
            response = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise ServerLost(f"{type(e).__name__}: {e}".rstrip(": ")) from None
        if response.status_code != 200:
            refused = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code >= 500 and not await self._answers():
                raise ServerLost(refused)
            raise PrimekdError(f"the vLLM server at {self.url} refused a request ({refused})")
        return response.json()

    async def _answers(self) -> bool:
        """Whether the server still works (vLLM's /health says 503 once its engine died)."""
        if self.server is not None and not self.server.alive():
            return False
        if self._client is None:
            return True  # no request sent yet
        try:  # its own connection: never queued behind the requests in flight
            async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
                return (await client.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch(self) -> None:
        """Raise ServerLost once the server process exits or its /health fails
        HEALTH_MISSES times in a row; runs beside the requests of `_stream`."""
        interval, misses = float(self.options.get("health_interval") or 30), 0
        while True:
            await asyncio.sleep(interval)
            if await self._answers():
                misses = 0
                continue
            misses += 1
            if misses >= HEALTH_MISSES or (self.server is not None and
                                           not self.server.alive()):
                raise ServerLost(f"/health failed {misses} time(s) in a row, "
                                 f"{interval:.0f} s apart")

    def _resilient(self, job: Callable[[int], Callable[[], Awaitable[Any]]], n: int
                   ) -> Iterator[tuple[int, Any]]:
        """`_stream` over jobs 0..n-1. When a server primekd started dies or stops answering
        midway, it is restarted once and the unfinished jobs run again; the caller has had
        every finished result already (eval and teach have saved them)."""
        todo, restarted = list(range(n)), False
        while True:
            done: set[int] = set()
            try:
                for i, result in self._stream({i: job(i) for i in todo}):
                    done.add(i)
                    yield i, result
                return
            except ServerLost as lost:
                todo = [i for i in todo if i not in done]
                if self.server is None or restarted:
                    raise PrimekdError(self._given_up(lost, restarted)) from None
                self._restart(lost)
                restarted = True

    def _restart(self, lost: ServerLost) -> None:
        old = self.server
        why = self._why(lost, old)
        discard(old)  # waits for its processes, so the new one gets the memory
        print(f"warning: the vLLM server at {self.url} stopped answering ({why}); "
              f"{old.failure()}. Restarting it once and resuming", file=sys.stderr, flush=True)
        self._drop_client()
        self.server = running_server(old.model, old.options, old.lora)
        self.url = self.server.url
        if self.adapter:
            self.served = self.server.load_adapter(self.adapter)

    def _given_up(self, lost: ServerLost, restarted: bool) -> str:
        why, again = self._why(lost, self.server), " again, after a restart" if restarted else ""
        where = ""
        if self.server is not None:
            discard(self.server)
            where = f"; {self.server.failure()}"
        return (f"the vLLM server at {self.url} stopped answering{again} ({why}){where}; "
                "finished rows are saved: rerun the same command to resume")

    @staticmethod
    def _why(lost: ServerLost, server: VLLMServer | None) -> str:
        code = server.exit_code() if server is not None else None
        return f"it exited with code {code}" if code is not None else str(lost)

    def _drop_client(self) -> None:
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._client = None

    def _stream(self, jobs: dict[int, Callable[[], Awaitable[Any]]]
                ) -> Iterator[tuple[int, Any]]:
        """Run every job concurrently on this engine's loop; yield (index, result) as each
        finishes. Leaving early (an error, a closed iterator) cancels what is in flight."""
        loop = self._loop

        async def indexed(i: int, job: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
            return i, await job()

        tasks = {loop.create_task(indexed(i, job)) for i, job in jobs.items()}
        pending = set(tasks)
        watch = loop.create_task(self._watch())
        try:
            while pending:
                done, pending = loop.run_until_complete(
                    asyncio.wait(pending | {watch}, return_when=asyncio.FIRST_COMPLETED))
                pending.discard(watch)
                for task in done - {watch}:
                    yield task.result()
                if watch in done:
                    watch.result()  # raises ServerLost, after the answers that came with it
        finally:
            watch.cancel()
            loop.run_until_complete(asyncio.gather(watch, return_exceptions=True))
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for task in tasks:  # retrieved: no "exception was never retrieved" on stderr
                if task.done() and not task.cancelled():
                    task.exception()


class ServerLost(Exception):
    """The server stopped answering a request (raised in the event loop, handled by
    `VLLMEngine._resilient`)."""


class _TokenBudget:
    """At most `limit` tokens in flight (one request alone may exceed it)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.changed = asyncio.Condition()

    def take(self, n: int) -> Any:
        budget = self

        class _Hold:
            async def __aenter__(self) -> None:
                async with budget.changed:
                    await budget.changed.wait_for(
                        lambda: budget.used == 0 or budget.used + n <= budget.limit)
                    budget.used += n

            async def __aexit__(self, *exc: Any) -> None:
                async with budget.changed:
                    budget.used -= n
                    budget.changed.notify_all()

        return _Hold()


def topk_arrays(entries: Sequence[dict[str, Any]], k: int) -> TopK:
    """Top-k arrays from vLLM's per-token log-prob dicts. Keys are token ids as text
    ("123" or "token_id:123"); values are log-probs or {"logprob": ...}. Each dict holds the
    top k plus, when it fell outside them, the chosen token itself: the k largest are kept."""
    ids = np.zeros((len(entries), k), dtype=np.int32)
    logprobs = np.zeros((len(entries), k), dtype=np.float32)
    for t, candidates in enumerate(entries):
        ranked = [(_rank(value), int(str(key).rsplit(":", 1)[-1]),
                   value["logprob"] if isinstance(value, dict) else value)
                  for key, value in (candidates or {}).items()]
        ranked.sort(key=lambda item: (item[0], -item[2]))  # by rank when given, else value
        pairs = [(token, value) for _, token, value in ranked]
        if len(pairs) < k:
            raise PrimekdError(f"the vLLM server returned {len(pairs)} log-probs per token, "
                               f"fewer than the {k} asked for (raise its --max-logprobs)")
        ids[t] = [token for token, _ in pairs[:k]]
        logprobs[t] = [value for _, value in pairs[:k]]
    return TopK(ids, logprobs)


def _rank(value: Any) -> int:
    return int(value.get("rank") or 0) if isinstance(value, dict) else 0


def _stop_ids(source: Any, tokenizer: Any) -> list[int]:
    """The hf engine's stop tokens, read from the model directory's generation config."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(source.path)
    except (OSError, ValueError):
        config = None
    holder = type("Model", (), {"generation_config": config})()
    return stop_token_ids(holder, tokenizer)


def served_model(base_url: str, name: str | None = None,
                 model: tuple[str, str] | None = None) -> str:
    """The model name to request at `base_url`: `name` if it is served, else the served model
    that is `model` (its reference and local path: a server's model id is the `--model` it
    was started with, or that path's last part), else the first one served."""
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/v1/models", timeout=10)
        response.raise_for_status()
        entries = response.json()["data"]
        models = [m["id"] for m in entries]
    except (httpx.HTTPError, KeyError, ValueError, TypeError) as e:
        raise PrimekdError(f"no OpenAI-compatible server answers at {base_url} "
                           f"({type(e).__name__}); is it running?") from None
    if name:
        if name not in models:
            raise PrimekdError(f"{base_url} serves {', '.join(models)}, not {name!r}")
        return name
    if not models:
        raise PrimekdError(f"{base_url} serves no model")
    if model is None:
        return models[0]
    wanted = {n for ref in model for n in (ref.rstrip("/"), Path(ref).name) if n}
    for entry in entries:
        names = {str(entry.get(k) or "").rstrip("/") for k in ("id", "root")} - {""}
        if names & wanted or {Path(n).name for n in names} & wanted:
            return entry["id"]
    raise PrimekdError(f"{base_url} serves {', '.join(models)}, not {model[0]}: point "
                       f"--base-url at a server of {model[0]}, or name its model there with "
                       "--engine-option served_model=NAME")


def check_tokenizer(base_url: str, served: str, tokenizer: Any, model: str) -> None:
    """Refuse a server whose tokenizer splits a probe text differently from the model's:
    token ids (and so log-probs) would not line up."""
    expected = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    try:
        response = httpx.post(f"{base_url.rstrip('/')}/tokenize", timeout=30, json={
            "model": served, "prompt": PROBE, "add_special_tokens": False})
        response.raise_for_status()
        tokens = response.json()["tokens"]
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise PrimekdError(f"{base_url} cannot tokenize ({type(e).__name__}), so primekd "
                           f"cannot check that it serves {model}") from None
    if tokens != expected:
        raise PrimekdError(f"{base_url} serves {served!r}, whose tokenizer differs from "
                           f"{model}'s (a probe text gives {len(tokens)} tokens there, "
                           f"{len(expected)} here): point --base-url at a server of {model}")
