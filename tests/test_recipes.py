"""Paper-scale recipes, the DeepSpeed configs, and teacher/student vocabularies that differ
only by padding."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO, read_results, run_cmd
from padd_ds.config import ConfigError, PaddConfig
from padd_ds.engine.ds_config import build_ds_config
from padd_ds.plan import Cluster, load_arch, make_plan
from padd_ds.recipe import load_config
from padd_ds.validate import validate

RECIPES = {  # recipe -> the sbatch script that runs it
    "qwen25math7b_to_qwen3_30b_a3b.yaml": "padd_7b.sbatch",
    "deepseekmath7b_to_v2lite.yaml": "padd_7b.sbatch",
    "qwen25_72b_to_qwen3_30b_a3b.yaml": "padd_70b.sbatch",
}
HUB_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_is_complete_and_valid(recipe):
    cfg = load_config(str(REPO / "recipes" / recipe))
    # What train.py checks before any process group, for the launch of its sbatch script:
    # ranges, DeepSpeed JSON, model references (hub ids: no download), the ranks' layout.
    nodes, per_node = _sbatch_shape(RECIPES[recipe])
    validate(cfg, world_size=nodes * per_node)
    # One prompt x G=8 per student rank and step, trained one sequence at a time: the engine
    # accumulates the rollout batch's 8 micro-batches into each optimiser step.
    students = nodes * per_node - cfg.topology.teacher_ranks
    assert cfg.stage3.prompts_per_step == students and cfg.train.micro_batch_size == 1
    ds = build_ds_config(cfg, "qwen3_moe", students, on_gpu=True)
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (8, 8 * students)
    for ref in (cfg.models.teacher, cfg.models.student):
        assert HUB_ID.match(ref), ref  # replaceable by a local path
    assert cfg.data.source == "agentica-org/DeepScaleR-Preview-Dataset"
    assert (cfg.data.question_field, cfg.data.answer_field) == ("problem", "answer")
    assert cfg.train.mode == "padd" and cfg.stage1.enabled and cfg.stage2.enabled and cfg.stage3.enabled
    assert cfg.stage3.group_size == 8 and cfg.eval.suite == "math5"
    text = (REPO / "recipes" / recipe).read_text()
    for section in ("stage1:", "stage2:", "stage3:", "stage4:"):  # coefficients written out, not implied
        assert f"\n{section}\n" in text
    # Both models can hold a whole sequence.
    seq = cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
    for ref, name in ((cfg.models.teacher, "models.teacher"), (cfg.models.student, "models.student")):
        assert seq <= load_arch(ref, name).max_positions
    # Activation checkpointing on; where the teacher's context allows, responses of 8k and more.
    assert cfg.train.activation_checkpointing
    teacher_positions = load_arch(cfg.models.teacher, "models.teacher").max_positions
    assert cfg.data.max_response_tokens >= min(8192, teacher_positions - cfg.data.max_prompt_tokens)


def _sbatch_shape(script: str) -> tuple[int, int]:
    text = (REPO / "slurm" / script).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --ntasks-per-node=(\d+)$", text, re.M).group(1))
    return nodes, per_node


@pytest.mark.parametrize("recipe, script", sorted(RECIPES.items()))
def test_recipe_fits_the_cluster_of_its_sbatch_script(recipe, script):
    nodes, per_node = _sbatch_shape(script)
    cfg = load_config(str(REPO / "recipes" / recipe))
    plan = make_plan(cfg, Cluster(nodes, per_node, 80.0))
    assert plan.fits, plan.report()
    if script == "padd_7b.sbatch":
        assert f"recipes/{recipe}" in (REPO / "slurm" / script).read_text()  # the default, or how to pick it


def _keys(obj: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in obj.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def test_every_deepspeed_field_is_documented():
    doc = (REPO / "ds_configs" / "README.md").read_text()
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        assert f"`{path.name}`" in doc
        for key in _keys(json.loads(path.read_text())):
            assert f"`{key}`" in doc, f"{path.name}: {key} is not documented in ds_configs/README.md"


def test_zero2_and_zero3_offload_configs_train_like_each_other(toy_build, tmp_path):
    """One colocated process per config, same data and seed: ZeRO-2 and ZeRO-3 with CPU
    offload of parameters and optimizer must give the same losses (fp32 on CPU), and the
    resolved JSON must carry the offload settings."""
    common = ["--recipe", str(REPO / "recipes" / "toy_cpu.yaml"), "--set", "topology.colocated=true",
              "--set", "deepspeed.expert_parallel_size=1", "--set", "train.steps=4", "--set", "train.log_every=1",
              "--set", "eval.num_problems=2", "--set", "eval.max_new_tokens=32", "--set", "logging.progress=false",
              "--set", "train.micro_batch_size=4"]
    losses = {}
    for name in ("zero2", "zero3_offload"):
        out = tmp_path / name
        run_cmd([sys.executable, str(REPO / "train.py"), "--deepspeed", f"ds_configs/{name}.json", *common,
                 "--set", f"run.output_dir={out}"], timeout=240)
        losses[name] = [h["train/kd_loss"] for h in read_results(out)["history"]]
        resolved = json.loads((out / "ds_config.json").read_text())
        assert resolved["bf16"]["enabled"] is False  # "auto" -> fp32 on CPU
        assert resolved["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    offload = json.loads((tmp_path / "zero3_offload" / "ds_config.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == "cpu" and offload["offload_param"]["device"] == "cpu"
    assert len(losses["zero2"]) == 4
    assert losses["zero3_offload"] == pytest.approx(losses["zero2"], rel=1e-4)


# --------------------------------------------------------------------------------------
# Vocabulary padding: one tokenizer, embedding tables of different sizes
# --------------------------------------------------------------------------------------


def _tokenizer(n_tokens: int, rename: dict[int, str] | None = None):
    from tokenizers import Tokenizer, models

    names = [f"t{i}" for i in range(n_tokens - 1)]
    for i, name in (rename or {}).items():
        names[i] = name
    tok = Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)}, unk_token=names[0]))
    tok.add_special_tokens(["<eos>"])  # an added token, as real tokenizers have
    return tok


def _model_dir(root: Path, name: str, conf: dict, tokenizer=None) -> str:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": 512, "hidden_size": 64, **conf}))
    (d / "model.safetensors").write_bytes(b"")  # validation checks that weights exist, not their content
    if tokenizer is not None:
        tokenizer.save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture
def padded(tmp_path, monkeypatch):
    """Teacher with 160 embedding rows, student with 128: like Qwen2.5 (152064) vs Qwen3
    (151936) over one tokenizer whose ids stop below both."""
    monkeypatch.chdir(tmp_path)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"expert_parallel": {"enabled": True, "autoep_size": 2}}))

    def make(tok_teacher, tok_student=None):
        cfg = PaddConfig()
        cfg.deepspeed.config = str(ds)
        n = len(list(tmp_path.glob("teacher*")))
        cfg.models.teacher = _model_dir(tmp_path, f"teacher{n}", {"model_type": "qwen2", "vocab_size": 160,
                                                                  "intermediate_size": 256}, tok_teacher)
        cfg.models.student = _model_dir(tmp_path, f"student{n}", {"model_type": "qwen3_moe", "vocab_size": 128,
                                                                  "num_experts": 8, "num_experts_per_tok": 2}, tok_student)
        return cfg

    return make, tmp_path


def test_padding_only_vocab_difference_is_accepted(padded):
    make, root = padded
    validate(make(_tokenizer(100), _tokenizer(100)), world_size=3, repo_root=root)
    # The student's tokenizer may extend the shared one (Qwen3 adds <think> tokens to Qwen2.5's).
    tok = _tokenizer(100)
    bigger = _tokenizer(100)
    bigger.add_special_tokens(["<think>"])
    validate(make(tok, bigger), world_size=3, repo_root=root)


def test_token_ids_beyond_the_smaller_table_are_refused(padded):
    make, root = padded
    with pytest.raises(ConfigError) as e:
        validate(make(_tokenizer(140)), world_size=3, repo_root=root)
    msg = str(e.value)
    assert msg.startswith("models.student: vocab_size 128 differs from the teacher's 160")
    assert "produces ids up to 139, beyond the 128 rows of the student" in msg


def test_a_different_tokenizer_family_is_refused(padded):
    make, root = padded
    with pytest.raises(ConfigError) as e:
        validate(make(_tokenizer(100), _tokenizer(100, rename={7: "seven"})), world_size=3, repo_root=root)
    assert "its tokenizer maps id 7 to 'seven', the shared tokenizer to 't7'" in str(e.value)


def test_unknown_tokenizer_with_different_vocab_sizes_is_refused(padded):
    make, root = padded
    with pytest.raises(ConfigError) as e:
        validate(make(None), world_size=3, repo_root=root)
    assert "has no tokenizer.json" in str(e.value) and "models.tokenizer" in str(e.value)


def test_same_vocab_size_but_different_tokens_is_refused(tmp_path, monkeypatch):
    """Equal table sizes prove nothing: a student with its own tokenizer must agree on every id."""
    monkeypatch.chdir(tmp_path)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"expert_parallel": {"enabled": True, "autoep_size": 2}}))
    cfg = PaddConfig()
    cfg.deepspeed.config = str(ds)
    cfg.models.teacher = _model_dir(tmp_path, "teacher", {"model_type": "qwen2", "vocab_size": 128,
                                                          "intermediate_size": 256}, _tokenizer(100))
    student = {"model_type": "qwen3_moe", "vocab_size": 128, "num_experts": 8, "num_experts_per_tok": 2}
    cfg.models.student = _model_dir(tmp_path, "student", student, _tokenizer(100))
    validate(cfg, world_size=3, repo_root=tmp_path)
    cfg.models.student = _model_dir(tmp_path, "other", student, _tokenizer(100, rename={42: "forty-two"}))
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size=3, repo_root=tmp_path)
    assert str(e.value) == ("models.student: its tokenizer maps id 42 to 'forty-two', the shared tokenizer to 't42'; "
                            "teacher and student need one tokenizer family (same ids, same tokens)")
