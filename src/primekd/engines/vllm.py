"""The vLLM engine: a vLLM (or SGLang) OpenAI-compatible server, reached over HTTP.

primekd either starts the server itself (`python -m vllm.entrypoints.openai.api_server` from
a separate environment, on 127.0.0.1 and a free port, readiness polled with a timeout, stopped
with its process group when primekd exits or another model needs the server: one alive at a
time) or uses a running one at `base_url` after checking that it tokenizes like the model.

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
import atexit
import contextlib
import ctypes
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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

# Options passed to the server as flags (`max_model_len` -> `--max-model-len`).
SERVER_FLAGS = ("max_model_len", "gpu_memory_utilization", "dtype", "tensor_parallel_size",
                "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                "enforce_eager", "quantization", "max_logprobs", "max_lora_rank", "seed")
# Options primekd itself reads.
CLIENT_OPTIONS = {
    "python": "Python of the vLLM environment (default: .venv-vllm/bin/python, "
              "$PRIMEKD_VLLM_PYTHON, or this Python when it has vllm)",
    "command": "full server command instead of `<python> -m vllm.entrypoints.openai."
               "api_server` (a list or a string; primekd appends --host/--port/--model/...)",
    "extra_args": "more server arguments (a list or a string)",
    "kv_cache_space": "CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, default 2)",
    "startup_timeout": "seconds to wait for the server to answer (default 900)",
    "request_timeout": "seconds one request may take (default 1800)",
    "concurrency": "generation requests in flight (default: --batch-size, else 64)",
    "score_tokens": "tokens of scoring requests in flight (default 8192)",
    "lora": "serve adapters with vLLM's LoRA support instead of a merged model "
            "(pays on GPU; on CPU it was 8x slower)",
    "served_model": "with --base-url: the model name to request (default: the first served)",
}
CPU_DEFAULTS = {"dtype": "bfloat16", "max_model_len": 2048, "enforce_eager": True}
# (and --no-enable-chunked-prefill on CPU, see VLLMServer.command)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LORA_NAME = "primekd-adapter"
PROBE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
         "clips in May. How many clips did Natalia sell altogether?  12 + 3.5 = 15.5\n"
         "Ünïcödé «quotes» — 数学 😀 <|im_start|>assistant\n<|im_end|>\tTHE ANSWER IS 72.")


def check_options(options: dict[str, Any]) -> None:
    known = set(SERVER_FLAGS) | set(CLIENT_OPTIONS)
    for key in options:
        if key not in known:
            raise PrimekdError(f"unknown vllm engine option {key!r}; known: "
                               f"{', '.join(sorted(known))}")
    for key in ("concurrency", "score_tokens", "startup_timeout", "request_timeout"):
        value = options.get(key)
        if value is not None and (not isinstance(value, int | float) or value <= 0):
            raise PrimekdError(f"vllm engine option {key} must be a positive number")


# ---------------------------------------------------------------------- the server


class VLLMServer:
    """A vLLM server subprocess in its own process group, logging to a file."""

    def __init__(self, model: str, options: dict[str, Any], lora: str | None = None) -> None:
        self.model, self.options, self.lora = model, options, lora
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / "primekd-vllm-unstarted.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        base = self.options.get("command")
        if base:
            command = base.split() if isinstance(base, str) else [str(c) for c in base]
        else:
            command = [vllm_python(self.options.get("python")), "-m", SERVER_MODULE]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--model", self.model,
                    "--generation-config", "vllm", "--no-enable-prefix-caching"]
        flags = {**(CPU_DEFAULTS if not _cuda() else {}), "max_logprobs": 50,
                 **{k: v for k, v in self.options.items() if k in SERVER_FLAGS}}
        for key, value in flags.items():
            if value is None or value is False:
                continue
            flag = "--" + key.replace("_", "-")
            command += [flag] if value is True else [flag, str(value)]
        if self.lora:
            command += ["--enable-lora", "--lora-modules", f"{LORA_NAME}={self.lora}"]
        extra = self.options.get("extra_args") or []
        extra = extra.split() if isinstance(extra, str) else [str(a) for a in extra]
        if not _cuda() and not any("chunked-prefill" in a for a in extra):
            # vLLM's CPU worker fails ("CPU Generator does not use offset") on a seeded,
            # sampled request whose prompt is split across steps: prefill prompts whole
            command.append("--no-enable-chunked-prefill")
        return command + extra

    def start(self) -> VLLMServer:
        command = self.command()
        self.log_path = Path(tempfile.mkdtemp(prefix="primekd-vllm-")) / "server.log"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.options.get("kv_cache_space",
                                                                           2)),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("wb") as log:
            try:
                self.process = subprocess.Popen(command, stdout=log,
                                                stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True,
                                                preexec_fn=_die_with_parent)
            except OSError as e:
                raise PrimekdError(f"could not start the vLLM server: {e}") from None
        return self

    def wait_ready(self) -> None:
        timeout = float(self.options.get("startup_timeout", 900))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process else None
            if code is not None:
                raise PrimekdError(f"the vLLM server exited with code {code} before it was "
                                   f"ready; {self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise PrimekdError(f"the vLLM server did not answer within {timeout:.0f} s "
                           f"(engine option startup_timeout); {self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            text = []
        tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
        return f"its log ({self.log_path}) ends: {tail}" if tail else \
            f"its log ({self.log_path}) is empty"

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        _signal_group(self.process.pid, signal.SIGKILL)  # what it left behind, too
        if self.process.poll() is None:
            self.process.wait()
        self.process = None


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when primekd dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def vllm_python(configured: str | None = None) -> str:
    """The Python that runs the server: the option, $PRIMEKD_VLLM_PYTHON, this Python if it
    has vllm and CUDA is here (a GPU build: `.venv-vllm` is `make vllm`'s CPU build), a
    `.venv-vllm` in the working directory or the source checkout, else this Python if it
    has vllm."""
    candidates = [configured, os.environ.get("PRIMEKD_VLLM_PYTHON")]
    if configured or candidates[1]:
        path = next(c for c in candidates if c)
        if not Path(path).exists() and not shutil.which(path):
            raise PrimekdError(f"vllm engine python {path} does not exist")
        return path
    own = importlib.util.find_spec("vllm") is not None
    if own and _cuda():
        return sys.executable
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        python = root / ".venv-vllm" / "bin" / "python"
        if python.exists():
            return str(python)
    if own:
        return sys.executable
    raise PrimekdError(
        "--engine vllm needs a vLLM environment: run `make vllm` in the primekd checkout "
        "(CPU), `pip install vllm` on a GPU machine and pass --engine-option "
        "python=/path/to/its/python, or give a running server with --base-url"
    )


# One server at a time, reused while the model and options stay the same.
_RUNNING: dict[str, Any] = {"key": None, "server": None}


def running_server(model: str, options: dict[str, Any], lora: str | None) -> VLLMServer:
    key = json.dumps([model, lora, options], sort_keys=True, default=str)
    server = _RUNNING["server"]
    if server is not None and _RUNNING["key"] == key and server.alive():
        return server
    shutdown()
    server = VLLMServer(model, options, lora).start()
    _RUNNING.update(key=key, server=server)
    try:
        server.wait_ready()
    except BaseException:
        shutdown()
        raise
    return server


def shutdown() -> None:
    """Stop the server primekd started, if any."""
    server = _RUNNING["server"]
    _RUNNING.update(key=None, server=None)
    if server is not None:
        server.stop()


atexit.register(shutdown)


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
        lora = str(adapter) if adapter and options.get("lora") else None
        path = merged_model(source, adapter) if adapter and not lora else source.path
        server = running_server(path, {k: v for k, v in options.items()
                                       if k not in ("concurrency", "score_tokens")}, lora)
        served = LORA_NAME if lora else served_model(server.url)
        return cls(server.url, served, tokenizer, stop_ids, options, server, batch_size)

    def close(self) -> None:
        """Closes the connection; the server stays up for the next stage (see `shutdown`)."""
        if self._client is not None:
            self._loop.run_until_complete(self._client.aclose())
            self._client = None
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

        yield from self._stream([job(i) for i in range(len(prompts))])

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
        yield from self._stream([job(i) for i in range(len(prompts))])

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
            timeout = float(self.options.get("request_timeout", 1800))
            self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        try:
            response = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as e:
            raise PrimekdError(self._lost(e)) from None
        if response.status_code != 200:
            raise PrimekdError(f"the vLLM server at {self.url} refused a request "
                               f"(HTTP {response.status_code}): {response.text[:300]}")
        return response.json()

    def _lost(self, error: Exception) -> str:
        why = f"{type(error).__name__}: {error}".rstrip(": ")
        if self.server is not None and not self.server.alive():
            code = self.server.process.poll() if self.server.process else None
            why = f"it exited (code {code}); {self.server.log_tail(3)}"
            shutdown()
        return (f"the vLLM server at {self.url} stopped answering ({why}); finished rows are "
                "saved: rerun the same command to resume")

    def _stream(self, jobs: list[Callable[[], Awaitable[Any]]]) -> Iterator[tuple[int, Any]]:
        """Run every job concurrently on this engine's loop; yield (index, result) as each
        finishes. Leaving early (an error, a closed iterator) cancels what is in flight."""
        loop = self._loop

        async def indexed(i: int, job: Callable[[], Awaitable[Any]]) -> tuple[int, Any]:
            return i, await job()

        tasks = {loop.create_task(indexed(i, job)) for i, job in enumerate(jobs)}
        pending = set(tasks)
        try:
            while pending:
                done, pending = loop.run_until_complete(
                    asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED))
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            for task in tasks:  # retrieved: no "exception was never retrieved" on stderr
                if task.done() and not task.cancelled():
                    task.exception()


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
