"""The drift report: one self-contained HTML page with the checks table, token-length histograms, the unigrams
that moved most (shown as the tokens they are) and, for tracked checks, each score over the batches checked so far."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llmops.monitoring.drift import MonitorResult


def _png_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _png(fig: Any) -> str:
    return base64.b64encode(_png_bytes(fig)).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def token_label(tokenizer: Any, token_id: int) -> str:
    """A token as the text it stands for, quoted so spaces and newlines show (`' def'`, `'\\n    '`)."""
    return repr(tokenizer.decode([token_id]))


def history_png(history: list[dict[str, Any]]) -> bytes:
    """One panel per check: its score at each tracked check (x = the ledger's step), the threshold dashed, flagged
    points red. `history` is the ledger's `batches` list, oldest first."""
    plt = _pyplot()
    names = [n for n in history[-1]["scores"] if any(e["scores"].get(n) is not None for e in history)]
    fig, axes = plt.subplots(len(names) or 1, 1, figsize=(7, 1.6 * max(len(names), 1)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=False):
        points = [(e["step"], e["scores"][name], name in e["flagged"]) for e in history if e["scores"].get(name) is not None]
        steps, values, _ = zip(*points, strict=True)
        ax.plot(steps, values, marker="o", markersize=3, color="tab:blue")
        ax.scatter([s for s, _, f in points if f], [v for _, v, f in points if f], color="tab:red", zorder=3)
        ax.axhline(history[-1]["thresholds"][name], linestyle="--", color="grey", linewidth=1)
        ax.set_ylabel(name, rotation=0, ha="right", fontsize=8)
    axes[-1, 0].set_xlabel("batch (ledger step)")
    fig.suptitle("Drift scores over the batches checked (dashed: threshold, red: flagged)", fontsize=9)
    return _png_bytes(fig)


def render_report(
    result: MonitorResult, reference: dict[str, Any], stats: dict[str, Any], token_label: Callable[[int], str], history: bytes | None = None
) -> str:
    """A self-contained HTML page: the checks table, token-length histograms, the unigrams that moved most (labelled by
    `token_label`, which turns a token id into the text it stands for) and the score history PNG when given."""
    import html

    plt = _pyplot()

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
    labels = [token_label(int(i)) for i in top]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(np.arange(len(top)) - 0.2, p[top], height=0.4, label="reference")
    ax.barh(np.arange(len(top)) + 0.2, q[top], height=0.4, label="batch")
    ax.set_yticks(np.arange(len(top)), labels)
    ax.invert_yaxis()
    ax.set(xlabel="share of tokens", title="Tokens whose share moved most")
    ax.legend()
    unigram_png = _png(fig)
    moved = "".join(
        f"<tr><td><code>{html.escape(label)}</code></td><td>{int(i)}</td><td>{p[i]:.4%}</td><td>{q[i]:.4%}</td></tr>" for label, i in zip(labels, top, strict=True)
    )

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
<h2>Tokens whose share moved most</h2><img src="data:image/png;base64,{unigram_png}">
<table><tr><th>token</th><th>id</th><th>share in reference</th><th>share in batch</th></tr>{moved}</table>
{f'<h2>Scores over time</h2><img src="data:image/png;base64,{base64.b64encode(history).decode()}">' if history else ""}
<h2>Counts and timings</h2><table>{info}</table>
</body></html>"""
