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


def markdown_to_html(markdown: str, folder, title: str = "report") -> str:
    """A self-contained HTML page from the Markdown subset our reports use (headings, paragraphs, lists, pipe
    tables, ``![alt](file)`` images, ``code``, **bold**); images under ``folder`` are inlined as data URIs."""
    import base64
    import html
    import re
    from pathlib import Path

    def inline(text: str) -> str:
        def image(m):
            path = Path(folder) / m.group(2)
            if not path.is_file():
                return html.escape(m.group(0))
            data = base64.b64encode(path.read_bytes()).decode()
            return f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}">'

        out = []
        for part in re.split(r"(!\[[^\]]*\]\([^)]+\))", text):
            m = re.fullmatch(r"!\[([^\]]*)\]\(([^)]+)\)", part)
            if m:
                out.append(image(m))
                continue
            part = html.escape(part)
            part = re.sub(r"`([^`]+)`", r"<code>\1</code>", part)
            part = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", part)
            out.append(re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', part))
        return "".join(out)

    body, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                    rows.append(cells)
                i += 1
            head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
            rest = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rest}</tbody></table>")
            continue
        elif re.match(r"^(- |\d+\. )", line):
            tag = "ul" if line.startswith("- ") else "ol"
            items = []
            while i < len(lines) and re.match(r"^(- |\d+\. )", lines[i]):
                item = re.sub(r"^(- |\d+\. )", "", lines[i])
                items.append(f"<li>{inline(item)}</li>")
                i += 1
            body.append(f"<{tag}>{''.join(items)}</{tag}>")
            continue
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%;image-rendering:pixelated}code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
