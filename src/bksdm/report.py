"""Small helpers for pictures and tables in reports."""

from __future__ import annotations

from PIL import Image


def image_grid(rows: list[list[Image.Image]], pad: int = 2, background=(255, 255, 255), min_size: int = 96) -> Image.Image:
    """Paste rows of equally sized images into one picture (rows top to bottom).

    Images smaller than ``min_size`` are enlarged by an integer factor (nearest neighbour: pixels stay pixels).
    """
    w, h = rows[0][0].size
    k = max(1, min_size // max(w, h))
    if k > 1:
        rows = [[im.resize((w * k, h * k), Image.NEAREST) for im in row] for row in rows]
        w, h = w * k, h * k
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), background)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def markdown_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4f}") -> str:
    columns = columns or list(rows[0])
    fmt = lambda v: floatfmt.format(v) if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
