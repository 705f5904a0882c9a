"""Is a model's answer right? ``grade(response, reference)``, shared by evaluation and RL rewards.

1. Extract the final answer from the response: the last ``#### x``, else the last
   ``\\boxed{x}`` (``\\fbox``, ``\\framebox``), else "the answer is x", else the last number.
2. Plain numbers are compared in this process (``1,000`` equals ``1000.0``; ``\\$18.90``
   equals ``18.9``), which covers GSM8K-style rewards without any symbolic algebra.
3. Everything else (fractions, LaTeX expressions, tuples, intervals, units) goes to
   math-verify, in a helper process.

Why a helper process: sympy can be driven into C code that no signal interrupts and that
can eat all memory (``\\boxed{2^{2^{40}}}`` is a ten-character answer a sampling policy can
produce). math-verify's own timeout is ``signal.alarm``, which also fails outside the main
thread. The helper runs math-verify under a soft deadline and a memory cap; the caller waits
at most ``timeout_s`` and kills and replaces a helper that overruns. So ``grade`` has a hard
time limit from any thread and never raises on any input.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time

from padd_ds.data.answers import BOXED, last_boxed
from padd_ds.paths import REPO_ROOT

GRADE_TIMEOUT_S = 5.0  # per call; a symbolic check of a sane answer takes < 0.3 s, sympy on a hostile one never ends
MAX_ANSWER_CHARS = 512  # a longer "final answer" is a runaway generation, not an answer; math-verify on it is slow
MAX_RESPONSE_CHARS = 2_000_000  # far above any generation budget; bounds the (linear) extraction work
_WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of the helper: a huge power fails with MemoryError, not OOM
_WORKER_START_TIMEOUT_S = 120.0  # importing sympy on a loaded 2-core machine can take tens of seconds

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"answer is[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_LEADING_NUMBER = re.compile(r"\s*\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?)(?![\d/^]|[.,]\d)")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# LaTeX that decorates a number without changing it: thin spaces, escaped dollar signs.
_NUMBER_DECORATION = re.compile(r"\\[!,;: ]|\\\$|\$|\\text\{\s*\}|\s")



def _candidate(tail: str) -> str | None:
    """The answer at the start of ``tail``: a leading number if any, else the trimmed text."""
    m = _LEADING_NUMBER.match(tail)
    if m:
        return m.group(1)
    tail = tail.strip().rstrip(".").strip()
    return tail or None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: ``#### x``, ``\\boxed{x}``, "the answer is x", the last number."""
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_RESPONSE_CHARS:
        return None
    hashes = _HASHES.findall(text)
    if hashes and (ans := _candidate(hashes[-1])):
        return ans
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    said = _ANSWER_IS.findall(text)
    if said and (ans := _candidate(said[-1])):
        return ans
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(s: str) -> float | None:
    """``s`` as a plain decimal number (thousands commas, ``$`` and thin spaces allowed), else None.
    ``3,4`` is not a number here: it is a pair, for math-verify to compare."""
    s = _NUMBER_DECORATION.sub("", s).rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    value = float(s.replace(",", ""))
    return value if math.isfinite(value) else None


def _reference_answer(reference: str) -> str:
    """Accept a full reference solution as well as a bare answer."""
    ref = reference.strip()
    if "####" in ref or BOXED.search(ref):
        ref = extract_answer(ref) or ref
    return ref


def grade(response: str, reference: str, *, timeout_s: float = GRADE_TIMEOUT_S) -> bool:
    """True when the final answer of ``response`` equals ``reference`` (a bare answer or a full
    reference solution). Never raises; returns within about ``timeout_s`` from any thread."""
    try:
        if not isinstance(reference, str) or not reference.strip():
            return False
        pred = extract_answer(response)
        if pred is None or len(pred) > MAX_ANSWER_CHARS:
            return False
        ref = _reference_answer(reference)
        if len(ref) > MAX_ANSWER_CHARS:
            return False
        a, b = _as_number(pred), _as_number(ref)
        if a is not None and b is not None:
            return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
        return _symbolic_equal(ref, pred, float(timeout_s))
    except Exception:  # noqa: BLE001 - a grader crash must never take a training run down
        return False


# ----------------------------------------------------------------------------------------
# math-verify in a helper process
# ----------------------------------------------------------------------------------------

_DELIMITERS = re.compile(r"(?<!\\)\$|\\[()\[\]]")


def _wrap(s: str) -> str:
    """An extracted answer as one math-verify LaTeX expression: math-verify reads LaTeX only
    between delimiters, and stray inner ones (``\\boxed{a+$ $b}``) would cut it in pieces."""
    return "$" + _DELIMITERS.sub(" ", s).strip().rstrip(".") + "$"


def _verify_here(ref: str, pred: str) -> bool:
    """math-verify's verdict, computed in this process without any timeout (the helper's job)."""
    from math_verify import parse, verify

    gold = parse(_wrap(ref), parsing_timeout=None)
    target = parse(_wrap(pred), parsing_timeout=None)
    return bool(gold and target and verify(gold, target, timeout_seconds=None))


class _Helper:
    """One long-lived helper process per grading process, replaced when it overruns or dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        proc = subprocess.Popen([sys.executable, "-m", "padd_ds.eval.grading"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        line = self._read_line(proc, _WORKER_START_TIMEOUT_S)
        if line != b"ready":
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the math-verify helper process did not start (got {line!r}); "
                               f"run `{sys.executable} -m padd_ds.eval.grading` to see why")
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout_s: float) -> bytes | None:
        """One line from the helper, or None on timeout or death."""
        fd = proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
        return buf.strip()

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def equal(self, ref: str, pred: str, timeout_s: float) -> bool:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            try:
                self._proc.stdin.write((json.dumps([ref, pred, timeout_s]) + "\n").encode())
            except OSError:
                self._kill()
                return False
            line = self._read_line(self._proc, timeout_s)
            if line is None:  # overran (stuck in C code) or died (memory cap): replace it
                self._kill()
                return False
            return line == b"1"

    def close(self) -> None:
        with self._lock:
            self._kill()


_HELPER = _Helper()
atexit.register(_HELPER.close)


@functools.lru_cache(maxsize=8192)  # RL groups repeat answers; a cache hit skips the round trip
def _symbolic_equal(ref: str, pred: str, timeout_s: float) -> bool:
    return _HELPER.equal(ref, pred, timeout_s)


def _helper_main() -> None:
    """Helper loop: read ``[ref, pred, timeout_s]`` lines, answer ``1``/``0``.

    A soft deadline (SIGALRM, we are the main thread here) ends slow pure-Python sympy work
    with a clean ``0``; the parent's kill covers work a signal cannot interrupt."""
    import logging
    import resource
    import signal

    logging.disable(logging.WARNING)  # math-verify warns on every timeout; the verdict is enough
    try:
        resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    except (ValueError, OSError):
        pass  # a lower hard limit is already in place
    import math_verify  # noqa: F401 - import before "ready": the first call must not pay for it

    class _Deadline(Exception):
        pass

    def on_alarm(signum, frame):
        raise _Deadline()

    signal.signal(signal.SIGALRM, on_alarm)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        verdict = False
        try:
            ref, pred, timeout_s = json.loads(line)
            signal.setitimer(signal.ITIMER_REAL, max(0.05, 0.8 * float(timeout_s)))
            try:
                verdict = _verify_here(ref, pred)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:  # noqa: BLE001 - deadline, MemoryError, RecursionError, bad request
            verdict = False
        out.write(b"1\n" if verdict else b"0\n")
        out.flush()


if __name__ == "__main__":
    _helper_main()
