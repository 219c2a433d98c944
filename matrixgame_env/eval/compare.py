"""Several `matrixgame-env eval` reports side by side (`matrixgame-env compare`).

One row per headline figure (PSNR and SSIM per horizon with the copy-last-frame baseline, what the
inverse-dynamics judge reads of the generated video, the drift's shares in the real range, the
targets), one column per report, the best value of a row marked. Reports scored on other clips,
horizons or judges are not comparable row by row: the notes say what differs. Where the reports
kept their clips' own figures and scored the same clips, rows "change from the first report" give
each later report's difference, clip by clip, with a 95 % bootstrap interval (`intervals`).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .intervals import Interval, is_finite_number, paired_interval, per_clip_values

REPORT_SECTIONS = ("fidelity", "idm", "drift")
# Settings that change what a row measures: differing ones are named in the notes.
COMPARED_SETTINGS = (
    "device",
    "dtype",
    "clips",
    "horizon_s",
    "val_fraction",
    "seed",
    "drift_minutes",
    "drift_worlds",
    "idm",
)
FORMATS = ("text", "markdown", "json")


@dataclass(frozen=True)
class Row:
    """One figure of every report: `values[i]` from report i (None where it was not measured)."""

    label: str
    values: tuple[Any, ...]
    higher_is_better: bool | None = None  # None: no best is marked (settings, baselines)
    digits: int = 3

    def best(self) -> set[int]:
        """The columns holding the row's best value (none when fewer than two reports measured it)."""
        # Compared as printed, so that values that print alike are marked alike.
        numbers = [(i, round(v, self.digits)) for i, v in enumerate(self.values) if is_finite_number(v)]
        if self.higher_is_better is None or len(numbers) < 2:
            return set()
        pick = max if self.higher_is_better else min
        best = pick(v for _, v in numbers)
        return {i for i, v in numbers if v == best}

    def cell(self, column: int) -> str:
        value = self.values[column]
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.{self.digits}f}" if math.isfinite(value) else str(value)
        if isinstance(value, Interval):
            return value.format(self.digits)
        return str(value)


def load_report(path: str | Path) -> dict[str, Any]:
    """The report in `path`: an eval.json, or a folder `matrixgame-env eval --out` wrote."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"no eval report at {path} (give an eval.json or the folder `eval --out` wrote)")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not JSON ({error}): give the eval.json `matrixgame-env eval` wrote") from None
    if not isinstance(report, dict) or not any(report.get(section) for section in REPORT_SECTIONS):
        raise ValueError(f"{path} is not a `matrixgame-env eval` report: it has none of {', '.join(REPORT_SECTIONS)}")
    return report


def comparison_rows(reports: Sequence[dict[str, Any]]) -> list[Row]:
    """The rows of the comparison, in the order of the printed table."""
    rows: list[Row] = []
    for label in _horizon_labels(reports):
        at = [_get(r, "fidelity", "at", label) for r in reports]
        rows.append(Row(f"PSNR at {label} (dB)", _each(at, "model", "psnr"), True, 2))
        rows += _change_row(f"PSNR at {label}", reports, ("fidelity", "at", label, "model", "psnr_clips"), 2)
        rows.append(Row(f"PSNR at {label}, copying the last frame", _each(at, "copy_last_frame", "psnr"), None, 2))
    for label in _horizon_labels(reports):
        at = [_get(r, "fidelity", "at", label) for r in reports]
        rows.append(Row(f"SSIM at {label}", _each(at, "model", "ssim"), True, 3))
        rows += _change_row(f"SSIM at {label}", reports, ("fidelity", "at", label, "model", "ssim_clips"), 3)
    generated = [_get(r, "idm", "generated") for r in reports]
    if any(generated):
        rows += [
            Row("IDM keys", _each(generated, "keyboard"), True),
            *_change_row("IDM keys", reports, ("idm", "generated", "per_clip", "keyboard"), 3),
            Row("IDM keys, by chance", _each(generated, "chance", "keyboard")),
            Row("IDM walking forward (W)", _each(generated, "keyboard_per_key", "forward"), True),
            Row("IDM yaw direction", _each(generated, "yaw_direction"), True),
            *_change_row("IDM yaw direction", reports, ("idm", "generated", "per_clip", "yaw_direction"), 3),
            Row("IDM yaw direction, by chance", _each(generated, "chance", "yaw_direction")),
            Row("IDM yaw of clear turns", tuple(_clear_turns(g) for g in generated), True),
        ]
        shares = [_get(r, "idm", "generated_share_of_round_trip") for r in reports]
        rows.append(Row("share of the round trip: keys", _each(shares, "keyboard"), True, 2))
        rows.append(Row("share of the round trip: yaw", _each(shares, "yaw_direction"), True, 2))
    drifts = [r.get("drift") for r in reports]
    if any(drifts):
        rows.append(Row("drift minutes", _each(drifts, "minutes"), None, 2))
        for name in _names_in(drifts, "statistics"):
            statistic = [_get(d, "statistics", name) if d else None for d in drifts]
            rows.append(Row(f"{name} in the real range", _each(statistic, "in_range_share"), True, 2))
            rows.append(
                Row(f"{name} in the real range, opening seconds", _each(statistic, "opening_in_range_share"), True, 2)
            )
            rows.append(
                Row(f"{name} in the real range, final frames", _each(statistic, "final_in_range_share"), True, 2)
            )
        rows.append(Row("collapsed", tuple(_collapse_cell(d) for d in drifts)))
    for name in _names_in(reports, "targets"):
        rows.append(Row(f"target {name}", tuple(_target_cell(_get(r, "targets", name)) for r in reports)))
    for name in ("device", "dtype", "action_guidance"):
        rows.append(Row(name, tuple(_get(r, "settings", name) for r in reports)))
    return rows


def comparison_notes(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> list[str]:
    """What differs between the reports' scoring, so that a row is not read across unlike runs."""
    notes = []
    for setting in COMPARED_SETTINGS:
        values = [_get(r, "settings", setting) for r in reports]
        if len({json.dumps(v) for v in values}) > 1:
            told = ", ".join(f"{name} {value}" for name, value in zip(names, values))
            notes.append(f"{setting} differs: {told}")
    sources = [_get(r, "fidelity", "sources") for r in reports]
    scored = [(name, s) for name, s in zip(names, sources) if s]
    if len(scored) > 1:
        if all(s == scored[0][1] for _, s in scored):
            notes.append(f"fidelity and IDM rows scored on the same {len(scored[0][1])} clips")
        else:
            groups: dict[str, list[str]] = {}
            for name, s in scored:
                groups.setdefault(json.dumps(s), []).append(name)
            told = "; ".join(", ".join(group) for group in groups.values())
            notes.append(f"scored on different clips ({told}): their fidelity and IDM rows are not comparable")
    if len(reports) > 1 and _same_clips(reports[0], reports[1:]):
        clips = _get(reports[0], "fidelity", "clips")
        keys = ("fidelity", "at", (_horizon_labels(reports) or [""])[0], "model", "psnr_clips")
        without = [name for name, r in zip(names, reports) if per_clip_values(_get(r, *keys), clips) is None]
        if without:
            notes.append(f"no per-clip figures in {', '.join(without)} (reports written before they were kept): "
                         "no change from the first report with an interval")  # fmt: skip
        else:
            notes.append("change from the first report: the mean over the clips of each clip's difference, "
                         "[95 % bootstrap interval]; an interval holding 0 cannot tell the two apart")  # fmt: skip
    partial = [name for name, r in zip(names, reports) if _get(r, "idm", "trained_against")]
    if partial:
        notes.append(f"judged by the IDM their VAE or DiT was trained against ({', '.join(partial)}): their IDM "
                     "rows are not an independent measure")  # fmt: skip
    return notes


def format_table(rows: Sequence[Row], names: Sequence[str], markdown: bool = False) -> str:
    """The rows as an aligned text table (best values marked *) or a Markdown table (best in bold)."""
    cells = []
    for row in rows:
        best = row.best()
        line = [row.label]
        for column in range(len(names)):
            text = row.cell(column)
            if column in best:
                text = f"**{text}**" if markdown else f"{text} *"
            line.append(text)
        cells.append(line)
    header = ["", *names]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            text.ljust(width) if i == 0 else text.rjust(width) for i, (text, width) in enumerate(zip(line, widths))
        )
        for line in [header, *cells]
    ).rstrip()


def comparison_json(rows: Sequence[Row], names: Sequence[str], notes: Sequence[str]) -> dict[str, Any]:
    """The comparison as plain values: per row, each report's value and the best reports' names."""
    return {
        "reports": list(names),
        "rows": [
            {
                "label": row.label,
                "values": {name: _plain(value) for name, value in zip(names, row.values)},
                "best": [names[i] for i in sorted(row.best())],
            }
            for row in rows
        ],
        "notes": list(notes),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", nargs="+", metavar="REPORT", help="eval.json files or folders `eval --out` wrote")
    parser.add_argument("--names", nargs="+", default=None, help="column names (default: the reports' folders)")
    parser.add_argument("--format", choices=FORMATS, default="text", help="text (default), markdown or json")
    parser.add_argument("--out", default=None, help="also write the comparison to this file")


def run(args: argparse.Namespace) -> str:
    """Load the reports, print the comparison (and write it to --out); returns the printed text."""
    reports = [load_report(path) for path in args.reports]
    names = list(args.names) if args.names else _default_names(args.reports)
    if len(names) != len(reports):
        raise ValueError(f"--names gives {len(names)} names for {len(reports)} reports: give one per report")
    rows = comparison_rows(reports)
    notes = comparison_notes(reports, names)
    if args.format == "json":
        text = json.dumps(comparison_json(rows, names, notes), indent=1)
    else:
        text = format_table(rows, names, markdown=args.format == "markdown")
        text += "".join(f"\nnote: {note}" for note in notes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    return text


def _default_names(paths: Sequence[str]) -> list[str]:
    """Each report's folder name (the file's own name when it is not eval.json), made unique."""
    names = []
    for raw in paths:
        path = Path(raw).expanduser()
        name = path.parent.name if path.name == "eval.json" else (path.name if path.is_dir() else path.stem)
        names.append(name or str(path))
    return [f"{name} ({i + 1})" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _change_row(label: str, reports: Sequence[dict[str, Any]], keys: tuple[str, ...], digits: int) -> list[Row]:
    """[The row of each later report's change from the first in the per-clip figures at `keys`, paired clip
    by clip with its interval], or [] where no report can be paired with the first (other clips, or no
    per-clip figures)."""
    if len(reports) < 2:
        return []
    first = reports[0]
    clips = _get(first, "fidelity", "clips")
    before = per_clip_values(_get(first, *keys), clips)
    values: list[Interval | None] = [None]
    for report in reports[1:]:
        after = per_clip_values(_get(report, *keys), clips)
        paired = before is not None and after is not None and _same_clips(first, [report])
        values.append(paired_interval(before, after) if paired else None)
    if not any(values):
        return []
    return [Row(f"{label}, change from the first report", tuple(values), None, digits)]


def _same_clips(first: dict[str, Any], others: Sequence[dict[str, Any]]) -> bool:
    """Whether every report of `others` scored the clips `first` scored (their fidelity sources)."""
    sources = _get(first, "fidelity", "sources")
    return bool(sources) and all(_get(other, "fidelity", "sources") == sources for other in others)


def _horizon_labels(reports: Sequence[dict[str, Any]]) -> list[str]:
    """The horizons any report scored, in increasing time."""
    found: dict[str, float] = {}
    for report in reports:
        for label, entry in (_get(report, "fidelity", "at") or {}).items():
            found[label] = entry.get("time_s", 0.0)
    return sorted(found, key=found.get)


def _names_in(entries: Sequence[Any], key: str) -> list[str]:
    """The keys of `entry[key]` over all entries, each once, in the order first seen."""
    return list(dict.fromkeys(name for entry in entries for name in (_get(entry, key) or {})))


def _target_cell(target: dict[str, Any] | None) -> str | None:
    if not target:
        return None
    state = {True: "met", False: "not met", None: "not measured"}[target.get("passed")]
    value = target.get("value")
    return f"{state} ({value:.3f})" if is_finite_number(value) else state


def _clear_turns(generated: dict[str, Any] | None) -> float | None:
    """Yaw direction accuracy in the band of the largest turns (`yaw_by_size`)."""
    sizes = (generated or {}).get("yaw_by_size")
    return sizes["yaw_direction"][-1] if sizes else None


def _collapse_cell(drift: dict[str, Any] | None) -> Any:
    """False, or the statistics that collapsed, each with its onset where the report has one
    ("sharpness (from the start)"); None where the report has no drift."""
    if not drift:
        return None
    if not drift.get("collapsed"):
        return False
    names = []
    for name in drift.get("collapsed_statistics") or []:
        onset = _get(drift, "statistics", name, "onset")
        names.append(f"{name} ({onset})" if onset else name)
    return ", ".join(names) or True


def _each(entries: Sequence[Any], *keys: str) -> tuple[Any, ...]:
    return tuple(_get(entry, *keys) for entry in entries)


def _get(entry: Any, *keys: str) -> Any:
    """entry[k0][k1]..., or None where a level is missing."""
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _plain(value: Any) -> Any:
    if isinstance(value, Interval):
        return value.as_dict()
    return None if isinstance(value, float) and not math.isfinite(value) else value
