"""The vLLM rollout engine process (runs in the vLLM environment, `make vllm`).

    .venv-vllm/bin/python -m padd_ds.vllm_engine.server --model DIR --clients N --address-file F

Builds one `vllm.LLM` on the model directory (a student export: config + safetensors), the
architecture swapped for its PADD routing variant (plugin.py; `--stock` keeps vLLM's own),
then serves the student ranks over TCP, one JSON object per line each way:

    {"op": "hello", "rank": r}                                  -> {"ok": true}
    {"op": "load", "files": [...]}    weights, HF names         -> {"ok": true, "tensors": n}
    {"op": "generate", "prompts": [[ids]], "n": G, "temperature": t, "top_p": p,
     "max_tokens": m, "stop": [eos ids]}                        -> {"ok": true, "tokens": [[ids]], "logprobs": [[lp]]}
    {"op": "routes", "seqs": [[ids]]}  experts of each token      -> {"ok": true, "routes": [[[[e]]]]}  seq, layer, token, k
    {"op": "sleep"} / {"op": "wake"}  free weights and KV cache / retake the memory (CUDA; a load follows)
    {"op": "close"}

`generate` waits until every one of the N clients has sent its own, then runs them as one
batch (rows come back prompt-major, G per prompt, in each client's order). Errors come back
as {"ok": false, "error": ...}. The process exits when its parent (the student rank that
started it) is gone, so a killed job leaves no engine behind.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import traceback
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    ap.add_argument("--clients", type=int, required=True, help="student ranks whose generate calls form one batch")
    ap.add_argument("--address-file", required=True, help="written as 'host port' once the engine serves")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, required=True)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20, help="KV cache size on CPU")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="share of the GPU it may take")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--stock", action="store_true", help="vLLM's own model (ignores the Stage IV bias)")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    return ap.parse_args(argv)


def build_llm(args: argparse.Namespace):
    from vllm import LLM
    from vllm.platforms import current_platform

    from padd_ds.vllm_engine.plugin import PADD_ARCHITECTURES, register

    register()  # also done by the entry point; here so a plain PYTHONPATH checkout works
    arch = json.loads((Path(args.model) / "config.json").read_text())["architectures"][0]
    if not args.stock and arch not in PADD_ARCHITECTURES:
        raise SystemExit(f"vllm engine: no PADD routing model for {arch} (have: {sorted(PADD_ARCHITECTURES)})")
    kw = dict(model=args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
              skip_tokenizer_init=True, enable_prefix_caching=False, enforce_eager=True,
              tensor_parallel_size=args.tensor_parallel_size,
              worker_extension_cls="padd_ds.vllm_engine.worker.PaddWorker",
              # log pi at the sampling temperature, the trainer's (and, under top_p < 1, the nucleus)
              logprobs_mode="processed_logprobs")
    if not args.stock:
        kw["hf_overrides"] = {"architectures": [PADD_ARCHITECTURES[arch]]}
    if current_platform.is_cpu():
        kw["kv_cache_memory_bytes"] = args.kv_cache_bytes
    else:  # colocated with a training rank: sleep mode hands the memory back while it trains
        kw.update(gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=True)
    return LLM(**kw)


class Engine:
    """The ops, on one LLM."""

    def __init__(self, llm):
        self.llm = llm

    def load(self, req: dict) -> dict:
        counts = self.llm.collective_rpc("padd_load", args=(req["files"],))
        return {"tensors": int(counts[0])}

    def generate(self, reqs: list[dict]) -> list[dict]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params, owner = [], [], []
        for i, r in enumerate(reqs):
            # top_k=0: the policy itself (no truncation); logprobs=0: the sampled token's
            sp = SamplingParams(n=r["n"], temperature=r["temperature"], top_p=r["top_p"], top_k=0,
                                max_tokens=r["max_tokens"], stop_token_ids=r["stop"], logprobs=0, detokenize=False)
            for ids in r["prompts"]:
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(sp)
                owner.append(i)
        outs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        replies = [{"tokens": [], "logprobs": []} for _ in reqs]
        for out, i in zip(outs, owner):
            for c in sorted(out.outputs, key=lambda c: c.index):
                replies[i]["tokens"].append(list(c.token_ids))
                replies[i]["logprobs"].append([step[t].logprob for step, t in zip(c.logprobs, c.token_ids)])
        return replies

    def routes(self, req: dict) -> dict:
        """The experts of every token of each sequence, one prefill each (exact token order)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.collective_rpc("padd_record_routes", args=(True,))
        try:
            out = []
            for ids in req["seqs"]:
                self.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, detokenize=False),
                                  use_tqdm=False)
                calls = self.llm.collective_rpc("padd_take_routes")[0]
                if any(len(c) != len(ids) for c in calls):
                    raise RuntimeError(f"routes: a prefill of {len(ids)} tokens routed {[len(c) for c in calls]}")
                out.append(calls)
            return {"routes": out}
        finally:
            self.llm.collective_rpc("padd_record_routes", args=(False,))


class Server:
    """One thread, one selector: ops run in arrival order; generate calls wait for all clients."""

    def __init__(self, engine: Engine, sock: socket.socket, clients: int, parent_pid: int | None):
        self.engine, self.sock, self.clients, self.parent_pid = engine, sock, clients, parent_pid
        self.sel = selectors.DefaultSelector()
        self.buffers: dict[socket.socket, bytes] = {}
        self.waiting: dict[socket.socket, dict] = {}  # the generate call of each client that sent one
        self.closing = False

    def run(self) -> None:
        self.sel.register(self.sock, selectors.EVENT_READ)
        while not self.closing:
            if self.parent_pid is not None and not _alive(self.parent_pid):
                print("vllm engine: its student rank is gone; exiting", file=sys.stderr, flush=True)
                return
            for key, _ in self.sel.select(timeout=1.0):
                if key.fileobj is self.sock:
                    conn, _ = self.sock.accept()
                    self.buffers[conn] = b""
                    self.sel.register(conn, selectors.EVENT_READ)
                else:
                    self._read(key.fileobj)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(1 << 20)
        except OSError:  # a client that died mid-message: as if it had closed
            data = b""
        if not data:
            self.sel.unregister(conn)
            self.buffers.pop(conn, None)
            self.waiting.pop(conn, None)
            conn.close()
            return
        self.buffers[conn] += data
        while b"\n" in self.buffers[conn]:
            line, self.buffers[conn] = self.buffers[conn].split(b"\n", 1)
            self._handle(conn, json.loads(line))

    def _handle(self, conn: socket.socket, req: dict) -> None:
        op = req.get("op")
        if op == "generate":
            self.waiting[conn] = req
            if len(self.waiting) == self.clients:
                conns, reqs = list(self.waiting), list(self.waiting.values())
                self.waiting = {}
                replies = _guarded(lambda: self.engine.generate(reqs), many=len(reqs))
                for c, reply in zip(conns, replies):
                    _send(c, reply)
            return
        if op == "close":
            self.closing = True
            _send(conn, {"ok": True})
            return
        handlers = {"hello": lambda: {}, "load": lambda: self.engine.load(req),
                    "routes": lambda: self.engine.routes(req),
                    "sleep": lambda: self.engine.llm.sleep(level=2) or {},  # weights are reloaded at wake
                    "wake": lambda: self.engine.llm.wake_up() or {}}
        if op not in handlers:
            _send(conn, {"ok": False, "error": f"unknown op {op!r}"})
            return
        _send(conn, _guarded(handlers[op]))


def _guarded(fn, many: int | None = None):
    try:
        out = fn()
        return [dict(r, ok=True) for r in out] if many is not None else dict(out, ok=True)
    except Exception as e:  # the student ranks raise it, naming the engine
        err = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-4000:]}
        return [err] * many if many is not None else err


def _send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


def _alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid  # an orphan is re-parented (to init or a subreaper)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    llm = build_llm(args)
    sock = socket.create_server((args.host, 0))
    host = socket.gethostname() if args.host == "0.0.0.0" else args.host
    tmp = Path(args.address_file + ".tmp")
    tmp.write_text(f"{host} {sock.getsockname()[1]}\n")
    os.replace(tmp, args.address_file)  # appears whole: the client reads it only once it exists
    print(f"vllm engine: serving on {host}:{sock.getsockname()[1]} for {args.clients} clients", flush=True)
    Server(Engine(llm), sock, args.clients, args.parent_pid).run()


if __name__ == "__main__":
    main()
