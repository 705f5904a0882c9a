"""What every `model.generate` call of padd-ds passes: the stop tokens, and decoding settings
under which the config's temperature and top-p are the only changes to the model's distribution.

    out = model.generate(ids, **decoding_kwargs(temperature=1.0, top_p=1.0), eos_token_id=eos_ids(model, tok))

`generate` fills every field the call leaves out from the model's generation_config.json
(Qwen2.5 instruct models ship top_k=20 and repetition_penalty=1.05), then from transformers'
defaults (top_k=50): rollouts would then not sample the policy the loss assumes, and an
evaluation would not decode as its config says. Used by rl/rollout.py and eval/evaluate.py.
"""

from __future__ import annotations

from typing import Any

# Each generation field that changes the next-token distribution, the number of candidates
# or when decoding stops, at the value that leaves the model's own distribution alone.
NEUTRAL_DECODING: dict[str, Any] = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
    "min_new_tokens": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "watermarking_config": None, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "stop_strings": None, "max_time": None, "token_healing": None,
}
# The other sampling-only truncations, unset (None: transformers adds no warper and warns of nothing).
_NO_TRUNCATION: dict[str, Any] = {"min_p": None, "top_h": None, "typical_p": None, "epsilon_cutoff": None,
                                  "eta_cutoff": None}


def decoding_kwargs(temperature: float | None, top_p: float = 1.0) -> dict[str, Any]:
    """`generate` kwargs: sampling at `temperature` with nucleus `top_p` (top_p=1: no cut), or
    greedy when temperature is None; nothing else from any generation config applies."""
    if temperature is None:
        return {**NEUTRAL_DECODING, **_NO_TRUNCATION, "do_sample": False, "temperature": None, "top_p": None,
                "top_k": None}
    # top_k=0 stated explicitly: transformers' default top_k=50 (or the model's) would truncate.
    return {**NEUTRAL_DECODING, **_NO_TRUNCATION, "do_sample": True, "temperature": temperature, "top_p": top_p,
            "top_k": 0}


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's (chat models add
    an end-of-turn token there)."""
    ids = []
    for v in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids += v if isinstance(v, (list, tuple)) else [v]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if not ids:
        raise ValueError("tokenizer has no eos_token_id; generation could not stop")
    return ids
