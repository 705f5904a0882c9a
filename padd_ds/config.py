"""Run configuration: one tree of typed dataclasses, loaded from a YAML recipe plus overrides.

    cfg = load_config("recipes/toy.yaml", ["stage2.tau=2.0", "train.lr=1e-4"])
    validate(cfg, world_size=3)          # before any process group exists
    print(dump_yaml(cfg))                # saved into every run dir

Every field has a default and the reason for it. Where the PADD paper gives a value we use
it; where it gives none (most coefficients, see /work/shared/PADD_METHOD.md) the comment
says why we picked ours. Every error is a single line naming the dotted field and the fix.

This module must import without torch or deepspeed: the CLI loads and validates a config
before anything heavy is imported, and a bad recipe should fail in a second, not a minute.
"""

import dataclasses
import difflib
import json
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

# The checkout this package lives in; relative paths (DeepSpeed JSON, recipes, local
# models) are looked up in the current directory first and then here.
REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A recipe, override or config value is wrong. The message is one line: field and fix
    (control characters of user text in it, such as a newline in a key, are escaped)."""

    def __init__(self, message: str):
        super().__init__(re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(message)))


# --------------------------------------------------------------------------------------
# The config tree
# --------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    # A short label for logs and W&B; the toy recipe is the default walking skeleton.
    name: str = "toy"
    # Checkpoints, the resolved config, metrics.jsonl. Relative to the working directory.
    output_dir: str = "runs/toy"
    # Fixed so that two runs of one recipe are comparable; change it to measure variance.
    seed: int = 1234


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
    # matmuls are slow and lossy, and the toy models are tiny).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Off: executing a checkpoint's Python code must be an explicit decision.
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # toy | gsm8k | a path to .jsonl/.json/.parquet | a datasets hub name.
    source: str = "toy"
    # Column names of the problem and its reference answer (GSM8K's names).
    question_field: str = "question"
    answer_field: str = "answer"
    # The paper's four disjoint parts of the problem pool: D_A clustering statistics,
    # D_B expert warmup, D_C main training, D_D held-out evaluation.
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"A": 0.10, "B": 0.20, "C": 0.65, "D": 0.05}
    )
    # Toy problems are short; 96 + 96 tokens keeps a CPU step well under a second.
    # Real math recipes raise both (e.g. 256 prompt / 1024+ response).
    max_prompt_tokens: int = 96
    max_response_tokens: int = 96
    # A training problem whose prompt is longer than max_prompt_tokens. error: stop before
    # training, naming it (cutting a question would train on a different problem); skip: drop
    # such problems with a count in the log (an error if none is left).
    long_prompts: Literal["error", "skip"] = "error"
    # Toy pool size: its 5% held-out part (200 problems) matches eval.num_problems.
    num_problems: int = 4000


@dataclass
class TopologyConfig:
    # Teacher processes, the LAST ranks of the launch. One replica serves all students:
    # measured on CPU, students never waited with a one-step prefetch.
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
    # How several teacher ranks share the work. replicas: each holds a full copy and serves
    # its own block of student ranks (fastest when the teacher fits one device). zero3: one
    # teacher ZeRO-3-partitioned over all teacher ranks (for a teacher too large for one
    # device, e.g. 70B bf16 = 140 GB); the first teacher rank serves every student.
    parallel: Literal["replicas", "zero3"] = "replicas"


@dataclass
class Stage1Config:
    """Neuron clustering, expert and router init, router-frozen warmup (paper Phase 1)."""

    enabled: bool = True
    # Points for the equal-size k-means: rows of gate and up together describe a SwiGLU
    # neuron completely (the paper only says "first projection" - our choice, switchable).
    cluster_input: Literal["gate_up", "gate", "up"] = "gate_up"
    # Temperature of the teacher's path distribution p_T = softmax(mean_act / xi). 1 keeps
    # the activations' own scale; the paper gives no value.
    xi: float = 1.0
    # Warmup loss L_LM + alpha * L_KD + beta * KL(p_S || p_T). alpha = 1: KD as important
    # as LM, the classic Hinton weighting.
    alpha: float = 1.0
    # The path KL is an auxiliary shaping term: an order of magnitude below the main losses
    # so it steers routing without dominating them.
    beta: float = 0.1
    # Short: experts start from teacher neurons (or a pre-trained MoE); the warmup only has
    # to align them under the uniform router before the real router takes over.
    warmup_steps: int = 100
    # Learning rate of the warmup; null = train.lr. The warmup is supervised (LM + KD on
    # reference solutions) and tolerates a far larger step than the RL stages after it.
    lr: Optional[float] = None
    # The paper freezes the router at uniform 1/N over all experts; with all experts on, a
    # decompressed student reproduces the dense FFN exactly. uniform_random_topk: k random
    # experts at 1/k each (the other reading). learned: route with the student's own router
    # (no uniform phase) - our switch for a pre-trained MoE, whose experts were trained with
    # their router: a uniform phase measurably breaks them (README, Stage I), the router
    # then trains with all three terms.
    warmup_router: Literal["uniform_all", "uniform_random_topk", "learned"] = "uniform_all"
    # Maps teacher hidden states to the student's for the router init when the hidden sizes
    # differ; the paper does not say how - a least-squares fit on D_A is the simplest exact map.
    projection: Literal["lstsq", "none"] = "lstsq"
    # How the router starts. centroids: from the teacher's cluster centroids (a decompressed
    # student has them exactly; a pre-trained one gets them through `projection`). keep: the
    # pre-trained student's own router. random: N(0, 0.02), the "no Stage I init" comparison.
    router_init: Literal["centroids", "keep", "random"] = "centroids"
    # Which expert of a pre-trained student stands for which teacher cluster (the paper does
    # not say). matched: the pairing that maximises the overlap of the student's current
    # routes with the teacher's paths on D_A (Hungarian), so the centroid init moves each
    # expert's traffic as little as possible; identity: expert j <- cluster j. A decompressed
    # student always uses identity (expert j *is* cluster j).
    pairing: Literal["matched", "identity"] = "matched"
    # D_A problems streamed through the teacher for the router fit and the targets: 512 toy
    # problems are ~60k tokens, far more than a router has inputs (hidden 128; 2048 for
    # Qwen3-30B-A3B); the rest of D_A adds time, not accuracy. null = all of D_A.
    targets_max_problems: Optional[int] = 512
    # Held-out (D_D) problems for the Stage I report (path agreement, KD loss with learned
    # routing) before init, after init and after warmup.
    eval_problems: int = 128
    # Decompression only (models.student is None): routed experts and top-k of the MoE built
    # from the teacher. 8 experts top-2 is the Mixtral ratio and the size our CPU timings use.
    # The teacher's FFN width must divide by decompress_experts (equal-size clusters).
    decompress_experts: int = 8
    decompress_top_k: int = 2


@dataclass
class Stage2Config:
    """Online adaptive distillation on the student's own responses."""

    enabled: bool = True
    # Weight of the forward KL to the teacher; 1 puts it on par with the policy loss.
    kd_weight: float = 1.0
    # Base KD temperature: 1 = the teacher's own distribution for a zero-advantage path.
    tau: float = 1.0
    # Phi(A) = 1 + tanh(kappa * A). Advantages are standardised (about +-1), so kappa = 1
    # uses most of tanh's range without saturating.
    kappa: float = 1.0
    # as_intended: effective temperature tau / Phi(A) (good paths sharper, the paper's
    # stated intent); as_written: tau * Phi(A); fixed: tau (the online-KD baseline).
    temperature_coupling: Literal["as_intended", "as_written", "fixed"] = "as_intended"
    # Phi(A) -> 0 as A -> -inf would make the temperature infinite (as_intended) or zero
    # (as_written). 0.1 caps it at 10 * tau (resp. 0.1 * tau), where a top-k target is already
    # nearly flat (resp. nearly one-hot); with kappa = 1 only advantages below -1.47 reach it.
    phi_floor: float = 0.1
    # The notes temper only the target p_T*. Tempering the student too (Hinton KD, loss * T^2)
    # would make the KD optimum the untempered teacher for every T, erasing "sharper targets
    # for good paths"; kept as a switch for the classic-KD reading.
    temper_student: bool = False


@dataclass
class Stage3Config:
    """Path-refined policy optimisation (PR-GRPO) and the baseline policies."""

    enabled: bool = True
    # pr_grpo: ratio damped by router drift on bad paths; grpo: plain; rspo: drift damping
    # on all tokens; gspo: sequence-level ratio.
    policy: Literal["pr_grpo", "grpo", "rspo", "gspo"] = "pr_grpo"
    # rho_t *= exp(-lambda * Gamma_t) on negative-advantage tokens. Gamma is an L2 distance
    # of probability vectors, in [0, sqrt(2)]: lambda = 1 damps a fully switched route to
    # ~0.24 and leaves small drifts almost untouched.
    drift_lambda: float = 1.0
    # The PPO/GRPO standard clip range.
    clip_eps: float = 0.2
    # Responses per prompt. 4 is the smallest group whose reward std is meaningful and fits
    # two CPU cores; paper-scale runs use 8-16.
    group_size: int = 4
    # token: GRPO's per-token ratio; gspo switches to sequence level itself.
    ratio_level: Literal["token", "sequence"] = "token"
    # Clip range of a sequence-level ratio (gspo, or ratio_level=sequence): a geometric mean
    # over hundreds of tokens sits far closer to 1 than one token's ratio, so clip_eps would
    # never bite; the GSPO paper clips at 3e-4 below / 4e-4 above (one symmetric value here).
    seq_clip_eps: float = 4e-4
    # RSPO floors its router-shift weight so that no token's update vanishes; 0.5 at most
    # halves a token's ratio (RSPO publishes the floor, not a value we could check).
    rspo_min_weight: float = 0.5
    # token_mean: sum over response tokens / token count (DAPO, Dr. GRPO: every token weighs the
    # same, no length bias); seq_mean: mean over each response, then over responses (GRPO, GSPO
    # papers). `denom` of the loss counts tokens resp. responses.
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    # Verifiable reward = reward_correct * [grader accepts the answer] + reward_format *
    # [an explicit final-answer marker: ####, \boxed{}, "the answer is"]. The format term is
    # 10x below correctness so that no formatted wrong answer outscores a correct one, yet it
    # separates responses in groups where all answers are wrong (those would have no signal).
    reward_correct: float = 1.0
    reward_format: float = 0.1
    # KL to a reference policy. 0 like DAPO/Dr.GRPO for verifiable rewards: the teacher KD
    # term already anchors the policy, and it saves a reference forward.
    ref_kl: float = 0.0
    # Rollout sampling: temperature 1 and no nucleus cut sample the policy itself, which is
    # what the policy-gradient estimate assumes (GRPO/DAPO defaults); the response budget is
    # data.max_response_tokens.
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    # Optimiser steps on each batch of rollouts. 1: strictly on-policy, the ratio is 1 at the
    # update, so the clip never acts, GRPO and GSPO give the same gradient and PR-GRPO's drift
    # penalty only rescales bad tokens (measured: MoE-GRPO, RSPO and GSPO runs agree to 4-7
    # digits). > 1: PPO-style reuse against the sampling policy's log-probs (computed once
    # before the first update), where clipping and the policy variants differ.
    updates_per_batch: int = 1


@dataclass
class Stage4Config:
    """Reward-augmented load balancing through a per-expert router bias."""

    enabled: bool = True
    # b_j -= eta * (f_j - 1/N). f_j - 1/N is at most ~1, so 0.01 moves a logit by at most
    # 0.01 per step: balance builds over ~100 steps without making routing jump (path rupture).
    eta: float = 0.01
    # + gamma * EMA(A_j): ten times weaker than the balancing term, so a preference for
    # high-reward experts can never starve the others.
    gamma: float = 0.001
    # EMA of per-expert advantage: ~10-step horizon, follows the policy, smooths batch noise.
    ema_decay: float = 0.9
    # balancing: b_j - eta * (f_j - 1/N) (overloaded experts lose bias); as_written: the
    # notes' "+" sign (positive feedback), kept for the comparison.
    bias_sign: Literal["balancing", "as_written"] = "balancing"
    # Classic auxiliary balance loss. 0: the bias does the balancing (DeepSeek-V3's
    # loss-free approach); kept as a knob for baselines.
    aux_loss_coeff: float = 0.0
    # Every K training steps (not the last), fold the bias into the router weights (the
    # export's softmax regression, fitted on the step's last rollout batch) and restart it from
    # 0, for routers without a bias slot (Qwen3-MoE, Mixtral, DeepSeek-V2). The export then
    # folds only the last <= K steps of bias, so the native checkpoint routes more like the
    # engine (a fold of the whole bias keeps ~0.87 of routes on the toy). 0: never, the
    # paper's reading (the bias lives beside the router until the export). Ignored where
    # the router has a bias slot.
    fold_every: int = 0
    # The last N training steps: fold the bias into the router weights before them and keep
    # it at 0 through them (Stage IV stops updating it), so the model trains its last steps
    # on the very routing it is exported with (export routing fidelity 1, no fold at the
    # export). 0: off, the paper's reading. Routers without a bias slot only.
    settle_steps: int = 0


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
    # Sequences per student rank per micro-step; fits the toy model on CPU.
    micro_batch_size: int = 16
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
    # A NaN/inf loss on any student rank skips that optimiser step on all of them (counted in
    # train/nonfinite_skipped); this many skipped steps in a row stop the run with an error. 3:
    # one bad batch is survivable, a streak means the weights or the data are broken.
    max_nonfinite_steps: int = 3


@dataclass
class DeepSpeedConfig:
    # DeepSpeed JSON, relative to the working directory, else to the repository.
    config: str = "ds_configs/zero3.json"
    # None => the JSON's expert_parallel.autoep_size (1 when expert_parallel is off).
    expert_parallel_size: Optional[int] = None


@dataclass
class LoggingConfig:
    wandb_project: str = "padd-ds"
    # auto: online when WANDB_API_KEY is set, else offline (sync later; never blocks a run).
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # metrics.jsonl in the run dir: the record that needs no service.
    jsonl: bool = True
    progress: bool = True


@dataclass
class EvalConfig:
    suite: Literal["toy", "gsm8k", "math5"] = "toy"
    # 200 problems: standard error ~3.5 points at 50% accuracy, minutes on CPU.
    num_problems: int = 200
    # Same as data.max_response_tokens so evaluation sees the lengths training saw.
    max_new_tokens: int = 96
    batch_size: int = 64
    # Evaluate the teacher and the untrained student as well as the trained one. Sweeps that
    # share those two across many runs (bench/reproduce_table.py) set false and evaluate them
    # once; results.json then holds null for them.
    references: bool = True
    # When the export folds a Stage IV bias (routers without a bias slot), also evaluate the
    # export with its exact routing restored (`load_exact_routing`): the fold's accuracy
    # cost. Doubles the trained student's evaluation, so off by default.
    exact_routing: bool = False


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
    stage4: Stage4Config = field(default_factory=Stage4Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------
# YAML with YAML 1.2 floats
# --------------------------------------------------------------------------------------
# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a *string*. Recipes and `--set` values
# are written by people who mean a float, so both the loader and the dumper use a 1.2-style
# float rule (the dumper must agree, or a str like "1e5" would be written unquoted).

_FLOAT_TAG = "tag:yaml.org,2002:float"
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _with_yaml12_floats(cls):
    cls.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    cls.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
    return cls


@_with_yaml12_floats
class _Loader(yaml.SafeLoader):
    pass


@_with_yaml12_floats
class _Dumper(yaml.SafeDumper):
    pass


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------
# Typed merging of mappings into the tree
# --------------------------------------------------------------------------------------

_NONE = type(None)


def _hints(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _type_name(tp) -> str:
    if tp is Any:
        return "any value"
    if _is_union(tp):
        return " or ".join("null" if a is _NONE else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is Literal:
        return "one of " + repr(list(get_args(tp)))
    if get_origin(tp) is dict:
        k, v = get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _given(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; int -> float is the only coercion."""
    try:
        return _coerce_inner(value, tp, key, where)
    except _Mismatch:
        hint = ""
        if "str" in _type_name(tp) and isinstance(value, (bool, int, float)):
            hint = "; quote the value to pass it as text"
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_given(value)}{where}{hint}") from None


def _coerce_inner(value: Any, tp: Any, key: str, where: str) -> Any:
    if tp is Any:
        return value
    if _is_union(tp):
        args = get_args(tp)
        if value is None:
            if _NONE in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is _NONE:
                continue
            try:
                return _coerce_inner(value, arg, key, where)
            except (_Mismatch, ConfigError):
                continue
        raise _Mismatch
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        # `type(...) is` so that True never passes for 1 and 1 never for 1.0.
        if any(value == a and type(value) is type(a) for a in allowed):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}{where}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if get_origin(tp) is dict:
        ktp, vtp = get_args(tp)
        if not isinstance(value, Mapping):
            raise _Mismatch
        return {
            _coerce(k, ktp, f"{key}.{k}", where): _coerce(v, vtp, f"{key}.{k}", where)
            for k, v in value.items()
        }
    if get_origin(tp) is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (etp,) = get_args(tp)
        return [_coerce(v, etp, f"{key}[{i}]", where) for i, v in enumerate(value)]
    raise TypeError(f"config annotation {tp!r} of {key} is not supported")  # a bug in this file


def _leaf_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _leaf_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(cls, prefix: str, name: Any, where: str) -> ConfigError:
    dotted = f"{prefix}{name}"
    siblings = list(_hints(cls))
    close = difflib.get_close_matches(str(name), siblings, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix}{close[0]}'?"
    else:
        # A valid name in the wrong section (train.tau -> stage2.tau)?
        elsewhere = [k for k in _leaf_keys(PaddConfig) if k.rsplit(".", 1)[-1] == name]
        if elsewhere:
            hint = f"did you mean '{elsewhere[0]}'?"
        else:
            section = prefix.rstrip(".") or "the top level"
            hint = f"valid keys of {section}: {', '.join(siblings)}"
    return ConfigError(f"unknown key '{dotted}'{where}; {hint}")


def _merge(obj: Any, data: Mapping, prefix: str, where: str) -> None:
    hints = _hints(type(obj))
    for name, value in data.items():
        if name not in hints:
            raise _unknown_key(type(obj), prefix, name, where)
        tp = hints[name]
        dotted = prefix + name
        if dataclasses.is_dataclass(tp):
            if value is None:  # a section whose fields are all commented out
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"{dotted}: expected a mapping of {dotted} fields, got {_given(value)}{where}"
                )
            _merge(getattr(obj, name), value, dotted + ".", where)
        else:
            setattr(obj, name, _coerce(value, tp, dotted, where))


def _set_path(cfg: PaddConfig, key: str, value: Any, where: str) -> None:
    """Apply one `a.b.c=value` override. A key inside a dict field (`data.split_fractions.A`)
    updates that entry."""
    parts = key.split(".")
    obj, prefix = cfg, ""
    for i, name in enumerate(parts):
        hints = _hints(type(obj))
        if name not in hints:
            raise _unknown_key(type(obj), prefix, name, where)
        tp, rest = hints[name], parts[i + 1 :]
        if not rest:
            _merge(obj, {name: value}, prefix, where)
            return
        if dataclasses.is_dataclass(tp):
            obj, prefix = getattr(obj, name), f"{prefix}{name}."
            continue
        if get_origin(tp) is dict and len(rest) == 1:
            _, vtp = get_args(tp)
            getattr(obj, name)[rest[0]] = _coerce(value, vtp, key, where)
            return
        raise ConfigError(f"{prefix}{name} holds {_type_name(tp)}; it has no field '{'.'.join(rest)}'{where}")


# --------------------------------------------------------------------------------------
# Loading and dumping
# --------------------------------------------------------------------------------------


def expand_user(path: str | os.PathLike) -> Path:
    """`~` and `~user` expanded; a `~user` that does not exist stays as written (pathlib
    raises RuntimeError for it) and then simply names no file."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _find_recipe(recipe: str) -> Path:
    candidates = [expand_user(recipe)]
    if not candidates[0].is_absolute():
        candidates += [REPO_ROOT / recipe, REPO_ROOT / "recipes" / recipe, REPO_ROOT / "recipes" / f"{recipe}.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"recipe '{recipe}' not found (looked in {Path.cwd()} and {REPO_ROOT / 'recipes'})")


def load_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> PaddConfig:
    """Defaults, then the YAML recipe (a mapping by section), then `section.field=value`
    overrides whose values are parsed as YAML (`1e-4`, `true`, `null`, `[1,2]`)."""
    cfg = PaddConfig()
    if recipe is not None:
        path = _find_recipe(recipe)
        where = f" in {recipe}"
        try:
            data = _yaml_load(path.read_text())
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"malformed YAML in {recipe}{line}: {e.problem or e.context}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"malformed YAML in {recipe}: {str(e).splitlines()[0]}") from None
        if data is not None:
            if not isinstance(data, Mapping):
                raise ConfigError(
                    f"recipe {recipe} must be a mapping of sections (run:, models:, ...), "
                    f"got a {type(data).__name__}"
                )
            _merge(cfg, data, "", where)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like section.field=value, e.g. train.lr=1e-4")
        try:
            value = _yaml_load(raw)
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. an unbalanced bracket): keep the text as typed
        _set_path(cfg, key, value, f" in --set {item}")
    return cfg


def from_dict(d: Mapping[str, Any]) -> PaddConfig:
    """Build a config from a (possibly partial) nested mapping, e.g. a saved run config."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config must be a mapping of sections, got a {type(d).__name__}")
    cfg = PaddConfig()
    _merge(cfg, d, "", "")
    return cfg


def to_dict(cfg: PaddConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: PaddConfig) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------
# Paths: models, DeepSpeed JSON
# --------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _local(path: str, repo_root: str | Path | None) -> Path | None:
    """`path` as an existing file system entry: as given, else relative to the repository."""
    p = expand_user(path)
    if p.exists():
        return p.resolve()
    if not p.is_absolute():
        q = Path(repo_root or REPO_ROOT) / p
        if q.exists():
            return q.resolve()
    return None


def resolve_model_path(
    ref: str, repo_root: str | Path | None = None, *, field_name: str = "model", need_config: bool = True
) -> str:
    """Resolve a model reference to a local directory or a hub id.

    `toy://NAME` -> `$PADD_TOY_DIR/NAME` (`padd toy build` sets PADD_TOY_DIR). A local path
    must exist and hold `config.json`. A string that is not a local path counts as a hub id
    only if it looks like `org/name`. `field_name` names the config field in errors.
    """
    if ref.startswith("toy://"):
        name = ref[len("toy://") :]
        toy_dir = os.environ.get("PADD_TOY_DIR")
        if not name:
            raise ConfigError(f"{field_name}: '{ref}' names no toy model; use e.g. toy://teacher")
        if not toy_dir:
            raise ConfigError(f"{field_name}: '{ref}' needs the toy models; run `padd toy build` first (it sets PADD_TOY_DIR)")
        path = Path(toy_dir) / name
        if not path.is_dir():
            raise ConfigError(f"{field_name}: toy model '{name}' not found in PADD_TOY_DIR={toy_dir}; run `padd toy build`")
        ref = str(path)
    local = _local(ref, repo_root)
    if local is None:
        if _HUB_ID.match(ref):
            return ref
        raise ConfigError(f"{field_name}: path '{ref}' does not exist")
    if need_config and not (local / "config.json").is_file():
        raise ConfigError(f"{field_name}: '{local}' has no config.json; point it at a Hugging Face model directory")
    return str(local)


def _read_model_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"'{file}' not found; a model directory needs its config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{file}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{file}' must hold a JSON object")
    return data


def _model_field(conf: Mapping[str, Any], name: str) -> Any:
    """A field of an HF config; multimodal configs keep the LM's under text_config."""
    if conf.get(name) is not None:
        return conf[name]
    text = conf.get("text_config")
    return text.get(name) if isinstance(text, Mapping) else None


# The routed-expert count's name per model_type (as DeepSpeed's AutoEP presets read it).
_EXPERT_FIELD = {
    "qwen3_moe": "num_experts",
    "qwen2_moe": "num_experts",
    "mixtral": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}
_ANY_EXPERT_FIELD = ("num_experts", "num_local_experts", "n_routed_experts")


def student_moe_shape(path: str | Path) -> tuple[int, int] | None:
    """(routed experts, top-k) from a local model's config.json, or None for a dense model."""
    conf = _read_model_config(path)
    # The family's own name first; then any: transformers 5.x saves Qwen3-MoE's count as
    # `num_local_experts` through its attribute_map.
    own = [_EXPERT_FIELD[conf["model_type"]]] if conf.get("model_type") in _EXPERT_FIELD else []
    names = own + [n for n in _ANY_EXPERT_FIELD if n not in own]
    num_experts = next((_model_field(conf, n) for n in names if _model_field(conf, n) is not None), None)
    if not isinstance(num_experts, int) or num_experts <= 0:
        return None
    top_k = _model_field(conf, "num_experts_per_tok")
    if not isinstance(top_k, int):
        raise ConfigError(f"'{Path(path) / 'config.json'}' has {num_experts} experts but no integer num_experts_per_tok")
    return num_experts, top_k


def resolve_deepspeed_config(cfg: PaddConfig, repo_root: str | Path | None = None) -> Path:
    """deepspeed.config relative to the working directory, else to the repository."""
    local = _local(cfg.deepspeed.config, repo_root)
    if local is None or not local.is_file():
        places = dict.fromkeys(str(p) for p in (Path.cwd(), Path(repo_root or REPO_ROOT).resolve()))
        raise ConfigError(
            f"deepspeed.config: DeepSpeed JSON '{cfg.deepspeed.config}' not found "
            f"(looked in {' and '.join(places)}); point deepspeed.config at a JSON file"
        )
    return local


def read_deepspeed_config(cfg: PaddConfig, repo_root: str | Path | None = None) -> dict[str, Any]:
    path = resolve_deepspeed_config(cfg, repo_root)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config: '{path}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: '{path}' must hold a JSON object")
    return data


def expert_parallel_size(cfg: PaddConfig, repo_root: str | Path | None = None) -> int:
    """deepspeed.expert_parallel_size, else the JSON's expert_parallel.autoep_size when
    expert_parallel is enabled (DeepSpeed's own default is 1), else 1."""
    if cfg.deepspeed.expert_parallel_size is not None:
        return cfg.deepspeed.expert_parallel_size
    ds = read_deepspeed_config(cfg, repo_root)
    ep = ds.get("expert_parallel") or {}
    if not isinstance(ep, dict):
        raise ConfigError(f"deepspeed.config: expert_parallel in '{cfg.deepspeed.config}' must be a JSON object")
    if not ep.get("enabled", False):
        return 1
    size = ep.get("autoep_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(
            f"deepspeed.config: expert_parallel.autoep_size in '{cfg.deepspeed.config}' must be an integer >= 1, "
            f"got {size!r}; or set deepspeed.expert_parallel_size"
        )
    return size


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_ranges(cfg: PaddConfig) -> None:
    def positive(key: str, value: float) -> None:
        _require(value > 0 and math.isfinite(value), f"{key} must be > 0, got {value}")

    def non_negative(key: str, value: float) -> None:
        _require(value >= 0 and math.isfinite(value), f"{key} must be >= 0, got {value}")

    _require(cfg.run.name.strip() != "", "run.name must not be empty")
    _require(cfg.run.output_dir.strip() != "", "run.output_dir must not be empty")
    non_negative("run.seed", cfg.run.seed)

    d = cfg.data
    _require(d.source.strip() != "", "data.source must not be empty; use toy, gsm8k, a file or a hub name")
    _require(d.question_field != "" and d.answer_field != "", "data.question_field/answer_field must not be empty")
    fr = d.split_fractions
    _require(
        set(fr) == {"A", "B", "C", "D"},
        f"data.split_fractions must have exactly the keys A, B, C, D, got {sorted(fr)}",
    )
    for k, v in fr.items():
        _require(0 < v <= 1, f"data.split_fractions.{k} must be in (0, 1], got {v}")
    total = sum(fr.values())
    _require(abs(total - 1) <= 1e-6, f"data.split_fractions must sum to 1, got {total:.6g}")
    positive("data.max_prompt_tokens", d.max_prompt_tokens)
    positive("data.max_response_tokens", d.max_response_tokens)
    positive("data.num_problems", d.num_problems)

    t = cfg.topology
    non_negative("topology.teacher_ranks", t.teacher_ranks)
    _require(
        t.colocated or t.teacher_ranks >= 1,
        "topology.teacher_ranks must be >= 1 unless topology.colocated=true",
    )
    _require(
        t.bridge_port is None or 1 <= t.bridge_port <= 65535,
        f"topology.bridge_port must be in 1..65535 or null, got {t.bridge_port}",
    )
    positive("topology.timeout_s", t.timeout_s)

    positive("teacher.logits_top_k", cfg.teacher.logits_top_k)
    non_negative("teacher.prefetch", cfg.teacher.prefetch)
    positive("teacher.request_timeout_s", cfg.teacher.request_timeout_s)

    s1 = cfg.stage1
    positive("stage1.xi", s1.xi)
    non_negative("stage1.alpha", s1.alpha)
    non_negative("stage1.beta", s1.beta)
    non_negative("stage1.warmup_steps", s1.warmup_steps)
    if s1.lr is not None:
        positive("stage1.lr", s1.lr)
    positive("stage1.decompress_experts", s1.decompress_experts)
    positive("stage1.decompress_top_k", s1.decompress_top_k)

    s2 = cfg.stage2
    non_negative("stage2.kd_weight", s2.kd_weight)
    positive("stage2.tau", s2.tau)
    non_negative("stage2.kappa", s2.kappa)
    _require(0 < s2.phi_floor <= 1, f"stage2.phi_floor must be in (0, 1], got {s2.phi_floor}")

    s3 = cfg.stage3
    non_negative("stage3.drift_lambda", s3.drift_lambda)
    _require(0 < s3.clip_eps < 1, f"stage3.clip_eps must be in (0, 1), got {s3.clip_eps}")
    positive("stage3.group_size", s3.group_size)
    _require(
        not s3.enabled or s3.group_size >= 2,
        f"stage3.group_size must be >= 2 when stage3 is enabled (a group-relative advantage needs "
        f"two responses), got {s3.group_size}",
    )
    non_negative("stage3.ref_kl", s3.ref_kl)
    _require(0 < s3.seq_clip_eps < 1, f"stage3.seq_clip_eps must be in (0, 1), got {s3.seq_clip_eps}")
    _require(0 <= s3.rspo_min_weight <= 1, f"stage3.rspo_min_weight must be in [0, 1], got {s3.rspo_min_weight}")
    non_negative("stage3.reward_correct", s3.reward_correct)
    positive("stage3.updates_per_batch", s3.updates_per_batch)
    non_negative("stage3.reward_format", s3.reward_format)

    s4 = cfg.stage4
    non_negative("stage4.eta", s4.eta)
    non_negative("stage4.gamma", s4.gamma)
    _require(0 <= s4.ema_decay < 1, f"stage4.ema_decay must be in [0, 1), got {s4.ema_decay}")
    non_negative("stage4.aux_loss_coeff", s4.aux_loss_coeff)
    _require(isinstance(s4.fold_every, int) and s4.fold_every >= 0,
             f"stage4.fold_every must be an integer >= 0 (0: never fold during training), got {s4.fold_every!r}")
    _require(isinstance(s4.settle_steps, int) and 0 <= s4.settle_steps < max(cfg.train.steps, 1),
             f"stage4.settle_steps must be an integer in [0, train.steps={cfg.train.steps}) (0: off), "
             f"got {s4.settle_steps!r}")

    tr = cfg.train
    positive("train.steps", tr.steps)
    positive("train.lr", tr.lr)
    non_negative("train.weight_decay", tr.weight_decay)
    positive("train.micro_batch_size", tr.micro_batch_size)
    positive("train.grad_accum", tr.grad_accum)
    non_negative("train.lm_weight", tr.lm_weight)
    positive("train.kd_temperature", tr.kd_temperature)
    positive("train.log_every", tr.log_every)
    non_negative("train.save_every", tr.save_every)
    positive("train.keep_last", tr.keep_last)
    positive("train.max_nonfinite_steps", tr.max_nonfinite_steps)

    ep = cfg.deepspeed.expert_parallel_size
    _require(ep is None or ep >= 1, f"deepspeed.expert_parallel_size must be >= 1 or null, got {ep}")
    _require(cfg.logging.wandb_project.strip() != "", "logging.wandb_project must not be empty")

    positive("eval.num_problems", cfg.eval.num_problems)
    positive("eval.max_new_tokens", cfg.eval.max_new_tokens)
    positive("eval.batch_size", cfg.eval.batch_size)


def _check_data_source(cfg: PaddConfig, repo_root: str | Path | None) -> None:
    src = cfg.data.source
    if src in ("toy", "gsm8k"):
        return
    looks_local = src.endswith((".jsonl", ".json", ".parquet")) or src.startswith(("/", "./", "../", "~"))
    if looks_local and _local(src, repo_root) is None:
        raise ConfigError(f"data.source: file '{src}' does not exist; use toy, gsm8k, an existing file or a hub name")


def _tokenizer_ids(path: str | Path) -> dict[int, str] | None:
    """id -> token of a fast tokenizer's tokenizer.json (model vocabulary plus added
    tokens), or None when the directory has none."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{file}' is not valid JSON (line {e.lineno}: {e.msg})") from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    # BPE/WordPiece/WordLevel: {token: id}; Unigram: [[piece, score], ...] in id order.
    ids = {i: p[0] for i, p in enumerate(vocab)} if isinstance(vocab, list) else {i: t for t, i in vocab.items()}
    ids.update({t["id"]: t["content"] for t in data.get("added_tokens") or []})
    return ids or None


def _check_padded_vocab(tokenizer: str, student: str, tv: int, sv: int) -> None:
    """Teacher and student embedding tables may differ in size when the difference is only
    padding (Qwen2.5 pads to 152064 rows, Qwen3 to 151936, both over one tokenizer): every
    id the shared tokenizer produces must exist in both tables, and a student that ships its
    own tokenizer must map those ids to the same tokens. Rows beyond the tokenizer are never
    produced by it; the teacher's such rows are padding the student can never be asked for."""
    ids = _tokenizer_ids(tokenizer)
    _require(
        ids is not None,
        f"models.student: vocab_size {sv} differs from the teacher's {tv} and '{tokenizer}' has no tokenizer.json "
        "to show the extra rows are only padding; point models.tokenizer at the shared tokenizer's directory",
    )
    n, smaller = max(ids) + 1, min(tv, sv)
    _require(
        n <= smaller,
        f"models.student: vocab_size {sv} differs from the teacher's {tv}, and the tokenizer in '{tokenizer}' "
        f"produces ids up to {n - 1}, beyond the {smaller} rows of the "
        f"{'student' if sv < tv else 'teacher'}; teacher and student need one tokenizer family",
    )
    _check_student_tokenizer(ids, tokenizer, student)


def _check_student_tokenizer(ids: dict[int, str] | None, tokenizer: str, student: str) -> None:
    """A student that ships its own tokenizer must map every id of the shared one to the same
    token (it may add tokens after them); otherwise KD compares unrelated tokens."""
    own = _tokenizer_ids(student) if Path(student).resolve() != Path(tokenizer).resolve() else None
    if own is not None and ids is not None:
        bad = next(((i, t) for i, t in sorted(ids.items()) if own.get(i) != t), None)
        _require(
            bad is None,
            f"models.student: its tokenizer maps id {bad and bad[0]} to {bad and own.get(bad[0])!r}, the shared "
            f"tokenizer to {bad and bad[1]!r}; teacher and student need one tokenizer family (same ids, same tokens)",
        )


def _check_models(cfg: PaddConfig, ep: int, repo_root: str | Path | None) -> None:
    m = cfg.models
    teacher = resolve_model_path(m.teacher, repo_root, field_name="models.teacher")
    student = None if m.student is None else resolve_model_path(m.student, repo_root, field_name="models.student")
    if m.tokenizer is not None:
        resolve_model_path(m.tokenizer, repo_root, field_name="models.tokenizer", need_config=False)

    t_conf = _read_model_config(teacher) if Path(teacher).is_dir() else None
    s_conf = _read_model_config(student) if student is not None and Path(student).is_dir() else None
    seq = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for name, conf in (("models.teacher", t_conf), ("models.student", s_conf)):
        limit = None if conf is None else _model_field(conf, "max_position_embeddings")
        _require(
            not isinstance(limit, int) or seq <= limit,
            f"{name}: max_position_embeddings={limit} is shorter than data.max_prompt_tokens + "
            f"data.max_response_tokens = {seq}; shorten them",
        )

    if t_conf is not None and s_conf is not None:
        tv, sv = _model_field(t_conf, "vocab_size"), _model_field(s_conf, "vocab_size")
        tok = teacher if m.tokenizer is None else resolve_model_path(m.tokenizer, repo_root, field_name="models.tokenizer", need_config=False)
        if tv != sv:
            _check_padded_vocab(tok, student, tv, sv)
        else:
            _check_student_tokenizer(_tokenizer_ids(tok), tok, student)

    if student is None:
        shape = (cfg.stage1.decompress_experts, cfg.stage1.decompress_top_k)
        where = "stage1.decompress_experts"
        ffn = None if t_conf is None else _model_field(t_conf, "intermediate_size")
        _require(
            not isinstance(ffn, int) or ffn % shape[0] == 0,
            f"stage1.decompress_experts={shape[0]} must divide the teacher's intermediate_size {ffn} "
            "(experts are equal-size neuron clusters)",
        )
    elif s_conf is not None:
        shape = student_moe_shape(student)
        where = "models.student"
        _require(
            shape is not None,
            f"models.student: '{m.student}' is not an MoE (its config.json has no num_experts, "
            "num_local_experts or n_routed_experts); PADD needs an MoE student, or set models.student=null "
            "to decompress the teacher",
        )
    else:
        return  # hub student: checked when it is downloaded
    num_experts, top_k = shape
    _require(
        top_k <= num_experts,
        f"{where}: top-k {top_k} is larger than the {num_experts} experts",
    )
    _require(
        num_experts % ep == 0,
        f"{where}: {num_experts} experts do not divide over expert-parallel size {ep}; "
        "set deepspeed.expert_parallel_size (or expert_parallel.autoep_size) to a divisor",
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _check_weights(path: Path, name: str) -> None:
    """A local model directory holds safetensors weights, every shard its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set((json.loads(index.read_text()).get("weight_map") or {}).values()))
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"{name}: '{index}' is not a valid safetensors index (JSON with a weight_map)") from None
        missing = [f for f in shards if not (path / f).is_file()]
        _require(
            not missing and bool(shards),
            f"{name}: '{path / (missing[0] if missing else index.name)}' "
            + (f"is missing ({len(missing)} of {len(shards)} shards listed in {index.name}); the checkpoint is "
               "incomplete, copy or download it again" if missing else "lists no shards"),
        )
        return
    if any(path.glob("*.safetensors")):
        return
    pickle = next((f.name for f in (path / "pytorch_model.bin", path / "pytorch_model.bin.index.json") if f.is_file()), None)
    raise ConfigError(
        f"{name}: '{path}' has only pickle weights ({pickle}); padd-ds loads safetensors only, convert them"
        if pickle else
        f"{name}: '{path}' has no model weights (model.safetensors or model.safetensors.index.json); "
        "point it at a complete Hugging Face model directory"
    )


def _check_model_files(cfg: PaddConfig, repo_root: str | Path | None) -> None:
    """Weights of the local teacher and student, and the tokenizer files, exist: a missing
    file fails here, before any process group, not on one rank after minutes of loading."""
    m = cfg.models
    for name, ref in (("models.teacher", m.teacher), ("models.student", m.student)):
        if ref is not None and Path(path := resolve_model_path(ref, repo_root, field_name=name)).is_dir():
            _check_weights(Path(path), name)
    name, ref = ("models.teacher", m.teacher) if m.tokenizer is None else ("models.tokenizer", m.tokenizer)
    path = Path(resolve_model_path(ref, repo_root, field_name=name, need_config=False))
    _require(
        not path.is_dir() or any((path / f).is_file() for f in _TOKENIZER_FILES),
        f"{name}: '{path}' has no tokenizer ({', '.join(_TOKENIZER_FILES)}); "
        + ("set models.tokenizer to the shared tokenizer's directory" if m.tokenizer is None else
           "point models.tokenizer at a directory that holds one"),
    )


def _check_world(cfg: PaddConfig, world_size: int, ep: int) -> None:
    t = cfg.topology
    _require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    if t.colocated:
        students = world_size
    else:
        _require(
            world_size > 1,
            "world size 1 cannot hold a separate teacher rank; set topology.colocated=true "
            "(teacher inside the student process) or launch more processes",
        )
        students = world_size - t.teacher_ranks
        _require(
            students >= 1,
            f"world size {world_size} cannot hold topology.teacher_ranks={t.teacher_ranks} plus at least one "
            f"student rank; lower topology.teacher_ranks or launch more processes",
        )
        _require(
            t.teacher_ranks <= students,
            f"topology.teacher_ranks={t.teacher_ranks} exceeds the {students} student ranks of world size "
            f"{world_size}; every teacher replica needs a student, lower topology.teacher_ranks",
        )
    _require(
        students % ep == 0,
        f"{students} student ranks (world size {world_size}) do not divide into expert-parallel groups of "
        f"{ep}; change topology.teacher_ranks, the process count or deepspeed.expert_parallel_size",
    )


def validate(cfg: PaddConfig, world_size: int | None = None, repo_root: str | Path | None = None) -> None:
    """Check a config before any process group exists. Raises ConfigError (one line).

    Checks value ranges, the DeepSpeed JSON, model paths and their config.json (shared
    vocabulary, MoE shape vs. expert parallelism) and, when given, that `world_size` holds
    the teacher and student ranks.
    """
    _check_ranges(cfg)
    ep = expert_parallel_size(cfg, repo_root)
    read_deepspeed_config(cfg, repo_root)  # exists and parses even when EP comes from the config
    _check_data_source(cfg, repo_root)
    _check_models(cfg, ep, repo_root)
    _check_model_files(cfg, repo_root)
    if world_size is not None:
        _check_world(cfg, world_size, ep)


def check_supported(cfg: PaddConfig) -> None:
    """Refuse, before any process group exists, combinations the trainer cannot run."""
    if cfg.train.mode == "padd" and cfg.train.micro_batch_size % cfg.stage3.group_size:
        raise ConfigError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be a multiple of "
                          f"stage3.group_size={cfg.stage3.group_size} in train.mode=padd (it counts rollouts "
                          "per rank: prompts x group size)")
    if cfg.models.student is None and cfg.stage1.router_init == "keep":
        raise ConfigError("stage1.router_init=keep needs a pre-trained student; a decompressed one "
                          "(models.student=null) starts from the centroids or a random router")
    if cfg.models.student is not None and cfg.stage1.enabled and cfg.stage1.router_init == "centroids" \
            and cfg.stage1.projection == "none":
        raise ConfigError("stage1.projection=none cannot place teacher centroids in a pre-trained student's "
                          "hidden space; use stage1.projection=lstsq (or router_init=keep/random)")

