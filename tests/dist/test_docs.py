"""The docs run: every command in a block marked `bash runnable` (README.md, then docs/*.md by name) runs, in
order, in one scratch folder, as a user would type it, with small overrides appended (a tiny model, two steps,
a few documents), so that no page drifts from the code. A block marked `console runnable` shows `$ command`
lines with what each prints: the command runs as it is written, and prints exactly the lines shown (times
taken, "in 1.3 s", aside)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from tests.conftest import ROOT, TINY

RUNNABLE = re.compile(r"^```(bash|console) runnable\n(.*?)^```", re.S | re.M)
SECONDS = re.compile(r"\bin \d+(\.\d+)? s\b")  # how long a command took: the one thing that may differ
# Appended to each command (later overrides win in Hydra): the layout a command asks for stays its own.
SMALL = {
    "trident-train": [o for o in TINY if not o.startswith(("parallel.", "launcher."))]
    + ["train.steps=2", "train.eval_every=0"],
    "trident-generate": ["generate.max_new_tokens=4"],
    "trident-eval": ["eval.limit=2", "eval.batch_size=2"],
}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_commands() -> list[tuple[str, list[str], Optional[list[str]]]]:
    """(page, argv, the output shown or None) of each command in the runnable blocks: a bash block's lines,
    continuation lines joined and comments dropped; a console block's `$ ` lines, each with the lines up to
    the next one."""
    out = []
    for page in PAGES:
        name = page.relative_to(ROOT).as_posix()
        for kind, block in RUNNABLE.findall(page.read_text()):
            if kind == "bash":
                for line in block.replace("\\\n", " ").splitlines():
                    argv = shlex.split(line, comments=True)
                    if argv:
                        out.append((name, argv, None))
                continue
            for line in block.splitlines():
                if line.startswith("$ "):
                    out.append((name, shlex.split(line[2:], comments=True), []))
                else:
                    out[-1][2].append(line)
    return out


def test_the_docs_mark_the_tour_runnable():
    commands = runnable_commands()
    assert [argv[0] for page, argv, _ in commands if page == "README.md"] == [
        "trident-train", "trident-plan", "trident-generate", "trident-eval", "trident-export", "trident-status"]
    shown = {page for page, _, output in commands if output}
    assert {"docs/levers-and-planning.md", "docs/generation-and-evaluation.md"} <= shown


def test_every_runnable_command_in_the_docs_runs(tmp_path):
    scripts = Path(sys.executable).parent
    ran = []
    for page, argv, shown in runnable_commands():
        cmd = [str(scripts / argv[0]), *argv[1:], *(SMALL.get(argv[0], []) if shown is None else [])]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={"PATH": f"{scripts}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
                                   "HOME": str(tmp_path), "WANDB_MODE": "disabled"})
        assert done.returncode == 0, f"{page}: {shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        if shown is not None:
            printed = done.stdout.rstrip("\n").splitlines()
            assert [SECONDS.sub("in _ s", line) for line in printed] == \
                [SECONDS.sub("in _ s", line) for line in shown], f"{page}: {shlex.join(argv)} prints otherwise"
        ran.append(argv[0])
    print(f"{len(ran)} commands of the docs ran")
    assert len(ran) >= 10
    assert (tmp_path / "runs" / "demo" / "hf" / "config.json").is_file()
