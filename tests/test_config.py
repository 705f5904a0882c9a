"""Config loading, overrides and validation (padd_ds/config.py, recipe.py, validate.py).

The model directories made here hold a `config.json`, which is all validation reads, plus an
empty `model.safetensors` and `tokenizer_config.json`: validation only checks that weights and
a tokenizer exist (reading them is the loader's job), so they are real inputs, not stand-ins
for a component.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from padd_ds.config import ConfigError, PaddConfig
from padd_ds.engine.ds_config import read_deepspeed_config
from padd_ds.models.arch import expert_parallel_size
from padd_ds.models.files import resolve_model_path, student_moe_shape
from padd_ds.paths import REPO_ROOT
from padd_ds.recipe import dump_yaml, from_dict, load_config, to_dict
from padd_ds.validate import validate

# --------------------------------------------------------------------------------------
# Fixtures: a DeepSpeed JSON and model directories holding a config.json
# --------------------------------------------------------------------------------------

TEACHER = {"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256,
           "max_position_embeddings": 512}
STUDENT = {"model_type": "qwen3_moe", "vocab_size": 1000, "hidden_size": 64, "num_experts": 8,
           "num_experts_per_tok": 2, "max_position_embeddings": 512}


def write_model(root: Path, name: str, conf: dict) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(conf))
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer_config.json").write_text("{}")
    return path


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A valid config: dense teacher, 8-expert top-2 student, EP size 2 from the JSON."""
    monkeypatch.chdir(tmp_path)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"expert_parallel": {"enabled": True, "autoep_size": 2}}))
    cfg = PaddConfig()
    cfg.models.teacher = str(write_model(tmp_path, "teacher", TEACHER))
    cfg.models.student = str(write_model(tmp_path, "student", STUDENT))
    cfg.deepspeed.config = str(ds)
    validate(cfg, world_size=3, repo_root=tmp_path)  # the baseline every case below breaks
    return cfg, tmp_path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


# --------------------------------------------------------------------------------------
# Round trips and overrides
# --------------------------------------------------------------------------------------


def test_defaults_round_trip_through_yaml(tmp_path):
    recipe = tmp_path / "resolved.yaml"
    recipe.write_text(dump_yaml(PaddConfig()))
    assert load_config(str(recipe)) == PaddConfig()
    assert from_dict(to_dict(PaddConfig())) == PaddConfig()


def test_non_default_values_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=1e-8", "models.student=null", "run.name='1e5'", "stage3.policy=gspo"])
    assert cfg.run.name == "1e5"  # a str that looks like a float must come back as a str
    recipe = tmp_path / "resolved.yaml"
    recipe.write_text(dump_yaml(cfg))
    assert load_config(str(recipe)) == cfg


def test_override_types():
    cfg = load_config(None, [
        "train.lr=1e-4",          # YAML 1.1 would read this as a string
        "stage1.enabled=false",
        "models.student=null",
        "topology.bridge_port=29600",
        "stage2.base_temperature=2",  # int -> float
        "data.split_fractions.A=0.15",
        "data.split_fractions.C=0.6",
    ])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.stage1.enabled is False
    assert cfg.models.student is None
    assert cfg.topology.bridge_port == 29600
    assert cfg.stage2.base_temperature == 2.0 and isinstance(cfg.stage2.base_temperature, float)
    assert cfg.data.split_fractions == {"A": 0.15, "B": 0.20, "C": 0.6, "D": 0.05}


def test_override_parses_lists_and_mappings():
    # No field holds a list, so a list value is parsed and then rejected by type.
    assert "got list [1, 2]" in error_of(load_config, None, ["models.student=[1,2]"])
    cfg = load_config(None, ["stage2={base_temperature: 0.5, advantage_scale: 2}"])
    assert (cfg.stage2.base_temperature, cfg.stage2.advantage_scale) == (0.5, 2.0)


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1e-3\n  steps: 50\nstage4:\n")  # empty section keeps defaults
    cfg = load_config(str(recipe), ["train.steps=7"])
    assert (cfg.train.lr, cfg.train.steps, cfg.stage4) == (1e-3, 7, PaddConfig().stage4)


# --------------------------------------------------------------------------------------
# Rejected recipes and overrides
# --------------------------------------------------------------------------------------


def test_unknown_nested_key_in_recipe_suggests_nearest(tmp_path):
    recipe = tmp_path / "x.yaml"
    recipe.write_text("stage2:\n  base_temprature: 2.0\n")
    msg = error_of(load_config, str(recipe))
    assert msg == f"unknown key 'stage2.base_temprature' in {recipe}; did you mean 'stage2.base_temperature'?"


@pytest.mark.parametrize("override, expected", [
    ("stag2.base_temperature=1", "unknown key 'stag2' in --set stag2.base_temperature=1; did you mean 'stage2'?"),
    ("train.base_temperature=1", "did you mean 'stage2.base_temperature'?"),  # right name, wrong section
    ("train.tau=1", "did you mean 'stage2.base_temperature'?"),               # a renamed name, wrong section
    ("train.zzz=1", "valid keys of train: mode, steps"),    # nothing close: list the section
])
def test_unknown_override_key(override, expected):
    assert expected in error_of(load_config, None, [override])


@pytest.mark.parametrize("override, expected", [
    ("train.steps=ten", "train.steps: expected int, got str 'ten'"),
    ("train.steps=true", "train.steps: expected int, got bool True"),
    ("train.steps=1.5", "train.steps: expected int, got float 1.5"),
    ("train.lr='0.1'", "train.lr: expected float, got str '0.1'"),
    ("stage1.enabled=1", "stage1.enabled: expected bool, got int 1"),
    ("run.name=12", "run.name: expected str, got int 12"),
    ("topology.bridge_port=x", "topology.bridge_port: expected int or null, got str 'x'"),
    ("data.split_fractions.A=high", "data.split_fractions.A: expected float, got str 'high'"),
    ("stage3.policy=ppo", "stage3.policy: 'ppo' is not allowed; choose one of ['pr_grpo', 'grpo', 'rspo', 'gspo']"),
    ("stage2.temperature_coupling=true", "stage2.temperature_coupling: True is not allowed"),
    ("rollout.backend=sglang", "rollout.backend: 'sglang' is not allowed; choose one of ['hf', 'hf_gathered', 'vllm']"),
    ("stage2=3", "stage2: expected a mapping of stage2 fields, got int 3"),
    ("train.lr.x=1", "train.lr holds float; it has no field 'x'"),
])
def test_wrong_types_name_the_field(override, expected):
    assert expected in error_of(load_config, None, [override])


@pytest.mark.parametrize("old, new", [
    ("stage1.xi", "stage1.path_temperature"), ("stage1.alpha", "stage1.kd_weight"),
    ("stage1.beta", "stage1.path_kl_weight"), ("stage2.tau", "stage2.base_temperature"),
    ("stage2.kappa", "stage2.advantage_scale"), ("stage2.phi_floor", "stage2.coupling_floor"),
    ("stage3.drift_lambda", "stage3.drift_penalty"), ("stage4.eta", "stage4.balance_rate"),
    ("stage4.gamma", "stage4.advantage_rate"), ("stage3.rollout_temperature", "rollout.temperature"),
    ("stage3.rollout_top_p", "rollout.top_p"),
])
def test_renamed_keys_name_the_new_key(tmp_path, old, new):
    assert error_of(load_config, None, [f"{old}=0.5"]) == f"key '{old}' in --set {old}=0.5 was renamed to '{new}'"
    section, name = old.split(".")
    assert error_of(load_config, None, [f"{section}={{{name}: 0.5}}"]).endswith(f"was renamed to '{new}'")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{section}:\n  {name}: 0.5\n")
    assert error_of(load_config, str(recipe)) == f"key '{old}' in {recipe} was renamed to '{new}'"
    new_section, new_name = new.split(".")
    assert getattr(getattr(load_config(None, [f"{new}=0.5"]), new_section), new_name) == 0.5


def test_errors_stay_on_one_line():
    # user text with control characters is escaped, not printed raw
    assert error_of(load_config, None, ["train.l\nr=1"]).startswith("unknown key 'train.l\\nr' in --set train.l\\nr=1;")


def test_unknown_home_directory_is_a_missing_path(setup):
    cfg, root = setup
    cfg.data.source = "~no-such-user-0/problems.jsonl"  # pathlib raises RuntimeError expanding it
    assert "data.source: file '~no-such-user-0/problems.jsonl' does not exist" in error_of(validate, cfg, repo_root=root)
    cfg.data.source = "toy"
    cfg.models.teacher = "~no-such-user-0"
    assert error_of(validate, cfg, repo_root=root) == "models.teacher: path '~no-such-user-0' does not exist"


def test_override_without_equals():
    assert "override 'train.lr' must look like section.field=value" in error_of(load_config, None, ["train.lr"])


def test_malformed_yaml_names_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  lr: 0.1\n  steps: 10: 20\n")
    msg = error_of(load_config, str(recipe))
    assert msg.startswith(f"malformed YAML in {recipe} line 3:")


def test_recipe_must_be_a_mapping(tmp_path):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- train\n- lr\n")
    assert "must be a mapping of sections" in error_of(load_config, str(recipe))


def test_missing_recipe():
    assert "recipe 'no/such/recipe.yaml' not found" in error_of(load_config, "no/such/recipe.yaml")


# --------------------------------------------------------------------------------------
# validate(): ranges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("train.steps=0", "train.steps must be > 0"),
    ("train.lr=-1e-3", "train.lr must be > 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be > 0"),
    ("stage2.base_temperature=0", "stage2.base_temperature must be > 0"),
    ("teacher.logits_top_k=0", "teacher.logits_top_k must be > 0"),
    ("stage3.group_size=1", "stage3.group_size must be >= 2 when stage3 is enabled"),
    ("stage3.clip_eps=1.5", "stage3.clip_eps must be in (0, 1)"),
    ("rollout.temperature=0", "rollout.temperature must be > 0 (rollouts are sampled), got 0.0"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("stage4.ema_decay=1", "stage4.ema_decay must be in [0, 1)"),
    ("stage4.fold_every=-1", "stage4.fold_every must be an integer >= 0"),
    ("eval.every=-2", "eval.every must be an integer >= 0 (0: before and after only), got -2"),
    ("stage4.settle_steps=300", "stage4.settle_steps must be an integer in [0, train.steps=300)"),
    ("data.split_fractions.A=0.5", "data.split_fractions must sum to 1"),
    ("data.split_fractions.A=0", "data.split_fractions.A must be in (0, 1]"),
    ("data.split_fractions={A: 0.5, B: 0.5}", "data.split_fractions must have exactly the keys A, B, C, D"),
    ("topology.teacher_ranks=0", "topology.teacher_ranks must be >= 1 unless topology.colocated=true"),
    ("topology.bridge_port=70000", "topology.bridge_port must be in 1..65535"),
])
def test_range_errors(setup, override, expected):
    cfg, root = setup
    bad = load_config(None, [override])
    bad.models, bad.deepspeed = cfg.models, cfg.deepspeed
    assert expected in error_of(validate, bad, repo_root=root)


TRAINER_CANNOT_RUN = [
    (["train.mode=padd", "train.grad_accum=2"],
     "train.grad_accum=2 in train.mode=padd: accumulation follows from stage3.prompts_per_step x "
     "stage3.group_size / (student ranks x train.micro_batch_size); remove train.grad_accum"),
    (["models.student=null", "stage1.router_init=keep"],
     "stage1.router_init=keep needs a pre-trained student; a decompressed one (models.student=null) starts from "
     "the centroids or a random router"),
    (["stage1.projection=none"],
     "stage1.projection=none cannot place teacher centroids in a pre-trained student's hidden space; use "
     "stage1.projection=lstsq (or router_init=keep/random)"),
    (["stage3.ref_kl=0.05"],
     "stage3.ref_kl=0.05: no frozen reference model is built (under ZeRO-3 it would cost another full sharded "
     "model and a forward per update; the teacher's KD term anchors the policy); keep stage3.ref_kl=0"),
    (["stage3.prompts_per_step=0"], "stage3.prompts_per_step must be > 0, got 0"),
    (["train.mode=distill", "eval.every=10"],
     "eval.every=10 needs train.mode=padd (the RL loop); train.mode=distill evaluates before and after only: "
     "set eval.every=0"),
    (["train.mode=padd", "rollout.backend=vllm", "rollout.route_replay=true"],
     "rollout.route_replay needs the rollout engine's routes, which the vllm backend does not return; use "
     "rollout.backend=hf_gathered or turn route_replay off"),
]


@pytest.mark.parametrize("overrides, expected", TRAINER_CANNOT_RUN)
def test_config_check_refuses_what_the_trainer_cannot_run(setup, overrides, expected):
    cfg, root = setup
    bad = load_config(None, overrides)
    bad.models.teacher, bad.deepspeed = cfg.models.teacher, cfg.deepspeed
    bad.models.student = cfg.models.student if bad.models.student else None
    assert error_of(bad.check) == expected
    assert error_of(validate, bad, world_size=3, repo_root=root) == expected


@pytest.mark.parametrize("overrides, expected", TRAINER_CANNOT_RUN)
def test_padd_config_validate_refuses_what_the_trainer_cannot_run(setup, capsys, overrides, expected):
    from padd_ds.cli import main

    cfg, root = setup
    cfg.data.source = "gsm8k"  # a hub dataset: no toy models needed, nothing downloaded by validation
    recipe = root / "recipe.yaml"
    recipe.write_text(dump_yaml(cfg))
    assert main(["config", "validate", "--recipe", str(recipe), "--world-size", "3"]) == 0
    assert capsys.readouterr().out == "config OK\n"
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["config", "validate", "--recipe", str(recipe), "--world-size", "3", *args]) == 2
    assert capsys.readouterr().err == f"padd-ds: config error: {expected}\n"


@pytest.mark.parametrize("overrides", [
    # A group split over micro-batches, and several PPO epochs over an accumulated rollout batch.
    ["train.mode=padd", "train.micro_batch_size=2", "stage3.updates_per_batch=2"],
    ["train.mode=padd", "train.micro_batch_size=16", "stage3.group_size=8", "stage3.updates_per_batch=2"],
    ["train.mode=distill", "train.grad_accum=2", "stage3.updates_per_batch=2"],  # distill runs no RL update
    ["train.mode=distill", "stage3.prompts_per_step=3"],                          # ... and samples no prompts
    ["stage3.ref_kl=0"],
])
def test_what_the_rl_rules_still_allow(setup, overrides):
    cfg, root = setup
    ok = load_config(None, overrides)
    ok.models, ok.deepspeed = cfg.models, cfg.deepspeed
    validate(ok, world_size=3, repo_root=root)


# The RL step's and Stage I's batch layouts need the number of student ranks: validate(world_size=...) and
# `padd config validate --world-size` refuse it with the same words (world size 3: 2 students).
BATCH_LAYOUT = [
    (["train.mode=padd", "stage3.prompts_per_step=3"],
     "stage3.prompts_per_step=3 does not split over 2 student ranks; make it a multiple of the student ranks"),
    (["train.mode=padd", "train.micro_batch_size=6"],
     "the rollout batch of 16 sequences per student rank (stage3.prompts_per_step=8 / 2 ranks x "
     "stage3.group_size=4) does not split into micro-batches of train.micro_batch_size=6; make the micro-batch a "
     "divisor of 16"),
    # Stage I walks its capped problem sets in global batches (micro-batch 16 x 2 student ranks).
    (["stage1.enabled=true", "stage1.eval_problems=8"],
     "stage1.eval_problems=8 is less than one global batch (16 (train.micro_batch_size) x 2 student ranks = 32); "
     "raise it to at least 32"),
    (["stage1.enabled=true", "stage1.targets_max_problems=31"],
     "stage1.targets_max_problems=31 is less than one global batch (16 (train.micro_batch_size) x 2 student ranks "
     "= 32); raise it to at least 32"),
    (["train.mode=padd", "rollout.backend=vllm", f"rollout.vllm_python={sys.executable}",
      "rollout.vllm_ranks_per_engine=3", "rollout.vllm_tensor_parallel=1"],
     "rollout.vllm_ranks_per_engine=3 does not divide the 2 student ranks; make it a divisor (or null: one engine "
     "for all)"),
]


@pytest.mark.parametrize("overrides, expected", BATCH_LAYOUT)
def test_batch_layout_is_refused_given_the_world_size(setup, capsys, overrides, expected):
    from padd_ds.cli import main

    cfg, root = setup
    bad = load_config(None, overrides)
    bad.models, bad.deepspeed = cfg.models, cfg.deepspeed
    validate(bad, repo_root=root)  # without a world size the ranks are unknown
    assert error_of(validate, bad, world_size=3, repo_root=root) == expected
    bad.data.source = "gsm8k"
    recipe = root / "recipe.yaml"
    recipe.write_text(dump_yaml(bad))
    assert main(["config", "validate", "--recipe", str(recipe), "--world-size", "3"]) == 2
    assert capsys.readouterr().err == f"padd-ds: config error: {expected}\n"


def test_accumulation_follows_from_the_rollout_batch():
    from padd_ds.config import accumulation_steps, rollout_batch_size

    cfg = load_config(None, ["train.mode=padd", "stage3.prompts_per_step=24", "stage3.group_size=8",
                             "train.micro_batch_size=2"])
    assert rollout_batch_size(cfg, 24) == 8 and accumulation_steps(cfg, 24) == 4
    assert rollout_batch_size(cfg, 12) == 16 and accumulation_steps(cfg, 12) == 8
    assert "does not split over 5 student ranks" in error_of(accumulation_steps, cfg, 5)
    cfg.train.mode, cfg.train.grad_accum = "distill", 3
    assert accumulation_steps(cfg, 5) == 3


def test_group_size_one_is_fine_without_stage3(setup):
    cfg, root = setup
    cfg.stage3.enabled, cfg.stage3.group_size = False, 1
    validate(cfg, repo_root=root)


# --------------------------------------------------------------------------------------
# validate(): DeepSpeed JSON and expert parallelism
# --------------------------------------------------------------------------------------


def test_missing_deepspeed_json(setup):
    cfg, root = setup
    cfg.deepspeed.config = "ds_configs/nope.json"
    msg = error_of(validate, cfg, repo_root=root)
    assert msg.startswith("deepspeed.config: DeepSpeed JSON 'ds_configs/nope.json' not found")


def test_unparsable_deepspeed_json(setup):
    cfg, root = setup
    Path(cfg.deepspeed.config).write_text("{not json")
    assert "is not valid JSON (line 1" in error_of(validate, cfg, repo_root=root)


def ep_size(cfg: PaddConfig, root: Path) -> int:
    return expert_parallel_size(read_deepspeed_config(cfg, repo_root=root), cfg.deepspeed.expert_parallel_size)


def test_deepspeed_json_relative_to_repo_root(setup, tmp_path_factory, monkeypatch):
    cfg, root = setup
    cfg.deepspeed.config = "ds.json"
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    assert ep_size(cfg, root) == 2


def test_expert_parallel_size_sources(setup):
    cfg, root = setup
    assert ep_size(cfg, root) == 2
    cfg.deepspeed.expert_parallel_size = 4
    assert ep_size(cfg, root) == 4
    cfg.deepspeed.expert_parallel_size = None
    Path(cfg.deepspeed.config).write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    assert ep_size(cfg, root) == 1


def test_experts_not_divisible_by_ep(setup):
    cfg, root = setup
    cfg.deepspeed.expert_parallel_size = 3
    msg = error_of(validate, cfg, repo_root=root)
    assert msg.startswith("models.student: 8 experts do not divide over expert-parallel size 3")


# --------------------------------------------------------------------------------------
# validate(): models
# --------------------------------------------------------------------------------------


def test_top_k_larger_than_experts(setup):
    cfg, root = setup
    cfg.models.student = str(write_model(root, "wide", {**STUDENT, "num_experts_per_tok": 16}))
    assert error_of(validate, cfg, repo_root=root) == "models.student: top-k 16 is larger than the 8 experts"


def test_vocab_mismatch_names_both_sizes(setup):
    cfg, root = setup
    cfg.models.student = str(write_model(root, "other_vocab", {**STUDENT, "vocab_size": 1024}))
    msg = error_of(validate, cfg, repo_root=root)
    assert "vocab_size 1024 differs from the teacher's 1000" in msg and msg.startswith("models.student")


def test_dense_student_is_rejected(setup):
    cfg, root = setup
    cfg.models.student = str(write_model(root, "dense", TEACHER))
    assert "is not an MoE" in error_of(validate, cfg, repo_root=root)


def test_missing_model_path(setup):
    cfg, root = setup
    cfg.models.teacher = "/abs/x"
    assert error_of(validate, cfg, repo_root=root) == "models.teacher: path '/abs/x' does not exist"
    cfg.models.teacher = "./x"
    assert error_of(validate, cfg, repo_root=root) == "models.teacher: path './x' does not exist"
    cfg.models.teacher = "gpt2"  # not org/name and not local
    assert error_of(validate, cfg, repo_root=root) == "models.teacher: path 'gpt2' does not exist"


def test_model_dir_without_config_json(setup):
    cfg, root = setup
    (root / "empty").mkdir()
    cfg.models.student = str(root / "empty")
    assert "has no config.json" in error_of(validate, cfg, repo_root=root)


def test_missing_weights_name_the_directory(setup):
    cfg, root = setup
    student = Path(cfg.models.student)
    (student / "model.safetensors").unlink()
    assert error_of(validate, cfg, repo_root=root) == (
        f"models.student: '{student}' has no model weights (model.safetensors or model.safetensors.index.json); "
        "point it at a complete Hugging Face model directory")
    (student / "pytorch_model.bin").write_bytes(b"")
    assert error_of(validate, cfg, repo_root=root) == (
        f"models.student: '{student}' has only pickle weights (pytorch_model.bin); padd-ds loads safetensors "
        "only, convert them")


def test_missing_shard_names_the_file(setup):
    cfg, root = setup
    teacher = Path(cfg.models.teacher)
    (teacher / "model.safetensors").unlink()
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    (teacher / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {f"layers.{i}.weight": f for i, f in enumerate(shards)}}))
    for f in shards[::2]:
        (teacher / f).write_bytes(b"")
    assert error_of(validate, cfg, repo_root=root) == (
        f"models.teacher: '{teacher / shards[1]}' is missing (1 of 3 shards listed in model.safetensors.index.json); "
        "the checkpoint is incomplete, copy or download it again")
    (teacher / shards[1]).write_bytes(b"")
    validate(cfg, repo_root=root)


def test_missing_tokenizer_names_the_directory(setup):
    cfg, root = setup
    teacher = Path(cfg.models.teacher)
    (teacher / "tokenizer_config.json").unlink()
    msg = error_of(validate, cfg, repo_root=root)
    assert msg.startswith(f"models.teacher: '{teacher}' has no tokenizer (tokenizer.json, tokenizer.model, ")
    assert msg.endswith("set models.tokenizer to the shared tokenizer's directory")
    cfg.models.tokenizer = cfg.models.student  # a directory that has one
    validate(cfg, repo_root=root)


def test_hub_ids_pass_through(setup):
    cfg, root = setup
    assert resolve_model_path("Qwen/Qwen3-30B-A3B", root) == "Qwen/Qwen3-30B-A3B"
    cfg.models.student = "Qwen/Qwen3-30B-A3B"
    validate(cfg, repo_root=root)


def test_toy_reference(setup, monkeypatch):
    cfg, root = setup
    monkeypatch.delenv("PADD_TOY_DIR", raising=False)
    assert "run `padd toy build`" in error_of(resolve_model_path, "toy://teacher", field_name="models.teacher")
    toy = root / "toy-demo-abc"
    toy.mkdir()
    write_model(toy, "teacher", TEACHER)
    monkeypatch.setenv("PADD_TOY_DIR", str(toy))
    assert resolve_model_path("toy://teacher") == str((toy / "teacher").resolve())
    assert "toy model 'student' not found" in error_of(resolve_model_path, "toy://student")


def test_student_moe_shape_per_model_type(tmp_path):
    mixtral = write_model(tmp_path, "mixtral", {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    dsv2 = write_model(tmp_path, "dsv2", {"model_type": "deepseek_v2", "n_routed_experts": 64,
                                          "n_shared_experts": 2, "num_experts_per_tok": 6})
    dense = write_model(tmp_path, "dense", TEACHER)
    assert student_moe_shape(mixtral) == (8, 2)
    assert student_moe_shape(dsv2) == (64, 6)
    assert student_moe_shape(dense) is None


def test_decompression_needs_divisible_ffn(setup):
    cfg, root = setup
    cfg.models.student = None
    validate(cfg, world_size=3, repo_root=root)  # 256 neurons into 8 experts
    cfg.stage1.decompress_experts = 6
    cfg.deepspeed.expert_parallel_size = 1
    assert "stage1.decompress_experts=6 must divide the teacher's intermediate_size 256" in error_of(
        validate, cfg, repo_root=root)


def test_sequence_longer_than_positions(setup):
    cfg, root = setup
    cfg.data.max_response_tokens = 1000
    assert "max_position_embeddings=512 is shorter" in error_of(validate, cfg, repo_root=root)


def test_missing_data_file(setup):
    cfg, root = setup
    cfg.data.source = "data/problems.jsonl"
    assert "data.source: file 'data/problems.jsonl' does not exist" in error_of(validate, cfg, repo_root=root)


# --------------------------------------------------------------------------------------
# validate(): world size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("world, teachers, expected", [
    (2, 2, "world size 2 cannot hold topology.teacher_ranks=2 plus at least one student rank"),
    (3, 2, "topology.teacher_ranks=2 exceeds the 1 student ranks of world size 3"),
    (2, 1, "1 student ranks do not divide into expert-parallel groups of 2 (world size 2)"),
    (1, 1, "world size 1 cannot hold a separate teacher rank; set topology.colocated=true"),
])
def test_world_size_errors(setup, world, teachers, expected):
    cfg, root = setup
    cfg.topology.teacher_ranks = teachers
    assert expected in error_of(validate, cfg, world_size=world, repo_root=root)


def test_world_size_ok_cases(setup):
    cfg, root = setup
    validate(cfg, world_size=5, repo_root=root)        # 4 students, 1 teacher
    cfg.topology.colocated = True
    validate(cfg, world_size=2, repo_root=root)        # 2 colocated students
    cfg.deepspeed.expert_parallel_size = 1
    validate(cfg, world_size=1, repo_root=root)


# --------------------------------------------------------------------------------------
# Import hygiene
# --------------------------------------------------------------------------------------


def test_imports_without_torch_or_deepspeed():
    code = ("import sys; import padd_ds.config, padd_ds.recipe, padd_ds.validate, padd_ds.plan, padd_ds.cli, "
            "padd_ds.launch.roles; "
            "bad = [m for m in ('torch', 'deepspeed') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=60)


def test_teacher_reference_follows_references_unless_switched_off():
    """eval.teacher_reference: null follows eval.references; false drops only the teacher's row
    (a sharded 70B teacher would hold the students past topology.timeout_s); true without
    eval.references is refused."""
    assert load_config(None, []).eval.teacher_evaluated
    assert not load_config(None, ["eval.teacher_reference=false"]).eval.teacher_evaluated
    assert not load_config(None, ["eval.references=false"]).eval.teacher_evaluated
    with pytest.raises(ConfigError, match="eval.teacher_reference=true needs eval.references=true"):
        load_config(None, ["eval.references=false", "eval.teacher_reference=true"]).check()


def test_vllm_backend_without_its_environment_is_one_config_error(setup, capsys, tmp_path):
    """Before any process group exists: validate() and `padd config validate` name the missing
    interpreter and the install command."""
    from padd_ds.cli import main

    cfg, root = setup
    missing = tmp_path / "no-venv" / "bin" / "python"
    bad = load_config(None, ["train.mode=padd", "rollout.backend=vllm", f"rollout.vllm_python={missing}"])
    bad.models, bad.deepspeed = cfg.models, cfg.deepspeed
    expected = (f"rollout.backend=vllm: no vLLM environment at {missing}; install it with `make vllm` (on a CUDA "
                "cluster: make vllm VLLM_PKG=vllm==0.33.0) or set rollout.vllm_python")
    assert error_of(validate, bad, world_size=3, repo_root=root) == expected
    recipe = root / "recipe.yaml"
    recipe.write_text(dump_yaml(bad))
    assert main(["config", "validate", "--recipe", str(recipe), "--world-size", "3"]) == 2
    assert capsys.readouterr().err == f"padd-ds: config error: {expected}\n"
    bad.rollout.vllm_python = sys.executable  # an interpreter that exists passes this check
    validate(bad, world_size=3, repo_root=root)
