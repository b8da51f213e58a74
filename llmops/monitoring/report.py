"""The drift report: one self-contained HTML page with the checks table, token-length histograms and the unigrams
that moved most."""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llmops.monitoring.drift import MonitorResult


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def render_report(result: MonitorResult, reference: dict[str, Any], stats: dict[str, Any]) -> str:
    """A self-contained HTML page: the checks table, token-length histograms, and the unigrams that moved most."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.asarray(reference["doc_length_bin_edges"])
    ref_h = np.asarray(reference["doc_length_histogram"], dtype=float)
    new_h = np.asarray(stats["doc_length_histogram"], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 3))
    centers = np.sqrt(edges[:-1] * edges[1:])
    ax.step(centers, ref_h / max(ref_h.sum(), 1), where="mid", label=f"reference ({int(ref_h.sum())} docs)")
    ax.step(centers, new_h / max(new_h.sum(), 1), where="mid", label=f"batch ({int(new_h.sum())} docs)")
    ax.set(xscale="log", xlabel="document length (tokens)", ylabel="share of documents", title="Token-length distribution")
    ax.legend()
    length_png = _png(fig)

    ref_u = np.asarray(reference["unigram_counts"], dtype=float)
    new_u = np.asarray(stats["unigram_counts"], dtype=float)
    p, q = ref_u / max(ref_u.sum(), 1), new_u / max(new_u.sum(), 1)
    top = np.argsort(-np.abs(q - p))[:20]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(np.arange(len(top)) - 0.2, p[top], height=0.4, label="reference")
    ax.barh(np.arange(len(top)) + 0.2, q[top], height=0.4, label="batch")
    ax.set_yticks(np.arange(len(top)), [f"id {i}" for i in top])
    ax.invert_yaxis()
    ax.set(xlabel="share of tokens", title="Unigrams that moved most")
    ax.legend()
    unigram_png = _png(fig)

    rows = "".join(
        f"<tr class='{'bad' if c.flagged else 'ok'}'><td>{c.name}</td><td>{'n/a' if math.isnan(c.score) else f'{c.score:.4f}'}</td>"
        f"<td>{'&le;' if c.kind == 'max' else '&ge;'} {c.threshold}</td><td>{'FLAGGED' if c.flagged else 'ok'}</td><td>{html.escape(c.note)}</td></tr>"
        for c in result.checks
    )
    info = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>" for k, v in result.info.items())
    verdict = "DRIFT" if result.drift else "no drift"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>llmops drift report {result.batch_id}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em}}
tr.bad td{{background:#fdd}}tr.ok td:nth-child(4){{color:#070}}</style></head><body>
<h1>Drift report: {verdict}</h1>
<p>batch <code>{html.escape(result.batch)}</code> (id {result.batch_id}); model scored: {html.escape(result.model)}</p>
<table><tr><th>check</th><th>score</th><th>threshold</th><th>verdict</th><th>note</th></tr>{rows}</table>
<h2>Token lengths</h2><img src="data:image/png;base64,{length_png}">
<h2>Unigrams</h2><img src="data:image/png;base64,{unigram_png}">
<h2>Counts and timings</h2><table>{info}</table>
</body></html>"""
