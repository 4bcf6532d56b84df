"""Results of a run: one `SectionResult` per section, written as Markdown and JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """One Markdown table: a heading (may be empty), column names, pre-formatted cells."""

    heading: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = []
        if self.heading:
            lines += [f"**{self.heading}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


@dataclass
class SectionResult:
    """A section's tables and notes (Markdown) and its raw samples plus medians (`records`,
    JSON). Every record is a flat dict; keys starting with `median_` hold the reported figures,
    keys starting with `samples_` the raw samples they are the median of."""

    key: str
    title: str
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"## {self.title}", ""]
        for t in self.tables:
            parts += [t.markdown(), ""]
        parts += [f"* {n}" for n in self.notes]
        parts.append(f"* section time: {self.seconds:.0f} s")
        return "\n".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "notes": self.notes, "seconds": round(self.seconds, 3),
                "tables": [{"heading": t.heading, "columns": t.columns, "rows": t.rows}
                           for t in self.tables],
                "records": self.records}


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with `digits` significant digits (thousands separated), or '-' for none/NaN."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "-"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def machine_markdown(machine: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in machine.items())
    return "| machine | |\n|---|---|\n" + rows


def render(machine: dict[str, Any], profile: dict[str, Any], sections: list[SectionResult],
           command: str) -> str:
    """The whole Markdown report."""
    head = [
        "# Benchmarks",
        "",
        f"Command: `{command}` (profile `{profile['name']}`). Every figure is the median of "
        "several timed runs after warm-up; contenders of one comparison run side by side, "
        "round-robin in rotating order (A B C, B C A, ...). Sample counts are in each section.",
        "",
        machine_markdown(machine),
        "",
    ]
    return "\n".join(head + [s.markdown() + "\n" for s in sections])


def _clean(obj: Any) -> Any:
    """JSON-safe copy (NaN/inf become null)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write(out: Path, machine: dict[str, Any], profile: dict[str, Any],
          sections: list[SectionResult], command: str) -> tuple[Path, Path, str]:
    """Write `bench_results.md` and `bench_results.json` into `out`; returns both paths and
    the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = render(machine, profile, sections, command)
    md_path, json_path = out / "bench_results.md", out / "bench_results.json"
    md_path.write_text(md, encoding="utf-8")
    payload = {"command": command, "machine": machine, "profile": profile,
               "sections": {s.key: s.to_dict() for s in sections}}
    json_path.write_text(json.dumps(_clean(payload), indent=1) + "\n", encoding="utf-8")
    return md_path, json_path, md
