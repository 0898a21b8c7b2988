"""The tables of one GPU pass (`benchmarks/gpu.sh`), from the folder its parts wrote.

    python benchmarks/gpu_summary.py RAW_DIR OUT_DIR [--print]

RAW_DIR holds status.tsv (part, status, exit code, seconds, limit; one line per part run),
env.txt, and each part's log and JSON. Writes OUT_DIR/summary.md (markdown: the parts, then
one table per benchmark, then the last lines of every failed part's log) and
OUT_DIR/summary.json. A part that timed out before writing its JSON still gets the rows it
printed as JSON lines (kernels.py prints one per length and GEMM size). Imports no jax.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path

TITLES = {
    "kernels": "kernel table (benchmarks/kernels.py)",
    "llama_bf16": "llama-1b train step, bf16",
    "llama_fp8": "llama-1b train step, precision.fp8=current",
    "tnl_8k": "tnl-1b train step, T 8192",
    "hgrn2_8k": "hgrn2-1b train step, T 8192",
    "moe": "MoE layer (benchmarks/moe.py)",
    "gpu_tests": "pytest -m gpu",
    "peers_jax": "linear-attention peers in JAX (benchmarks/peers.py)",
    "peers_torch": "fla's kernels (benchmarks/peers_torch.py)",
}
ATTENTION = {"pallas": "lightning kernel", "xla": "XLA chunked", "softmax": "cuDNN flash softmax"}
GLA = {"pallas": "GLA kernel", "xla": "XLA chunked"}
TRAIN_PARTS = ("llama_bf16", "llama_fp8", "tnl_8k", "hgrn2_8k")
GEMM = {"bf16": "bf16", "xla_fp8": "XLA FP8", "pallas_fp8": "Pallas FP8"}
TAIL_LINES = 20


def read_status(raw: Path) -> list[dict]:
    rows = []
    path = raw / "status.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, seconds, limit = (line.split("\t") + [""] * 5)[:5]
        rows.append(
            {"part": name, "status": status, "exit": rc, "seconds": seconds, "limit": limit}
        )
    return rows


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def json_lines(log: Path, first_key: str) -> list[dict]:
    """Rows a script printed as one JSON object per line, starting with `first_key`."""
    rows = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        if line.startswith('{"' + first_key + '"'):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def tail(log: Path, n: int = TAIL_LINES) -> str:
    if not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def kernels_md(data: dict) -> list[str]:
    meta = data.get("meta", {})
    out = []
    if meta:
        note = (
            " Pallas INTERPRETED (CPU): not kernel timings." if meta["pallas_interpreted"] else ""
        )
        s = meta["shape"]
        out.append(
            f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, B{s['B']} H{s['H']} "
            f"K=V={s['K']} {meta['dtype']}, median of {meta['rounds']} rounds; kernel vs XLA "
            f"form RMS ratio {meta['check_rms_ratio']:.2g}.{note}"
        )
        out.append("")
    if data.get("attention"):
        out += _op_table("Lightning attention", data["attention"], ATTENTION, "softmax")
    if data.get("gla"):
        out += _op_table("Gated linear attention (HGRN2's core)", data["gla"], GLA, "xla")
    if data.get("gemm"):
        names = [n for n in GEMM if n in data["gemm"][0]]
        out.append("GEMM n×n×n, TFLOP/s (RMS error vs bf16):")
        out.append("")
        out.append("| n | " + " | ".join(GEMM[n] for n in names) + " |")
        out.append("|---" * (len(names) + 1) + "|")
        for row in data["gemm"]:
            cells = [f"{row[n]['tflops']:.3g} ({row[n]['rms_vs_bf16']:.1e})" for n in names]
            out.append(f"| {row['n']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def peers_md(tables: list[dict]) -> list[str]:
    """One table of peers.py's and peers_torch.py's rows (same shapes and timing), by T."""
    names = [n for t in tables for n in t.get("accuracy", {}) if any(n in r for r in t["rows"])]
    by_T: dict[int, dict] = {}
    for t in tables:
        for row in t["rows"]:
            by_T.setdefault(row["T"], {}).update(row)
    acc = {n: a for t in tables for n, a in t.get("accuracy", {}).items()}

    def cell(r):
        return f"{r['ms']:.2f} ({r['ns_per_token']:.1f})" if "ms" in r else "error"

    out = ["Forward + backward, ms (ns/token); last row: worst RMS ratio vs float32.", ""]
    out.append("| T | " + " | ".join(names) + " |")
    out.append("|---" * (len(names) + 1) + "|")
    for T, row in sorted(by_T.items()):
        out.append(f"| {T} | " + " | ".join(cell(row.get(n, {})) for n in names) + " |")
    out.append("| accuracy | " + " | ".join(f"{acc[n]:.2e}" for n in names) + " |")
    return [*out, ""]


def _op_table(title: str, rows: list[dict], ops: dict, versus: str) -> list[str]:
    """A forward + backward table, ms (ns/token) per op and the ratio `versus` / kernel."""
    out = [f"{title} forward + backward, ms (ns/token):", ""]
    out.append("| T | " + " | ".join(ops.values()) + f" | {ops[versus]} / kernel |")
    out.append("|---" * (len(ops) + 2) + "|")
    for row in rows:
        cells = []
        for op in ops:
            r = row.get(op, {})
            if "ms" in r:
                cells.append(f"{r['ms']:.2f} ({r['ns_per_token']:.1f})")
            elif r.get("error"):
                cells.append("error: " + r["error"][:60].replace("|", "/"))
            else:
                cells.append(f"not run (temp {r.get('temp_bytes', 0) / 2**30:.0f} GiB)")
        vs, pl = row.get(versus, {}).get("ms"), row.get("pallas", {}).get("ms")
        ratio = f"{vs / pl:.2f}" if vs and pl else "-"
        out.append(f"| {row['T']} | " + " | ".join(cells) + f" | {ratio} |")
    return [*out, ""]


TRAIN_HEAD = (
    "| run | preset | T | batch | params M | ms/step | tokens/s | TFLOP/s | MFU | compile s "
    "| temp GiB |"
)


def train_row(part: str, r: dict) -> str:
    labels = {
        "llama_bf16": "bf16",
        "llama_fp8": "fp8 current",
        "tnl_8k": "bf16",
        "hgrn2_8k": "bf16",
    }
    label = labels.get(part, part)
    temp = None if r.get("temp_mib") is None else r["temp_mib"] / 1024
    return (
        f"| {label} | {r['preset']} | {r['seq_len']} | {r['batch']} | {r['params_m']:.4g} "
        f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
        f"| {r['tflops_per_s_per_device']:.3g} | {100 * r['mfu']:.1f}% "
        f"| {r['compile_s']:.1f} | {_f(temp, '.3g')} |"
    )


def moe_md(data: dict) -> list[str]:
    a = data["args"]
    out = [
        f"{data['device']} ({data['backend']}), {a['tokens']} tokens, D {a['d_model']}, "
        f"E {a['experts']} top-{a['top_k']}, F {a['expert_d_ff']}, {a['dtype']}, "
        "forward + backward:",
        "",
        "| layer | ms | tokens/s | active TFLOP/s | of the dense FLOP rate |",
        "|---|---|---|---|---|",
    ]
    dense = data["rows"][-1]["active_tflops"]
    for r in data["rows"]:
        out.append(
            f"| {r['layer']} | {r['ms']:.2f} | {r['tokens_per_s']:,.0f} "
            f"| {r['active_tflops']:.4g} | {100 * r['active_tflops'] / dense:.0f}% |"
        )
    out.append("")
    return out


def tests_result(xml: Path) -> dict | None:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    res = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    res["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    res["failed"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return res


def summarize(raw: Path) -> tuple[str, dict]:
    parts = read_status(raw)
    env = (raw / "env.txt").read_text().splitlines() if (raw / "env.txt").exists() else []
    results: dict = {}
    md = ["# GPU pass (benchmarks/gpu.sh)", ""]
    md += [f"    {line}" for line in env] + [""]
    md += ["| # | part | status | exit | s / limit |", "|---|---|---|---|---|"]
    for i, p in enumerate(parts, 1):
        md.append(
            f"| {i} | {p['part']}: {TITLES.get(p['part'], '')} | {p['status']} | {p['exit']} "
            f"| {p['seconds']} / {p['limit']} |"
        )
    md.append("")
    done = {p["part"] for p in parts}

    if "kernels" in done:
        data = read_json(raw / "kernels.json")
        if data is None:  # timed out or failed: the rows it printed so far
            by_T = json_lines(raw / "kernels.log", "T")
            data = {
                # Lightning rows time softmax attention beside the kernel; GLA rows do not.
                "attention": [r for r in by_T if "softmax" in r],
                "gla": [r for r in by_T if "softmax" not in r],
                "gemm": json_lines(raw / "kernels.log", "n"),
            }
        results["kernels"] = data
        if data.get("attention") or data.get("gla") or data.get("gemm"):
            md += ["## Kernels", "", *kernels_md(data)]

    train = []
    for part in TRAIN_PARTS:
        data = read_json(raw / f"{part}.json") if part in done else None
        if data:
            results[part] = data
            train += [train_row(part, r) for r in data]
    if train:
        first = next(results[p][0] for p in TRAIN_PARTS if p in results)
        md += ["## Train steps", ""]
        md += [
            f"{first['device']} × {first['n_devices']}; MFU against "
            f"{first['peak_tflops']:.4g} TFLOP/s ({first['peak_source']}), bf16 peak for the "
            "FP8 run too; median step of the timed steps.",
            "",
            TRAIN_HEAD,
            "|---" * 11 + "|",
            *train,
            "",
        ]

    if "moe" in done:
        data = read_json(raw / "moe.json")
        if data:
            results["moe"] = data
            md += ["## MoE layer", "", *moe_md(data)]

    peers = [read_json(raw / f"{p}.json") for p in ("peers_jax", "peers_torch") if p in done]
    peers = [p for p in peers if p]
    if peers:
        results["peers"] = peers
        md += ["## Linear-attention peers", "", *peers_md(peers)]

    if "gpu_tests" in done:
        res = tests_result(raw / "gpu_tests.xml")
        if res:
            results["gpu_tests"] = res
            md += [
                "## GPU tests",
                "",
                f"{res['tests']} collected, {res['failures']} failed, {res['errors']} errors, "
                f"{res['skipped']} skipped.",
                *[f"- failed: `{name}`" for name in res["failed"]],
                "",
            ]

    bad = [p for p in parts if p["status"] not in ("ok", "none", "skipped")]
    if bad:
        md += ["## Failed parts: the last lines of their logs", ""]
        for p in bad:
            md += [
                f"### {p['part']}: {p['status']} (exit {p['exit']})",
                "",
                "```",
                tail(raw / f"{p['part']}.log"),
                "```",
                "",
            ]
    return "\n".join(md), {"env": env, "parts": parts, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--print", action="store_true", help="also print summary.md")
    args = ap.parse_args()
    md, data = summarize(args.raw)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(md)
    (args.out / "summary.json").write_text(json.dumps(data, indent=1))
    if args.print:
        print(md)


if __name__ == "__main__":
    main()
