"""A self-contained HTML report of a run folder, with its figures embedded."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

REPORT_FILE = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f3f3f3; }
td:first-child, td:nth-child(2) { text-align: left; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; }
pre { background: #f7f7f7; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
"""


def _markdown_table(text: str) -> str:
    """Render the pipe tables and paragraphs of a results Markdown file as HTML."""
    parts: list[str] = []
    rows: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if not all(set(cell) <= {"-", ":"} for cell in cells):
                rows.append(cells)
            continue
        if rows:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in rows[1:]
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            rows = []
        if line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")

    return "\n".join(parts)


def _rounded(value: str) -> str:
    """Show a number with six significant digits; leave anything else as it is."""
    try:
        return f"{float(value):.6g}"
    except ValueError:
        return value


def _pairs_table(title: str, pairs: list[tuple[str, str]]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_rounded(v))}</td></tr>" for k, v in pairs
    )

    return f"<h2>{html.escape(title)}</h2><table><tbody>{cells}</tbody></table>"


def _metrics_table(path: Path) -> str:
    """The last epoch of a metrics CSV."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        return ""

    return _pairs_table(
        "Last epoch", list(zip(lines[0].split(","), lines[-1].split(","), strict=False))
    )


def write(folder: str | Path) -> Path:
    """Write ``report.html`` into a run folder of ``reproduce`` or ``train``; return its path.

    The page holds the results table (``results.md``) or the run's summary and the last epoch
    of ``metrics.csv``,
    every PNG figure of the folder embedded as data, and the settings that made the run.

    Raises:
        FileNotFoundError: when the folder does not exist or holds nothing to report.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")

    sections = []
    if (folder / "results.md").is_file():
        sections.append("<h2>Results</h2>" + _markdown_table((folder / "results.md").read_text()))
    if (folder / "summary.json").is_file():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{folder / 'summary.json'}: not readable JSON ({error})") from None
        pairs = [(key, str(value)) for key, value in summary.items()]
        sections.append(_pairs_table("Training run (best epoch)", pairs))
    if (folder / "metrics.csv").is_file():
        sections.append(_metrics_table(folder / "metrics.csv"))
    figures = sorted(folder.glob("*.png"))
    for figure in figures:
        data = base64.b64encode(figure.read_bytes()).decode("ascii")
        sections.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(figure.stem)}">'
            f"<figcaption>{html.escape(figure.name)}</figcaption></figure>"
        )
    for name in ("settings.json", "results.json"):
        path = folder / name
        if path.is_file():
            settings = json.loads(path.read_text())
            if name == "results.json":
                settings = {"recipe": settings.get("recipe"), "seeds": settings.get("seeds")}
            sections.append(
                f"<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=2))}</pre>"
            )
    if not sections:
        raise FileNotFoundError(f"{folder}: holds no results, metrics or figures to report")

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>exactflow report: {html.escape(folder.name)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>exactflow report: {html.escape(folder.name)}</h1>"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    path = folder / REPORT_FILE
    path.write_text(page, encoding="utf-8")

    return path
