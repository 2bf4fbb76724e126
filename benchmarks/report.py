"""Output shared by the modes: tables, the CPU-contention line, the --json file."""
import json
import os
from typing import Dict, List


def format_table(rows: List[Dict], columns) -> str:
    cells = [[h for h, _, _ in columns]] + [["-" if r[k] is None else fmt.format(r[k]) for _, k, fmt in columns]
                                            for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    text_cols = sum(1 for _, _, fmt in columns if fmt == "{}")
    lines = [" | ".join(c.ljust(w) if i < text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def describe_contention(c: Dict, threads: int) -> str:
    if c["other_processes_cores"] is None:
        return ""
    busy = c["other_processes_cores"] + c["steal_cores"] > 0.1 * threads
    return (f"# cores used while timing: this process {c['own_cores']:.2f}, other processes "
            f"{c['other_processes_cores']:.2f}, hypervisor steal {c['steal_cores']:.2f}"
            + ("  WARNING: the CPU was shared; the numbers are low" if busy else ""))


def write_json(path: str, r: Dict) -> None:
    """--json: the results (nothing when path is empty)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=1)
            f.write("\n")
