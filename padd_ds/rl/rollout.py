"""G sampled responses per prompt from the student, on every student rank.

    sampling = RolloutSampling(group_size=4, temperature=1.0, top_p=1.0, max_new_tokens=128, max_prompt_tokens=96)
    with rollout_policy(engine, cfg.rollout.backend, num_students) as (model, synced):
        ro = sample_rollouts(model, tok, problems, sampling, synced)
    ro.batch            # TokenBatch: prompt + response ids (right-padded), loss mask on the response
    ro.responses        # decoded responses (for the reward)
    ro.prompt_index     # [P*G]: which problem each row answers (rows of one group are adjacent)

Generation works on token ids throughout: the sequences the policy loss, the teacher and
the KD term see are exactly the tokens the student sampled (decoding and re-encoding text
can change the tokenisation). Under ZeRO-3 + AutoEP every forward gathers parameters and
exchanges tokens between ranks, so `synced=True` keeps all student ranks stepping until the
slowest finishes (`synced_gpus`); no rank can leave a collective hanging. The `hf_gathered`
backend generates on a whole copy of the student per rank instead (models/gathered.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from transformers import LogitsProcessorList

from padd_ds.config import PaddConfig
from padd_ds.data.batch import TokenBatch
from padd_ds.data.prompt import format_prompt
from padd_ds.launch.device import rank_device
from padd_ds.models.gathered import gathered_student
from padd_ds.models.generation import decoding_kwargs, eos_ids
from padd_ds.rl.routes import RouteCapture, align_routes
from padd_ds.rl.vllm_policy import VllmPolicy


@dataclass
class Rollouts:
    batch: TokenBatch
    responses: list[str]
    prompt_index: torch.Tensor   # [P*G] int64
    response_lengths: torch.Tensor  # [P*G] tokens sampled (EOS included when it was reached)
    finished: torch.Tensor       # [P*G] bool: the response ended with EOS within the budget
    # [P*G, L] the rollout engine's log pi (temperature 1) of each sampled token, where
    # token_logprobs puts the trainer's (position t: token t+1; 0 off the loss mask)
    logprobs: torch.Tensor | None = None
    # [P*G, L, MoE layers, k] int16: the experts the rollout engine used for each token the
    # trainer sees at that position (-1: none known; rl/routes.py); None: routers not recognised
    routes: torch.Tensor | None = None


@dataclass(frozen=True)
class RolloutSampling:
    """How the student samples its answers."""

    group_size: int  # G responses per prompt
    temperature: float  # > 0: rollouts are sampled
    top_p: float
    max_new_tokens: int  # response budget
    max_prompt_tokens: int  # a longer prompt is an error, not silently cut

    @classmethod
    def from_config(cls, cfg: PaddConfig) -> RolloutSampling:
        return cls(cfg.stage3.group_size, cfg.rollout.temperature, cfg.rollout.top_p, cfg.data.max_response_tokens,
                   cfg.data.max_prompt_tokens)


@contextlib.contextmanager
def rollout_policy(engine, backend: str, num_students: int,
                   vllm: VllmPolicy | None = None) -> Iterator[tuple[torch.nn.Module | VllmPolicy, bool]]:
    """(policy, synced) that generates one rollout phase: the engine itself, every student rank
    stepping together (`hf`), a whole gathered copy on each rank, no collective (`hf_gathered`),
    or the run's vLLM engine after a weight sync (`vllm`; collective sync, then no collective)."""
    if backend == "hf":
        yield engine.module, num_students > 1
    elif backend == "hf_gathered":
        with gathered_student(engine) as model:
            yield model, False
    elif backend == "vllm":
        if vllm is None:
            raise ValueError("rollout.backend=vllm needs the run's VllmPolicy")
        vllm.sync(engine)
        yield vllm, False
    else:
        raise ValueError(f"rollout.backend={backend!r}: expected hf, hf_gathered or vllm")


@torch.no_grad()
def sample_rollouts(model, tok, problems: list[dict], sampling: RolloutSampling, synced: bool) -> Rollouts:
    if sampling.temperature <= 0:
        raise ValueError("rollouts need sampling: rollout.temperature must be > 0")
    eos = eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    prompts = _prompt_ids(tok, problems, sampling.max_prompt_tokens)
    if isinstance(model, VllmPolicy):  # no routes come back from vLLM
        sampled, logprobs = model.sample(prompts, sampling.group_size, sampling.temperature, sampling.top_p,
                                         sampling.max_new_tokens, eos)
        return _rollout_batch(tok, prompts, (sampled, logprobs), sampling.group_size, eos, pad)
    sampled, logprobs, capture = _sample(model, prompts, sampling, eos, pad, synced)
    ro = _rollout_batch(tok, prompts, (sampled, logprobs), sampling.group_size, eos, pad)
    if capture is not None:
        width = max(len(x) for x in prompts)
        lens = [len(prompts[i // sampling.group_size]) for i in range(len(sampled))]
        ro.routes = align_routes(capture.calls, lens, ro.response_lengths.tolist(), width, ro.batch.ids.shape[1])
    return ro


class SampledLogprobs:
    """A logits processor that changes nothing and records log pi(token) of every sampled token
    under the model's logits at the sampling temperature (the distribution the trainer's
    log-probs are of). transformers applies custom processors before its temperature and top-p
    warpers, so the scores here are the model's own; each call gathers the previous step's
    log-softmax at the token that step appended, so one [B, V] row set is held at a time, never
    the whole history."""

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, token: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, token.view(-1, 1)).squeeze(1).cpu())
            self.prev = None

    def finish(self, sequences: torch.Tensor, new_tokens: int) -> list[list[float]]:
        """Per row, the log-probs of its `new_tokens` sampled tokens (`sequences`: generate's output)."""
        self._take(sequences[:, -1])
        if len(self.steps) != new_tokens:
            raise RuntimeError(f"recorded {len(self.steps)} sampled-token log-probs for {new_tokens} decode steps")
        return torch.stack(self.steps, dim=1).tolist() if self.steps else [[] for _ in range(sequences.shape[0])]


def _prompt_ids(tok, problems: list[dict], max_prompt_tokens: int) -> list[list[int]]:
    prompts = []
    for p in problems:
        ids = tok(format_prompt(p["question"]))["input_ids"]
        if len(ids) > max_prompt_tokens:
            raise ValueError(f"problem {p.get('id')}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                             f"{max_prompt_tokens}; raise the limit or filter long problems")
        prompts.append(ids)
    return prompts


def _sample(model, prompts: list[list[int]], sampling: RolloutSampling, eos: list[int], pad: int,
            synced: bool) -> tuple[list[list[int]], list[list[float]], RouteCapture | None]:
    """The sampled tokens of each of the P*G rows (prompt-major), padding after EOS included,
    the model's log-prob of each, and the routes of every forward (None: routers unknown)."""
    P = len(prompts)
    width = max(len(x) for x in prompts)
    left = torch.full((P, width), pad, dtype=torch.int64)
    attn = torch.zeros((P, width), dtype=torch.int64)
    for i, x in enumerate(prompts):  # left-padded: every continuation starts at column `width`
        left[i, width - len(x):] = torch.tensor(x)
        attn[i, width - len(x):] = 1
    left, attn = left.to(rank_device()), attn.to(rank_device())
    was_training = model.training
    model.eval()
    record, capture = SampledLogprobs(sampling.temperature), RouteCapture.of(model)
    try:
        # The policy itself: temperature and top_p are the only transforms (top_k=0, no model defaults).
        decoding = decoding_kwargs(sampling.temperature, sampling.top_p)
        with capture or contextlib.nullcontext():
            gen = model.generate(input_ids=left, attention_mask=attn, **decoding,
                                 max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.group_size,
                                 eos_token_id=eos, pad_token_id=pad, synced_gpus=synced,
                                 logits_processor=LogitsProcessorList([record]))
    finally:
        model.train(was_training)
    return gen[:, width:].cpu().tolist(), record.finish(gen, gen.shape[1] - width), capture


def _rollout_batch(tok, prompts: list[list[int]], sampled: tuple[list[list[int]], list[list[float]]], G: int,
                   eos: list[int], pad: int) -> Rollouts:
    """Prompt + response rows, right-padded, each cut after its first EOS, with the sampled
    tokens' log-probs where the trainer's stand."""
    sampled, logps = sampled
    seqs, masks, texts, rlen, done = [], [], [], [], []
    for row, toks in enumerate(sampled):
        cut = next((j for j, t in enumerate(toks) if t in eos), None)
        resp = toks[: cut + 1] if cut is not None else toks  # keep the EOS: the policy learns to stop
        prompt = prompts[row // G]
        seqs.append(prompt + resp)
        masks.append([False] * (len(prompt) - 1) + [True] * len(resp) + [False])
        texts.append(tok.decode(resp[:cut] if cut is not None else resp, skip_special_tokens=True))
        rlen.append(len(resp))
        done.append(cut is not None)
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.int64)
    loss_mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        loss_mask[i, : len(s)] = torch.tensor(m)
    logprobs = torch.zeros((len(seqs), L), dtype=torch.float32)
    for i, n in enumerate(rlen):
        start = len(prompts[i // G]) - 1  # position t holds log p(token t+1): the first response token
        logprobs[i, start:start + n] = torch.tensor(logps[i][:n])
    batch = TokenBatch(ids, torch.tensor([len(s) for s in seqs]), loss_mask)
    P = len(prompts)
    return Rollouts(batch, texts, torch.arange(P).repeat_interleave(G), torch.tensor(rlen), torch.tensor(done),
                    logprobs)


def token_logprobs(logits: torch.Tensor, batch: TokenBatch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token t+1 | <= t) at every position [B, L] (0 where the loss mask is off), pi the
    policy at `temperature` (the rollouts': TRL's and veRL's convention, so the gradient is the
    sampled policy's)."""
    z = logits[:, :-1].float() / temperature  # gather - logsumexp: never a second [B, L, V] tensor
    logp = z.gather(-1, batch.ids[:, 1:].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    out = torch.zeros(batch.ids.shape, dtype=logp.dtype, device=logp.device)
    out[:, :-1] = logp
    return out * batch.loss_mask


@dataclass
class RolloutBatch:
    """One step's rollout batch on this rank, scored: what the update and the step's metrics consume."""

    rollouts: Rollouts           # prompt + response token ids, loss mask, decoded responses
    rewards: torch.Tensor        # [P, G] verifiable rewards
    advantages: torch.Tensor     # [P*G] group-relative, prompt-major like the rows
    correct: float = 0.0         # responses the grader accepted
    group_stats: dict = field(default_factory=dict)  # groups, zero-variance groups (rl/rewards.group_advantages)
    requests: list[int] = field(default_factory=list)  # the teacher's request id per micro-batch (Stage II)
    seconds: float = 0.0         # time spent generating
