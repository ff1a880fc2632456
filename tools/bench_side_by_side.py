"""The table of tools/bench when servers are measured: offline sides and servers side by side.

Every side with a prefix cache (the offline engine with caching on, and every server) gets two
columns, its first pass (**cold**: the cache holds nothing of the workload) and its later
passes (**warm**: the previous pass's prompts are cached), because their hit rates differ;
a side without a cache (offline cache off, offline mlx-lm) gets one column over all its
passes. A column of one pass shows that pass; a column of several shows median +- population
standard deviation, as the offline table does.
"""

import math
from dataclasses import dataclass

from tools.bench_workload import METRICS, Workload, speedup, summarize

OFFLINE_LABELS = {"cache_off": "cache off", "cache_on": "cache on", "mlx_lm": "mlx-lm"}


@dataclass(frozen=True, slots=True)
class Column:
    key: str  # "offline:cache_on" or "server:<name>"
    label: str
    phase: str  # "cold", "warm" or "all"
    passes: list[dict]
    hit_tokens: tuple[int, int] | None  # (hits, queries) summed over the passes
    output_tokens: int
    expected_output_tokens: int

    @property
    def title(self) -> str:
        return self.label if self.phase == "all" else f"{self.label} {self.phase}"

    def median(self, metric: str) -> float:
        return summarize(self.passes)[metric]["median"]


def _sum_hits(hits: list) -> tuple[int, int] | None:
    if not hits or any(h is None for h in hits):
        return None
    return sum(h[0] for h in hits), sum(h[1] for h in hits)


def _split(key: str, label: str, passes: list[dict], hits: list, outputs: list[int], expected: int) -> list[Column]:
    """A cold column (the first pass) and a warm column (the others, where there are any)."""
    columns = [Column(key, label, "cold", passes[:1], _sum_hits(hits[:1]), outputs[0], expected)]
    if len(passes) > 1:
        columns.append(
            Column(key, label, "warm", passes[1:], _sum_hits(hits[1:]), sum(outputs[1:]), expected * (len(passes) - 1))
        )
    return columns


def columns(result: dict) -> list[Column]:
    w = Workload(**result["workload"])
    per_pass = w.num_prompts * w.output_len
    found = []
    for side, data in result.get("sides", {}).items():
        passes = data["passes"]
        outputs = [per_pass] * len(passes)  # the engine and BatchGenerator ignore EOS
        if side == "cache_on":
            hit = result["hit_rate"]
            found += _split(f"offline:{side}", OFFLINE_LABELS[side], passes,
                            [hit["cold_tokens"], *hit["warm_tokens"]], outputs, per_pass)
        else:
            found.append(Column(f"offline:{side}", OFFLINE_LABELS[side], "all", passes, None,
                                sum(outputs), per_pass * len(passes)))
    for name, server in result.get("servers", {}).items():
        found += _split(f"server:{name}", server["label"], server["passes"], server["hit_tokens"],
                        server["output_tokens"], server["expected_output_tokens"])
    return found


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    return f"{value:.0f}" if magnitude >= 100 else f"{value:.1f}" if magnitude >= 10 else f"{value:.2f}"


def _cell(column: Column, metric: str) -> str:
    summary = summarize(column.passes)[metric]
    if len(column.passes) == 1:
        return fmt(summary["median"])
    return f"{fmt(summary['median'])} +- {fmt(summary['stdev'])}"


def render(result: dict) -> str:
    cols = columns(result)
    w = Workload(**result["workload"])
    lines = [
        f"prefix repetition: {w.describe()}; prompts of whole-word tokens (sent as ids or as text)",
        (
            f"model {result['model']} ({(result['model_parameters'] or 0) / 1e6:.1f}M params), "
            f"device {result['device']}, MLX {result['mlx_version']}, mlx-lm {result['mlx_lm_version']}, "
            f"BLAS {result['blas']}"
        ),
        f"engine {', '.join(f'{k}={v}' for k, v in result['engine'].items())}",
    ]
    for server in result.get("servers", {}).values():
        lines.append(f"{server['label']}: {server.get('command') or server['url']}")
        lines.append(f"  {server['evidence']}; hit rate from {server['hit_source'] or 'nowhere (none reported)'}")
    concurrency = result.get("max_concurrency")
    lines += [
        (
            f"requests: {'all at once' if concurrency is None else f'at most {concurrency} at a time'}; "
            f"{result['repeats']} passes per side (cold = the first, warm = the others)"
        ),
        "",
    ]
    header = ["metric", *(c.title for c in cols)]
    rows = [[f"{label} ({unit})", *(_cell(c, name) for c in cols)] for name, label, unit, _ in METRICS]
    rows.append(["Hit rate", *("-" if c.hit_tokens is None or not c.hit_tokens[1]
                               else f"{100 * c.hit_tokens[0] / c.hit_tokens[1]:.1f} %" for c in cols)])
    rows.append(["Output tokens", *(f"{c.output_tokens}/{c.expected_output_tokens}" for c in cols)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                         for i, (cell, width) in enumerate(zip(row, widths)))

    lines += [line(header), "  ".join("-" * width for width in widths), *map(line, rows), ""]
    lines += ratio_lines(cols)
    for server in result.get("servers", {}).values():
        if sum(server.get("resent", ())):
            lines.append(
                f"{server['label']}: requests sent again after a connection reset before any answer "
                f"(per pass: {server['resent']}); the wait counts in their TTFT"
            )
        if server.get("expected_hit_rate"):
            exp = server["expected_hit_rate"]
            lines.append(f"expected hit rate of {server['label']}: {exp['why']}: " + ", ".join(
                f"{phase} {100 * exp[phase]:.1f} %" for phase in ("cold", "warm") if exp.get(phase) is not None))
    load = result.get("load_average")
    if load:
        lines.append(f"load average (1 min) at start {load['start']:.2f}, at end {load['end']:.2f}")
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return "\n".join(lines)


def ratio_lines(cols: list[Column]) -> list[str]:
    """Output throughput of each server over the offline engine (cache on), and of the first
    server over the others, phase by phase (> 1: the first named is faster)."""
    by_key: dict[str, dict[str, Column]] = {}
    for column in cols:
        by_key.setdefault(column.key, {})[column.phase] = column
    servers = [key for key in by_key if key.startswith("server:")]
    lines = []

    def ratios(ours: dict[str, Column], theirs: dict[str, Column]) -> str:
        return ", ".join(
            f"{phase} {speedup('throughput', ours[phase].median('throughput'), theirs[phase].median('throughput')):.2f}x"
            for phase in ("cold", "warm") if phase in ours and phase in theirs
        )

    offline = by_key.get("offline:cache_on")
    for key in servers:
        if offline:
            label = next(iter(by_key[key].values())).label
            lines.append(f"output throughput, {label} over the offline engine (cache on): "
                         f"{ratios(by_key[key], offline)}")
    if len(servers) > 1:
        first = by_key[servers[0]]
        for key in servers[1:]:
            lines.append(
                f"output throughput, {next(iter(first.values())).label} over "
                f"{next(iter(by_key[key].values())).label}: {ratios(first, by_key[key])}"
            )
    return lines
