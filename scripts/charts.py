#!/usr/bin/env python3
"""The two charts in BENCHMARKS.md, drawn from the measured figures in benchmarks/*.csv.

    pip install matplotlib && python3 scripts/charts.py

Reads benchmarks/http-ab.csv (the summary of scripts/http-ab.sh) and
benchmarks/redis-throughput.csv (the throughput table of examples/redis_throughput.rs),
and writes benchmarks/http.svg and benchmarks/redis-coalescing.svg. Each CSV starts with
a comment line (`#`) saying when and by which command its figures were measured; the
charts show that line under their titles. Regenerating from the same CSVs gives the same
SVG files byte for byte (fixed hash salt, no date, text kept as text), so a changed chart
in a diff means changed figures.
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "benchmarks")

# One colour per library, the same in both charts (Okabe-Ito, readable with colour-blindness).
TOLLGATE = "#0072B2"
GOVERNOR = "#E69F00"
BARE = "#999999"
OFF = "#BBBBBB"

# http-ab.sh mode -> (label, colour), in the order the chart lists them, top to bottom.
HTTP_MODES = [
    ("bare", "bare axum server (no limiter)", BARE),
    ("governor", "tower_governor, peer IP", GOVERNOR),
    ("governor_headers", "tower_governor, .use_headers()", GOVERNOR),
    ("tollgate", "tollgate, headers + Decision ext. (default)", TOLLGATE),
    ("tollgate_lean", "tollgate, headers, no extension", TOLLGATE),
    ("tollgate_none", 'tollgate, headers = "none"', TOLLGATE),
]

plt.rcParams.update(
    {
        "svg.hashsalt": "tollgate-benchmarks",
        "svg.fonttype": "none",
        "font.family": "sans-serif",
        "font.sans-serif": ["DejaVu Sans"],
        "font.size": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 11,
        "axes.titleweight": "bold",
    }
)


def read(name):
    """The comment line (without '#') and the rows, as dicts, of benchmarks/NAME."""
    path = os.path.join(DATA, name)
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    notes = [line.lstrip("# ").strip() for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if line and not line.startswith("#")))
    if not rows:
        sys.exit(f"charts: {path} has no rows")
    return (notes[0] if notes else ""), rows


def header(fig, title, note, top):
    """Title and the CSV's note above the panels, which fill the figure below `top`."""
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.text(0.01, 0.975, title, ha="left", va="top", fontweight="bold", fontsize=12)
    fig.text(0.01, 0.905, f"Medians over rounds. {note}", ha="left", va="top", fontsize=8.5,
             color="#555555")


def save(fig, name):
    path = os.path.join(DATA, name)
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": "scripts/charts.py"})
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def http_chart():
    note, rows = read("http-ab.csv")
    by_mode = {r["mode"]: r for r in rows}
    missing = [m for m, _, _ in HTTP_MODES if m not in by_mode]
    if missing:
        sys.exit(f"charts: http-ab.csv lacks the modes {', '.join(missing)}")
    modes = list(reversed(HTTP_MODES))  # barh draws from the bottom up
    labels = [label for _, label, _ in modes]
    colours = [colour for _, _, colour in modes]
    ratio = [float(by_mode[m]["ratio_to_bare"]) for m, _, _ in modes]
    cpu = [float(by_mode[m]["cpu_us_per_request"]) for m, _, _ in modes]
    cpu_ratio = [float(by_mode[m]["cpu_ratio_to_bare"]) for m, _, _ in modes]
    y = range(len(modes))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.9), sharey=True)
    left.barh(y, ratio, color=colours, height=0.62)
    for i, v in enumerate(ratio):
        left.text(v + 0.015, i, f"{v:.3f}", va="center", fontsize=9)
    left.set_xlim(0, 1.18)
    left.set_yticks(list(y), labels)
    left.set_xlabel("requests per second, as a ratio to the bare server")
    left.set_title("Throughput (higher is better)", loc="left")

    right.barh(y, cpu, color=colours, height=0.62)
    for i, (v, r) in enumerate(zip(cpu, cpu_ratio)):
        right.text(v + 0.1, i, f"{v:.2f} µs ({r:.3f})", va="center", fontsize=9)
    right.set_xlim(0, max(cpu) * 1.32)
    right.set_xlabel("server CPU time per request, µs (ratio to bare)")
    right.set_title("Server CPU per request (lower is better)", loc="left")
    right.tick_params(axis="y", length=0)

    for ax in (left, right):
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="x", color="#E5E5E5", linewidth=0.6)
        ax.set_axisbelow(True)

    title = "HTTP: tollgate against tower_governor (an axum hello-world on one core)"
    header(fig, title, note, 0.87)
    save(fig, "http.svg")


def per_second(v, _):
    """A log axis tick: 10k, 100k, 1M."""
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    return f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


def redis_chart():
    note, rows = read("redis-throughput.csv")
    table = {(int(r["rules"]), int(r["callers"]), r["coalescing"]): r for r in rows}
    callers = sorted({int(r["callers"]) for r in rows})
    rules = sorted({int(r["rules"]) for r in rows})
    top = max(float(r["checks_per_s"]) for r in rows)

    fig, axes = plt.subplots(1, len(rules), figsize=(10, 4.2), sharey=True)
    axes = axes if len(rules) > 1 else [axes]
    width = 0.38
    for ax, n in zip(axes, rules):
        for offset, mode, colour, name in (
            (-width / 2, "off", OFF, "coalescing off (max_batch 1)"),
            (width / 2, "on", TOLLGATE, "coalescing on (default)"),
        ):
            xs, values = [], []
            for i, c in enumerate(callers):
                row = table.get((n, c, mode))
                if row:
                    xs.append(i + offset)
                    values.append(float(row["checks_per_s"]))
            ax.bar(xs, values, width=width, color=colour, label=name)
            for x, v in zip(xs, values):
                ax.text(x, v * 1.06, f"{v:,.0f}".replace(",", "\u2009"), ha="center",
                        va="bottom", fontsize=8)
        for i, c in enumerate(callers):
            row = table.get((n, c, "on"))
            if row:
                ax.text(i, top * 2.9, f"on/off {float(row['ratio_on_off']):.2f}×", ha="center",
                        fontsize=9, fontweight="bold", color=TOLLGATE)
        ax.set_xticks(range(len(callers)), [str(c) for c in callers])
        ax.set_xlabel("concurrent callers")
        ax.set_title(f"{n} rule{'s' if n > 1 else ''} a check ({n} key{'s' if n > 1 else ''})",
                     loc="left")
        ax.set_yscale("log")
        ax.set_ylim(3_000, top * 5)
        ax.grid(axis="y", color="#E5E5E5", linewidth=0.6, which="major")
        ax.set_axisbelow(True)
    axes[0].set_ylabel("checks per second (log scale)")
    axes[0].yaxis.set_major_formatter(FuncFormatter(per_second))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper left", ncol=2, frameon=False,
               fontsize=9, bbox_to_anchor=(0.005, 0.87))

    title = "Redis: checks per second with and without coalescing (one Redis core)"
    header(fig, title, note, 0.83)
    save(fig, "redis-coalescing.svg")


if __name__ == "__main__":
    http_chart()
    redis_chart()
