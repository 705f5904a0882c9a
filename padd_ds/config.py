"""Run configuration: one dataclass per section, each field with its default and the reason.

Where the PADD paper gives a value we use it; where it gives none the comment says why we
picked ours, and names the paper's symbol. Each section's `check()` holds its ranges;
`PaddConfig.check()` adds the rules across sections, including what the trainer cannot run.
Errors are one line naming the dotted field. Loading: recipe.py; file checks: validate.py.
No padd_ds, torch or deepspeed imports: the CLI checks a config before anything heavy loads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A recipe, override or config value is wrong. The message is one line: field and fix
    (control characters of user text in it, such as a newline in a key, are escaped)."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(message)))


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive(key: str, value: float) -> None:
    require(value > 0 and math.isfinite(value), f"{key} must be > 0, got {value}")


def non_negative(key: str, value: float) -> None:
    require(value >= 0 and math.isfinite(value), f"{key} must be >= 0, got {value}")


@dataclass
class RunConfig:
    # A short label for logs and W&B; the toy recipe is the default walking skeleton.
    name: str = "toy"
    # Checkpoints, the resolved config, metrics.jsonl. Relative to the working directory.
    output_dir: str = "runs/toy"
    # Fixed so that two runs of one recipe are comparable; change it to measure variance.
    seed: int = 1234

    def check(self) -> None:
        require(self.name.strip() != "", "run.name must not be empty")
        require(self.output_dir.strip() != "", "run.output_dir must not be empty")
        non_negative("run.seed", self.seed)


@dataclass
class ModelsConfig:
    # Dense teacher. `toy://NAME` is a tiny model built by `padd toy build`; otherwise a
    # local Hugging Face model directory or a hub id `org/name`.
    teacher: str = "toy://teacher"
    # Pre-trained MoE student (the paper's setting). None => decompress the teacher into an
    # MoE in Stage I (each expert is one neuron cluster of the teacher's FFN).
    student: Optional[str] = "toy://student"
    # None => the teacher's tokenizer: PADD requires a shared tokenizer family anyway.
    tokenizer: Optional[str] = None
    # auto: bf16 on CUDA (what both paper models are trained in), fp32 on CPU (CPU bf16
    # matmuls are slow and lossy, and the toy models are tiny). Rule: models/arch.uses_bf16.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Off: executing a checkpoint's Python code must be an explicit decision.
    trust_remote_code: bool = False

    def check(self) -> None:
        """No ranges here: the paths and files are checked by validate.py (they need the file system)."""


@dataclass
class DataConfig:
    # toy | gsm8k | a path to .jsonl/.json/.parquet | a datasets hub name.
    source: str = "toy"
    # Column names of the problem and its reference answer (GSM8K's names).
    question_field: str = "question"
    answer_field: str = "answer"
    # The paper's four disjoint parts of the problem pool: D_A clustering statistics,
    # D_B expert warmup, D_C main training, D_D held-out evaluation.
    split_fractions: dict[str, float] = field(default_factory=lambda: {"A": 0.10, "B": 0.20, "C": 0.65, "D": 0.05})
    # Toy problems are short; 96 + 96 tokens keeps a CPU step well under a second.
    # Real math recipes raise both (e.g. 256 prompt / 1024+ response).
    max_prompt_tokens: int = 96
    max_response_tokens: int = 96
    # A prompt longer than max_prompt_tokens. error: stop before training, naming it (a cut
    # question is another problem); skip: drop such problems, counted in the log.
    long_prompts: Literal["error", "skip"] = "error"
    # Toy pool size: its 5% held-out part (200 problems) matches eval.num_problems.
    num_problems: int = 4000

    def check(self) -> None:
        require(self.source.strip() != "", "data.source must not be empty; use toy, gsm8k, a file or a hub name")
        require(self.question_field != "" and self.answer_field != "",
                "data.question_field/answer_field must not be empty")
        fr = self.split_fractions
        require(set(fr) == {"A", "B", "C", "D"},
                f"data.split_fractions must have exactly the keys A, B, C, D, got {sorted(fr)}")
        for k, v in fr.items():
            require(0 < v <= 1, f"data.split_fractions.{k} must be in (0, 1], got {v}")
        total = sum(fr.values())
        require(abs(total - 1) <= 1e-6, f"data.split_fractions must sum to 1, got {total:.6g}")
        positive("data.max_prompt_tokens", self.max_prompt_tokens)
        positive("data.max_response_tokens", self.max_response_tokens)
        positive("data.num_problems", self.num_problems)


@dataclass
class TopologyConfig:
    # Teacher processes, the LAST ranks of the launch. One replica serves all students: with
    # a one-step prefetch the students never waited for it in our CPU measurements.
    teacher_ranks: int = 1
    # Teacher inside the student process (no bridge). Required when the world size is 1;
    # teacher_ranks is then ignored.
    colocated: bool = False
    # Port of the student<->teacher bridge. None => MASTER_PORT + 2 (the students' world
    # uses MASTER_PORT and the teachers' world MASTER_PORT + 1).
    bridge_port: Optional[int] = None
    # How long ranks wait for each other to connect. Generous for the first model load
    # from a shared file system; finite so a dead peer ends the job instead of hanging it.
    timeout_s: float = 300.0

    def check(self) -> None:
        non_negative("topology.teacher_ranks", self.teacher_ranks)
        require(self.colocated or self.teacher_ranks >= 1,
                "topology.teacher_ranks must be >= 1 unless topology.colocated=true")
        require(self.bridge_port is None or 1 <= self.bridge_port <= 65535,
                f"topology.bridge_port must be in 1..65535 or null, got {self.bridge_port}")
        positive("topology.timeout_s", self.timeout_s)


@dataclass
class TeacherConfig:
    # Sparse teacher targets: top-k logits per token. A trained LM puts nearly all of its
    # mass on a few dozen tokens; 32 cuts bridge traffic by vocab/32 (~5000x for Qwen).
    logits_top_k: int = 32
    # topk: exact top-k probabilities + tail mass (biased: the tail's shape is lost);
    # sampled: logits_top_k draws from p, unbiased KD loss and gradient (noisier).
    logits_mode: Literal["topk", "sampled"] = "topk"
    # Requests in flight ahead of the student. 1 hides the teacher's latency in our
    # measurements; more only adds memory and staleness.
    prefetch: int = 1
    # One scoring request (a full micro-batch) must answer within this; fail, don't hang.
    request_timeout_s: float = 120.0
    # replicas: each teacher rank holds a full copy and serves its own block of students
    # (fastest when the teacher fits one device). zero3: one teacher partitioned over all
    # teacher ranks (too large for one device, e.g. 70B bf16 = 140 GB), serving every student.
    parallel: Literal["replicas", "zero3"] = "replicas"
    # replicas: up to this many waiting requests (same kind) scored in one forward, for
    # throughput when one replica serves several students. 1: one per forward, so an answer
    # never depends on what else had arrived (a packed forward's floats can differ in the last
    # bits with the batch's shape, and a run's numbers with the timing). zero3 always packs one
    # request per teacher rank, which keeps answers exact.
    pack_requests: int = 1

    def check(self) -> None:
        positive("teacher.pack_requests", self.pack_requests)
        positive("teacher.logits_top_k", self.logits_top_k)
        non_negative("teacher.prefetch", self.prefetch)
        positive("teacher.request_timeout_s", self.request_timeout_s)


@dataclass
class Stage1Config:
    """Neuron clustering, expert and router init, router-frozen warmup (paper Phase 1)."""

    enabled: bool = True
    # Points for the equal-size k-means: rows of gate and up together describe a SwiGLU
    # neuron completely (the paper only says "first projection" - our choice, switchable).
    cluster_input: Literal["gate_up", "gate", "up"] = "gate_up"
    # xi: the teacher's path distribution p_T = softmax(mean_act / xi). 1 keeps the
    # activations' own scale; the paper gives no value.
    path_temperature: float = 1.0
    # alpha: warmup loss L_LM + alpha * L_KD + beta * KL(p_S || p_T). 1: KD as important as
    # LM, the classic Hinton weighting.
    kd_weight: float = 1.0
    # beta: the path KL is an auxiliary shaping term, an order of magnitude below the main
    # losses so it steers routing without dominating them.
    path_kl_weight: float = 0.1
    # Short: experts start from teacher neurons (or a pre-trained MoE); the warmup only has
    # to align them under the uniform router before the real router takes over.
    warmup_steps: int = 100
    # Learning rate of the warmup; null = train.lr. The warmup is supervised (LM + KD on
    # reference solutions) and tolerates a far larger step than the RL stages after it.
    lr: Optional[float] = None
    # The paper freezes the router at uniform 1/N over all experts (a decompressed student
    # then reproduces the dense FFN exactly). uniform_random_topk: k random experts at 1/k
    # (the other reading). learned: the student's own router, no uniform phase - for a
    # pre-trained MoE, whose experts a uniform phase measurably breaks.
    warmup_router: Literal["uniform_all", "uniform_random_topk", "learned"] = "uniform_all"
    # Maps teacher hidden states to the student's for the router init when the hidden sizes
    # differ; the paper does not say how - a least-squares fit on D_A is the simplest exact map.
    projection: Literal["lstsq", "none"] = "lstsq"
    # How the router starts. centroids: from the teacher's cluster centroids (a decompressed
    # student has them exactly; a pre-trained one gets them through `projection`). keep: the
    # pre-trained student's own router. random: N(0, 0.02), the "no Stage I init" comparison.
    router_init: Literal["centroids", "keep", "random"] = "centroids"
    # Which expert of a pre-trained student stands for which teacher cluster (the paper does
    # not say). matched: the pairing with most overlap of the student's routes and the
    # teacher's paths on D_A (Hungarian), so the init moves each expert's traffic least;
    # identity: expert j <- cluster j (always, for a decompressed student).
    pairing: Literal["matched", "identity"] = "matched"
    # D_A problems for the router fit: 512 toy problems are ~60k tokens, far more than a
    # router has inputs (hidden 128; 2048 for Qwen3-30B-A3B). null = all of D_A.
    targets_max_problems: Optional[int] = 512
    # Held-out (D_D) problems for the Stage I report before init, after init, after warmup.
    eval_problems: int = 128
    # Decompression only (models.student null): experts and top-k of the MoE built from the
    # teacher; 8 top-2 is the Mixtral ratio. The FFN width must divide by the expert count.
    decompress_experts: int = 8
    decompress_top_k: int = 2

    def check(self) -> None:
        positive("stage1.path_temperature", self.path_temperature)
        non_negative("stage1.kd_weight", self.kd_weight)
        non_negative("stage1.path_kl_weight", self.path_kl_weight)
        non_negative("stage1.warmup_steps", self.warmup_steps)
        if self.lr is not None:
            positive("stage1.lr", self.lr)
        positive("stage1.decompress_experts", self.decompress_experts)
        positive("stage1.decompress_top_k", self.decompress_top_k)


@dataclass
class Stage2Config:
    """Online adaptive distillation on the student's own responses."""

    enabled: bool = True
    # Weight of the forward KL to the teacher; 1 puts it on par with the policy loss.
    kd_weight: float = 1.0
    # tau: 1 = the teacher's own distribution for a zero-advantage path.
    base_temperature: float = 1.0
    # kappa: Phi(A) = 1 + tanh(kappa * A). Advantages are standardised (about +-1), so 1 uses
    # most of tanh's range without saturating.
    advantage_scale: float = 1.0
    # as_intended: effective temperature tau / Phi(A) (good paths sharper, the paper's
    # stated intent); as_written: tau * Phi(A); fixed: tau (the online-KD baseline).
    temperature_coupling: Literal["as_intended", "as_written", "fixed"] = "as_intended"
    # Floor of Phi(A), which -> 0 as A -> -inf: 0.1 caps the temperature at 10 tau (as_intended;
    # 0.1 tau as_written), already a nearly flat (one-hot) target; kappa = 1: only A < -1.47.
    coupling_floor: float = 0.1
    # The notes temper only the target p_T*. Tempering the student too (Hinton KD, loss * T^2)
    # makes the untempered teacher the optimum for every T; a switch for that classic reading.
    temper_student: bool = False

    def check(self) -> None:
        non_negative("stage2.kd_weight", self.kd_weight)
        positive("stage2.base_temperature", self.base_temperature)
        non_negative("stage2.advantage_scale", self.advantage_scale)
        require(0 < self.coupling_floor <= 1, f"stage2.coupling_floor must be in (0, 1], got {self.coupling_floor}")


@dataclass
class Stage3Config:
    """Path-refined policy optimisation (PR-GRPO) and the baseline policies."""

    enabled: bool = True
    # pr_grpo: ratio damped by router drift on bad paths; grpo: plain; rspo: drift damping
    # on all tokens; gspo: sequence-level ratio.
    policy: Literal["pr_grpo", "grpo", "rspo", "gspo"] = "pr_grpo"
    # lambda: rho_t *= exp(-lambda * Gamma_t) on negative-advantage tokens. Gamma is an L2
    # distance of probability vectors, in [0, sqrt(2)]: 1 damps a fully switched route to
    # ~0.24 and leaves small drifts almost untouched.
    drift_penalty: float = 1.0
    # The PPO/GRPO standard clip range.
    clip_eps: float = 0.2
    # Responses per prompt. 4 is the smallest group whose reward std is meaningful and fits
    # two CPU cores; paper-scale runs use 8-16.
    group_size: int = 4
    # token: GRPO's per-token ratio; gspo switches to sequence level itself.
    ratio_level: Literal["token", "sequence"] = "token"
    # Clip range of a sequence-level ratio, below and above 1 (clip(s, 1 - low, 1 + high)): a
    # geometric mean over hundreds of tokens sits far closer to 1 than one token's ratio; the
    # GSPO paper's range.
    seq_clip_low: float = 3e-4
    seq_clip_high: float = 4e-4
    # RSPO floors its router-shift weight so that no token's update vanishes; 0.5 at most
    # halves a token's ratio (RSPO publishes the floor, not a value we could check).
    rspo_min_weight: float = 0.5
    # token_mean: over all response tokens (DAPO, Dr. GRPO: no length bias); seq_mean: mean
    # over each response, then over responses (GRPO paper). For grpo, pr_grpo and rspo only:
    # gspo always uses seq_mean, the aggregation GSPO is defined with.
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    # Verifiable reward = reward_correct * [grader accepts the answer] + reward_format *
    # [an explicit final-answer marker: ####, \boxed{}, "the answer is"]. The format term is
    # 10x below correctness so that no formatted wrong answer outscores a correct one, yet it
    # separates responses in groups where all answers are wrong (those would have no signal).
    reward_correct: float = 1.0
    reward_format: float = 0.1
    # Partial credit: + reward_steps x the share of the reference solution's equations
    # (a op b = c) the response states (rl/rewards.step_credit). 0: off, the paper's reward.
    # A dense reward for a student that rarely gets a whole answer right (docs/results.md).
    reward_steps: float = 0.0
    # KL to a reference policy: must stay 0 (DAPO, Dr. GRPO for verifiable rewards). No frozen
    # reference copy is built: under ZeRO-3 it would cost a second sharded model and a forward
    # per update, and the teacher's KD term already anchors the policy.
    ref_kl: float = 0.0
    # Prompts per RL step over all student ranks (veRL's data.train_batch_size). Each rank samples
    # its prompts_per_step / (student ranks) prompts x group_size responses in one rollout phase
    # (its rollout batch) and trains on it in micro-batches of train.micro_batch_size sequences,
    # accumulated into each optimiser step. 8: the toy's 2 student ranks x 4 prompts x G=4 = one
    # micro-batch of 16 sequences per rank.
    prompts_per_step: int = 8
    # PPO epochs: optimiser steps per rollout batch, each over the whole batch (all its
    # micro-batches accumulated; there is no mini-batch option). 1: strictly on-policy, the ratio
    # is 1, the clip never acts and the policy variants give (nearly) the same gradient. > 1:
    # PPO-style reuse against the sampling policy's log-probs, where clipping and the variants differ.
    updates_per_batch: int = 1
    # Truncated importance sampling: each token's surrogate is weighted by min(pi_old /
    # pi_rollout, tis_cap), pi_rollout the rollout engine's probability of the sampled token
    # (logged as rollout/logprob_diff_*). 0: off, the trainer's pi_old is taken as the sampler.
    tis_cap: float = 0.0
    # The control arm of a power study: each rank's advantages permuted across its rollout
    # batch before the update, so the step moves the policy as much but carries no reward
    # information (a real GRPO step must beat it).
    shuffle_advantages: bool = False
    # One more forward per micro-batch after the updates (and one before when updates_per_batch
    # is 1): train/policy_move = mean |log pi_new - log pi_old| per response token.
    measure_movement: bool = False

    def check(self) -> None:
        non_negative("stage3.drift_penalty", self.drift_penalty)
        require(self.tis_cap == 0 or self.tis_cap >= 1, f"stage3.tis_cap must be 0 (off) or >= 1 (a cap below 1 "
                f"down-weights tokens the two engines agree on), got {self.tis_cap}")
        require(0 < self.clip_eps < 1, f"stage3.clip_eps must be in (0, 1), got {self.clip_eps}")
        positive("stage3.group_size", self.group_size)
        require(not self.enabled or self.group_size >= 2,
                f"stage3.group_size must be >= 2 when stage3 is enabled (a group-relative advantage needs "
                f"two responses), got {self.group_size}")
        require(self.ref_kl == 0, f"stage3.ref_kl={self.ref_kl}: no frozen reference model is built (under ZeRO-3 "
                "it would cost another full sharded model and a forward per update; the teacher's KD term anchors "
                "the policy); keep stage3.ref_kl=0")
        require(0 < self.seq_clip_low < 1, f"stage3.seq_clip_low must be in (0, 1), got {self.seq_clip_low}")
        require(0 < self.seq_clip_high < 1, f"stage3.seq_clip_high must be in (0, 1), got {self.seq_clip_high}")
        require(0 <= self.rspo_min_weight <= 1, f"stage3.rspo_min_weight must be in [0, 1], got {self.rspo_min_weight}")
        non_negative("stage3.reward_correct", self.reward_correct)
        positive("stage3.prompts_per_step", self.prompts_per_step)
        positive("stage3.updates_per_batch", self.updates_per_batch)
        non_negative("stage3.reward_format", self.reward_format)
        non_negative("stage3.reward_steps", self.reward_steps)


@dataclass
class RolloutConfig:
    """How the student generates its Stage III rollouts (train.mode=padd)."""

    # hf: transformers' generate on the ZeRO-3 + AutoEP engine itself; every decode step gathers
    # the partitioned parameters and runs the expert all-to-alls on every rank in step
    # (synced_gpus): right for tiny models, hours per RL step at paper scale.
    # hf_gathered: each rank gathers the whole student once per rollout phase (ZeRO-3 gather,
    # expert-parallel all-gather) into a plain transformers model that routes exactly like the
    # engine (Stage IV bias included), generates its own prompts without collectives, and frees
    # it; it needs the whole student in bf16 plus its KV cache on each device (`padd plan`).
    # vllm: a vLLM engine in its own process and environment (`make vllm`), started by student
    # rank 0 on its device, gets the student's weights after every optimizer step and samples
    # every rank's prompts as one batch, routing with the Stage IV bias (padd_ds/vllm_engine).
    backend: Literal["hf", "hf_gathered", "vllm"] = "hf"
    # Temperature 1 and no nucleus cut sample the policy itself, as the policy gradient
    # assumes (GRPO/DAPO defaults); the length budget is data.max_response_tokens. At another
    # temperature the trainer's log-probs are at it too (TRL, veRL): it trains the policy it samples.
    temperature: float = 1.0
    top_p: float = 1.0
    # Routing replay: the trainer's forward on a rollout batch uses, token by token, the experts
    # the rollout engine chose (its gate still weights them, so the router keeps its gradient).
    # Off: the trainer routes by itself and rollout/route_agreement logs how often they agree.
    route_replay: bool = False
    # The vLLM environment's interpreter (null: this checkout's .venv-vllm, built by `make vllm`).
    vllm_python: Optional[str] = None
    # Student ranks per engine (consecutive, on one node); the first starts it. null: all of them.
    vllm_ranks_per_engine: Optional[int] = None
    # Devices per engine (vLLM tensor parallel): the first rank's and the next ones.
    vllm_tensor_parallel: int = 1
    # Share of each engine device's memory it may take (weights + KV cache); it sleeps while the
    # student trains.
    vllm_gpu_memory_utilization: float = 0.3
    # Its KV cache on a CPU host.
    vllm_cpu_kv_cache_gb: float = 0.25
    # An engine must start, load a sync or answer a rollout phase within this; fail, don't hang.
    vllm_timeout_s: float = 1800.0

    def check(self) -> None:
        require(self.temperature > 0, f"rollout.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        require(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        require(0 < self.vllm_gpu_memory_utilization < 1,
                f"rollout.vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        positive("rollout.vllm_cpu_kv_cache_gb", self.vllm_cpu_kv_cache_gb)
        positive("rollout.vllm_timeout_s", self.vllm_timeout_s)
        positive("rollout.vllm_tensor_parallel", self.vllm_tensor_parallel)
        require(self.vllm_ranks_per_engine is None or self.vllm_ranks_per_engine >= self.vllm_tensor_parallel,
                f"rollout.vllm_ranks_per_engine={self.vllm_ranks_per_engine} must be >= rollout.vllm_tensor_parallel="
                f"{self.vllm_tensor_parallel}: an engine runs on devices of its own ranks")
        require(not (self.route_replay and self.backend == "vllm"),
                "rollout.route_replay needs the rollout engine's routes, which the vllm backend does not return; "
                "use rollout.backend=hf_gathered or turn route_replay off")


@dataclass
class Stage4Config:
    """Reward-augmented load balancing through a per-expert router bias."""

    enabled: bool = True
    # eta: b_j -= eta * (f_j - 1/N). f_j - 1/N is at most ~1, so 0.01 moves a logit by at most
    # 0.01 per step: balance builds over ~100 steps without making routing jump (path rupture).
    balance_rate: float = 0.01
    # gamma: + gamma * EMA(A_j), ten times weaker than the balancing term, so a preference for
    # high-reward experts can never starve the others.
    advantage_rate: float = 0.001
    # EMA of per-expert advantage: ~10-step horizon, follows the policy, smooths batch noise.
    ema_decay: float = 0.9
    # balancing: b_j - eta * (f_j - 1/N) (overloaded experts lose bias); as_written: the
    # notes' "+" sign (positive feedback), kept for the comparison.
    bias_sign: Literal["balancing", "as_written"] = "balancing"
    # Classic auxiliary balance loss. 0: the bias does the balancing (DeepSeek-V3's
    # loss-free approach); kept as a knob for baselines.
    aux_loss_coeff: float = 0.0
    # Routers without a bias slot (Qwen3-MoE, Mixtral, DeepSeek-V2): every K steps (not the
    # last) fold the bias into the router weights (the export's softmax regression on the
    # step's last rollouts) and restart it from 0, so the export folds only <= K steps of bias
    # and routes more like the engine. 0: never, the paper's reading.
    fold_every: int = 0
    # Routers without a bias slot: fold the bias before the last N steps and keep it at 0
    # through them, so they train on the very routing the export has. 0: off (the paper).
    settle_steps: int = 0

    def check(self) -> None:
        non_negative("stage4.balance_rate", self.balance_rate)
        non_negative("stage4.advantage_rate", self.advantage_rate)
        require(0 <= self.ema_decay < 1, f"stage4.ema_decay must be in [0, 1), got {self.ema_decay}")
        non_negative("stage4.aux_loss_coeff", self.aux_loss_coeff)
        require(isinstance(self.fold_every, int) and self.fold_every >= 0,
                f"stage4.fold_every must be an integer >= 0 (0: never fold during training), got {self.fold_every!r}")


@dataclass
class TrainConfig:
    # distill: online KD only (the walking skeleton); padd: Stage I then Stages II-IV.
    mode: Literal["distill", "padd"] = "distill"
    # Enough for the toy student to visibly approach the teacher on CPU in minutes.
    steps: int = 300
    # AdamW's usual rate for small transformers; paper-scale recipes lower it (~1e-6 for RL).
    lr: float = 3e-4
    # 0: short fine-tuning from pre-trained/teacher-derived weights; decay would only pull
    # them towards zero.
    weight_decay: float = 0.0
    # Sequences per student rank per micro-step (forward + backward); fits the toy model on CPU.
    micro_batch_size: int = 16
    # Micro-steps per optimiser step in train.mode=distill. In padd mode it follows from the
    # rollout batch (config.accumulation_steps) and must stay 1.
    grad_accum: int = 1
    # Small LM term on reference answers next to KD: KD carries the teacher signal, the LM
    # term anchors the output format.
    lm_weight: float = 0.1
    # 1 = match the teacher's sampling distribution (no extra smoothing).
    kd_temperature: float = 1.0
    log_every: int = 10
    # 0 => only at the end (toy runs are short).
    save_every: int = 0
    # The newest checkpoint plus one fallback in case the newest write was interrupted.
    keep_last: int = 2
    # auto: continue from the newest complete checkpoint in run.output_dir/checkpoints if
    # there is one (a requeued or restarted job picks up where it stopped); never: start fresh.
    resume: Literal["auto", "never"] = "auto"
    # Recompute each decoder layer in backward (HF gradient checkpointing, non-reentrant) instead
    # of keeping its activations: long responses fit at the cost of one more student forward.
    # Off: the toy runs fit without it and train faster.
    activation_checkpointing: bool = False
    # The routers' learning rate as a multiple of train.lr (a param group of their own). 1: one
    # rate for every weight. > 1: routes move faster than the experts, the regime PR-GRPO's drift
    # penalty and routing replay are for (bench/stage3_routes.py).
    router_lr_scale: float = 1.0
    # A NaN/inf loss on any student rank skips that optimiser step on all of them (counted in
    # train/nonfinite_skipped); this many skipped steps in a row stop the run with an error. 3:
    # one bad batch is survivable, a streak means the weights or the data are broken.
    max_nonfinite_steps: int = 3

    def check(self) -> None:
        positive("train.steps", self.steps)
        positive("train.lr", self.lr)
        non_negative("train.weight_decay", self.weight_decay)
        positive("train.micro_batch_size", self.micro_batch_size)
        positive("train.grad_accum", self.grad_accum)
        non_negative("train.lm_weight", self.lm_weight)
        positive("train.kd_temperature", self.kd_temperature)
        positive("train.log_every", self.log_every)
        non_negative("train.save_every", self.save_every)
        positive("train.keep_last", self.keep_last)
        positive("train.max_nonfinite_steps", self.max_nonfinite_steps)
        positive("train.router_lr_scale", self.router_lr_scale)


@dataclass
class DeepSpeedConfig:
    # DeepSpeed JSON, relative to the working directory, else to the repository.
    config: str = "ds_configs/zero3.json"
    # None => the JSON's expert_parallel.autoep_size (1 when expert_parallel is off).
    expert_parallel_size: Optional[int] = None

    def check(self) -> None:
        ep = self.expert_parallel_size
        require(ep is None or ep >= 1, f"deepspeed.expert_parallel_size must be >= 1 or null, got {ep}")


@dataclass
class LoggingConfig:
    wandb_project: str = "padd-ds"
    # auto: online when WANDB_API_KEY is set, else offline (sync later; never blocks a run).
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # metrics.jsonl in the run dir: the record that needs no service.
    jsonl: bool = True
    progress: bool = True

    def check(self) -> None:
        require(self.wandb_project.strip() != "", "logging.wandb_project must not be empty")


@dataclass
class EvalConfig:
    # What the run's before/after table evaluates: toy (the toy build's held-out problems),
    # gsm8k (its test set) or math5 (the paper's five benchmarks, accuracy averaged over them).
    suite: Literal["toy", "gsm8k", "math5"] = "toy"
    # Per benchmark. 200 problems: standard error ~3.5 points at 50% accuracy, minutes on CPU.
    num_problems: int = 200
    # Same as data.max_response_tokens so evaluation sees the lengths training saw.
    max_new_tokens: int = 96
    batch_size: int = 64
    # Evaluate the teacher and the untrained student as well as the trained one. Sweeps that
    # share those two across many runs (bench/reproduce_table.py) set false and evaluate them
    # once; results.json then holds null for them.
    references: bool = True
    # The teacher's row of those references (null: as `references`). The teacher ranks
    # evaluate while the students build their engine, and the students' Stage I waits for
    # them (topology.timeout_s): a ZeRO-3 teacher splits the problems over its ranks, yet a
    # 70B one decoding math5 still takes hours. Set false there; the table then holds null
    # for the teacher (evaluate it once apart, e.g. `padd eval`).
    teacher_reference: Optional[bool] = None
    # When the export folds a Stage IV bias (routers without a bias slot), also evaluate the
    # export with its exact routing restored (`load_exact_routing`): the fold's accuracy
    # cost. Doubles the trained student's evaluation, so off by default.
    exact_routing: bool = False
    # Also evaluate the live student every K RL steps (train.mode=padd), logged as
    # eval/heldout_acc with the step's cumulative training time: learning curves. 0: before
    # and after only. Greedy decoding draws no random numbers, so training is unchanged.
    every: int = 0

    def check(self) -> None:
        positive("eval.num_problems", self.num_problems)
        require(isinstance(self.every, int) and self.every >= 0,
                f"eval.every must be an integer >= 0 (0: before and after only), got {self.every!r}")
        positive("eval.max_new_tokens", self.max_new_tokens)
        positive("eval.batch_size", self.batch_size)
        require(self.references or not self.teacher_reference,
                "eval.teacher_reference=true needs eval.references=true (the teacher's row is one of the "
                "references); leave it null or set eval.references=true")

    @property
    def teacher_evaluated(self) -> bool:
        """Whether the run evaluates the teacher (the reference row of the table)."""
        return self.references and self.teacher_reference is not False


@dataclass
class PaddConfig:
    run: RunConfig = field(default_factory=RunConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    stage4: Stage4Config = field(default_factory=Stage4Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def check(self) -> None:
        """Every section's ranges, then the rules that span sections. Raises ConfigError."""
        for section in dataclasses.fields(self):
            getattr(self, section.name).check()
        s4, tr = self.stage4, self.train
        require(isinstance(s4.settle_steps, int) and 0 <= s4.settle_steps < max(tr.steps, 1),
                f"stage4.settle_steps must be an integer in [0, train.steps={tr.steps}) (0: off), "
                f"got {s4.settle_steps!r}")
        require(self.eval.every == 0 or tr.mode == "padd",
                f"eval.every={self.eval.every} needs train.mode=padd (the RL loop); train.mode={tr.mode} "
                "evaluates before and after only: set eval.every=0")
        # What the trainer cannot run.
        require(tr.mode != "padd" or tr.grad_accum == 1,
                f"train.grad_accum={tr.grad_accum} in train.mode=padd: accumulation follows from "
                "stage3.prompts_per_step x stage3.group_size / (student ranks x train.micro_batch_size); "
                "remove train.grad_accum")
        s1, student = self.stage1, self.models.student
        require(student is not None or s1.router_init != "keep",
                "stage1.router_init=keep needs a pre-trained student; a decompressed one "
                "(models.student=null) starts from the centroids or a random router")
        require(student is None or not s1.enabled or s1.router_init != "centroids" or s1.projection != "none",
                "stage1.projection=none cannot place teacher centroids in a pre-trained student's "
                "hidden space; use stage1.projection=lstsq (or router_init=keep/random)")


# --------------------------------------------------------------------------------------
# The RL step's batch layout (train.mode=padd), given the number of student ranks
# --------------------------------------------------------------------------------------


def rollout_layout_problem(cfg: PaddConfig, students: int) -> str | None:
    """The rollout batch splits evenly over the student ranks and into whole micro-batches
    (the one place of this rule: validate.py and the planner call it)."""
    if cfg.train.mode != "padd":
        return None
    s3, mbs = cfg.stage3, cfg.train.micro_batch_size
    if s3.prompts_per_step % students:
        return (f"stage3.prompts_per_step={s3.prompts_per_step} does not split over {students} student ranks; "
                "make it a multiple of the student ranks")
    per_rank = s3.prompts_per_step // students * s3.group_size
    if per_rank % mbs:
        return (f"the rollout batch of {per_rank} sequences per student rank (stage3.prompts_per_step="
                f"{s3.prompts_per_step} / {students} ranks x stage3.group_size={s3.group_size}) does not split into "
                f"micro-batches of train.micro_batch_size={mbs}; make the micro-batch a divisor of {per_rank}")
    return None


def rollout_engines_problem(cfg: PaddConfig, students: int) -> str | None:
    """rollout.backend=vllm: the student ranks split into whole engine groups."""
    rpe = cfg.rollout.vllm_ranks_per_engine
    if cfg.train.mode != "padd" or cfg.rollout.backend != "vllm" or rpe is None or students % rpe == 0:
        return None
    return (f"rollout.vllm_ranks_per_engine={rpe} does not divide the {students} student ranks; "
            "make it a divisor (or null: one engine for all)")


def rollout_batch_size(cfg: PaddConfig, students: int) -> int:
    """Sequences each student rank samples and trains on per RL step: its prompts x G."""
    return cfg.stage3.prompts_per_step // students * cfg.stage3.group_size


def accumulation_steps(cfg: PaddConfig, students: int) -> int:
    """Micro-batches per optimiser step: train.grad_accum (distill), or the rollout batch over
    the micro-batch (padd). Raises ConfigError when the layout does not split."""
    if cfg.train.mode != "padd":
        return cfg.train.grad_accum
    problem = rollout_layout_problem(cfg, students)
    require(problem is None, str(problem))
    return rollout_batch_size(cfg, students) // cfg.train.micro_batch_size
