"""A pipeline schedule's timeline as a picture: one row per pp rank, time to the right.

Blue F (forward), green B (backward), light green I and orange W (a zero-bubble schedule's split backward:
input gradients, then weight gradients), white idle; the brighter shade of a colour is the first stage a rank
holds, the darker its second. The times are the simulation's (orchestrator/planner/bubble.py: unit costs
F=1, B=2, I=W=1), so the picture shows the schedule's shape and bubble, not measured durations.
"""

from pathlib import Path

from PIL import Image, ImageDraw

from orchestrator.planner.bubble import pipeline_orders, simulate

COLOURS = {"F": (66, 110, 220), "B": (40, 160, 70), "I": (120, 200, 120), "W": (240, 150, 40)}


def draw(result: dict, pp: int, scale: int = 12, row_h: int = 28, gap: int = 6) -> Image.Image:
    """The picture of a simulated timeline (`simulate`'s result) of pp ranks."""
    width = int(result["makespan"] * scale) + 2
    img = Image.new("RGB", (width, pp * (row_h + gap) + gap), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for rank, ops in result["timeline"].items():
        top = gap + rank * (row_h + gap)
        pen.rectangle([0, top - 1, width - 1, top + row_h], outline=(200, 200, 200))  # a thin frame per rank
        first_stage = min(op.stage for _, _, op in ops)
        for start, end, op in ops:
            colour = COLOURS[op.kind]
            if op.stage != first_stage:
                colour = tuple(int(c * 0.6) for c in colour)
            x0, x1 = int(start * scale) + 1, int(end * scale)
            if x1 > x0:
                pen.rectangle([x0, top, x1 - 1, top + row_h - 1], fill=colour)
    return img


def schedule_png(path: Path, schedule: str, pp: int, microbatches: int, stages_per_rank=None) -> dict:
    """Simulate the schedule at `microbatches` per step and write its timeline to path; the simulation."""
    orders, n_stages = pipeline_orders(schedule, pp, microbatches, stages_per_rank)
    result = simulate(orders, n_stages)
    draw(result, pp).save(path, format="PNG")
    return result
