"""The one check of a run before any process group exists: `validate(cfg, world_size)`.

    validate(cfg, world_size=3)   # raises ConfigError (one line: the field and the fix)

It runs the config's own checks (ranges, cross-section rules, what the trainer cannot run:
`PaddConfig.check`), then what needs the file system: the DeepSpeed JSON, the data source,
the model directories (config.json, weights, tokenizer, one tokenizer family), the MoE shape
against the expert-parallel size and, given a world size, that a checkpoint in run.output_dir
that train.resume=auto would continue can continue on this launch's layout (engine/layout.py),
that the world holds the teacher and student ranks and that the RL step's rollout batch
splits over them (config.rollout_layout_problem).
train.py, `padd config validate`, `padd train` and `padd plan` all call it; the planner states
the layout rules through the same functions (`*_problem`).
"""

from __future__ import annotations

from pathlib import Path

from padd_ds.config import (ConfigError, PaddConfig, TopologyConfig, require, rollout_engines_problem,
                            rollout_layout_problem)
from padd_ds.engine.ds_config import read_deepspeed_config
from padd_ds.engine.layout import launch_layout, newest_layout, resume_problem
from padd_ds.models.arch import expert_parallel_size, model_field
from padd_ds.models.files import (TOKENIZER_FILES, check_shared_tokenizer, check_weights, has_tokenizer,
                                  read_model_config, resolve_model_path, student_moe_shape)
from padd_ds.paths import local_path
from padd_ds.vllm_engine.client import vllm_environment_problem
from padd_ds.vllm_engine.plugin import PADD_MODEL_TYPES

# --------------------------------------------------------------------------------------
# Layout rules (also the planner's): None when fine, else the problem in words
# --------------------------------------------------------------------------------------


def teacher_split_problem(topology: TopologyConfig, world_size: int) -> str | None:
    """A separate teacher needs its own ranks, and at least one student rank per teacher."""
    if topology.colocated:
        return None
    if world_size <= 1:
        return ("world size 1 cannot hold a separate teacher rank; set topology.colocated=true "
                "(teacher inside the student process) or launch more processes")
    t, students = topology.teacher_ranks, world_size - topology.teacher_ranks
    if students < 1:
        return (f"world size {world_size} cannot hold topology.teacher_ranks={t} plus at least one "
                "student rank; lower topology.teacher_ranks or launch more processes")
    if t > students:
        return (f"topology.teacher_ranks={t} exceeds the {students} student ranks of world size {world_size}; "
                "every teacher replica needs a student, lower topology.teacher_ranks")
    return None


def student_ranks(topology: TopologyConfig, world_size: int) -> int:
    return world_size if topology.colocated else world_size - topology.teacher_ranks


def expert_groups_problem(students: int, ep: int) -> str | None:
    """Student ranks form whole expert-parallel groups."""
    return None if students % ep == 0 else f"{students} student ranks do not divide into expert-parallel groups of {ep}"


def experts_problem(experts: int, ep: int) -> str | None:
    """Routed experts spread evenly over an expert-parallel group."""
    return None if experts % ep == 0 else f"{experts} experts do not divide over expert-parallel size {ep}"


def positions_problem(name: str, limit: int | None, seq: int) -> str | None:
    """A model holds a whole sequence (prompt + response)."""
    if not isinstance(limit, int) or seq <= limit:
        return None
    return (f"{name}: max_position_embeddings={limit} is shorter than data.max_prompt_tokens + "
            f"data.max_response_tokens = {seq}; shorten them")


# --------------------------------------------------------------------------------------
# Checks that read files
# --------------------------------------------------------------------------------------


def _check_data_source(cfg: PaddConfig, repo_root: str | Path | None) -> None:
    src = cfg.data.source
    if src in ("toy", "gsm8k"):
        return
    looks_local = src.endswith((".jsonl", ".json", ".parquet")) or src.startswith(("/", "./", "../", "~"))
    if looks_local and local_path(src, repo_root) is None:
        raise ConfigError(f"data.source: file '{src}' does not exist; use toy, gsm8k, an existing file or a hub name")


def _check_moe(cfg: PaddConfig, student: str | None, teacher_conf: dict | None, ep: int) -> None:
    """The student's MoE shape (or the one decompression will build) against EP."""
    if student is None:
        experts, top_k = cfg.stage1.decompress_experts, cfg.stage1.decompress_top_k
        where = "stage1.decompress_experts"
        ffn = None if teacher_conf is None else model_field(teacher_conf, "intermediate_size")
        require(not isinstance(ffn, int) or ffn % experts == 0,
                f"stage1.decompress_experts={experts} must divide the teacher's intermediate_size {ffn} "
                "(experts are equal-size neuron clusters)")
    elif Path(student).is_dir():
        shape = student_moe_shape(student)
        require(shape is not None,
                f"models.student: '{cfg.models.student}' is not an MoE (its config.json has no num_experts, "
                "num_local_experts or n_routed_experts); PADD needs an MoE student, or set models.student=null "
                "to decompress the teacher")
        (experts, top_k), where = shape, "models.student"
    else:
        return  # hub student: checked when it is downloaded
    require(top_k <= experts, f"{where}: top-k {top_k} is larger than the {experts} experts")
    problem = experts_problem(experts, ep)
    require(problem is None, f"{where}: {problem}; set deepspeed.expert_parallel_size "
                             "(or expert_parallel.autoep_size) to a divisor")


def _check_models(cfg: PaddConfig, ep: int, repo_root: str | Path | None) -> None:
    m = cfg.models
    teacher = resolve_model_path(m.teacher, repo_root, field_name="models.teacher")
    student = None if m.student is None else resolve_model_path(m.student, repo_root, field_name="models.student")
    tokenizer = teacher if m.tokenizer is None else \
        resolve_model_path(m.tokenizer, repo_root, field_name="models.tokenizer", need_config=False)

    t_conf = read_model_config(teacher) if Path(teacher).is_dir() else None
    s_conf = read_model_config(student) if student is not None and Path(student).is_dir() else None
    seq = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for name, conf in (("models.teacher", t_conf), ("models.student", s_conf)):
        problem = None if conf is None else positions_problem(name, model_field(conf, "max_position_embeddings"), seq)
        require(problem is None, str(problem))
    if t_conf is not None and s_conf is not None:
        check_shared_tokenizer(tokenizer, student, model_field(t_conf, "vocab_size"), model_field(s_conf, "vocab_size"))
    _check_moe(cfg, student, t_conf, ep)
    _check_rollout_engine(cfg, s_conf)


def _check_rollout_engine(cfg: PaddConfig, s_conf: dict | None) -> None:
    """rollout.backend=vllm: its environment exists and it has a PADD routing model for the student."""
    if cfg.rollout.backend != "vllm" or cfg.train.mode != "padd":
        return
    problem = vllm_environment_problem(cfg.rollout.vllm_python)
    require(problem is None, str(problem))
    kind = None if s_conf is None else model_field(s_conf, "model_type")
    require(kind is None or kind in PADD_MODEL_TYPES,
            f"rollout.backend=vllm routes with the Stage IV bias for {', '.join(PADD_MODEL_TYPES)} students; "
            f"models.student is {kind}: use rollout.backend=hf_gathered")


def _check_model_files(cfg: PaddConfig, repo_root: str | Path | None) -> None:
    """Weights of the local teacher and student, and the tokenizer files, exist: a missing
    file fails here, before any process group, not on one rank after minutes of loading."""
    m = cfg.models
    for name, ref in (("models.teacher", m.teacher), ("models.student", m.student)):
        if ref is not None and Path(path := resolve_model_path(ref, repo_root, field_name=name)).is_dir():
            check_weights(Path(path), name)
    name, ref = ("models.teacher", m.teacher) if m.tokenizer is None else ("models.tokenizer", m.tokenizer)
    path = Path(resolve_model_path(ref, repo_root, field_name=name, need_config=False))
    require(not path.is_dir() or has_tokenizer(path),
            f"{name}: '{path}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            + ("set models.tokenizer to the shared tokenizer's directory" if m.tokenizer is None else
               "point models.tokenizer at a directory that holds one"))


def _student_experts(cfg: PaddConfig, repo_root: str | Path | None) -> int | None:
    """Routed experts of the student this run trains (None: a hub student, not read here)."""
    if cfg.models.student is None:
        return cfg.stage1.decompress_experts
    path = resolve_model_path(cfg.models.student, repo_root, field_name="models.student")
    shape = student_moe_shape(path) if Path(path).is_dir() else None
    return shape[0] if shape else None


def _check_resume(cfg: PaddConfig, ds: dict, world_size: int, repo_root: str | Path | None) -> None:
    """The checkpoint train.resume=auto would continue was trained on a layout this launch can
    continue (another student world or expert-parallel size, keeping the global batch)."""
    newest = newest_layout(Path(cfg.run.output_dir) / "checkpoints") if cfg.train.resume == "auto" else None
    if newest is None or teacher_split_problem(cfg.topology, world_size) is not None:
        return  # nothing to continue, or a world the checks below refuse anyway
    new = launch_layout(cfg, ds, student_ranks(cfg.topology, world_size), _student_experts(cfg, repo_root), None)
    problem = resume_problem(newest[1], new, newest[0], cfg)
    require(problem is None, str(problem))


def stage1_batch_problem(cfg: PaddConfig, students: int) -> str | None:
    """Stage I's measurements and router fit walk their problems in global batches of
    train.micro_batch_size per student rank; a capped set smaller than one batch has none."""
    if not cfg.stage1.enabled:
        return None
    batch = cfg.train.micro_batch_size * students
    for name in ("eval_problems", "targets_max_problems"):
        n = getattr(cfg.stage1, name)
        if n is not None and n < batch:
            return (f"stage1.{name}={n} is less than one global batch ({cfg.train.micro_batch_size} "
                    f"(train.micro_batch_size) x {students} student ranks = {batch}); raise it to at least {batch}")
    return None


def _check_world(cfg: PaddConfig, world_size: int, ep: int) -> None:
    require(world_size >= 1, f"world size must be >= 1, got {world_size}")
    problem = teacher_split_problem(cfg.topology, world_size)
    require(problem is None, str(problem))
    problem = expert_groups_problem(student_ranks(cfg.topology, world_size), ep)
    require(problem is None, f"{problem} (world size {world_size}); change topology.teacher_ranks, the process "
                             "count or deepspeed.expert_parallel_size")
    problem = rollout_layout_problem(cfg, student_ranks(cfg.topology, world_size))
    require(problem is None, str(problem))
    problem = rollout_engines_problem(cfg, student_ranks(cfg.topology, world_size))
    require(problem is None, str(problem))
    problem = stage1_batch_problem(cfg, student_ranks(cfg.topology, world_size))
    require(problem is None, str(problem))


def validate(cfg: PaddConfig, world_size: int | None = None, repo_root: str | Path | None = None) -> None:
    """Check a config before any process group exists. Raises ConfigError (one line).

    `repo_root` is where relative paths are looked up after the working directory (default:
    this checkout)."""
    cfg.check()
    ds = read_deepspeed_config(cfg, repo_root)
    ep = expert_parallel_size(ds, cfg.deepspeed.expert_parallel_size, cfg.deepspeed.config)
    _check_data_source(cfg, repo_root)
    if world_size is not None and world_size >= 1:  # first: its refusal names the checkpoint's shape too
        _check_resume(cfg, ds, world_size, repo_root)
    _check_models(cfg, ep, repo_root)
    _check_model_files(cfg, repo_root)
    if world_size is not None:
        _check_world(cfg, world_size, ep)
