"""The vLLM server's lifecycle without vLLM: its defaults on this CPU, its process group, its
scratch directory, the root cause read from its log. Stand-in servers are small Python
processes started through the `command` engine option (primekd appends its flags to it)."""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from primekd.core.errors import PrimekdError
from primekd.engines.cpu_features import cpu_dtype, cpu_flags, native_bf16
from primekd.engines.vllm_server import (
    PRIVATE_PORTS_FROM,
    VLLMServer,
    _cuda,
    _ephemeral_low,
    _free_port,
    group_members,
    root_cause,
)

pytestmark = pytest.mark.usefixtures("vllm_scratch")

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_dtype_is_bf16_only_where_the_cpu_has_it() -> None:
    assert cpu_flags(EPYC) >= {"avx2", "fma"} and not native_bf16(cpu_flags(EPYC))
    assert cpu_dtype(cpu_flags(EPYC)) == "float32"
    assert cpu_dtype(cpu_flags(SAPPHIRE)) == "bfloat16"
    assert cpu_dtype(cpu_flags(GRAVITON)) == "bfloat16"
    assert cpu_dtype(cpu_flags("")) == "float32"


@pytest.mark.skipif(_cuda(), reason="CPU defaults")
def test_cpu_server_defaults_follow_this_cpu_and_options_win() -> None:
    command = VLLMServer("m", {"command": ["true"]}).command()
    dtype = command[command.index("--dtype") + 1]
    assert dtype == ("bfloat16" if native_bf16() else "float32")
    if "bf16" not in Path("/proc/cpuinfo").read_text():  # this machine: AVX2 EPYC
        assert dtype == "float32"
    chosen = VLLMServer("m", {"command": ["true"], "dtype": "bfloat16"}).command()
    assert chosen[chosen.index("--dtype") + 1] == "bfloat16" and chosen.count("--dtype") == 1


@pytest.mark.skipif(_cuda(), reason="CPU defaults")
def test_cpu_server_lets_a_slow_first_step_finish(monkeypatch) -> None:
    """vLLM's 300 s execute timeout killed the engine on the first step of a 1.5B model on
    2 AVX2 cores; CPU servers get the request timeout instead (a user's setting wins)."""
    monkeypatch.delenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", raising=False)
    assert VLLMServer("m", {}).environment()["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "1800"
    env = VLLMServer("m", {"request_timeout": 4000}).environment()
    assert env["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "4000"
    monkeypatch.setenv("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "99")
    assert VLLMServer("m", {}).environment()["VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS"] == "99"


@pytest.mark.skipif(_cuda(), reason="CPU defaults")
def test_few_cores_are_not_split_between_front_end_and_model(monkeypatch) -> None:
    """On 2 cores vLLM would keep one for its front end; primekd asks for none there (1.48x,
    bench/vllm_levers.py), not on a larger machine, and a user's setting wins."""
    from primekd.engines import vllm_server

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: 2)
    assert VLLMServer("m", {}).environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: 32)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in VLLMServer("m", {}).environment()
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setattr(vllm_server, "usable_cores", lambda: 2)
    assert VLLMServer("m", {}).environment()["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"


# the parent exits at once on SIGTERM; its child (same process group, as vLLM's EngineCore)
# needs a while to clean up, then writes a marker
SLOW_CHILD = """
import signal, subprocess, sys, time
child = '''
import signal, sys, time
def bye(*_):
    time.sleep(1.5)
    open(sys.argv[1], "w").write("clean")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
open(sys.argv[1] + ".up", "w").write("up")
time.sleep(600)
'''
subprocess.Popen([sys.executable, "-c", child, MARKER])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(600)
"""
# a child that ignores SIGTERM: only SIGKILL ends it
STUBBORN_CHILD = """
import signal, subprocess, sys, time
child = 'import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); ' \\
        'open(sys.argv[1] + ".up", "w").write("up"); time.sleep(600)'
subprocess.Popen([sys.executable, "-c", child, MARKER])
time.sleep(600)
"""


def _server(script: str, marker: Path) -> VLLMServer:
    code = script.replace("MARKER", repr(str(marker)))
    server = VLLMServer("m", {"command": [sys.executable, "-c", code]}).start()
    up = Path(f"{marker}.up")
    for _ in range(600):
        if up.exists():
            break
        assert server.alive(), server.log_tail()
        time.sleep(0.05)
    assert up.exists(), server.log_tail()
    return server


def test_stop_waits_for_every_process_of_the_group(tmp_path) -> None:
    """Defect H (issue 25): `stop` returned once the API server was gone, SIGKILLing its
    EngineCore/workers mid-cleanup without waiting; their memory was not yet free."""
    server = _server(SLOW_CHILD, tmp_path / "clean")
    pgid = server.process.pid
    assert len(group_members(pgid)) == 2
    server.stop()
    assert (tmp_path / "clean").read_text() == "clean"  # its shutdown ran to the end
    assert group_members(pgid) == []

    stubborn = _server(STUBBORN_CHILD, tmp_path / "stubborn")
    pgid = stubborn.process.pid
    stubborn.stop(grace=1)
    assert group_members(pgid) == []


def test_scratch_directory_goes_with_the_server_unless_it_failed(tmp_path) -> None:
    server = _server(SLOW_CHILD, tmp_path / "clean")
    scratch = server.log_path.parent
    assert scratch.name.startswith("primekd-vllm-") and scratch.is_dir()
    server.stop()
    assert not scratch.exists()

    command = [sys.executable, "-c", "import sys; print('ValueError: no such model'); "
               "sys.exit(3)"]
    failed = VLLMServer("m", {"command": command, "startup_timeout": 60}).start()
    with pytest.raises(PrimekdError) as error:
        failed.wait_ready()
    assert str(failed.log_path) in str(error.value) and failed.log_path.exists()
    assert "exited with code 3" in str(error.value) and not failed.alive()
    assert "no such model" in failed.failure() and str(failed.log_path) in failed.failure()
    # the log alone is kept (no caches, no owner: never swept as a killed run's)
    assert [p.name for p in failed.log_path.parent.iterdir()] == ["server.log"]
    failed.stop()  # a kept log goes when the caller is done with it
    assert not failed.log_path.parent.exists()


def test_a_killed_runs_scratch_goes_when_the_next_server_starts(vllm_scratch, tmp_path
                                                                 ) -> None:
    """A primekd process killed with its server up (a session's end) leaves ~150 MB of
    caches in its scratch directory; the next server removes it, and nothing else."""
    from primekd.engines import scratch

    maker = ("from primekd.engines import scratch; import time; "
             "print(scratch.make(), flush=True); time.sleep(600)")
    killed = subprocess.Popen([sys.executable, "-c", maker], stdout=subprocess.PIPE, text=True)
    orphan = Path(killed.stdout.readline().strip())
    (orphan / "torchinductor_root").mkdir()
    (orphan / "torchinductor_root" / "cache.bin").write_bytes(b"x" * 4096)
    assert orphan not in scratch.remove_orphans() and orphan.exists()  # its owner lives
    killed.kill()
    killed.wait()
    killed.stdout.close()
    reused = scratch.make()  # a pid alive again, but another process: not the owner
    (reused / "owner").write_text("1 0")
    foreign = vllm_scratch / "primekd-vllm-kept-log"  # a failed server's log: no owner
    foreign.mkdir()
    server = _server(SLOW_CHILD, tmp_path / "clean")
    try:
        assert not orphan.exists() and not reused.exists()
        assert foreign.is_dir() and server.log_path.exists()
    finally:
        server.stop()
        shutil.rmtree(foreign)


# Shaped like the log of a vLLM 0.32 CPU server whose engine step ran past the execute
# timeout (the messages are vLLM's)
TIMED_OUT_LOG = """\
(APIServer pid=2201) INFO 12-07 11:02:13 [api_server.py:1046] Starting vLLM API server 0 on http://127.0.0.1:40125
(EngineCore_DP0 pid=2290) ERROR 12-07 11:07:40 [core.py:866] EngineCore encountered a fatal error.
(EngineCore_DP0 pid=2290) ERROR 12-07 11:07:40 [core.py:866] Traceback (most recent call last):
(EngineCore_DP0 pid=2290) ERROR 12-07 11:07:40 [core.py:866]   File "/x/multiproc_executor.py"
(EngineCore_DP0 pid=2290) TimeoutError: RPC call to execute_model timed out.
(APIServer pid=2201) ERROR 12-07 11:07:40 [async_llm.py:525] AsyncLLM output_handler failed.
(APIServer pid=2201) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an \
issue. See stack trace (above) for the root cause.
(APIServer pid=2201) INFO:     127.0.0.1:50912 - "POST /v1/completions" 500
"""


# From the log of a vLLM 0.32 CPU server whose EngineCore was SIGKILLed (the test in
# test_vllm.py; paths shortened): nothing but the wrapper is an exception
KILLED_LOG = """\
(APIServer pid=15232) WARNING 12-07 13:53:35 [core_client.py:817] [shutdown] MPClient: \
engine core exited unexpectedly; starting cleanup
(APIServer pid=15232) INFO 12-07 13:53:35 [core_client.py:777] [shutdown] MPClient: complete
(APIServer pid=15232) ERROR 12-07 13:53:35 [async_llm.py:906] AsyncLLM output_handler failed.
(APIServer pid=15232) ERROR 12-07 13:53:35 [async_llm.py:906] Traceback (most recent call last):
(APIServer pid=15232) ERROR 12-07 13:53:35 [async_llm.py:906]   File "/x/core_client.py", line 1235
(APIServer pid=15232) ERROR 12-07 13:53:35 [async_llm.py:906]     raise self._format_exception(o)
(APIServer pid=15232) ERROR 12-07 13:53:35 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDead\
Error: EngineCore encountered an issue. See stack trace (above) for the root cause.
INFO:     127.0.0.1:41454 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error
"""


def test_root_cause_is_the_error_not_its_wrapper() -> None:
    assert root_cause(TIMED_OUT_LOG) == "TimeoutError: RPC call to execute_model timed out."
    assert root_cause(KILLED_LOG) == ("[shutdown] MPClient: engine core exited unexpectedly; "
                                      "starting cleanup")
    only_logged = "INFO 1 ok\n(APIServer pid=1) ERROR 12-07 10:00:00 [x.py:1] Out of memory\n"
    assert root_cause(only_logged) == "Out of memory"
    assert root_cause("INFO all fine\nWARNING slow\n") is None


# A stand-in OpenAI server: answers /v1/models, /health and /v1/completions (three token ids,
# after 50 ms, or after argv[3] seconds), and writes each answered prompt to a file, and for
# each /health the number of completion requests it held at that moment. Start
# number N (counted in a file) dies on its K-th completion request when argv[2] gives N:K,
# writing an error line to its log; with N:hK it hangs there instead (alive, that request and
# every later one never answered, /health 503, as a wedged engine).
FAKE_SERVER = """
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
state, deaths = sys.argv[1], dict(a.split(":") for a in sys.argv[2].split(",") if a)
delay = float(sys.argv[3]) if not sys.argv[3].startswith("--") else 0.05
port = int(sys.argv[sys.argv.index("--port") + 1])
starts = int(open(state + ".starts").read()) + 1 if os.path.exists(state + ".starts") else 1
open(state + ".starts", "w").write(str(starts))
fault = deaths.get(str(starts), "0")
hang, die_at, seen, held = fault.startswith("h"), int(fault.lstrip("h")), [0], [0]
lock = threading.Lock()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            with open(state + ".health", "a") as f:
                f.write(f"{held[0]}\\n")
        if self.path == "/health" and hang and seen[0] >= die_at:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.reply({"data": [{"id": "m"}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        seen[0] += 1
        if seen[0] >= die_at > 0 and hang:
            time.sleep(3600)
        if seen[0] == die_at:
            print("RuntimeError: the engine fell over", flush=True)
            os._exit(1)
        with lock:
            held[0] += 1
        time.sleep(delay)
        with lock:
            held[0] -= 1
        with open(state + ".answered", "a") as f:
            f.write(f"{starts} {body['prompt'][0]}\\n")
        self.reply({"choices": [{"token_ids": [5, 6, 7], "finish_reason": "length"}]})

ThreadingHTTPServer.request_queue_size = 512  # every request of a test at once
ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def _fake_engine(tmp_path: Path, deaths: str, delay: float = 0.05, **options):
    from primekd.core.testing import tiny_tokenizer
    from primekd.engines.vllm import VLLMEngine
    from primekd.engines.vllm_server import running_server

    state = tmp_path / "state"
    command = [sys.executable, "-c", FAKE_SERVER, str(state), deaths, str(delay)]
    server = running_server("m", {"command": command, "startup_timeout": 60}, None)
    engine = VLLMEngine(server.url, "m", tiny_tokenizer(), [],
                        {"concurrency": 1, **options}, server)
    return engine, state


def test_a_server_that_loses_its_port_starts_again_on_another(tmp_path) -> None:
    """CI: a server's port, free when chosen, was taken before vLLM bound it (by another
    server's own sockets, tests running side by side); it died "Address already in use"."""
    state = tmp_path / "state"
    command = [sys.executable, "-c", FAKE_SERVER, str(state), "", "0.05"]
    server = VLLMServer("m", {"command": command, "startup_timeout": 60})
    taken = server.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
        try:
            server.wait_ready()
            assert server.port != taken and server.url.endswith(f":{server.port}")
            assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200
            assert state.with_suffix(".starts").read_text() == "2"
        finally:
            server.stop()


def test_server_ports_are_chosen_below_the_ephemeral_range() -> None:
    """Ports the kernel hands out (vLLM's own sockets, outgoing connections) come from the
    ephemeral range; a port chosen there is the next one another process is given."""
    low = _ephemeral_low()
    ports = {_free_port() for _ in range(20)}
    assert all(PRIVATE_PORTS_FROM <= port < low for port in ports) and len(ports) > 1
    # two processes seeded alike (transformers' set_seed seeds `random`) draw different ports
    draws = []
    for _ in range(2):
        random.seed(0)
        draws.append([_free_port() for _ in range(5)])
    assert draws[0] != draws[1]


def _answer_all(engine, n: int) -> list[int]:
    """Send prompts 0..n-1 through the fake engine; the indices in the order they came back.
    The engine and any server left running are stopped afterwards."""
    from primekd.engines import SamplingParams
    from primekd.engines.vllm_server import shutdown

    try:
        return [i for i, _ in engine.generate([[i] for i in range(n)], SamplingParams(3))]
    finally:
        engine.close()
        shutdown()


def _answered(state: Path) -> list[tuple[int, int]]:
    lines = Path(f"{state}.answered").read_text().split("\n")
    return [tuple(map(int, line.split())) for line in lines if line]


def test_a_dead_server_is_restarted_once_and_only_the_unfinished_rerun(vllm_scratch, tmp_path,
                                                                       capfd) -> None:
    # the session's private temp folder (vllm_scratch): no other job's servers in it
    before = set(Path(tempfile.gettempdir()).glob("primekd-vllm-*"))
    engine, state = _fake_engine(tmp_path, "1:3")  # the first server dies on request 3
    got = _answer_all(engine, 6)
    assert sorted(got) == list(range(6)) and got[:2] == [0, 1]
    assert _answered(state) == [(1, 0), (1, 1), (2, 2), (2, 3), (2, 4), (2, 5)]
    warning = capfd.readouterr().err
    assert "Restarting it once" in warning and "RuntimeError: the engine fell over" in warning
    kept = sorted(set(Path(tempfile.gettempdir()).glob("primekd-vllm-*")) - before)
    assert len(kept) == 1 and str(kept[0] / "server.log") in warning  # the dead one's log
    shutil.rmtree(kept[0])


def test_a_server_that_dies_again_gives_one_line_naming_its_log(vllm_scratch, tmp_path) -> None:
    from primekd.engines import SamplingParams

    # the session's private temp folder (vllm_scratch): no other job's servers in it
    before = set(Path(tempfile.gettempdir()).glob("primekd-vllm-*"))
    engine, state = _fake_engine(tmp_path, "1:2,2:2")
    got = []
    try:
        with pytest.raises(PrimekdError) as error:
            for i, _ in engine.generate([[i] for i in range(6)], SamplingParams(3)):
                got.append(i)
    finally:
        engine.close()
    message = str(error.value)
    assert got == [0, 1] and _answered(state) == [(1, 0), (2, 1)]
    assert "stopped answering again, after a restart (it exited with code 1)" in message
    assert "it says: RuntimeError: the engine fell over" in message and "rerun" in message
    log = Path(re.search(r"kept at (\S+server\.log)", message).group(1))
    assert log.exists() and engine.server.process is None  # stopped, all of it
    for kept in set(Path(tempfile.gettempdir()).glob("primekd-vllm-*")) - before:
        shutil.rmtree(kept)


def test_a_request_slower_than_any_fixed_timeout_is_waited_for(vllm_scratch, tmp_path, capfd
                                                                ) -> None:
    """A busy server answers late, not never: each request takes 2 s, /health is checked every
    0.2 s meanwhile and answers, so no request is called lost and nothing is redone (a
    read timeout did call a 1.5B teacher's 30-minute queue dead, and redid all of it)."""
    from primekd.engines import SamplingParams
    from primekd.engines.vllm_server import shutdown

    engine, state = _fake_engine(tmp_path, "", delay=2.0, health_interval=0.2)
    try:
        got = [i for i, _ in engine.generate([[i] for i in range(3)], SamplingParams(3))]
        assert engine._client.timeout.read is None  # no limit unless request_timeout is set
    finally:
        engine.close()
        shutdown()
    assert sorted(got) == [0, 1, 2] and _answered(state) == [(1, 0), (1, 1), (1, 2)]
    assert "stopped answering" not in capfd.readouterr().err


def test_more_requests_in_flight_than_an_http_pool_holds(vllm_scratch, tmp_path, capfd
                                                         ) -> None:
    """The pair preset's eval keeps 128 requests in flight. httpx's client pools 100
    connections by default: the extra 28 waited, and the /health checks, sharing that pool,
    waited behind them until they timed out, three times, and a working server was called
    lost. Every request goes out at once, and /health is answered beside them."""
    from primekd.engines import SamplingParams
    from primekd.engines.vllm_server import shutdown

    n = 130
    engine, state = _fake_engine(tmp_path, "", delay=1.5, health_interval=0.1,
                                 concurrency=n)
    try:
        got = [i for i, _ in engine.generate([[i] for i in range(n)], SamplingParams(3))]
    finally:
        engine.close()
        shutdown()
    assert sorted(got) == list(range(n))
    held = [int(x) for x in Path(f"{state}.health").read_text().split()]
    assert max(held) == n  # all of them at once, and a /health answered meanwhile
    assert "stopped answering" not in capfd.readouterr().err


def test_a_wedged_server_is_found_by_its_health_and_restarted(vllm_scratch, tmp_path, capfd
                                                               ) -> None:
    """The first server hangs on its 3rd request (alive, /health 503): after 3 failed checks
    it is restarted and only the unanswered requests are sent to the new one."""
    engine, state = _fake_engine(tmp_path, "1:h3", health_interval=0.2)
    got = _answer_all(engine, 5)
    assert sorted(got) == list(range(5)) and got[:2] == [0, 1]
    assert _answered(state) == [(1, 0), (1, 1), (2, 2), (2, 3), (2, 4)]
    warning = capfd.readouterr().err
    assert "Restarting it once" in warning and "/health failed 3 time(s) in a row" in warning
    for kept in Path(tempfile.gettempdir()).glob("primekd-vllm-*"):  # the wedged one's log
        shutil.rmtree(kept)


def test_process_table_reads_survive_processes_that_exit_meanwhile() -> None:
    """`stop()` reads /proc while vLLM's processes exit. Listing /proc and then reading a
    process that had just gone raised ProcessLookupError from inside pathlib's glob (it
    broke the on-policy vLLM tests beside a busy job); now such a process is skipped."""
    import threading

    from primekd.engines.vllm_server import group_members, process_stats

    stop = threading.Event()

    def churn() -> None:  # short-lived processes, all the time
        while not stop.is_set():
            subprocess.run(["true"], check=False)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(300):
            mine = dict(process_stats())
            assert int(mine[os.getpid()][1]) == os.getppid()
            assert os.getpid() in group_members(os.getpgrp())
    finally:
        stop.set()
        worker.join()
