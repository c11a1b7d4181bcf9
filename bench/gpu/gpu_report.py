#!/usr/bin/env python3
"""Builds the GPU benchmark report from one GPU session's outputs.

Inputs: Google Benchmark JSON of bench/cuda/quant_bench.cu (qmem, with the same-run copy roofline)
and peer_bench.py's anchors.json (bitsandbytes, torch; measured in the same session).
Outputs: a Markdown section (side-by-side table qmem / bitsandbytes / roofline, then every block
size) and an SVG bar chart of each kernel's % of the copy roofline. Plain Python, no packages.

  gpu_report.py --bench quant_bench.json [--anchors anchors.json] --md report.md --svg chart.svg
"""
import argparse
import json
import os


def load(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def qmem_rows(bench):
    rows = {}
    for b in bench.get("benchmarks", []):
        if b.get("run_type", "iteration") != "iteration":
            continue
        rows[b["name"].replace("/manual_time", "")] = b
    return rows


def ms(b):
    # manual time, reported in milliseconds (Unit(kMillisecond))
    return b["real_time"] if b.get("time_unit") == "ms" else b["real_time"] / 1e6


# (label, qmem benchmark name, anchors key, anchors field)
PAIRS = [
    ("NF4 quantize, bf16 in, block 64", "nf4_quantize_bf16/64", "bnb_nf4_bs64", "quant_ms"),
    ("NF4 dequantize to bf16, block 64", "nf4_dequantize_bf16/64", "bnb_nf4_bs64", "dequant_ms"),
    ("NF4 quantize + double quant", "nf4_quantize_bf16_dq/64", "bnb_nf4_bs64_dq", "quant_ms"),
    ("NF4 dequantize, double quant", "nf4_dequantize_bf16_dq/64", "bnb_nf4_bs64_dq", "dequant_ms"),
    ("FP4 quantize, bf16 in, block 64", "fp4_quantize_bf16/64", "bnb_fp4_bs64", "quant_ms"),
    ("FP4 dequantize to bf16, block 64", "fp4_dequantize_bf16/64", "bnb_fp4_bs64", "dequant_ms"),
    ("FP4 quantize + double quant", "fp4_quantize_bf16_dq/64", "bnb_fp4_bs64_dq", "quant_ms"),
    ("FP4 dequantize, double quant", "fp4_dequantize_bf16_dq/64", "bnb_fp4_bs64_dq", "dequant_ms"),
    ("int8 dynamic quantize, fp32 in, block 256", "int8_quantize_f32/256",
     "bnb_int8_dynamic_bs256_fp32", "quant_ms"),
    ("int8 dynamic dequantize to fp32, block 256", "int8_dequantize_f32/256",
     "bnb_int8_dynamic_bs256_fp32", "dequant_ms"),
    ("int8 dynamic quantize, fp32 in, block 4096", "int8_quantize_f32/4096",
     "bnb_int8_dynamic_bs4096_fp32", "quant_ms"),
    ("int8 dynamic dequantize to fp32, block 4096", "int8_dequantize_f32/4096",
     "bnb_int8_dynamic_bs4096_fp32", "dequant_ms"),
    ("int8 quantize + double quant, block 256", "int8_quantize_f32_dq/256", None, None),
    ("int8 dequantize, double quant, block 256", "int8_dequantize_f32_dq/256", None, None),
]


def svg_chart(items, path):
    """items: list of (label, pct). Horizontal bars, 0..100 %."""
    w, left, bar, gap, top = 760, 330, 16, 6, 40
    h = top + len(items) * (bar + gap) + 30
    scale = (w - left - 60) / 100.0
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">'
           'qmem GPU kernels, % of the same-run device-to-device copy bandwidth (2^28 elements)'
           '</text>']
    for pct in (0, 25, 50, 75, 100):
        x = left + pct * scale
        out.append(f'<line x1="{x}" y1="{top - 5}" x2="{x}" y2="{h - 25}" stroke="#ccc"/>')
        out.append(f'<text x="{x}" y="{h - 10}" text-anchor="middle">{pct}%</text>')
    for i, (label, pct) in enumerate(items):
        y = top + i * (bar + gap)
        color = "#2b7bba" if "dequantize" in label else "#e08a1e"
        out.append(f'<text x="{left - 6}" y="{y + bar - 4}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{max(pct, 0) * scale:.1f}" height="{bar}" '
                   f'fill="{color}"/>')
        out.append(f'<text x="{left + max(pct, 0) * scale + 4:.1f}" y="{y + bar - 4}">'
                   f'{pct:.0f}%</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--anchors")
    ap.add_argument("--md", required=True)
    ap.add_argument("--svg", required=True)
    ap.add_argument("--chart-link", default="gpu_quant_roofline.svg")
    a = ap.parse_args()
    bench = load(a.bench)
    anchors = load(a.anchors) or {}
    rows = qmem_rows(bench)
    ctx = bench.get("context", {})
    copy = float(ctx.get("copy_GBps", "nan"))
    lines = []
    lines.append(f"Device: {ctx.get('device', '?')}, {ctx.get('date', '?')}; 2^28 elements; "
                 f"same-run device-to-device copy {copy:.0f} GB/s (qmem benchmark)"
                 + (f", {anchors['copy_GBps']:.0f} GB/s (torch, peer script)"
                    if "copy_GBps" in anchors else "")
                 + (f"; peers: torch {anchors.get('torch', '?')}, bitsandbytes 0.50.2"
                    if anchors else "; peers not measured in this session") + ".")
    lines.append("")
    lines.append("| workload | qmem ms | qmem GB/s | % of copy | bitsandbytes ms | qmem speed-up "
                 "| roofline ms |")
    lines.append("|---|---|---|---|---|---|---|")
    for label, name, key, field in PAIRS:
        b = rows.get(name)
        if b is None:
            continue
        t = ms(b)
        peer = anchors.get(key, {}).get(field) if key else None
        peer_s = f"{peer:.3f}" if peer else "—"
        speed = f"{peer / t:.1f}x" if peer else "—"
        lines.append(f"| {label} | {t:.3f} | {b['GBps']:.0f} | {b['pct_copy']:.0f}% | {peer_s} | "
                     f"{speed} | {b['roofline_ms']:.3f} |")
    lines.append("")
    lines.append("Every block size (ms, % of copy):")
    lines.append("")
    families = ["nf4_quantize_bf16", "nf4_dequantize_bf16", "fp4_quantize_bf16",
                "fp4_dequantize_bf16", "int8_quantize_f32", "int8_dequantize_f32"]
    blocks = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    lines.append("| kernel | " + " | ".join(str(b) for b in blocks) + " |")
    lines.append("|---|" + "---|" * len(blocks))
    for fam in families:
        cells = []
        for blk in blocks:
            b = rows.get(f"{fam}/{blk}")
            cells.append(f"{ms(b):.3f} ({b['pct_copy']:.0f}%)" if b else "—")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"![qmem kernels, % of copy roofline]({a.chart_link})")
    with open(a.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    items = [(label, rows[name]["pct_copy"]) for label, name, _, _ in PAIRS if name in rows]
    svg_chart(items, a.svg)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
