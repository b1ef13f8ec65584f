"""results.json (written after every record, so a run cut short keeps what it measured), the terminal table,
and the compact summary that bench/gpu_check.sh prints."""
from __future__ import annotations

import json
import os
from pathlib import Path

SCHEMA = 1


class Results:
    def __init__(self, out_dir: Path, header: dict):
        self.path = Path(out_dir) / "results.json"
        self.data = {"schema": SCHEMA, **header, "peaks": None, "ops": [], "e2e": [], "e2e_info": None,
                     "plots": None, "finished": False}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def add(self, section: str, record: dict) -> None:
        self.data[section].append(record)
        self.save()


def _fmt(x, digits=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, dict):
        x = x.get("value")
        if x is None:
            return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def ops_table(data: dict) -> str:
    from .ops import display_order

    rows, missing = [], []
    for r in sorted(data.get("ops", []), key=display_order):
        if "time" not in r:
            missing.append(f"not measured: {r['label']} [{r['impl']}]: {r.get('error') or r.get('skipped')}")
            continue
        diff = r.get("max_diff_vs_torch")
        rows.append([
            r["label"], r["impl"] + (" (baseline)" if r["is_baseline"] else ""),
            _fmt(r["time"]), _fmt(r["bandwidth"]), _fmt(r["throughput"]),
            _pct(r["fraction_of_copy_bandwidth"]), _pct(r["fraction_of_matmul_peak"]),
            _pct(r["fraction_of_roofline"]),
            "" if r["is_baseline"] or not r.get("speedup_vs_baseline") else f"{r['speedup_vs_baseline']['value']:.2f}x",
            "" if not diff else f"{diff['value']:.2g}",
        ])
    if not rows and not missing:
        return ""
    table = _table(rows, ["op", "impl", "us", "TB/s", "TFLOP/s", "%copy", "%mm", "%roof", "vs base", "diff"]) if rows else ""
    return "\n".join([table] + missing)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x['value']:.0f}%"


def _params(p: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


def e2e_table(data: dict) -> str:
    rows, missing = [], []
    for r in data.get("e2e", []):
        if "value" not in r:
            missing.append(f"not measured: {r.get('kind')} {_params(r['params'])} [{r['system']}]: "
                           f"{r.get('error') or r.get('skipped')}")
            continue
        if r["metric"] == "request_s":
            continue
        base = r.get("baselines", {})
        higher_is_better = r["unit"] == "tokens/s"

        def vs(name):
            if name not in base:
                return ""
            ratio = r["value"] / base[name]["value"] if higher_is_better else base[name]["value"] / r["value"]
            return f"{ratio:.2f}x"

        compiled = "pytorch-compiled" if "pytorch-compiled" in base else "pytorch-static"
        rows.append([r["metric"], _params(r["params"]), r["system"], f"{_fmt(r['value'], 4)} {r['unit']}",
                     vs("hf-eager"), vs(compiled), _pct(r.get("fraction_of_floor"))])
    if not rows and not missing:
        return ""
    table = _table(rows, ["metric", "case", "system", "value", "vs hf-eager", "vs compiled", "%floor"]) if rows else ""
    return "\n".join([table] + missing)


def header_lines(data: dict) -> list[str]:
    env = data.get("env", {})
    lines = [f"device: {env.get('device_name', env.get('device'))}  driver {env.get('driver')}  "
             f"torch {env.get('torch')}  triton {env.get('triton')}  transformers {env.get('transformers')}  "
             f"commit {env.get('git_commit')}"]
    peaks = data.get("peaks")
    if peaks:
        lines.append(f"measured peaks: copy {_fmt(peaks['copy_bandwidth'])} TB/s, "
                     f"matmul {_fmt(peaks['matmul_peak'])} TFLOP/s ({peaks['matmul_peak']['how']})")
    backends = data.get("backends", {})
    lines.append("backends: " + ", ".join(
        f"{name} ({'runs' if b['runnable'] else 'not runnable: ' + b['reason']})" for name, b in backends.items()))
    return lines


def full_report(data: dict) -> str:
    parts = header_lines(data)
    ops = ops_table(data)
    if ops:
        parts += ["", "per-op (median of cold-input runs; %roof = roofline time / measured time)", ops]
    e2e = e2e_table(data)
    if e2e:
        parts += ["", "end to end", e2e]
    info = data.get("e2e_info") or {}
    for shape, cfg in (info.get("gemv_tuned") or {}).items():
        parts.append(f"Triton GEMV tiles tuned on this card: {shape}: {cfg}")
    for s in info.get("skipped_systems", []):
        parts.append(f"skipped system {s['system']}: {s['reason']}")
    for a in info.get("token_agreement", []):
        parts.append(f"tokens: {a['system']} shares its first {a['common_prefix_tokens']}/{a['new_tokens']} new tokens "
                     f"with {a['reference']} ({_params(a['params'])})")
    serving = data.get("serving")
    if serving:
        from .serving import format_row

        parts += ["", "serving (bench/serving.py)"] + [format_row(r) for r in serving["results"]]
        for rate, ratios in serving["ratios"].items():
            parts.append(f"  engine / other, rate {rate}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    plots = data.get("plots")
    if isinstance(plots, dict) and plots.get("skipped"):
        parts.append(f"plots skipped: {plots['skipped']}")
    elif plots:
        parts.append("plots: " + ", ".join(plots))
    return "\n".join(parts)


def summary(data: dict) -> str:
    """A few lines: the headline per-op and end-to-end figures, each next to its baseline, and the failures."""
    lines = header_lines(data)
    lines.append("per op: impl time fraction-of-roofline (decode-shaped projections and attention; all in results.json)")
    best: dict[str, dict] = {}
    for r in data.get("ops", []):
        if "time" in r:
            best.setdefault(r["label"], {})[r["impl"]] = r
    for label, impls in best.items():
        r0 = next(iter(impls.values()))
        if not (r0["op"] in ("prefill_attention", "extend_attention", "decode_attention") or r0["params"].get("M") == 1):
            continue  # the summary keeps decode-shaped projections and the attention kernels
        cells = [f"{impl} {_fmt(r['time'])}us {_pct(r['fraction_of_roofline'])}" for impl, r in impls.items()]
        lines.append(f"  {label}: " + " | ".join(cells))
    by_case: dict[str, list[str]] = {}
    for r in data.get("e2e", []):
        if "value" in r and r["metric"] != "request_s":
            key = f"{r['metric']} [{r['unit']}] ({_params(r['params'])})"
            floor = f" ({_pct(r['fraction_of_floor'])} of the floor)" if r.get("fraction_of_floor") else ""
            if r.get("vs_dense_weights"):
                floor += f" ({_fmt(r['vs_dense_weights'], 3)}x {r['vs_dense_weights']['system']})"
            by_case.setdefault(key, []).append(f"{r['system']} {_fmt(r['value'], 4)}{floor}")
    floor = (data.get("e2e_info") or {}).get("floor")
    if floor:
        lines.append(f"decode floor: {floor['weight_bytes_per_token'] / 1e9:.2f} GB of weights a token at the measured "
                     f"copy rate = {_fmt(floor['floor_ms_per_token'], 4)} ms/token")
    if by_case:
        lines.append("end to end:")
    for key, cells in by_case.items():
        lines.append(f"  {key}: " + " | ".join(cells))
    failures = [r for r in data.get("ops", []) + data.get("e2e", []) if "error" in r]
    for r in failures[:10]:
        lines.append(f"  ERROR {r.get('label') or r.get('kind')} {r.get('impl') or r.get('system')}: {r['error']}")
    if len(failures) > 10:
        lines.append(f"  ... {len(failures) - 10} more errors in results.json")
    skipped = [r for r in data.get("ops", []) + data.get("e2e", []) if "skipped" in r]
    if skipped:
        lines.append(f"  {len(skipped)} cases skipped (see results.json)")
    if not data.get("finished"):
        lines.append("  the run did not finish: these are the results it had written")
    return "\n".join(lines)
