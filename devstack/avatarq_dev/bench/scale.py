"""Scale figures from one ramp step: how many streams a worker process and a worker node hold,
from the step's measured cost per stream (docs/capacity.md reads these).

A process is bounded by its busiest single-threaded part: all its Python threads share one
GIL, and libwebrtc moves every data-channel byte on one `network_thread`; each may use
`HEADROOM` of a core. A node is bounded by its cores (the sum of all threads) and its RAM.
"""

from __future__ import annotations

from typing import Any

#: Share of a core (or of the node) a worker may use and still keep time under jitter.
HEADROOM = 0.8
NODE_CORES = 16
NODE_RAM_GB = 64
PROCESSES = (1, 2, 4, 8, 16)


def per_stream(step: dict[str, Any]) -> dict[str, float]:
    """CPU (% of one core) and RSS (MB) per stream of the worker at `step`."""
    n = step["streams"]
    threads = step.get("worker_threads_cpu_percent") or {}
    python = sum(v for k, v in threads.items() if k.startswith("python"))
    return {
        "cpu_percent": step["worker_cpu_percent"] / n,
        "python_threads_cpu_percent": python / n,
        "network_thread_cpu_percent": threads.get("network_thread", 0.0) / n,
        "rss_mb": step["worker_rss_mb"] / n,
    }


def node_plan(step: dict[str, Any], idle_rss_mb: float) -> dict[str, Any]:
    """Streams per process and per 16-core node for 1…16 worker processes."""
    cost = per_stream(step)
    limits = {
        "gil": HEADROOM * 100 / cost["python_threads_cpu_percent"]
        if cost["python_threads_cpu_percent"]
        else float("inf"),
        "network_thread": HEADROOM * 100 / cost["network_thread_cpu_percent"]
        if cost["network_thread_cpu_percent"]
        else float("inf"),
    }
    per_process = int(min(limits.values()))
    marginal_mb = max(0.0, (step["worker_rss_mb"] - idle_rss_mb) / step["streams"])
    rows = []
    for processes in PROCESSES:
        by = {
            "per-process limit": processes * per_process,
            "cores": int(HEADROOM * NODE_CORES * 100 / cost["cpu_percent"]),
            "memory": int(
                (NODE_RAM_GB * 1000 * HEADROOM - processes * idle_rss_mb) / max(marginal_mb, 0.1)
            ),
        }
        limit = min(by, key=lambda k: by[k])
        rows.append(
            {
                "processes": processes,
                "streams_per_process": by[limit] // processes,
                "streams_per_node": by[limit],
                "limited_by": limit,
            }
        )
    return {
        "from_step_streams": step["streams"],
        "per_stream": {k: round(v, 3) for k, v in cost.items()},
        "rss_mb_marginal_per_stream": round(marginal_mb, 2),
        "worker_rss_mb_idle": round(idle_rss_mb, 1),
        "process_limit_streams": per_process,
        "process_limited_by": min(limits, key=lambda k: limits[k]),
        "node": {"cores": NODE_CORES, "ram_gb": NODE_RAM_GB, "headroom": HEADROOM},
        "rows": rows,
    }


def markdown(plan: dict[str, Any]) -> str:
    lines = [
        "| worker processes | streams per process | streams per node | limited by |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['processes']} | {r['streams_per_process']} | {r['streams_per_node']} | "
        f"{r['limited_by']} |"
        for r in plan["rows"]
    ]
    return "\n".join(lines)
