"""The docs run: every command in a block marked `bash runnable` (README.md, then docs/*.md by name) runs, in
order, in one scratch folder, as a user would type it, with small overrides appended (a tiny model, two steps,
a few documents), so that no page drifts from the code."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, TINY

RUNNABLE = re.compile(r"^```bash runnable\n(.*?)^```", re.S | re.M)
# Appended to each command (later overrides win in Hydra): the layout a command asks for stays its own.
SMALL = {
    "trident-train": [o for o in TINY if not o.startswith(("parallel.", "launcher."))]
    + ["train.steps=2", "train.eval_every=0"],
    "trident-generate": ["generate.max_new_tokens=4"],
    "trident-eval": ["eval.limit=2", "eval.batch_size=2"],
}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of each command in the runnable blocks, continuation lines joined, comments dropped."""
    out = []
    for page in PAGES:
        for block in RUNNABLE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv:
                    out.append((page.relative_to(ROOT).as_posix(), argv))
    return out


def test_the_docs_mark_the_tour_runnable():
    commands = runnable_commands()
    assert [argv[0] for _, argv in commands if _ == "README.md"] == [
        "trident-train", "trident-plan", "trident-generate", "trident-eval", "trident-export", "trident-status"]


def test_every_runnable_command_in_the_docs_runs(tmp_path):
    scripts = Path(sys.executable).parent
    ran = []
    for page, argv in runnable_commands():
        cmd = [str(scripts / argv[0]), *argv[1:], *SMALL.get(argv[0], [])]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                              env={"PATH": f"{scripts}:/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
                                   "HOME": str(tmp_path), "WANDB_MODE": "disabled"})
        assert done.returncode == 0, f"{page}: {shlex.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(argv[0])
    assert len(ran) >= 6
    assert (tmp_path / "runs" / "demo" / "hf" / "config.json").is_file()
