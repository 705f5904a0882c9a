"""rollout.backend=vllm on the student ranks: the student's copies in vLLM engine processes.

Placement (colocated): the student ranks form groups of rollout.vllm_ranks_per_engine
consecutive ranks (default: all of them, one engine); the first rank of each group starts its
group's engine on its node, on its own device and the next rollout.vllm_tensor_parallel - 1
(tensor parallel inside vLLM), at rollout.vllm_gpu_memory_utilization of their memory; it
serves its group over TCP. On a GPU the engine sleeps while the student trains (vLLM's sleep
mode, level 2: weights and KV cache freed) and wakes for the next sync. Each rollout phase:

1. weight sync (collective): the export's gather (ZeRO-3 gather, expert-parallel all-gather,
   HF names), written by each group's first rank as safetensors buckets of export's shard size
   into a shared-memory folder on its node, plus each MoE layer's Stage IV bias; the engine
   reloads them in place (vLLM's layerwise reload) and the folder is emptied. The first phase
   starts the engines on those folders instead.
2. each rank sends its own prompts; its engine waits for the whole group and samples them as
   one batch with temperature / top_p only (top_k off), returning token ids and the sampled
   tokens' log-probs under the raw logits (what the trainer's ratio uses).

The engines route with PADD's rule (vllm_engine/models.py), so they sample on the experts the
trainer uses. They return no routes: rollout.route_replay needs hf or hf_gathered.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import save_file

from padd_ds.config import PaddConfig
from padd_ds.models.export import write_weights
from padd_ds.models.router import PaddRouter
from padd_ds.vllm_engine.client import EngineConnection, EngineLost, EngineProcess, EngineSpec, vllm_python

BIAS_FILE = "padd_bias.safetensors"
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def ranks_per_engine(cfg: PaddConfig, students: int) -> int:
    return cfg.rollout.vllm_ranks_per_engine or students


def engine_spec(cfg: PaddConfig, students: int, dtype: torch.dtype, stock: bool = False) -> EngineSpec:
    ro, data = cfg.rollout, cfg.data
    return EngineSpec(python=vllm_python(ro.vllm_python), clients=ranks_per_engine(cfg, students),
                      dtype=_DTYPES[dtype], seed=cfg.run.seed,
                      max_model_len=data.max_prompt_tokens + data.max_response_tokens + 1,
                      kv_cache_bytes=int(ro.vllm_cpu_kv_cache_gb * 2**30),
                      gpu_memory_utilization=ro.vllm_gpu_memory_utilization, timeout_s=ro.vllm_timeout_s,
                      tensor_parallel=ro.vllm_tensor_parallel, devices=engine_devices(ro.vllm_tensor_parallel),
                      stock=stock)


def engine_devices(tensor_parallel: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for an engine started by this rank: its device and the next ones
    (None on a host without CUDA)."""
    if not torch.cuda.is_available():
        return None
    first = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if first + tensor_parallel > len(ids):
        raise ValueError(f"rollout.vllm_tensor_parallel={tensor_parallel}: device {first} has only "
                         f"{len(ids) - first - 1} devices after it on this node")
    return ",".join(ids[first:first + tensor_parallel])


def _sync_folder() -> Path:
    """Shared memory when the host has it: the weights never touch a disk."""
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="padd-vllm-", dir=shm if shm.is_dir() else None))


class VllmPolicy:
    """This rank's handle on its group's vLLM engine (the group's first rank owns the process)."""

    def __init__(self, spec: EngineSpec, rank: int, students: int, log_dir: Path):
        if students % spec.clients:
            raise ValueError(f"rollout.vllm_ranks_per_engine={spec.clients} does not divide the {students} student ranks")
        self.spec, self.rank, self.students = spec, rank, students
        self.leader = rank - rank % spec.clients  # the student rank that owns this rank's engine
        self.log_dir = log_dir / f"vllm_engine.{rank // spec.clients}"
        self.proc: EngineProcess | None = None
        self.conn: EngineConnection | None = None
        self.folder = _sync_folder() if rank == self.leader else None
        self.generation_config = None  # the student's (its EOS ids), taken at each sync
        self.sleeping = False

    @property
    def owner(self) -> bool:
        return self.rank == self.leader

    def sync(self, engine) -> None:
        """Collective: the engine's current weights into every vLLM engine (started on the first call)."""
        self.generation_config = getattr(engine.module, "generation_config", None)
        weights = self.folder / "weights" if self.owner else None
        write_weights(engine, weights, next(engine.module.parameters()).dtype)
        error = None
        if self.owner:
            save_file(stage4_biases(engine.module), str(weights / BIAS_FILE), metadata={"format": "pt"})
            try:
                if self.proc is None:
                    self.proc = EngineProcess.start(self.spec, weights, self.log_dir)
                else:
                    if self.sleeping:
                        self.conn.call({"op": "wake"})
                        self.sleeping = False
                    self.conn.call({"op": "load", "files": sorted(str(f) for f in weights.glob("*.safetensors"))})
            except EngineLost as e:
                error = e
            finally:
                shutil.rmtree(weights, ignore_errors=True)  # loaded (or failed): free the shared memory
        if self.conn is None:  # the first phase: every rank learns where its engine serves, or that it failed
            mine = (f"{error}" if error is not None else list(self.proc.address)) if self.owner else None
            every = [None] * self.students
            tdist.all_gather_object(every, mine)
            if error is not None:
                raise error
            where = every[self.leader]
            if isinstance(where, str):
                raise EngineLost(f"student rank {self.leader} could not start its vLLM rollout engine: {where}")
            self.conn = EngineConnection(tuple(where), self.rank, self.spec.timeout_s,
                                         str(self.proc.log) if self.proc is not None else "")
        elif error is not None:
            raise error

    def sample(self, prompts: list[list[int]], group_size: int, temperature: float, top_p: float,
               max_new_tokens: int, eos: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """G responses per prompt (prompt-major) and their tokens' log-probs."""
        self._check_alive()
        reply = self.conn.call({"op": "generate", "prompts": prompts, "n": group_size, "temperature": temperature,
                                "top_p": top_p, "max_tokens": max_new_tokens, "stop": eos})
        if self.owner and self.spec.devices is not None:  # its group is served: hand the memory to training
            self.conn.call({"op": "sleep"})
            self.sleeping = True
        return reply["tokens"], reply["logprobs"]

    def routes(self, seqs: list[list[int]]) -> list:
        """[seq][layer][token][k] experts the engine routes each token of `seqs` to (a prefill each)."""
        self._check_alive()
        if self.sleeping:
            self.conn.call({"op": "wake"})
            self.sleeping = False
        return self.conn.call({"op": "routes", "seqs": seqs})["routes"]

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is not None:
            raise EngineLost(f"the vLLM rollout engine exited with code {self.proc.proc.returncode} "
                             f"(log {self.proc.log})")

    def close(self) -> None:
        if self.conn is not None and self.owner:
            with contextlib.suppress(EngineLost):  # it is gone already: nothing to close
                self.conn.call({"op": "close"})
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            self.proc.stop()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def stage4_biases(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`<moe block>.gate.padd_bias` [N] fp32 of every router (the name the vLLM models read)."""
    out = {}
    for name, r in module.named_modules():
        if isinstance(r, PaddRouter):
            out[name.rsplit(".router", 1)[0] + ".gate.padd_bias"] = r.padd_bias.detach().float().cpu().contiguous()
    if not out:
        raise ValueError("rollout.backend=vllm: the student has no PADD router to take the Stage IV bias from")
    return out
