"""vLLM worker extension (`worker_extension_cls`): methods the server calls on every worker
through `LLM.collective_rpc` (runs in the vLLM environment only)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


class PaddWorker:
    def padd_load(self, files: list[str]) -> int:
        """Reload the model in place from safetensors files (HF names, one bucket each). vLLM
        repacks weights for its kernels after loading (on CPU the router weight is emptied),
        so a plain `load_weights` cannot update a built model; its in-place reload
        re-materialises and re-processes each layer."""
        count = [0]

        def stream():  # one bucket in memory at a time
            for path in files:
                tensors = load_file(path)
                count[0] += len(tensors)
                yield from tensors.items()
                del tensors

        self.model_runner.reload_weights(weights_iterator=stream(), is_checkpoint_format=True)
        _repack_cpu_kernels(self.model_runner.model)
        return count[0]

    def padd_record_routes(self, on: bool) -> None:
        """Record the experts every MoE router hands to the kernel (route checks)."""
        from padd_ds.vllm_engine.models import moe_routers

        self.padd_routes = [] if on else None
        for _, runner in moe_routers(self.model_runner.model):
            router = runner.router
            base = getattr(router, "_padd_unrecorded", None) or router._compute_routing
            router._padd_unrecorded = base
            router._compute_routing = _recording(base, self) if on else base

    def padd_take_routes(self) -> list[list[list[int]]]:
        """The recorded calls, oldest first: per call the [tokens][k] experts; clears them."""
        calls, self.padd_routes = self.padd_routes or [], [] if self.padd_routes is not None else None
        return [c.tolist() for c in calls]


def _repack_cpu_kernels(model: torch.nn.Module) -> None:
    """vLLM 0.32 on CPU leaves two kernels on the old weights after an in-place reload, so
    redo their packing as the first load did:
    - the MoE experts: a weight update skips their prepack into the CPU kernel's layout
      (UnquantizedFusedMoEMethod._setup_kernel runs the experts' `process_weights_after_loading`
      on the first load only), so the kernel would read unpacked weights as packed ones;
    - a tied LM head: reload processes a tied weight for one owner only (the embedding), so
      the head's oneDNN matmul keeps the old copy."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None:
            kernel.fused_experts.process_weights_after_loading(module)
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)  # layers that kept their weight


def _recording(compute, worker):
    def wrapped(*args, **kwargs):
        weights, ids = compute(*args, **kwargs)
        if worker.padd_routes is not None:
            worker.padd_routes.append(ids.detach().to(torch.int64).sort(dim=-1).values.cpu())
        return weights, ids
    return wrapped
