"""PNG plots of a results.json: the fraction of the roofline per op, and the end-to-end figures per system.

matplotlib is optional (the `bench` extra): without it the plots are skipped with a note and the run goes on.
"""
from __future__ import annotations

from pathlib import Path

MISSING = "matplotlib is not installed (pip install matplotlib, or kogpt-fast's bench extra)"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def make_plots(data: dict, out_dir: Path) -> list[str] | dict:
    """Writes the PNGs into out_dir; returns their file names, or {"skipped": why}."""
    plt = _pyplot()
    if plt is None:
        return {"skipped": MISSING}
    written = []
    title = f"{data.get('env', {}).get('device_name') or data.get('env', {}).get('device')}"
    for name, draw in (("ops_roofline.png", _ops_roofline), ("e2e.png", _e2e)):
        try:
            fig = draw(plt, data, title)
        except Exception as e:  # a plot must never cost the run its results
            return {"skipped": f"plotting failed: {type(e).__name__}: {e}", "written": written}
        if fig is not None:
            fig.savefig(Path(out_dir) / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _grid(plt, n: int, width_per: float, height: float):
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width_per * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _grouped_bars(ax, groups: list[str], series: dict[str, dict[str, float]]):
    width = 0.8 / max(len(series), 1)
    for s, (impl, values) in enumerate(series.items()):
        xs = [g + s * width for g in range(len(groups))]
        ax.bar(xs, [values.get(label, 0.0) for label in groups], width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=7)


def _ops_roofline(plt, data, title):
    from .ops import display_order

    records = sorted((r for r in data.get("ops", []) if "fraction_of_roofline" in r), key=display_order)
    if not records:
        return None
    names = list(dict.fromkeys(r["name"] for r in records))
    fig, axes = _grid(plt, len(names), 5.5, 3.6)
    for ax, name in zip(axes, names):
        mine = [r for r in records if r["name"] == name]
        groups = list(dict.fromkeys(" ".join(f"{k}={v}" for k, v in r["params"].items() if k in ("M", "T", "N", "context", "batch"))
                                    for r in mine))
        series: dict[str, dict[str, float]] = {}
        for r in mine:
            group = " ".join(f"{k}={v}" for k, v in r["params"].items() if k in ("M", "T", "N", "context", "batch"))
            impl = r["impl"] + (" (baseline)" if r["is_baseline"] else "")
            series.setdefault(impl, {})[group] = r["fraction_of_roofline"]["value"]
        _grouped_bars(ax, groups, series)
        ax.set_title(f"{name} ({mine[0]['op']})", fontsize=9)
        ax.set_ylabel("fraction of roofline", fontsize=8)
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=6)
    fig.suptitle(f"per-op fraction of the roofline measured in the same run: {title}", fontsize=10)
    fig.tight_layout()
    return fig


def _e2e(plt, data, title):
    records = [r for r in data.get("e2e", []) if "value" in r and r["metric"] != "request_s"]
    if not records:
        return None
    keys = list(dict.fromkeys((r["metric"], tuple(r["params"].items())) for r in records))
    fig, axes = _grid(plt, len(keys), 5.0, 3.4)
    for ax, (metric, params) in zip(axes, keys):
        mine = [r for r in records if r["metric"] == metric and tuple(r["params"].items()) == params]
        ax.bar(range(len(mine)), [r["value"] for r in mine], color=[f"C{i}" for i in range(len(mine))])
        ax.set_xticks(range(len(mine)))
        ax.set_xticklabels([r["system"] for r in mine], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(mine[0]["unit"], fontsize=8)
        ax.set_title(f"{metric}\n" + " ".join(f"{k}={v}" for k, v in params), fontsize=8)
    fig.suptitle(f"end to end, per system: {title}", fontsize=10)
    fig.tight_layout()
    return fig
