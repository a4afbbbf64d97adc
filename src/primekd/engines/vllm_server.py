"""The vLLM server primekd starts: its command, its process group, its log, its end.

The server runs `python -m vllm.entrypoints.openai.api_server` from a separate environment,
on 127.0.0.1 and a free port (`_free_port`: below the kernel's ephemeral range; a server that
still loses its port to a race is started again on another), in its own process group (the
API server, its EngineCore and any tensor-parallel workers), logging to `server.log` in a
scratch directory `primekd-vllm-*` of the system temp folder (`engines.scratch`). Readiness
is polled with a timeout. One server is alive at a time (`running_server`), kept while the
same model and options are asked for; with `lora` it serves successive adapters, each loaded
at run time (`load_adapter`).

Stopping waits for the whole group to exit (SIGTERM, then SIGKILL after a grace period), so
its memory is free when `stop` returns. The scratch directory goes with the server, unless
the server failed: then its log alone is kept and the error names it (`root_cause` quotes
the line that says why). Directories of killed primekd processes go when the next server
starts.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import getpass
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from primekd.core.errors import PrimekdError
from primekd.core.models import adapter_hash
from primekd.engines import scratch as scratch_dirs
from primekd.engines.cpu_features import cpu_dtype

# Options passed to the server as flags (`max_model_len` -> `--max-model-len`).
SERVER_FLAGS = ("max_model_len", "gpu_memory_utilization", "dtype", "tensor_parallel_size",
                "pipeline_parallel_size", "max_num_seqs", "max_num_batched_tokens",
                "enforce_eager", "quantization", "max_logprobs", "max_lora_rank", "seed")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LORA_PREFIX = "primekd-lora-"  # + the adapter's hash: a retrained adapter is a new name
SCRATCH_PREFIX = scratch_dirs.PREFIX
STOP_GRACE_S = 30.0  # SIGTERM -> SIGKILL: time for a clean shutdown of the whole group
PRIVATE_PORTS_FROM = 20000  # _free_port's range starts here and ends at the ephemeral range
PORT_TAKEN = "Address already in use"
PORT_TRIES = 3  # starts on fresh ports when another process took the server's port first


FEW_CORES = 4  # at most this many usable cores: vLLM reserves none for its front end


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def cpu_defaults() -> dict[str, Any]:
    """Server flags without a GPU (engine options override each). The dtype follows the CPU:
    emulated bf16 is slower than fp32 and drifts from the hf engine's answers."""
    return {"dtype": cpu_dtype(), "max_model_len": 2048, "enforce_eager": True}


class VLLMServer:
    """A vLLM server subprocess in its own process group, logging to a file."""

    def __init__(self, model: str, options: dict[str, Any], lora: bool = False) -> None:
        self.model, self.options, self.lora = model, options, bool(lora)
        self.adapters: set[str] = set()  # names of the LoRA adapters loaded into it
        self.port = _free_port()
        self.scratch: Path | None = None
        self.log_path = Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}unstarted.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        base = self.options.get("command")
        if base:
            command = base.split() if isinstance(base, str) else [str(c) for c in base]
        else:
            command = [vllm_python(self.options.get("python")), "-m", SERVER_MODULE]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--model", self.model,
                    "--generation-config", "vllm", "--no-enable-prefix-caching"]
        flags = {**(cpu_defaults() if not _cuda() else {}), "max_logprobs": 50,
                 **{k: v for k, v in self.options.items() if k in SERVER_FLAGS}}
        for key, value in flags.items():
            if value is None or value is False:
                continue
            flag = "--" + key.replace("_", "-")
            command += [flag] if value is True else [flag, str(value)]
        if self.lora:  # adapters are loaded at run time (`load_adapter`)
            command.append("--enable-lora")
        extra = self.options.get("extra_args") or []
        extra = extra.split() if isinstance(extra, str) else [str(a) for a in extra]
        if not _cuda() and not any("chunked-prefill" in a for a in extra):
            # vLLM's CPU worker fails ("CPU Generator does not use offset") on a seeded,
            # sampled request whose prompt is split across steps: prefill prompts whole
            command.append("--no-enable-chunked-prefill")
        return command + extra

    def environment(self) -> dict[str, str]:
        env = {**os.environ,
               "VLLM_CPU_KVCACHE_SPACE": str(self.options.get("kv_cache_space", 2)),
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
        if self.lora:  # enables POST /v1/load_lora_adapter
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        if self.scratch is not None:
            # vLLM leaves its ZeroMQ sockets in the temp folder: in the scratch directory
            # they go with it. torch's compile cache stays where torch keeps it.
            env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(
                Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"))
            env["TMPDIR"] = str(self.scratch)
        if not _cuda():
            # vLLM kills its engine when one model step runs past this (default 300 s). On a
            # slow CPU the first step, prefilling a full batch of prompts (up to 2,048 tokens
            # with chunked prefill off), can take longer: a 1.5B model in emulated bf16 on 2
            # AVX2 cores did, and the server died before its first answer. A step can never
            # need longer than a whole request may take, so that bounds it instead.
            env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS",
                           str(int(self.options.get("request_timeout", 1800))))
            if usable_cores() <= FEW_CORES:
                # vLLM's CPU build keeps one core for its front end and runs the model on
                # the rest: on 2 cores, half the machine. The front end needs far less: the
                # model on every core answered 1.48x as fast (bench/vllm_levers.py).
                env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        return env

    def start(self) -> VLLMServer:
        command = self.command()
        self.scratch = scratch_dirs.make()
        self.log_path = self.scratch / scratch_dirs.LOG
        with self.log_path.open("wb") as log:
            try:
                self.process = subprocess.Popen(command, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                env=self.environment(),
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True,
                                                preexec_fn=_die_with_parent)
            except OSError as e:
                self._remove_scratch()
                raise PrimekdError(f"could not start the vLLM server: {e}") from None
        return self

    def wait_ready(self) -> None:
        timeout = float(self.options.get("startup_timeout", 900))
        deadline = time.monotonic() + timeout
        restarts = PORT_TRIES - 1
        while time.monotonic() < deadline:
            code = self.process.poll() if self.process else None
            if code is not None and restarts and self._lost_its_port():
                restarts -= 1
                self._restart_on_another_port()
                continue
            if code is not None:
                self.stop(keep_log=True)
                raise PrimekdError(f"the vLLM server exited with code {code} before it was "
                                   f"ready; {self.failure(tail=8)}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop(keep_log=True)
        raise PrimekdError(f"the vLLM server did not answer within {timeout:.0f} s "
                           f"(engine option startup_timeout); {self.failure(tail=8)}")

    def _lost_its_port(self) -> bool:
        """The server died because its port was taken between `_free_port` and its bind (by
        another server's own sockets, say, when tests run side by side)."""
        try:
            return PORT_TAKEN in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def _restart_on_another_port(self) -> None:
        self.stop()
        self.port = _free_port()
        self.start()

    def load_adapter(self, adapter: str) -> str:
        """Load the LoRA adapter at `adapter` into this server (once per content) and return
        the model name that requests it."""
        name = LORA_PREFIX + adapter_hash(adapter)
        if name in self.adapters:
            return name
        try:
            response = httpx.post(f"{self.url}/v1/load_lora_adapter", timeout=600,
                                  json={"lora_name": name, "lora_path": str(adapter)})
        except httpx.HTTPError as e:
            raise PrimekdError(f"the vLLM server at {self.url} did not load the adapter "
                               f"{adapter} ({type(e).__name__})") from None
        if response.status_code != 200:
            raise PrimekdError(f"the vLLM server at {self.url} refused the adapter {adapter} "
                               f"(HTTP {response.status_code}: {response.text[:300]})")
        self.adapters.add(name)
        return name

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self, timeout: float = 5.0) -> bool:
        """Alive and answering `/health` (vLLM's says 503 once its engine is dead)."""
        if not self.alive():
            return False
        try:
            return httpx.get(f"{self.url}/health", timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def exit_code(self, grace: float = 5.0) -> int | None:
        """The server's exit status, or None while it runs. A dropped connection often arrives
        a moment before the dying process is reaped, so wait up to `grace` seconds for it."""
        if self.process is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        return self.process.poll()

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            text = []
        tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
        return f"its log ({self.log_path}) ends: {tail}" if tail else \
            f"its log ({self.log_path}) is empty"

    def failure(self, tail: int = 0) -> str:
        """Where the kept log is, the line in it that says why the server failed and, with
        `tail`, its last lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        cause = root_cause(text)
        message = f"its log is kept at {self.log_path}"
        message += f"; it says: {cause}" if cause else " (no error line in it)"
        last = [line.strip() for line in text.strip().splitlines()[-tail:] if line.strip()]
        return message + (f"; it ends: {' | '.join(last)}" if tail and last else "")

    def stop(self, keep_log: bool = False, grace: float = STOP_GRACE_S) -> None:
        """Stop the server's whole process group and wait until every process of it has
        exited; remove the scratch directory unless `keep_log` (a failed server)."""
        if self.process is not None:
            stop_group(self.process.pid, grace)
            if self.process.poll() is None:  # only a process of another group could be left
                self.process.kill()
            self.process.wait()
            self.process = None
        if not keep_log:
            self._remove_scratch()
        elif self.scratch is not None:
            scratch_dirs.keep_log_only(self.scratch)

    def _remove_scratch(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


# ---------------------------------------------------------------------- process groups


def process_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the fields of /proc/<pid>/stat after the command name) of every process.
    A process that exits while /proc is read is skipped (globbing /proc raised
    ProcessLookupError when one vanished between the listing and its stat)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := scratch_dirs.stat_fields(name)):
            yield int(name), fields


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies count as gone: their memory is
    free), read from /proc."""
    return [pid for pid, fields in process_stats()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X")]


def stop_group(pgid: int, grace: float = STOP_GRACE_S, kill_wait: float = 30.0) -> list[int]:
    """SIGTERM the group, wait up to `grace` s for all of it to exit, SIGKILL what is left and
    wait up to `kill_wait` s more. Returns the processes still there (none, normally)."""
    _signal_group(pgid, signal.SIGTERM)
    if _wait_group(pgid, grace):
        return []
    _signal_group(pgid, signal.SIGKILL)
    _wait_group(pgid, kill_wait)
    return group_members(pgid)


def _wait_group(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ChildProcessError):  # reap our own child (the API server)
            os.waitpid(pgid, os.WNOHANG)
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM when primekd dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# ---------------------------------------------------------------------- the log

# `(EngineCore_DP0 pid=12) ` before lines of vLLM's child processes
_PROCESS_PREFIX = re.compile(r"^\([\w.-]+ pid=\d+\) ?")
# `ERROR 12-07 13:53:35 [async_llm.py:906] ` before vLLM's log messages
_HEADER = re.compile(r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^]]*\] ?")
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?:[A-Z]\w*)?"
                        r"(?:Error|Exception|Exit|Interrupt)(?::|$)")
# wrappers that point elsewhere for the cause
_NOT_THE_CAUSE = ("EngineDeadError", "EngineGenerateError", "See stack trace",
                  "See root cause above")
_DEATH = ("unexpectedly", "timed out")  # "engine core exited unexpectedly" (killed: no error)


def root_cause(log: str) -> str | None:
    """The line of a vLLM server log that says why it failed: the last exception that is
    not a wrapper pointing elsewhere ("EngineDeadError: ... see stack trace above"), else the
    last line saying a process died or timed out, else the last ERROR message, else the last
    wrapper."""
    exceptions, deaths, errors = [], [], []
    for raw in log.splitlines():
        line = _PROCESS_PREFIX.sub("", raw.rstrip())
        header = _HEADER.match(line)
        message = line[header.end():] if header else line
        if _EXCEPTION.match(message):
            exceptions.append(message)
        elif any(word in message for word in _DEATH):
            deaths.append(message)
        elif header and header["level"] in ("ERROR", "CRITICAL") and message[:1].strip() \
                and not message.startswith(("Traceback", "^")):
            errors.append(message)
    causes = [e for e in exceptions if not any(w in e for w in _NOT_THE_CAUSE)]
    for found in (causes, deaths, errors, exceptions):
        if found:
            return found[-1].strip()[:300]
    return None


# ---------------------------------------------------------------------- the running server


def _free_port() -> int:
    """A port free now, below the kernel's ephemeral range where it can: a port the kernel
    hands out (bind to port 0, an outgoing connection) is the next one another process is
    given too, and a running vLLM server takes such ports for its own sockets. Drawn from
    the system's randomness: processes seeded alike (`set_seed`) would draw the same ports."""
    below_ephemeral = range(PRIVATE_PORTS_FROM, _ephemeral_low())
    for port in random.SystemRandom().sample(below_ephemeral, min(50, len(below_ephemeral))):
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_low(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


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


def running_server(model: str, options: dict[str, Any], lora: bool = False) -> VLLMServer:
    """The running server of `model` with `options` (started if needed); with `lora`, one
    that loads LoRA adapters at run time, so successive adapters share it."""
    key = json.dumps([model, lora, options], sort_keys=True, default=str)
    server = _RUNNING["server"]
    if server is not None and _RUNNING["key"] == key and server.alive():
        return server
    shutdown()
    server = VLLMServer(model, options, lora).start()
    _RUNNING.update(key=key, server=server)
    try:
        server.wait_ready()
    except PrimekdError:  # wait_ready stopped it, keeping the log its error names
        _RUNNING.update(key=None, server=None)
        raise
    except BaseException:
        shutdown()
        raise
    return server


def discard(server: VLLMServer) -> None:
    """Stop a server that failed, keeping its log (its error names it)."""
    if _RUNNING["server"] is server:
        _RUNNING.update(key=None, server=None)
    server.stop(keep_log=True)


def shutdown() -> None:
    """Stop the server primekd started, if any (and wait until its processes are gone)."""
    server = _RUNNING["server"]
    _RUNNING.update(key=None, server=None)
    if server is not None:
        server.stop()


atexit.register(shutdown)
