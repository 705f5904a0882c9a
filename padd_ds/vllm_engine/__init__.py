"""The vLLM rollout engine (rollout.backend=vllm): its own process and venv (`make vllm`).

- plugin.py / models.py run inside vLLM's environment: the PADD routing models, registered
  with vLLM through its `vllm.general_plugins` entry point.
- server.py is the engine process; client.py is what a student rank uses to start it, load
  the student's weights into it after each optimizer step, and sample from it.

Nothing here imports DeepSpeed, and nothing on the student side imports vLLM.
"""
