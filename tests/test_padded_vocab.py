"""A teacher whose embedding table is padded past the student's (Qwen2.5 152064 rows vs
Qwen3 151936, one tokenizer): its padding rows must never reach the student as top-k ids.

The padded teacher here is the toy teacher with 64 extra output rows of norm ~1e3: about
half of them out-score every real token at every position, so without the vocab limit the
top-k would be mostly padding ids the student's logits cannot be indexed with."""

from __future__ import annotations

import math
import shutil

import torch

from conftest import REPO, deepspeed_cmd, read_results, run_cmd

PAD = 64


def padded_teacher(toy_build):
    from padd_ds.models.loading import load_causal_lm

    model = load_causal_lm(str(toy_build.teacher_dir), "float32")
    v = model.config.vocab_size
    model.resize_token_embeddings(v + PAD, mean_resizing=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        # (may be the input table too, when tied: the tokenizer never produces these ids)
        head[v:] = 1e3 * torch.randn(PAD, head.shape[1], generator=g) / head.shape[1] ** 0.5
    return model, v


def test_teacher_targets_stay_inside_the_student_vocab(toy_build):
    from padd_ds.teacher.service import TeacherModel
    from padd_ds.teacher.sparse import encode_topk

    model, v = padded_teacher(toy_build)
    ids = torch.randint(3, v, (2, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([12, 7])
    unlimited = TeacherModel(model).score(ids, lengths, k=8)
    assert (unlimited.logits.indices >= v).float().mean() > 0.3  # the padding rows do win without the limit
    out = TeacherModel(model, vocab_limit=v).score(ids, lengths, k=8).logits
    assert int(out.indices.max()) < v
    mask = (torch.arange(12).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ref = encode_topk(model(input_ids=ids, attention_mask=mask).logits[..., :v].float(), 8)
    real = mask.bool()  # the teacher scores real positions only
    assert torch.equal(out.indices[real], ref.indices[real])
    torch.testing.assert_close(out.values[real], ref.values[real])
    torch.testing.assert_close(out.lse[real], ref.lse[real])  # renormalised over the shared rows


def test_three_process_distillation_from_a_padded_teacher(toy_build, tmp_path):
    """The teacher rank reads the student's vocab_size and limits its targets: the run
    finishes and its KD loss is finite (without the limit the students fail on an index
    past their vocabulary)."""
    model, v = padded_teacher(toy_build)
    teacher_dir = tmp_path / "teacher"
    model.save_pretrained(teacher_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_build.tokenizer_dir / f, teacher_dir / f)
    out = tmp_path / "run"
    run_cmd(deepspeed_cmd(3, "--recipe", str(REPO / "recipes" / "toy_cpu.yaml"),
                          "--set", f"models.teacher={teacher_dir}", "--set", f"models.tokenizer={toy_build.tokenizer_dir}",
                          "--set", "train.steps=2", "--set", "train.log_every=1", "--set", "train.micro_batch_size=4",
                          "--set", "eval.num_problems=4", "--set", "eval.max_new_tokens=16",
                          "--set", "eval.references=false", "--set", "logging.wandb_mode=disabled",
                          "--set", "logging.progress=false", "--set", "topology.timeout_s=120",
                          "--set", f"run.output_dir={out}"), timeout=420)
    kd = [h["train/kd_loss"] for h in read_results(out)["history"]]
    assert len(kd) == 2 and all(math.isfinite(k) and 0 < k < 50 for k in kd), kd
