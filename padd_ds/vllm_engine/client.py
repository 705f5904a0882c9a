"""A student rank's side of the vLLM rollout engine (runs in the project's environment; no vLLM).

    proc = EngineProcess.start(spec, model_dir)      # one rank: the engine's owner
    conn = EngineConnection(proc.address or addr, rank, timeout_s)
    conn.call({"op": "load", "files": [...]})
    conn.call({"op": "generate", ...})

Every call has a deadline; an engine that exits, closes its socket or does not answer in
time raises EngineLost, which names the engine, its address and its log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from padd_ds.paths import REPO_ROOT

INSTALL_HINT = "install it with `make vllm` (on a CUDA cluster: make vllm VLLM_PKG=vllm==0.33.0) or set rollout.vllm_python"


class EngineLost(RuntimeError):
    """The vLLM rollout engine died, hung or failed."""


def vllm_python(configured: str | None) -> Path:
    """The vLLM environment's interpreter: rollout.vllm_python, else this checkout's .venv-vllm."""
    return Path(configured).expanduser() if configured else REPO_ROOT / ".venv-vllm" / "bin" / "python"


def vllm_environment_problem(configured: str | None) -> str | None:
    """None when the interpreter exists, else the one-line problem and its fix."""
    py = vllm_python(configured)
    if not py.exists():
        return f"rollout.backend=vllm: no vLLM environment at {py}; {INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class EngineSpec:
    python: Path
    clients: int             # student ranks whose generate calls form one batch
    dtype: str               # the student's dtype: what the trainer computes in
    seed: int
    max_model_len: int
    kv_cache_bytes: int      # CPU
    gpu_memory_utilization: float  # CUDA
    timeout_s: float         # start-up and every call
    tensor_parallel: int = 1
    devices: str | None = None  # CUDA_VISIBLE_DEVICES of the engine (None: a CPU host)
    stock: bool = False      # vLLM's own routing (tests: it ignores the Stage IV bias)


class EngineProcess:
    """The engine process, started by (and exiting with) its owner rank."""

    def __init__(self, proc: subprocess.Popen, log: Path, address: tuple[str, int]):
        self.proc, self.log, self.address = proc, log, address

    @classmethod
    def start(cls, spec: EngineSpec, model_dir: Path, workdir: Path) -> EngineProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        addr_file, log = workdir / "vllm_engine.address", workdir / "vllm_engine.log"
        addr_file.unlink(missing_ok=True)
        cmd = [str(spec.python), "-m", "padd_ds.vllm_engine.server", "--model", str(model_dir),
               "--clients", str(spec.clients), "--address-file", str(addr_file), "--dtype", spec.dtype,
               "--seed", str(spec.seed), "--max-model-len", str(spec.max_model_len),
               "--kv-cache-bytes", str(spec.kv_cache_bytes),
               "--gpu-memory-utilization", str(spec.gpu_memory_utilization), "--parent-pid", str(os.getpid()),
               "--tensor-parallel-size", str(spec.tensor_parallel)]
        if spec.stock:
            cmd.append("--stock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: its death is the engine's
        if spec.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = spec.devices
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)  # vLLM builds its own torch.distributed world; ours would confuse it
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + spec.timeout_s
        while not addr_file.exists():
            if proc.poll() is not None:
                raise EngineLost(f"the vLLM rollout engine exited with code {proc.returncode} while starting "
                                 f"(log {log}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                proc.kill()
                raise EngineLost(f"the vLLM rollout engine did not start within {spec.timeout_s:.0f}s "
                                 f"(log {log}):\n{_tail(log)}")
            time.sleep(0.2)
        host, port = addr_file.read_text().split()
        return cls(proc, log, (host, int(port)))

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class EngineConnection:
    """One student rank's connection; one call at a time."""

    def __init__(self, address: tuple[str, int], rank: int, timeout_s: float, log: str = ""):
        self.address, self.timeout_s, self.where = address, timeout_s, f"{address[0]}:{address[1]}" + (
            f", log {log}" if log else "")
        try:
            self.sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as e:
            raise EngineLost(f"cannot reach the vLLM rollout engine at {self.where}: {e}") from e
        self.sock.settimeout(timeout_s)
        self.buf = b""
        self.call({"op": "hello", "rank": rank})

    def call(self, request: dict) -> dict:
        op = request.get("op")
        try:
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            while b"\n" not in self.buf:
                data = self.sock.recv(1 << 20)
                if not data:
                    raise EngineLost(f"the vLLM rollout engine ({self.where}) closed the connection during "
                                     f"'{op}': it died")
                self.buf += data
        except socket.timeout as e:
            raise EngineLost(f"the vLLM rollout engine ({self.where}) did not answer '{op}' within "
                             f"{self.timeout_s:.0f}s") from e
        except OSError as e:
            raise EngineLost(f"the vLLM rollout engine ({self.where}) failed during '{op}': {e}") from e
        line, self.buf = self.buf.split(b"\n", 1)
        reply = json.loads(line)
        if not reply.get("ok"):
            raise EngineLost(f"the vLLM rollout engine ({self.where}) failed '{op}': {reply.get('error')}\n"
                             f"{reply.get('trace', '')}")
        return reply

    def close(self) -> None:
        self.sock.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

