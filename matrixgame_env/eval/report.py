"""The evaluation report: targets checked, one JSON file, one PNG figure.

Figure panels: PSNR and SSIM vs horizon (model, copy-last-frame baseline, VAE reconstruction),
IDM action accuracy (real held-out frames, the same windows generated, chance), and each drift
statistic over the rollout with the real data's 1st-99th percentile range shaded.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

TARGET_IDM_ACCURACY = 0.9
TARGET_SECONDS = "1s"
_METHOD_STYLE = {
    "model": ("model", "tab:blue", "-"),
    "copy_last_frame": ("copy last frame", "tab:orange", "--"),
    "vae_reconstruction": ("VAE reconstruction", "tab:gray", ":"),
}


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The model card's targets, each {"value", "target", "passed"} (passed None when not measured)."""
    targets: dict[str, dict[str, Any]] = {}
    generated = report.get("idm", {}).get("generated")
    for name in ("keyboard", "yaw_direction"):
        value = None if generated is None else generated[name]
        targets[f"idm_{name}_accuracy"] = _target(value, f">= {TARGET_IDM_ACCURACY}",
                                                  None if value is None else value >= TARGET_IDM_ACCURACY)  # fmt: skip
        if generated is not None:  # the same accuracy of always answering the most frequent label
            targets[f"idm_{name}_accuracy"]["chance"] = generated["chance"][name]
    at = report.get("fidelity", {}).get("at", {}).get(TARGET_SECONDS)
    margin = None if at is None else at["model"]["psnr"] - at["copy_last_frame"]["psnr"]
    targets["psnr_above_copy_last_frame_at_1s"] = _target(margin, "> 0 dB", None if margin is None else margin > 0)
    drift = report.get("drift")
    worst = None if drift is None else min(v["final_in_range_share"] for v in drift["statistics"].values())
    targets["no_collapse"] = _target(
        worst,
        f">= {drift['in_range_needed'] if drift else 0.5} of the final frames in the real range, every statistic",
        None if drift is None else not drift["collapsed"],
    )
    return targets


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Strict JSON (NaN and infinities written as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
    return path


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Draw the figure of a report into a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 3, figsize=(15, 11), constrained_layout=True)
    title = f"{report['settings']['model']} against {Path(report['settings']['data']).name}"
    figure.suptitle(title)
    fidelity = report.get("fidelity")
    for axis, metric, label in ((axes[0, 0], "psnr", "PSNR (dB)"), (axes[0, 1], "ssim", "SSIM")):
        if fidelity is None:
            _not_run(axis, label)
            continue
        _plot_metric(axis, fidelity, metric, label)
    _plot_idm(axes[0, 2], report.get("idm"))
    drift = report.get("drift")
    panels = [axes[1, 0], axes[1, 1], axes[1, 2], axes[2, 0], axes[2, 1]]
    names = ("brightness", "contrast", "colourfulness", "sharpness", "motion")
    for axis, name in zip(panels, names):
        if drift is None:
            _not_run(axis, f"drift: {name}")
            continue
        _plot_drift(axis, drift, name)
    _plot_in_range(axes[2, 2], drift)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _plot_metric(axis, fidelity: dict[str, Any], metric: str, label: str) -> None:
    seconds = fidelity["time_s"]
    for method, values in fidelity["methods"].items():
        name, colour, style = _METHOD_STYLE.get(method, (method, None, "-"))
        mean, spread = values[metric], values[f"{metric}_std"]
        start = 1 if method == "copy_last_frame" else 0  # frame 0 of the baseline is the real frame itself
        axis.plot(seconds[start:], mean[start:], style, color=colour, label=name)
        if method == "model":
            low = [m - s for m, s in zip(mean, spread)]
            high = [m + s for m, s in zip(mean, spread)]
            axis.fill_between(seconds, low, high, color=colour, alpha=0.15, linewidth=0)
    axis.set_xlabel("horizon (s)")
    axis.set_ylabel(label)
    axis.set_title(f"{label} vs horizon ({fidelity['clips']} held-out clips)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _plot_idm(axis, idm: dict[str, Any] | None) -> None:
    if idm is None:
        _not_run(axis, "IDM action accuracy")
        return
    named = (
        ("real_val", "real held-out"),
        ("real_clips", "real, same windows"),
        ("vae_round_trip", "VAE round trip of those"),
        ("generated", "generated"),
    )
    sets = [(key, text) for key, text in named if idm.get(key)]
    reference = idm[sets[0][0]]
    keys = list(reference["keyboard_per_key"])
    labels = [*keys, "all keys", "exact", "yaw dir."]
    width = 0.8 / max(1, len(sets))
    for number, (key, text) in enumerate(sets):
        result = idm[key]
        values = [*result["keyboard_per_key"].values(), result["keyboard"], result["keyboard_exact"],
                  result["yaw_direction"]]  # fmt: skip
        axis.bar([i + (number - (len(sets) - 1) / 2) * width for i in range(len(labels))], values, width, label=text)
    chance = reference["chance"]
    chance_values = [*chance["keyboard_per_key"].values(), chance["keyboard"], chance["keyboard_exact"],
                     chance["yaw_direction"]]  # fmt: skip
    axis.scatter(range(len(labels)), chance_values, marker="_", s=300, color="black", label="chance", zorder=3)
    readable = idm.get("readable_from_motion", {})
    if all(key in readable for key in keys):  # the keys' limit for any judge of frames (not for exact or yaw)
        limits = [readable[key]["readable"] for key in keys] + [readable["mean"]["readable"]]
        axis.scatter(
            range(len(limits)), limits, marker="v", s=30, color="tab:purple", label="from true motion", zorder=3
        )
    axis.axhline(TARGET_IDM_ACCURACY, color="tab:red", linestyle=":", linewidth=1, label="target")
    axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
    axis.set_ylim(0, 1.3)  # room above the bars for the legend
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.set_title("IDM action accuracy")
    axis.legend(fontsize=7, loc="upper center", ncol=3)


def _plot_drift(axis, drift: dict[str, Any], name: str) -> None:
    values = drift["statistics"][name]
    times, unit = _time_axis(drift)
    axis.axhspan(values["real_low"], values["real_high"], color="tab:green", alpha=0.15, label="real 1-99%")
    axis.plot(times, values["per_second_mean"], color="tab:blue", linewidth=1, label="rollout (mean per s)")
    axis.set_xlabel(f"video time ({unit})")
    axis.set_title(f"drift: {name} (in range {_percent(values['in_range_share'])})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _plot_in_range(axis, drift: dict[str, Any] | None) -> None:
    if drift is None:
        _not_run(axis, "drift: share in range")
        return
    times, unit = _time_axis(drift)
    for name, values in drift["statistics"].items():
        axis.plot(times, values["per_second_in_range"], linewidth=1, label=name)
    verdict = "collapsed" if drift["collapsed"] else "no collapse"
    axis.set_title(f"share of frames in the real range ({verdict})")
    axis.set_xlabel(f"video time ({unit})")
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)


def _time_axis(drift: dict[str, Any]) -> tuple[list[float], str]:
    """Drift times in minutes, or in seconds for rollouts shorter than two minutes."""
    if drift["seconds"][-1] < 120:
        return list(drift["seconds"]), "s"
    return [s / 60 for s in drift["seconds"]], "min"


def _not_run(axis, title: str) -> None:
    axis.set_title(title)
    axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes, color="gray")
    axis.set_xticks([])
    axis.set_yticks([])


def _percent(share: float | None) -> str:
    return "n/a" if share is None or (isinstance(share, float) and math.isnan(share)) else f"{100 * share:.0f}%"


def _target(value: Any, target: str, passed: bool | None) -> dict[str, Any]:
    return {"value": value, "target": target, "passed": passed}


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
