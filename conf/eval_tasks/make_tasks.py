"""Writes the data of the two shipped lm-eval tasks from this Python's standard library: their provenance.

    .venv/bin/python conf/eval_tasks/make_tasks.py      # writes the two JSONL files beside this script

What it reads: every top-level module of the standard library, `Path(os.__file__).parent / "*.py"`, in
name order: no packages, so neither the test suite nor site-packages, and not `_sysconfigdata_*.py` (the
settings of one build). Of each file it keeps the code lines:
not blank, not comment-only, not inside (or opening or closing) a triple-quoted string, ASCII, no tabs, at
most MAX_LINE characters. A window is a few consecutive kept lines of one file (3 to 6: the context) and
the kept line after them (the answer); the windows are drawn with a fixed seed, and their answers are
distinct. The first N_ITEMS windows make `stdlib_next_line_mc`, the next N_ITEMS `stdlib_complete_line`.

stdlib_next_line_mc: the answer among 4 choices; the 3 distractors are kept lines found in no file of the
answer, of a length close to the answer's, with its indentation (any indentation where fewer than NEAR
lines have it), none equal to the answer or to a line of the context, stripped.

Each item names its source (file and line of the answer) and the Python that made it. The output depends on
the Python version (its stdlib), so the project ships the files; this script says how they were made.
"""

import bisect
import json
import os
import platform
import random
from pathlib import Path

SEED = 1234
N_ITEMS = 200                 # per task
CONTEXT_LINES = (3, 6)        # lines before the answer, inclusive bounds
MAX_LINE = 72                 # characters in any line shown
MAX_CONTEXT = 300             # characters in a whole context: short prompts for models of 256-token contexts
ANSWER_LEN = (6, 60)          # characters of the stripped answer: a line a 32-token generation can hold
NEAR = 24                     # distractors are drawn among this many lines closest in length to the answer
HERE = Path(__file__).resolve().parent
OUTPUTS = {"mc": HERE / "stdlib_next_line_mc.jsonl", "gen": HERE / "stdlib_complete_line.jsonl"}


def stdlib_files() -> list[Path]:
    """The top-level modules, less the build's own settings (`_sysconfigdata_*`: paths and flags of one build)."""
    return sorted(p for p in Path(os.__file__).parent.glob("*.py") if not p.name.startswith("_sysconfigdata"))


def string_lines(lines: list[str]) -> set[int]:
    """Indices of the lines inside a triple-quoted string or holding a triple quote (docstrings, mostly).

    A scan for the quotes, not a tokenizer (4 s for the stdlib against a tenth of that): a triple quote
    inside a one-line string can mislead it, which keeps a docstring's line or drops a code line; the items
    stay real lines of the file either way.
    """
    inside, marked = None, set()
    for i, line in enumerate(lines):
        if inside is not None:
            marked.add(i)
        j = 0
        while True:
            hits = [(k, q) for q in ('"""', "'''") if (k := line.find(q, j)) >= 0]
            if not hits:
                break
            k, q = min(hits)
            marked.add(i)
            if inside is None:
                inside = q
            elif q == inside:
                inside = None
            j = k + 3
    return marked


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the lines an item may show, in file order."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    strings = string_lines(lines)
    kept = []
    for i, line in enumerate(lines):
        line = line.rstrip()
        text = line.strip()
        if not text or text.startswith("#") or i in strings:
            continue
        if not line.isascii() or "\t" in line or len(line) > MAX_LINE:
            continue
        kept.append((i + 1, line))
    return kept


def windows(files: dict[str, list[tuple[int, str]]], rng: random.Random, n: int) -> list[dict]:
    """n windows (source, context, answer) with distinct answers, drawn at random positions."""
    positions = [(name, j) for name, lines in files.items() for j in range(CONTEXT_LINES[1], len(lines))]
    rng.shuffle(positions)
    out, answers = [], set()
    for name, j in positions:
        lines = files[name]
        lineno, answer = lines[j]
        k = rng.randint(*CONTEXT_LINES)
        context = "".join(line + "\n" for _, line in lines[j - k:j])
        if lineno - lines[j - k][0] > 3 * k:
            continue                      # the kept lines are far apart in the file: not one passage
        if not ANSWER_LEN[0] <= len(answer.strip()) <= ANSWER_LEN[1] or len(context) > MAX_CONTEXT:
            continue
        if answer.strip() in answers:
            continue
        answers.add(answer.strip())
        out.append({"source": f"{name}:{lineno}", "context": context, "answer": answer})
        if len(out) == n:
            return out
    raise RuntimeError(f"only {len(out)} windows of {n} in the standard library")


class Distractors:
    """The distinct kept lines of the whole stdlib by indentation, each bucket sorted by length, and the
    files each line is in."""

    def __init__(self, files: dict[str, list[tuple[int, str]]]):
        self.files_of, self.buckets = {}, {}
        for name, lines in files.items():
            for _, line in lines:
                if ANSWER_LEN[0] <= len(line.strip()) <= ANSWER_LEN[1]:
                    self.files_of.setdefault(line, set()).add(name)
        for line in self.files_of:
            self.buckets.setdefault(len(line) - len(line.lstrip()), []).append((len(line.strip()), line))
        for bucket in self.buckets.values():
            bucket.sort()
        self.every = sorted(e for bucket in self.buckets.values() for e in bucket)

    def draw(self, window: dict, rng: random.Random) -> list[str]:
        answer, name = window["answer"], window["source"].split(":")[0]
        shown = {line.strip() for line in window["context"].splitlines()} | {answer.strip()}
        indent = len(answer) - len(answer.lstrip())

        def ok(line: str) -> bool:
            return name not in self.files_of[line] and line.strip() not in shown

        near = self._nearest(self.buckets.get(indent, []), len(answer.strip()), ok)
        if len(near) < NEAR:              # a rare indentation in other files: lines of any indentation
            near = self._nearest(self.every, len(answer.strip()), ok)
        return rng.sample(near, 3)

    @staticmethod
    def _nearest(bucket: list, length: int, ok) -> list[str]:
        """The NEAR lines of the bucket closest in length that pass ok, walking out from length both ways;
        no two the same but for their indentation."""
        hi = bisect.bisect_left(bucket, (length, ""))
        lo, near, texts = hi - 1, [], set()
        while len(near) < NEAR and (lo >= 0 or hi < len(bucket)):
            if hi >= len(bucket) or (lo >= 0 and length - bucket[lo][0] <= bucket[hi][0] - length):
                e, lo = bucket[lo], lo - 1
            else:
                e, hi = bucket[hi], hi + 1
            if ok(e[1]) and e[1].strip() not in texts:
                near.append(e[1])
                texts.add(e[1].strip())
        return near


def make() -> dict[str, list[dict]]:
    """The items of both tasks, as written to OUTPUTS."""
    files = {p.name: code_lines(p) for p in stdlib_files()}
    rng = random.Random(SEED)
    drawn = windows(files, rng, 2 * N_ITEMS)
    distractors = Distractors(files)
    python = platform.python_version()
    mc, gen = [], []
    for i, w in enumerate(drawn[:N_ITEMS]):
        choices = [w["answer"]] + distractors.draw(w, rng)
        rng.shuffle(choices)
        mc.append({"id": i, "source": w["source"], "python": python, "context": w["context"],
                   "choices": choices, "label": choices.index(w["answer"])})
    for i, w in enumerate(drawn[N_ITEMS:]):
        gen.append({"id": i, "source": w["source"], "python": python, "context": w["context"],
                    "answer": w["answer"]})
    return {"mc": mc, "gen": gen}


def jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=True) + "\n" for item in items)


def main() -> None:
    for key, items in make().items():
        OUTPUTS[key].write_text(jsonl(items))
        print(f"{OUTPUTS[key]}: {len(items)} items")


if __name__ == "__main__":
    main()
