"""A static, self-contained HTML report: tables, figures (PNG files beside it), text. No network.

rep = Report(out_dir, "weightzoo demo")
rep.section("Models", "One small nnU-Net per task, trained on site A.")
rep.table([{"task": "cord", "Dice": 0.93}], caption="Test Dice")
rep.figure(fig, "loss_curves", caption="Training loss")   # a matplotlib Figure, saved as PNG
rep.write()  # -> out_dir/report.html
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from weightzoo.fileio import atomic_write_bytes

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}
.note{background:#f8f8e8;border-left:4px solid #cc4;padding:.5em 1em}.meta{color:#666;font-size:.85em}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return html.escape(str(v))


class Report:
    """Collects sections, tables and figures; writes `report.html` and `figures/*.png` in `out_dir`."""

    def __init__(self, out_dir: str | Path, title: str):
        self.out_dir = Path(out_dir)
        self.title = title
        self.parts: list[str] = []
        (self.out_dir / "figures").mkdir(parents=True, exist_ok=True)

    def section(self, title: str, text: str = "") -> Report:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")
        if text:
            self.text(text)
        return self

    def text(self, text: str, note: bool = False) -> Report:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")
        return self

    def table(self, rows: list[dict[str, Any]], caption: str = "") -> Report:
        """Rows of dicts; columns are the union of keys in first-seen order."""
        if not rows:
            return self.text(f"{caption}: (no rows)")
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def figure(self, fig: Any, name: str, caption: str = "") -> Path:
        """Save a matplotlib Figure (or copy a PNG path) under figures/ and reference it."""
        path = self.out_dir / "figures" / f"{name}.png"
        if isinstance(fig, (str, Path)):
            atomic_write_bytes(path, Path(fig).read_bytes())
        else:
            import matplotlib.pyplot as plt

            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
        rel = f"figures/{path.name}"
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.parts.append(f'<figure><img src="{rel}" alt="{html.escape(name)}">{cap}</figure>')
        return path

    def write(self, meta: str = "") -> Path:
        meta_html = f'<p class="meta">{html.escape(meta)}</p>' if meta else ""
        doc = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{meta_html}"
            + "\n".join(self.parts)
            + "</body></html>\n"
        )
        return atomic_write_bytes(self.out_dir / "report.html", doc.encode())
