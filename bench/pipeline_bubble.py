"""The pipeline bubble of every schedule, simulated from its action lists, against theory.

    .venv/bin/python bench/pipeline_bubble.py [--pp 4] [--png DIR]

Prints JSON: for each schedule and m in {4, 8, 16}, the simulated idle
fraction with unit costs (F=1, B=2, split backward I=1 + W=1) and the
analytic value where theory gives one. With --png, writes one timeline
picture per schedule at m=8 (rows: pp ranks; blue F, green B, light green
I, orange W, white idle; the brighter shade of a colour is the first stage
a rank holds, the darker its second).
"""

import argparse
import json
import struct
import sys
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.planner.bubble import analytic_bubble, pipeline_orders, simulate  # noqa: E402
from parallel.pipeline_parallel import SCHEDULES  # noqa: E402

COLOURS = {"F": (66, 110, 220), "B": (40, 160, 70), "I": (120, 200, 120), "W": (240, 150, 40)}


def write_png(path: Path, pixels: list[list[tuple]]) -> None:
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)
    chunk = lambda tag, data: struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def render(result: dict, pp: int, scale: int = 12, row_h: int = 28, gap: int = 6) -> list[list[tuple]]:
    width = int(result["makespan"] * scale) + 2
    height = pp * (row_h + gap) + gap
    img = [[(255, 255, 255)] * width for _ in range(height)]
    for rank, ops in result["timeline"].items():
        top = gap + rank * (row_h + gap)
        first_stage = min(op.stage for _, _, op in ops)
        for start, end, op in ops:
            colour = COLOURS[op.kind]
            if op.stage != first_stage:
                colour = tuple(int(c * 0.6) for c in colour)
            x0, x1 = int(start * scale) + 1, int(end * scale)
            for y in range(top, top + row_h):
                row = img[y]
                for x in range(x0, x1):
                    row[x] = colour
        for y in (top - 1, top + row_h):  # thin frame per rank
            img[y] = [(200, 200, 200) if px == (255, 255, 255) else px for px in img[y]]
    return img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    out = {"pp": args.pp, "costs": {"F": 1, "B": 2, "I": 1, "W": 1}, "schedules": {}}
    for name in SCHEDULES:
        rows = {}
        for m in (4, 8, 16):
            try:
                orders, n_stages = pipeline_orders(name, args.pp, m)
            except ValueError as e:  # e.g. DualPipeV with fewer micro-batches than stages
                rows[m] = {"error": str(e)}
                continue
            result = simulate(orders, n_stages)
            theory = analytic_bubble(name, args.pp, m, n_stages // args.pp)
            rows[m] = {
                "stages": n_stages,
                "simulated": round(result["bubble"], 6),
                "analytic": None if theory is None else round(theory, 6),
                "makespan": result["makespan"],
            }
            if args.png and m == 8:
                args.png.mkdir(parents=True, exist_ok=True)
                write_png(args.png / f"{name}-pp{args.pp}-m{m}.png", render(result, args.pp))
        out["schedules"][name] = rows
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
