"""Build the toy models: a SentencePiece tokenizer, a dense teacher and a weak MoE student.

The real recipe distills a large dense LM into an MoE student on GPUs. The toy
build reproduces its shape on two CPU cores: a Qwen3 teacher that solves most
synthetic arithmetic word problems and a Qwen3-MoE student (8 experts, top-2,
fewer active parameters) that is trained less and so is clearly weaker. Tests,
demos and benchmarks all start from it, so the build is cached under a hash of
its config and written atomically: a killed build never leaves a half cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from padd_ds.data.math import PACKAGED_DATA_DIR
from padd_ds.data.prompt import format_example
from padd_ds.data.toy import ToyProblem, toy_splits
from padd_ds.eval.evaluate import Decoding, evaluate_problems
from padd_ds.paths import REPO_ROOT

log = logging.getLogger(__name__)

# Bump whenever the build recipe changes in a way the config does not capture.
BUILD_VERSION = "1"
PROFILES = ("demo", "test", "guess")
_COMPLETE_MARKER = "BUILD_COMPLETE"


@dataclass
class ToyBuildConfig:
    """Everything that determines a toy build; its hash names the cache folder.

    Defaults are the "demo" profile (under 10 minutes on 2 CPU cores); use
    ``ToyBuildConfig.for_profile("test")`` for the fast one used by tests.
    """

    profile: str = "demo"  # "demo" (teacher strong, student weak) or "test" (barely trained, fast)
    seed: int = 0
    n_train: int = 40_000  # more than steps * batch, so training rarely repeats a problem
    n_heldout: int = 300  # held-out problems for the accuracies in metrics
    # Tokenizer: small vocab, digits split so arithmetic works digit by digit.
    vocab_size: int = 1024
    tokenizer_use_gsm8k: bool = True  # also train the tokenizer on the packaged GSM8K train file
    max_seq_len: int = 192  # longest prompt+response in tokens (~150 seen); longer examples are an error
    # Teacher: dense Qwen3.
    teacher_hidden: int = 128
    teacher_layers: int = 4
    teacher_heads: int = 4
    teacher_intermediate: int = 512
    teacher_steps: int = 1100  # held-out accuracy jumps between ~700 and ~1000 steps
    teacher_lr: float = 3e-3
    # Student: Qwen3-MoE, every layer sparse.
    student_hidden: int = 128
    student_layers: int = 4
    student_heads: int = 4
    student_moe_intermediate: int = 128  # 2 active experts x 128 < the teacher's dense 512
    student_num_experts: int = 8
    student_top_k: int = 2
    student_steps: int = 700  # stops mid-way through learning: clearly weaker, not useless
    student_lr: float = 3e-3
    # Share of the student's training examples whose solution is the answer alone ("#### 18"):
    # a student that sometimes guesses instead of working the problem out, a choice RL can
    # learn across problems (the "guess" profile; docs/results.md, power round 7). 0: none.
    student_guess_fraction: float = 0.0
    # 0: the mix from the first step. N: the student_steps on worked solutions alone, then N
    # steps on the mix at a tenth of student_lr (its worked answers keep most of the demo's skill).
    student_guess_steps: int = 0
    # Shared optimisation / evaluation settings.
    batch_size: int = 32
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_batch_size: int = 100
    max_new_tokens: int = 128  # a level-3 solution is ~90 tokens

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        for name in ("n_train", "n_heldout", "teacher_steps", "student_steps", "batch_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.student_guess_fraction < 1:
            raise ValueError(f"student_guess_fraction must be in [0, 1), got {self.student_guess_fraction}")
        if self.student_guess_steps < 0 or (self.student_guess_steps and not self.student_guess_fraction):
            raise ValueError(f"student_guess_steps must be >= 0 and needs student_guess_fraction > 0, got "
                             f"{self.student_guess_steps} with {self.student_guess_fraction}")
        if self.student_num_experts != 8 or self.student_top_k != 2:
            raise ValueError("the toy student is fixed at 8 experts, top-2 (the shape the pipeline targets)")
        for who in ("teacher", "student"):
            if getattr(self, f"{who}_hidden") % getattr(self, f"{who}_heads"):
                raise ValueError(f"{who}_hidden must be divisible by {who}_heads")

    @classmethod
    def for_profile(cls, profile: str) -> "ToyBuildConfig":
        if profile == "demo":
            return cls()
        if profile == "guess":
            return cls(profile="guess", student_guess_fraction=0.5, student_guess_steps=100)
        if profile == "test":
            return cls(
                profile="test",
                n_train=6_000,
                n_heldout=48,
                teacher_hidden=64,
                teacher_intermediate=256,
                teacher_layers=2,
                teacher_steps=150,
                student_hidden=64,
                student_layers=2,
                student_moe_intermediate=32,
                student_steps=60,
                warmup_steps=20,
                eval_batch_size=48,
            )
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")

    def cache_key(self) -> str:
        """Short hash of the config and BUILD_VERSION: a changed recipe never reuses a stale cache."""
        config = asdict(self)
        for added in ("student_guess_fraction", "student_guess_steps"):  # the builds without them keep their keys
            if not config[added]:
                del config[added]
        blob = json.dumps({"config": config, "build_version": BUILD_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class ToyBuild:
    """Paths of a finished toy build plus its metrics (accuracies, parameter counts, seconds)."""

    root: Path
    tokenizer_dir: Path
    teacher_dir: Path
    student_dir: Path
    train_file: Path
    heldout_file: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path) -> "ToyBuild":
        root = Path(root)
        metrics_file = root / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        return cls(
            root=root,
            tokenizer_dir=root / "tokenizer",
            teacher_dir=root / "teacher",
            student_dir=root / "student",
            train_file=root / "train.jsonl",
            heldout_file=root / "heldout.jsonl",
            metrics=metrics,
        )


def repo_root() -> Path:
    """The checkout root: the parent of the ``padd_ds`` package directory."""
    return REPO_ROOT


# GSM8K's train split, installed with the package (padd_ds/data/files/README.md).
GSM8K_TRAIN = PACKAGED_DATA_DIR / "gsm8k" / "train.jsonl"


def default_cache_dir() -> Path:
    env = os.environ.get("PADD_CACHE")
    return Path(env) if env else repo_root() / ".cache" / "padd_ds"


# ---------------------------------------------------------------------------
# data and tokenizer


def _write_jsonl(path: Path, problems: list[ToyProblem]) -> None:
    with path.open("w") as f:
        for p in problems:
            row = {"id": p.id, "question": p.question, "solution": p.solution, "answer": p.answer, "level": p.level}
            f.write(json.dumps(row) + "\n")


def tokenizer_corpus(train: list[ToyProblem], use_gsm8k: bool) -> list[str]:
    """Toy examples, then (``use_gsm8k``) every GSM8K train example, as the tokenizer sees them."""
    texts = ["".join(format_example(p.question, p.solution)) for p in train]
    if not use_gsm8k:
        return texts
    if not GSM8K_TRAIN.is_file():
        raise FileNotFoundError(f"the toy tokenizer's corpus {GSM8K_TRAIN} is missing; reinstall padd-ds")
    with GSM8K_TRAIN.open() as f:
        for line in f:
            row = json.loads(line)
            texts.append("".join(format_example(row["question"], row["answer"])))
    return texts


def _bpe_merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocab: pieces are listed in merge order."""
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, rank in vocab.items():
        if piece in skip:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int) -> Any:
    """Train a SentencePiece BPE model and save it as a transformers ``LlamaTokenizer``.

    SentencePiece settings keep text byte-exact (identity normalization, no
    whitespace folding, byte fallback for unseen characters) and split digits so
    numbers are spelled digit by digit. The model's pieces are read through the
    sentencepiece API (not its protobuf, whose runtime version other packages
    pin) and become a fast BPE ``LlamaTokenizer`` whose ``tokenizer.json``
    ``AutoTokenizer`` loads without remote code. It must encode exactly like
    SentencePiece; that is checked below.
    """
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "tokenizer")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type="bpe",
            split_digits=True,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            pad_piece="<pad>",
            max_sentence_length=1 << 16,
            num_threads=2,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = {"<unk>", "<s>", "</s>", "<pad>"}
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=_bpe_merges(vocab, skip=special),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,  # every sequence starts with BOS, prompts included
        add_eos_token=False,  # training appends EOS after the response itself
        padding_side="left",
    )
    for text in texts[:200] + texts[-50:]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if ids != sp.encode(text):
            raise RuntimeError(f"fast tokenizer disagrees with SentencePiece on {text!r}")
        if tok.decode(ids) != text:
            raise RuntimeError(f"tokenizer does not round-trip {text!r}")
    if len(tok) != vocab_size:
        raise RuntimeError(f"converted tokenizer has {len(tok)} tokens, expected {vocab_size}")
    tok.save_pretrained(str(out_dir))
    return tok


def with_guesses(problems: list[ToyProblem], fraction: float, seed: int) -> list[ToyProblem]:
    """`problems` with a seeded `fraction` of them answered without working: solution "#### x"."""
    if not fraction:
        return problems
    rng = random.Random(seed + 7)
    return [replace(p, solution=f"#### {p.answer}") if rng.random() < fraction else p for p in problems]


def student_phases(cfg: ToyBuildConfig, worked: list, mixed: list) -> list[tuple[list, int, float, int]]:
    """The student's training phases, each (examples, steps, peak lr, warmup steps): the mix with
    guesses from the start, or (student_guess_steps) after the worked solutions alone."""
    if not cfg.student_guess_steps:
        return [(mixed, cfg.student_steps, cfg.student_lr, cfg.warmup_steps)]
    return [(worked, cfg.student_steps, cfg.student_lr, cfg.warmup_steps),
            (mixed, cfg.student_guess_steps, cfg.student_lr / 10, cfg.warmup_steps // 5)]


def encode_examples(tokenizer, problems: list[ToyProblem], max_seq_len: int) -> list[tuple[list[int], int]]:
    """Token ids of ``BOS prompt response EOS`` and the prompt length (loss masks the prompt)."""
    prompts, fulls = zip(*[format_example(p.question, p.solution) for p in problems])
    prompt_ids = tokenizer(list(prompts))["input_ids"]
    full_ids = tokenizer([a + b for a, b in zip(prompts, fulls)])["input_ids"]
    out = []
    for p_ids, f_ids, prob in zip(prompt_ids, full_ids, problems):
        if f_ids[: len(p_ids)] != p_ids:  # generation starts from the prompt tokenized alone
            raise RuntimeError(f"prompt tokens are not a prefix of prompt+response for {prob.id}")
        ids = f_ids + [tokenizer.eos_token_id]
        if len(ids) > max_seq_len:
            raise ValueError(f"example {prob.id} has {len(ids)} tokens > max_seq_len={max_seq_len}")
        out.append((ids, len(p_ids)))
    return out


# ---------------------------------------------------------------------------
# models


def teacher_config(cfg: ToyBuildConfig, tokenizer):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.teacher_hidden,
        intermediate_size=cfg.teacher_intermediate,
        num_hidden_layers=cfg.teacher_layers,
        num_attention_heads=cfg.teacher_heads,
        num_key_value_heads=cfg.teacher_heads,
        head_dim=cfg.teacher_hidden // cfg.teacher_heads,
        max_position_embeddings=cfg.max_seq_len + cfg.max_new_tokens,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def student_config(cfg: ToyBuildConfig, tokenizer):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.student_hidden,
        intermediate_size=4 * cfg.student_hidden,  # unused: every layer is sparse
        moe_intermediate_size=cfg.student_moe_intermediate,
        num_hidden_layers=cfg.student_layers,
        num_attention_heads=cfg.student_heads,
        num_key_value_heads=cfg.student_heads,
        head_dim=cfg.student_hidden // cfg.student_heads,
        max_position_embeddings=cfg.max_seq_len + cfg.max_new_tokens,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        num_experts=cfg.student_num_experts,
        num_experts_per_tok=cfg.student_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=False,  # train_lm asks for router logits (load-balancing loss) per call
        router_aux_loss_coef=0.01,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Total and per-token active parameters; routed expert weights count top_k/num_experts."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    n_experts = getattr(cfg, "num_experts", None)
    active = total
    if n_experts:
        for name, p in model.named_parameters():
            if ".experts." in name:
                active -= p.numel() - p.numel() * cfg.num_experts_per_tok // n_experts
    return {"total": total, "active": active}


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(examples: list[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless shuffled, right-padded batches with the prompt and padding masked out of the loss.

    Batches are drawn from length-sorted pools of 32 batches, which cuts padding
    (and so CPU time) by about a quarter without ordering the data by length.
    """
    rng = random.Random(seed)
    order: list[int] = []
    ready: list[list[int]] = []
    pool_size = 32 * batch_size
    while True:
        if not ready:
            while len(order) < pool_size:
                fresh = list(range(len(examples)))
                rng.shuffle(fresh)
                order.extend(fresh)
            pool, order = sorted(order[:pool_size], key=lambda i: len(examples[i][0])), order[pool_size:]
            ready = [pool[i : i + batch_size] for i in range(0, pool_size, batch_size)]
            rng.shuffle(ready)
        chunk = ready.pop()
        width = max(len(examples[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            seq, n_prompt = examples[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            mask[row, : len(seq)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class LMTraining:
    """How `train_lm` trains one model: AdamW, linear warmup then cosine decay."""

    steps: int
    batch_size: int
    lr: float  # peak learning rate
    warmup_steps: int
    weight_decay: float  # on matrices only; norms and biases get none
    seed: int  # batch order


def train_lm(
    model: torch.nn.Module,
    examples: list[tuple[list[int], int]],
    how: LMTraining,
    *,
    pad_id: int,
    desc: str,
    console: Console | None = None,
) -> list[float]:
    """AdamW on the response tokens; returns the loss per step."""
    steps, lr = how.steps, how.lr
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": how.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    # MoE models add the load-balancing loss only when asked for router logits.
    extra = {"output_router_logits": True} if getattr(model.config, "num_experts", None) else {}
    model.train()
    losses: list[float] = []
    batches = _batches(examples, how.batch_size, pad_id, how.seed)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(desc, total=steps, loss=float("nan"))
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr, how.warmup_steps)
            out = model(**next(batches), **extra)
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(out.loss.item())
            smooth = sum(losses[-20:]) / len(losses[-20:])
            progress.update(task, advance=1, loss=smooth)
    model.eval()
    return losses


# ---------------------------------------------------------------------------
# build


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize builds of one config across processes (multi-process tests build concurrently)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _is_complete(root: Path) -> bool:
    return (root / _COMPLETE_MARKER).is_file()


def _build_into(cfg: ToyBuildConfig, root: Path, console: Console) -> dict[str, Any]:
    """Run the whole build into ``root`` (a temp dir) and return the metrics."""
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    t0 = time.time()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    train, heldout = toy_splits(cfg.n_train, cfg.n_heldout, cfg.seed)
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "heldout.jsonl", heldout)

    t = time.time()
    tokenizer = train_tokenizer(tokenizer_corpus(train, cfg.tokenizer_use_gsm8k), root / "tokenizer", cfg.vocab_size)
    console.log(f"tokenizer: {len(tokenizer)} tokens in {time.time() - t:.1f}s")
    examples = encode_examples(tokenizer, train, cfg.max_seq_len)
    student_examples = (encode_examples(tokenizer, with_guesses(train, cfg.student_guess_fraction, cfg.seed),
                                        cfg.max_seq_len) if cfg.student_guess_fraction else examples)
    heldout_rows = [{"question": p.question, "answer": p.answer, "level": p.level} for p in heldout]
    metrics: dict[str, Any] = {"profile": cfg.profile, "cache_key": cfg.cache_key(), "config": asdict(cfg)}

    specs = (
        ("teacher", Qwen3ForCausalLM, teacher_config(cfg, tokenizer),
         [(examples, cfg.teacher_steps, cfg.teacher_lr, cfg.warmup_steps)]),
        ("student", Qwen3MoeForCausalLM, student_config(cfg, tokenizer), student_phases(cfg, examples, student_examples)),
    )
    for who, cls, model_cfg, phases in specs:
        t = time.time()
        torch.manual_seed(cfg.seed + (0 if who == "teacher" else 1))
        model = cls(model_cfg)
        losses = []
        for data, steps, lr, warmup in phases:
            how = LMTraining(steps=steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=warmup,
                             weight_decay=cfg.weight_decay, seed=cfg.seed)
            losses += train_lm(model, data, how, pad_id=tokenizer.pad_token_id, desc=who, console=console)
        train_s = time.time() - t
        t = time.time()
        result = evaluate_problems(model, tokenizer, heldout_rows, Decoding(cfg.max_new_tokens, cfg.eval_batch_size))
        metrics[who] = {
            "heldout_accuracy": result["accuracy"],
            "heldout_n": result["n"],
            "per_level": {str(k): v for k, v in result["per_level"].items()},
            "params": count_params(model),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_seconds": round(train_s, 1),
            "eval_seconds": round(time.time() - t, 1),
            "samples": result["samples"][:3],
        }
        console.log(f"{who}: held-out accuracy {result['accuracy']:.3f} {metrics[who]['per_level']}")
        model.save_pretrained(str(root / who))
        tokenizer.save_pretrained(str(root / who))
        del model
    metrics["teacher_accuracy"] = metrics["teacher"]["heldout_accuracy"]
    metrics["student_accuracy"] = metrics["student"]["heldout_accuracy"]
    metrics["build_seconds"] = round(time.time() - t0, 1)
    return metrics


def _print_summary(build: ToyBuild, console: Console) -> None:
    m = build.metrics
    for who in ("teacher", "student"):
        w = m[who]
        console.print(
            f"[bold]{who}[/bold]: held-out acc {w['heldout_accuracy']:.3f} (n={w['heldout_n']}, per level {w['per_level']}), "
            f"params total {w['params']['total']:,} active {w['params']['active']:,}, "
            f"train {w['train_seconds']}s eval {w['eval_seconds']}s"
        )
    console.print(f"toy build (profile {m['profile']}) done in {m['build_seconds']}s at {build.root}")


def build_root(cfg: ToyBuildConfig, cache_dir: Path | None = None) -> Path:
    """Where the toy build of `cfg` lives (complete once it holds the BUILD_COMPLETE marker)."""
    return (cache_dir or default_cache_dir()) / f"toy-{cfg.profile}-{cfg.cache_key()}"


def is_built(root: Path) -> bool:
    return _is_complete(root)


def build_toy(
    profile: str = "demo",
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    config: ToyBuildConfig | None = None,
) -> ToyBuild:
    """Return the cached toy build for ``profile``, building it first if needed.

    ``config`` overrides the profile's defaults (its own ``profile`` field wins).
    The build goes to a temp dir next to the cache and is renamed into place
    only when complete, under a file lock so concurrent callers build it once.
    """
    cfg = config if config is not None else ToyBuildConfig.for_profile(profile)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = build_root(cfg, cache)
    if _is_complete(root) and not force:
        return ToyBuild.at(root)

    console = Console(stderr=True)
    with _file_lock(cache / f".{root.name}.lock"):
        if _is_complete(root) and not force:  # another process finished it while we waited
            return ToyBuild.at(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=cache))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(min(2, os.cpu_count() or 1))  # the thread count changes float sums, so fix it
            metrics = _build_into(cfg, tmp, console)
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
            (tmp / "build_config.json").write_text(json.dumps(asdict(cfg), indent=2))
            (tmp / _COMPLETE_MARKER).write_text(BUILD_VERSION + "\n")
            if root.exists():  # force=True, or a leftover without the marker
                trash = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=cache))
                os.replace(root, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            torch.set_num_threads(threads)
            shutil.rmtree(tmp, ignore_errors=True)
    build = ToyBuild.at(root)
    _print_summary(build, console)
    return build


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build (or reuse) the cached toy models.")
    parser.add_argument("--profile", default="demo", choices=PROFILES)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    build_toy(args.profile, args.cache_dir, args.force)
