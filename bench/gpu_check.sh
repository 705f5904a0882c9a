#!/usr/bin/env bash
# bench/gpu_check.sh: the CUDA path end to end on the toy world, in at most 10 minutes on one GPU.
#
#   bash bench/gpu_check.sh                          # on a GPU node; one GPU is enough
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh    # the same commands on CPU (gloo, fp32): a dry run
#
# Each check prints one line `CHECK <name> ok|FAIL <detail>` (a failing phase first shows the
# tail of its log, indented with "  | "); the last line is
#   GPU_CHECK ok=<passed>/<total> device="<name>" torch=... deepspeed=... transformers=... students=S seconds=T
# and the exit status is 0 only when every check passed. Without a CUDA device it refuses with
# one line (`GPU_CHECK ok=0/0 refused: no CUDA device ...`) and exit status 2.
#
# The checks, in order (a check whose input failed is counted as FAIL "skipped"):
#   env        torch sees CUDA; deepspeed and transformers import (versions in the last line)
#   toy_build  `padd toy build --profile test` (reused when cached under $PADD_CACHE)
#   fused_adam DeepSpeed's FusedAdam (ZeRO-3's optimizer on a GPU) JIT-built with nvcc (ok without
#              a build on CPU, where the engine uses torch's AdamW)
#   distill    `padd train`, train.mode=distill: 1 teacher process + S student processes (separate
#              worlds; the students' is NCCL), ZeRO-3 + AutoEP (expert-parallel size S), bf16
#              (models.dtype auto), a few steps, export, evaluation
#   devices    every rank of that run said `[device] ... cuda:N, backend nccl (students), models
#              bfloat16`; its DeepSpeed JSON had ZeRO stage 3, bf16 and AutoEP of size S
#   padd       `padd train`, train.mode=padd: Stage I (router init + warmup), then Stages II-IV
#              with the Stage IV bias, stopped by train.steps at half the steps (a checkpoint)
#   resume     the same run started again with train.steps at the full count: it continues from
#              that checkpoint (train.resume=auto) to the end; the Stage IV bias moved
#   export     the exported transformers checkpoints reproduce their engines' logits (the PADD
#              run's through its exact routing, the bias being folded) within the dtype's tolerance
#   eval       `padd eval` on the PADD run's export, on the GPU
#   colocated  topology.colocated=true: teacher and student in one process (train.mode=padd), its
#              rollouts from a gathered copy of the student (rollout.backend=hf_gathered) replayed
#              through the trainer's routers (rollout.route_replay); prints the sampler-trainer gaps
#   vllm       the same one-process PADD run sampling from a vLLM engine next to it on the same
#              device (rollout.backend=vllm: weight sync each step, sleep mode while it trains);
#              only where a vLLM environment exists (GPU_CHECK_VLLM_PYTHON, default .venv-vllm:
#              `make vllm VLLM_PKG=vllm==0.33.0` on a CUDA node; on CPU the toy's head_dim must be
#              >= 32, GPU_CHECK_PROFILE=demo); otherwise `CHECK vllm skipped <why>`, not counted
#
# S (GPU_CHECK_STUDENTS) is 1 on a 1-GPU node: NCCL refuses two ranks of one world on one GPU
# ("Duplicate GPU detected"), so there the student world is 1 rank and AutoEP's all-to-all has
# one member; the teacher process shares GPU 0 (launch/device.py: local rank % GPUs). With 2 or
# more GPUs S defaults to 2 and the expert all-to-all crosses GPUs.
#
# Knobs (environment):
#   GPU_CHECK_STEPS=3          distill steps
#   GPU_CHECK_PADD_STEPS=4     PADD steps in all (even: stopped at half, resumed to the end)
#   GPU_CHECK_STUDENTS=S       student processes (default: 1 on one GPU, else 2)
#   GPU_CHECK_PROFILE=test     toy build profile (test: ~2 min on 2 CPU cores; demo: ~6 min)
#   GPU_CHECK_BUDGET_S=570     wall-clock budget of the whole script; every phase's timeout is
#                              cut to what is left, so the script ends inside it (default 570 s
#                              on a GPU, 3600 s with GPU_CHECK_ALLOW_CPU=1)
#   GPU_CHECK_TIME_SCALE=1     multiplies each phase's own timeout (default 4 with ALLOW_CPU)
#   GPU_CHECK_LOGIT_TOL        export logit tolerance (default 1.0 in bf16, 1e-3 in fp32)
#   GPU_CHECK_DIR              run folder (default runs/gpu_check/<date-time>)
#   GPU_CHECK_PYTHON           python to use (default: .venv/bin/python when present, else python3)
#   GPU_CHECK_ALLOW_CPU=1      run the whole sequence on CPU (DS_ACCELERATOR=cpu, gloo, fp32)
#   OUT                        when set, a summary and a tarball of the logs (no weights) go there
#
# Installs nothing: the python it uses needs torch with CUDA, deepspeed (0.19.8 here),
# transformers (>=5.18,<5.23) and the rest of requirements.txt already installed. It uses the
# repository's .venv when one exists, else the python3 on PATH, and puts this checkout first on
# PYTHONPATH (no `pip install -e .` needed). On a cluster node: `make install` once (pip picks
# torch's CUDA build there), then `bash bench/gpu_check.sh`.
#
# On this workplace's lent GPU machine (one H100/H200, no network, a copy of the working tree,
# `$OUT` comes back; /work/.library/device/README.md): its python3 has torch 2.11 (CUDA 13, not
# the pinned 2.13: too big to carry), transformers 5.17 and no deepspeed, so carry wheels in
# `.whl/` (git-ignored through .git/info/exclude; `carry: [".whl"]`, 19 MB of the 64 MiB),
# fetched here once:
#   pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # sdist only; pure python
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.22.2 hjson pydantic==2.14.4 pydantic-core==2.50.5 annotated-types \
#     typing-inspection typing-extensions regex math-verify==0.9.0 latex2sympy2_extended==1.11.0 \
#     antlr4-python3-runtime==4.13.2
# and run there (the device tool's `run` command; the toy build takes a minute or two there,
# or carry a built .cache/padd_ds/toy-test-* too, 4 MB):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site GPU_CHECK_PYTHON=python3 GPU_CHECK_BUDGET_S=540 bash bench/gpu_check.sh
# (540 s leaves the install and the tool's 600 s limit room; timeout_s=600).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
START=$SECONDS

if [[ -n ${GPU_CHECK_PYTHON:-} ]]; then
    PY=$GPU_CHECK_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=$(command -v python3 || command -v python || echo python3)
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# JIT-built DeepSpeed ops (FusedAdam on a GPU, the shm comm op on CPU): where `make install` builds
# them for the checkout's .venv, else torch's default (~/.cache/torch_extensions).
if [[ -z ${TORCH_EXTENSIONS_DIR:-} && $PY == "$REPO/.venv/bin/python" ]]; then
    export TORCH_EXTENSIONS_DIR=$REPO/.venv/torch_extensions
fi

# ---- refuse without CUDA (one line), unless asked for the CPU dry run -------------------------
CPU=${GPU_CHECK_ALLOW_CPU:-0}
[[ $CPU == 1 ]] || CPU=0
if ! probe=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.cuda.device_count())' 2>/dev/null); then
    echo "GPU_CHECK ok=0/0 refused: cannot import torch with $PY (set GPU_CHECK_PYTHON to a python with torch, deepspeed, transformers)"
    exit 2
fi
read -r HAS_CUDA NGPU <<<"$probe"
if [[ $HAS_CUDA != 1 && $CPU != 1 ]]; then
    echo "GPU_CHECK ok=0/0 refused: no CUDA device (torch.cuda.is_available() is False); run it on a GPU node (GPU_CHECK_ALLOW_CPU=1 runs the same commands on CPU as a dry run)"
    exit 2
fi

if [[ $CPU == 1 ]]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    MODE=cpu; NGPU=0
    BUDGET=${GPU_CHECK_BUDGET_S:-3600}; SCALE=${GPU_CHECK_TIME_SCALE:-4}; TOL=${GPU_CHECK_LOGIT_TOL:-1e-3}
    STUDENTS=${GPU_CHECK_STUDENTS:-1}
    WANT_DEV=cpu; WANT_BACKEND=gloo; WANT_DTYPE=float32
else
    export DS_ACCELERATOR=cuda
    MODE=cuda
    BUDGET=${GPU_CHECK_BUDGET_S:-570}; SCALE=${GPU_CHECK_TIME_SCALE:-1}; TOL=${GPU_CHECK_LOGIT_TOL:-1.0}
    if (( NGPU >= 2 )); then STUDENTS=${GPU_CHECK_STUDENTS:-2}; else STUDENTS=${GPU_CHECK_STUDENTS:-1}; fi
    WANT_DEV=cuda; WANT_BACKEND=nccl; WANT_DTYPE=bfloat16
fi
DSTEPS=${GPU_CHECK_STEPS:-3}
PSTEPS=${GPU_CHECK_PADD_STEPS:-4}
PROFILE=${GPU_CHECK_PROFILE:-test}
if (( PSTEPS < 2 || PSTEPS % 2 )); then
    echo "GPU_CHECK ok=0/0 refused: GPU_CHECK_PADD_STEPS=$PSTEPS must be even and >= 2 (stopped at half, resumed)"
    exit 2
fi
HALF=$((PSTEPS / 2))
export PADD_TOY_PROFILE=$PROFILE

RUN=${GPU_CHECK_DIR:-$REPO/runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN" || exit 2
RUN=$(cd "$RUN" && pwd)
SUMMARY=$RUN/summary.txt
: >"$SUMMARY"

PASSED=0
TOTAL=0
declare -A OK=()

say() { echo "$*" | tee -a "$SUMMARY"; }

check() {  # check NAME ok|FAIL DETAIL...
    local name=$1 verdict=$2
    shift 2
    TOTAL=$((TOTAL + 1))
    if [[ $verdict == ok ]]; then PASSED=$((PASSED + 1)); OK[$name]=1; fi
    say "CHECK $name $verdict $*"
}

tail_log() {  # the end of a failing phase's log, indented
    [[ -f $1 ]] && tail -n "${2:-25}" "$1" | sed 's/^/  | /' | tee -a "$SUMMARY"
    return 0
}

# run_phase NAME TIMEOUT_S CMD...: the command under `timeout` (its whole process group: the
# deepspeed launcher and every rank), output in $RUN/NAME.log; cut to the budget that is left.
# Sets RC (124: timed out, 125: no time left).
run_phase() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START) - 20))
    limit=$((limit * SCALE))
    (( limit > left )) && limit=$left
    if (( limit < 15 )); then
        RC=125
        echo "no time left in the ${BUDGET}s budget" >"$RUN/$name.log"
        return
    fi
    local t0=$SECONDS
    echo "+ $*" >"$RUN/$name.log"
    timeout -k 10 "$limit" "$@" >>"$RUN/$name.log" 2>&1 </dev/null
    RC=$?
    echo "[gpu_check] $name: exit $RC after $((SECONDS - t0))s (limit ${limit}s)" >>"$RUN/$name.log"
    PHASE_S=$((SECONDS - t0))
}

why() {  # a failed command's one-line reason
    case $RC in
        124|137) echo "timed out (${PHASE_S:-?}s)" ;;
        125) echo "no time left in the ${BUDGET}s budget" ;;
        *) local last
           last=$(grep -E "padd-ds: |Error|error:" "$RUN/$1.log" | tail -n 1 | cut -c1-200)
           echo "exit $RC${last:+: $last}" ;;
    esac
}

# pycheck ARGS... (Python on stdin, a here-document): an assertion over a run's files; prints the
# detail (the last line of its output: what it found, or the failed assertion) and returns its status.
pycheck() {
    local out rc
    out=$("$PY" - "$@" 2>&1)
    rc=$?
    echo "$out" | tail -n 1
    return $rc
}

PADD=("$PY" -m padd_ds.cli)
COMMON=(--set logging.wandb_mode=disabled --set logging.progress=false
        --set topology.timeout_s=240 --set teacher.request_timeout_s=180
        --set data.max_response_tokens=48 --set eval.num_problems=8 --set eval.max_new_tokens=32
        --set train.log_every=1)
NPROC=$((STUDENTS + 1))

# ---- env ------------------------------------------------------------------------------------
VERSIONS=$("$PY" - <<'PY' 2>"$RUN/env.log"
import torch
import deepspeed
import transformers
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f'device="{name}" torch={torch.__version__} cuda={torch.version.cuda} deepspeed={deepspeed.__version__} '
      f'transformers={transformers.__version__}')
PY
)
if [[ $? == 0 && -n $VERSIONS ]]; then
    check env ok "$MODE, $NGPU GPU(s), $VERSIONS, python $PY"
else
    tail_log "$RUN/env.log"
    check env FAIL "cannot import torch, deepspeed and transformers with $PY"
    VERSIONS="device=unknown"
fi

# ---- toy_build ------------------------------------------------------------------------------
if [[ -n ${OK[env]:-} ]]; then
    run_phase toy_build 240 "${PADD[@]}" toy build --profile "$PROFILE"
    if [[ $RC == 0 ]] && grep -q "^PADD_TOY_DIR=" "$RUN/toy_build.log"; then
        check toy_build ok "profile $PROFILE in ${PHASE_S}s: $(grep '^PADD_TOY_DIR=' "$RUN/toy_build.log" | tail -n 1 | cut -d= -f2)"
    else
        tail_log "$RUN/toy_build.log"
        check toy_build FAIL "$(why toy_build)"
    fi
else
    check toy_build FAIL "skipped: needs env"
fi

# ---- fused_adam -----------------------------------------------------------------------------
# On a GPU DeepSpeed's optimizer for ZeRO-3 is FusedAdam, JIT-compiled (nvcc, ninja) by the first
# engine into TORCH_EXTENSIONS_DIR: build it here, under its own time limit, so a compiler problem
# is named as such and the training phases do not pay for the build. (On CPU the engine uses
# torch's AdamW: engine/ds_config.py.)
if [[ -z ${OK[env]:-} ]]; then
    check fused_adam FAIL "skipped: needs env"
elif [[ $MODE == cpu ]]; then
    check fused_adam ok "skipped on CPU (the engine uses torch's AdamW there; nothing to build)"
else
    run_phase fused_adam 240 "$PY" -c 'from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()'
    if [[ $RC == 0 ]]; then
        check fused_adam ok "built or loaded in ${PHASE_S}s under ${TORCH_EXTENSIONS_DIR:-the default ~/.cache/torch_extensions}"
    else
        tail_log "$RUN/fused_adam.log"
        check fused_adam FAIL "$(why fused_adam)"
    fi
fi

# ---- distill --------------------------------------------------------------------------------
if [[ -n ${OK[toy_build]:-} && -n ${OK[fused_adam]:-} ]]; then
    run_phase distill 150 "${PADD[@]}" train --nproc "$NPROC" --recipe recipes/toy_cpu.yaml "${COMMON[@]}" \
        --set run.output_dir="$RUN/distill" --set train.resume=never --set train.steps="$DSTEPS" \
        --set train.micro_batch_size=8 --set deepspeed.expert_parallel_size="$STUDENTS"
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/distill" "$DSTEPS" <<'PY'
import json, math, sys
r = json.load(open(sys.argv[1] + "/results.json"))
h = r["history"]
assert len(h) == int(sys.argv[2]), f"{len(h)} logged steps, want {sys.argv[2]}"
kd = [x["train/kd_loss"] for x in h]
assert all(math.isfinite(v) for v in kd), f"non-finite KD loss {kd}"
acc = {k: (r[k] or {}).get("accuracy") for k in ("teacher", "student_before", "student_after")}
print(f"{len(h)} steps, kd {kd[0]:.4f} -> {kd[-1]:.4f}, accuracy {acc}")
PY
); then
        check distill ok "1 teacher + $STUDENTS student process(es) in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/distill.log"
        check distill FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why distill; fi)"
    fi
else
    check distill FAIL "skipped: needs toy_build and fused_adam"
fi

# ---- devices --------------------------------------------------------------------------------
if [[ -n ${OK[distill]:-} ]]; then
    if detail=$(pycheck "$RUN/distill.log" "$RUN/distill" "$WANT_DEV" "$WANT_BACKEND" "$WANT_DTYPE" "$STUDENTS" <<'PY'
import json, re, sys
log, run, dev, backend, dtype, students = sys.argv[1:7]
students = int(students)
lines = [l for l in open(log) if "[device] rank" in l]
ranks = {}
for l in lines:
    m = re.search(r"\[device\] rank (\d+) \((\w+)\): (\S+?)(?: \((.*)\))?, backend (\w+), models (\w+)", l)
    assert m, f"unreadable: {l.strip()}"
    ranks[int(m[1])] = m.groups()[1:]
assert len(ranks) == students + 1, f"{len(ranks)} [device] lines, want {students + 1}: {sorted(ranks)}"
for r, (role, d, name, be, dt) in sorted(ranks.items()):
    assert d.startswith(dev), f"rank {r} ({role}) computes on {d}, want {dev}"
    assert dt == dtype, f"rank {r} ({role}) loads models in {dt}, want {dtype}"
    want_be = backend if role == "student" else "none"
    assert be == want_be, f"rank {r} ({role}) backend {be}, want {want_be}"
ds = json.load(open(run + "/ds_config.json"))
assert ds["zero_optimization"]["stage"] == 3, ds["zero_optimization"]
assert ds["bf16"]["enabled"] == (dtype == "bfloat16"), ds["bf16"]
ep = ds["expert_parallel"]
assert ep["enabled"] and ep["autoep_size"] == students, ep
print("; ".join(f"rank {r} {v[0]} {v[1]} {v[3]} {v[4]}" for r, v in sorted(ranks.items()))
      + f"; ZeRO-3, bf16={ds['bf16']['enabled']}, AutoEP size {ep['autoep_size']} grouped_mm={ep['use_grouped_mm']}")
PY
); then
        check devices ok "$detail"
    else
        grep "\[device\]" "$RUN/distill.log" | sed 's/^/  | /'
        check devices FAIL "$detail"
    fi
else
    check devices FAIL "skipped: needs distill"
fi

# ---- padd (stopped by steps at half) and resume -------------------------------------------
PADD_ARGS=(--nproc "$NPROC" --recipe recipes/toy_padd.yaml "${COMMON[@]}" --set run.output_dir="$RUN/padd"
           --set stage1.warmup_steps=2 --set stage3.prompts_per_step=$((2 * STUDENTS))
           --set train.micro_batch_size=4 --set eval.references=false
           --set deepspeed.expert_parallel_size="$STUDENTS")
if [[ -n ${OK[toy_build]:-} && -n ${OK[fused_adam]:-} ]]; then
    run_phase padd 150 "${PADD[@]}" train "${PADD_ARGS[@]}" --set train.resume=never --set train.steps="$HALF"
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/padd" "$HALF" <<'PY'
import json, os, sys
run, half = sys.argv[1], int(sys.argv[2])
r = json.load(open(run + "/results.json"))
assert len(r["history"]) == half, f"{len(r['history'])} logged steps, want {half}"
assert os.path.exists(run + "/stage1/report.json"), "no Stage I report"
assert os.path.isdir(f"{run}/checkpoints/step_{half}"), f"no checkpoint {run}/checkpoints/step_{half}"
h = r["history"][-1]
print(f"Stage I + {half} PADD steps, checkpoint step_{half}, reward {h.get('train/reward')}, "
      f"bias norm {h.get('routing/bias_norm')}")
PY
); then
        check padd ok "in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/padd.log"
        check padd FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why padd; fi)"
    fi
else
    check padd FAIL "skipped: needs toy_build and fused_adam"
fi

if [[ -n ${OK[padd]:-} ]]; then
    run_phase resume 150 "${PADD[@]}" train "${PADD_ARGS[@]}" --set train.resume=auto --set train.steps="$PSTEPS"
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/padd" "$RUN/resume.log" "$HALF" "$PSTEPS" <<'PY'
import json, math, sys
run, log, half, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(log).read()
want = f"[resume] continuing from {run}/checkpoints/step_{half}"
assert want in text, f"no line {want!r}"
h = json.load(open(run + "/results.json"))["history"]
assert [x["step"] for x in h] == list(range(1, steps + 1)), f"steps {[x.get('step') for x in h]}"
kd = [x["train/kd_loss"] for x in h]
assert all(math.isfinite(v) for v in kd), f"non-finite KD loss {kd}"
bias = h[-1]["routing/bias_norm"]
assert bias > 0, f"Stage IV bias norm {bias}"
print(f"continued from step_{half} to step {steps}, kd {kd[-1]:.4f}, Stage IV bias norm {bias:.4g}")
PY
); then
        check resume ok "in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/resume.log"
        check resume FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why resume; fi)"
    fi
else
    check resume FAIL "skipped: needs padd"
fi

# ---- export ---------------------------------------------------------------------------------
if [[ -n ${OK[distill]:-} && -n ${OK[resume]:-} ]]; then
    if detail=$(pycheck "$RUN/distill" "$RUN/padd" "$TOL" <<'PY'
import json, math, os, sys
tol = float(sys.argv[3])
out = []
for run in sys.argv[1:3]:
    r = json.load(open(run + "/results.json"))
    for f in ("config.json", "model.safetensors"):
        assert os.path.exists(f"{run}/hf/{f}"), f"{run}/hf/{f} missing"
    exact = r.get("export_exact_routing")
    diff = exact["max_abs_logit_diff"] if exact else r["export_max_abs_logit_diff"]
    fid = exact["routing_fidelity"] if exact else r["export_routing_fidelity"]
    name = os.path.basename(run)
    assert math.isfinite(diff) and diff <= tol, f"{name}: exported logits differ by {diff:.4g} > {tol}"
    out.append(f"{name}: max logit diff {diff:.3g}{' (exact routing)' if exact else ''}, routing fidelity {fid:.3f}")
print("; ".join(out) + f" (tolerance {tol})")
PY
); then
        check export ok "$detail"
    else
        check export FAIL "$detail"
    fi
else
    check export FAIL "skipped: needs distill and resume"
fi

# ---- eval -----------------------------------------------------------------------------------
if [[ -n ${OK[resume]:-} ]]; then
    run_phase eval 90 "${PADD[@]}" eval --model "$RUN/padd/hf" --suite toy --limit 16 --max-new-tokens 32 \
        --batch-size 16 --output "$RUN/eval.json"
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/eval.json" "$WANT_DEV" "$WANT_DTYPE" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
dev, dtype = sys.argv[2], sys.argv[3]
assert r["device"].startswith(dev), f"evaluated on {r['device']}, want {dev}"
assert r["dtype"] == dtype, f"evaluated in {r['dtype']}, want {dtype}"
accs = {k: v for k, v in r.items() if "acc" in k or k == "average"}
print(f"on {r['device']} in {r['dtype']}: {json.dumps(accs)[:160]}")
PY
); then
        check eval ok "in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/eval.log"
        check eval FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why eval; fi)"
    fi
else
    check eval FAIL "skipped: needs resume"
fi

# ---- colocated ------------------------------------------------------------------------------
# colocated_run NAME TIMEOUT_S OVERRIDES...: 2 PADD steps in one process (the teacher inside it)
# into $RUN/NAME, with the phase's own rollout overrides.
colocated_run() {
    local name=$1 limit=$2 port
    shift 2
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    MASTER_PORT=$port run_phase "$name" "$limit" "${PADD[@]}" train --nproc 1 --recipe recipes/toy_padd.yaml \
        "${COMMON[@]}" --set run.output_dir="$RUN/$name" --set train.resume=never --set train.steps=2 \
        --set topology.colocated=true --set deepspeed.expert_parallel_size=1 --set stage1.warmup_steps=2 \
        --set stage3.prompts_per_step=2 --set train.micro_batch_size=4 "$@"
}
if [[ -n ${OK[toy_build]:-} && -n ${OK[fused_adam]:-} ]]; then
    colocated_run colocated 120 --set rollout.backend=hf_gathered --set rollout.route_replay=true
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/colocated" "$RUN/colocated.log" "$WANT_DEV" "$WANT_BACKEND" "$WANT_DTYPE" "$TOL" <<'PY'
import json, math, re, sys
run, log, dev, backend, dtype, tol = sys.argv[1:7]
lines = [l.strip() for l in open(log) if "[device] rank" in l]
assert len(lines) == 1, f"{len(lines)} [device] lines, want 1"
m = re.search(r"\((\w+)\): (\S+?)(?: \(.*\))?, backend (\w+), models (\w+)", lines[0])
assert m and m.groups() == ("colocated", m[2], backend, dtype) and m[2].startswith(dev), lines[0]
r = json.load(open(run + "/results.json"))
exact = r.get("export_exact_routing")
diff = exact["max_abs_logit_diff"] if exact else r["export_max_abs_logit_diff"]
assert math.isfinite(diff) and diff <= float(tol), f"exported logits differ by {diff:.4g} > {tol}"
assert len(r["history"]) == 2 and all(math.isfinite(x["train/kd_loss"]) for x in r["history"]), r["history"]
gap, routes = r["history"][-1]["rollout/logprob_diff_max"], r["history"][-1]["rollout/route_agreement"]
assert math.isfinite(gap) and 0 <= routes <= 1, (gap, routes)
print(f"one process on {m[2]} ({backend}, {dtype}), 2 PADD steps with gathered rollouts, sampler-trainer log-prob "
      f"gap max {gap:.3g}, own routes agreeing {routes:.4f}, teacher accuracy "
      f"{(r['teacher'] or {}).get('accuracy')}, export max logit diff {diff:.3g}{' (exact routing)' if exact else ''}")
PY
); then
        check colocated ok "in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/colocated.log"
        check colocated FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why colocated; fi)"
    fi
else
    check colocated FAIL "skipped: needs toy_build and fused_adam"
fi

# ---- vllm -----------------------------------------------------------------------------------
VLLM_PY=${GPU_CHECK_VLLM_PYTHON:-$REPO/.venv-vllm/bin/python}
VLLM_SKIP=""
if [[ ! -x $VLLM_PY ]]; then
    VLLM_SKIP="no vLLM environment at $VLLM_PY (make vllm; on CUDA: make vllm VLLM_PKG=vllm==0.33.0)"
elif [[ $CPU == 1 ]] && ! "$PY" -c 'import json, sys
sys.exit(json.load(open(sys.argv[1] + "/student/config.json")).get("head_dim", 64) < 32)' \
        "$(grep '^PADD_TOY_DIR=' "$RUN/toy_build.log" 2>/dev/null | tail -n 1 | cut -d= -f2)" 2>/dev/null; then
    VLLM_SKIP="the $PROFILE toy's head_dim is below vLLM's CPU minimum of 32 (GPU_CHECK_PROFILE=demo)"
fi
if [[ -n $VLLM_SKIP ]]; then
    say "CHECK vllm skipped $VLLM_SKIP"
elif [[ -n ${OK[toy_build]:-} && -n ${OK[fused_adam]:-} ]]; then
    colocated_run vllm 180 --set rollout.backend=vllm --set rollout.vllm_python="$VLLM_PY" \
        --set rollout.vllm_gpu_memory_utilization=0.3
    if [[ $RC == 0 ]] && detail=$(pycheck "$RUN/vllm" "$TOL" <<'PY'
import json, math, sys
run, tol = sys.argv[1], float(sys.argv[2])
r = json.load(open(run + "/results.json"))
assert len(r["history"]) == 2 and all(math.isfinite(x["train/kd_loss"]) for x in r["history"]), r["history"]
gaps = [h["rollout/logprob_diff_max"] for h in r["history"]]
assert all(math.isfinite(g) and g <= tol for g in gaps), f"vLLM-trainer log-prob gaps {gaps} > {tol}"
log = open(run + "/vllm_engine.0/vllm_engine.log").read()
print(f"2 PADD steps sampled by vLLM after a weight sync each, vLLM-trainer log-prob gap max {max(gaps):.3g} "
      f"(tolerance {tol}); engine log {len(log.splitlines())} lines")
PY
); then
        check vllm ok "in ${PHASE_S}s: $detail"
    else
        tail_log "$RUN/vllm.log"
        [[ -f $RUN/vllm/vllm_engine.0/vllm_engine.log ]] && tail_log "$RUN/vllm/vllm_engine.0/vllm_engine.log"
        check vllm FAIL "$(if [[ $RC == 0 ]]; then echo "$detail"; else why vllm; fi)"
    fi
else
    check vllm FAIL "skipped: needs toy_build and fused_adam"
fi

# ---- summary --------------------------------------------------------------------------------
say "logs: $RUN"
LAST="GPU_CHECK ok=$PASSED/$TOTAL $VERSIONS mode=$MODE students=$STUDENTS seconds=$((SECONDS - START))"
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT"
    # Logs, results and configs only: no weights or checkpoints (the device tool brings back 8 files).
    (cd "$RUN" && find . -type f \( -name "*.log" -o -name "*.json" -o -name "*.jsonl" -o -name "*.txt" \
        -o -name "*.yaml" -o -name "*.md" \) -not -path "*/checkpoints/*" -print0 |
        tar -czf "$OUT/gpu_check_logs.tar.gz" --null -T -) 2>/dev/null
fi
say "$LAST"
[[ -n ${OUT:-} ]] && cp "$SUMMARY" "$OUT/gpu_check_summary.txt"
[[ $PASSED == "$TOTAL" ]]
