"""The sweep's outputs in its run directory, each written atomically.

``results.csv`` and ``results.json`` (one row per schedule), ``pareto.png`` (reward vs diversity, one panel per
reward, :func:`rdt_lib.evaluation.pareto.pareto_figure`), ``grids/<schedule>.png`` (rows = the first
``report.grid_prompts`` prompts, columns = the seeds; the same prompts and seeds for every schedule),
``sweep.toml`` (the resolved configuration) and ``report.html``, which shows the plot, the table and the grids
through relative links (the folder can be moved or served as it is).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import torch

from ..atomic_io import write_text_atomic
from ..images import image_grid, write_png
from ..evaluation.pareto import pareto_figure, pareto_front, save_figure
from .config import SCHEMA, EvalConfig

__all__ = ["write_outputs", "grid_file_name"]


def grid_file_name(schedule: str) -> str:
    """``"switch@0.5"`` -> ``"switch_0.5.png"`` (letters, digits, dots; other runs of characters -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", schedule).strip("_") + ".png"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def write_outputs(run_dir: Path, config: EvalConfig, rows: list[dict[str, Any]], rewards: Sequence[str],
                  prompts: Sequence[str], seeds: Sequence[int], images_of: Sequence[torch.Tensor],
                  timings: dict[str, float]) -> dict[str, Path]:
    """Write every output (see the module docstring); returns their paths by name."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    columns = list(rows[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    out["csv"] = write_text_atomic(run_dir / "results.csv", buf.getvalue())
    summary = {"rows": rows, "rewards": list(rewards), "prompts": list(prompts), "seeds": list(seeds),
               "timings_seconds": timings, "config": SCHEMA.config_to_dict(config)}
    out["json"] = write_text_atomic(run_dir / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    out["config"] = write_text_atomic(run_dir / "sweep.toml", SCHEMA.to_toml(config))

    title = config.report.title or f"{Path(config.model.path).name} vs {Path(config.tuned.path).name or 'base'}"
    diversity = "diversity" if all("diversity" in r for r in rows) else None
    front: list[bool] = [False] * len(rows)
    if diversity and rewards:
        fig = pareto_figure(rows, rewards=list(rewards), diversity=diversity, title=title)
        out["pareto"] = save_figure(fig, run_dir / "pareto.png")
        pts = [(r[diversity], *(r[k] for k in rewards)) for r in rows]
        if all(math.isfinite(v) for p in pts for v in p):
            front = pareto_front(pts)

    n_rows = min(config.report.grid_prompts, len(prompts))
    per = len(seeds)
    grids = []
    for row, images in zip(rows, images_of):
        path = run_dir / "grids" / grid_file_name(row["name"])
        write_png(path, image_grid(images[:n_rows * per], n_rows, per, pad=2))
        grids.append(path)
    out["grids"] = run_dir / "grids"
    out["report"] = write_text_atomic(run_dir / "report.html",
                                      _report_html(title, rows, columns, front, grids, run_dir, prompts[:n_rows],
                                                   seeds, "pareto" in out))
    return out


def _report_html(title: str, rows: list[dict[str, Any]], columns: list[str], front: list[bool], grids: list[Path],
                 run_dir: Path, prompts: Sequence[str], seeds: Sequence[int], has_plot: bool) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "<th>on the front</th>"
    body = "\n".join(
        "<tr>" + "".join(f"<td>{_fmt(r[c])}</td>" for c in columns) + f"<td>{'yes' if f else ''}</td></tr>"
        for r, f in zip(rows, front))
    prompt_list = "".join(f"<li>{html.escape(p)}</li>" for p in prompts)
    grid_html = "\n".join(
        f'<figure><figcaption>{html.escape(r["name"])}</figcaption>'
        f'<a href="{html.escape(g.relative_to(run_dir).as_posix())}"><img class="grid" alt="grid {html.escape(r["name"])}" '
        f'src="{html.escape(g.relative_to(run_dir).as_posix())}"></a></figure>'
        for r, g in zip(rows, grids))
    plot = ('<h2>Reward vs diversity</h2><img id="pareto" alt="Pareto plot" src="pareto.png">' if has_plot else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
img.grid {{ image-rendering: pixelated; min-width: 256px; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; vertical-align: top; }}
#pareto {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{plot}
<h2>Results (one row per schedule)</h2>
<table><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table>
<p>Files: <a href="results.csv">results.csv</a>, <a href="results.json">results.json</a>,
<a href="sweep.toml">sweep.toml</a></p>
<h2>Images</h2>
<p>Rows: the prompts below; columns: seeds {", ".join(str(s) for s in seeds)}. Every schedule uses the same
prompts and seeds.</p>
<ol>{prompt_list}</ol>
{grid_html}
</body></html>
"""
