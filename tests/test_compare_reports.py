"""`matrixgame-env compare` on eval reports the package's own models produced (shipped in models/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from matrixgame_env.cli import main
from matrixgame_env.eval.compare import Row, comparison_rows, load_report
from matrixgame_env.eval.idm import idm_weights_sha256, load_idm
from matrixgame_env.eval.intervals import paired_interval

ROOT = Path(__file__).resolve().parents[1]
# The previous release (session 7's student) through its previous decoder: CPU, float32, 10 minutes of drift.
SHIPPED = ROOT / "models/doom-small/eval/eval_previous_decoder.json"
STUDENT = ROOT / "models/next/dit-mapped-motion/student278_action_eval.json"  # H200, bfloat16
SHARP = ROOT / "models/next/dit-mapped-motion/student278_action_generated_decoder_cpu_eval.json"  # 2 min drift
# Each doom-small release evaluated again without drift (CPU, float32, the same 32 clips), per-clip figures kept.
PAIRED = ROOT / "models/doom-small/eval/paired"


def _compare_json(capsys, *argv: str) -> dict:
    assert main(["compare", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def _row(comparison: dict, label: str) -> dict:
    (row,) = [row for row in comparison["rows"] if row["label"] == label]
    return row


def test_rows_carry_each_reports_figures_and_mark_the_best(capsys):
    comparison = _compare_json(capsys, str(SHIPPED), str(STUDENT), "--names", "shipped", "student")
    shipped, student = (json.loads(path.read_text()) for path in (SHIPPED, STUDENT))
    assert comparison["reports"] == ["shipped", "student"]

    psnr = _row(comparison, "PSNR at 1s (dB)")
    assert psnr["values"] == {name: r["fidelity"]["at"]["1s"]["model"]["psnr"] for name, r in
                              (("shipped", shipped), ("student", student))}  # fmt: skip
    assert psnr["values"]["student"] > psnr["values"]["shipped"] and psnr["best"] == ["student"]
    copy = _row(comparison, "PSNR at 1s, copying the last frame")
    assert copy["values"]["shipped"] == shipped["fidelity"]["at"]["1s"]["copy_last_frame"]["psnr"]
    assert copy["best"] == []  # a baseline, not a contest

    keys = _row(comparison, "IDM keys")
    assert keys["values"]["shipped"] == shipped["idm"]["generated"]["keyboard"]
    assert keys["best"] == ["student"]
    # The shipped report predates the yaw-by-size breakdown: not measured, no best among one value.
    clear = _row(comparison, "IDM yaw of clear turns")
    assert clear["values"]["shipped"] is None and clear["best"] == []
    sharpness = _row(comparison, "sharpness in the real range")
    assert sharpness["values"]["shipped"] == shipped["drift"]["statistics"]["sharpness"]["in_range_share"]
    assert sharpness["best"] == ["shipped"]  # 0.13 against the blurry student's 0.00
    assert _row(comparison, "target no_collapse")["values"]["shipped"].startswith("not met")

    # Same clips (the recorder is seeded), but other devices and dtypes: named, not hidden.
    assert "fidelity and IDM rows scored on the same 32 clips" in comparison["notes"]
    assert any(note.startswith("device differs: shipped cpu, student cuda") for note in comparison["notes"])
    assert any(note.startswith("dtype differs") for note in comparison["notes"])


def test_a_collapse_is_named_with_its_onset(capsys):
    # An H100 decoder run whose sharpness left the real range over its 10 minutes (a report with onsets)
    # beside the current release's report (no collapse) and one written before onsets were reported.
    drifted = ROOT / "models/next/dit-mapped-motion/student300_action06_motion2_gan_h100_decoder_eval.json"
    release = ROOT / "models/doom-small/eval/release_2026-12-06/eval.json"
    comparison = _compare_json(capsys, str(drifted), str(release), str(STUDENT), "--names", "run", "release", "old")
    sharpness = json.loads(drifted.read_text())["drift"]["statistics"]["sharpness"]
    assert sharpness["onset"] == "drifted"
    collapsed = _row(comparison, "collapsed")["values"]
    assert collapsed == {"run": "sharpness (drifted)", "release": False, "old": "sharpness"}
    opening = _row(comparison, "sharpness in the real range, opening seconds")["values"]
    assert opening == {"run": sharpness["opening_in_range_share"], "release": None, "old": None}


def test_reports_on_other_clips_or_settings_are_flagged(tmp_path, capsys):
    report = json.loads(SHARP.read_text())
    report["fidelity"]["sources"] = report["fidelity"]["sources"][1:]
    other = tmp_path / "other" / "eval.json"
    other.parent.mkdir()
    other.write_text(json.dumps(report))
    comparison = _compare_json(capsys, str(SHARP), str(other), str(SHIPPED), "--names", "a", "b", "c")
    notes = comparison["notes"]
    assert any("scored on different clips (a, c; b)" in note for note in notes), notes
    assert any(note.startswith("drift_minutes differs: a 2.0, b 2.0, c 10.0") for note in notes), notes


def test_text_and_markdown_tables(tmp_path, capsys):
    folder = tmp_path / "run_sharp"
    folder.mkdir()
    shutil.copy(SHARP, folder / "eval.json")
    out = tmp_path / "table.md"
    assert main(["compare", str(SHIPPED), str(folder), "--format", "markdown", "--out", str(out)]) == 0
    capsys.readouterr()  # the markdown, printed too
    lines = out.read_text().splitlines()
    assert lines[0] == "|  | eval_previous_decoder | run_sharp |"  # a folder is named by itself, a file by its stem
    assert lines[1] == "|---|---|---|"
    table = [line for line in lines if line.startswith("|")]
    assert all(line.count("|") == 4 for line in table)
    assert "| PSNR at 4s (dB) | **18.44** | 17.75 |" in lines
    assert "| sharpness in the real range | 0.13 | **0.68** |" in lines

    assert main(["compare", str(SHIPPED), str(folder / "eval.json")]) == 0  # eval.json: named by its folder
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["eval_previous_decoder", "run_sharp"]
    sharp_line = next(line for line in text.splitlines() if line.startswith("sharpness in the real range"))
    assert sharp_line.split()[-2:] == ["0.68", "*"]
    assert "note: fidelity and IDM rows scored on the same 32 clips" in text


def _with_clips(report: dict, shift: float, seed: int) -> dict:
    """`report` with per-clip figures: PSNR per clip about the report's own mean, plus `shift`; keys
    accuracy per clip likewise (what `eval` keeps since reports hold per-clip figures)."""
    rng = np.random.default_rng(seed)
    report = json.loads(json.dumps(report))
    clips = report["fidelity"]["clips"]
    for entry in report["fidelity"]["at"].values():
        for method in ("model", "copy_last_frame"):
            entry[method]["psnr_clips"] = (entry[method]["psnr"] + shift + rng.normal(0, 2, clips)).tolist()
            entry[method]["ssim_clips"] = (entry[method]["ssim"] + rng.normal(0, 0.05, clips)).tolist()
    generated = report["idm"]["generated"]
    generated["per_clip"] = {name: (generated[name] + rng.normal(0, 0.05, clips)).tolist()
                             for name in ("keyboard", "yaw_direction")}  # fmt: skip
    return report


def test_changes_from_the_first_report_are_paired_clip_by_clip(tmp_path, capsys):
    base = json.loads(SHIPPED.read_text())
    first, second = _with_clips(base, 0.0, 1), _with_clips(base, -0.6, 2)
    other_clips = _with_clips(base, 0.0, 3)
    other_clips["fidelity"]["sources"] = other_clips["fidelity"]["sources"][1:]
    paths = []
    for name, report in (("first", first), ("second", second), ("elsewhere", other_clips), ("old", base)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    comparison = _compare_json(capsys, *map(str, paths[:3]))
    row = _row(comparison, "PSNR at 1s, change from the first report")
    expected = paired_interval(first["fidelity"]["at"]["1s"]["model"]["psnr_clips"],
                               second["fidelity"]["at"]["1s"]["model"]["psnr_clips"])  # fmt: skip
    assert row["values"]["first"] is None and row["values"]["elsewhere"] is None  # itself; other clips
    assert row["values"]["second"] == expected.as_dict() and row["best"] == []
    per_clip = np.subtract(second["fidelity"]["at"]["1s"]["model"]["psnr_clips"],
                           first["fidelity"]["at"]["1s"]["model"]["psnr_clips"])  # fmt: skip
    assert expected.mean == pytest.approx(float(per_clip.mean()), abs=1e-12)
    keys = _row(comparison, "IDM keys, change from the first report")["values"]["second"]
    assert keys == paired_interval(first["idm"]["generated"]["per_clip"]["keyboard"],
                                   second["idm"]["generated"]["per_clip"]["keyboard"]).as_dict()  # fmt: skip

    # The printed table shows "mean [low, high]"; a report without per-clip figures gets a note instead.
    assert main(["compare", str(paths[0]), str(paths[1])]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("PSNR at 1s, change"))
    assert line.split()[-4:] == ["-", expected.format(2).split()[0], *expected.format(2).split()[1:]]
    comparison = _compare_json(capsys, str(paths[0]), str(paths[3]), "--names", "first", "old")
    assert not any(row["label"].endswith("change from the first report") for row in comparison["rows"])
    assert any(note.startswith("no per-clip figures in old") for note in comparison["notes"]), comparison["notes"]


def test_values_that_print_alike_are_marked_alike():
    row = Row("share", (0.9996, 1.0, 0.5), higher_is_better=True, digits=2)
    assert row.best() == {0, 1}
    assert [row.cell(i) for i in range(3)] == ["1.00", "1.00", "0.50"]
    assert Row("one report", (0.5, None), higher_is_better=True).best() == set()


def test_rows_follow_what_the_reports_hold():
    sharp = load_report(SHARP)
    without_drift = {key: value for key, value in sharp.items() if key != "drift"}
    labels = [row.label for row in comparison_rows([without_drift])]
    assert "PSNR at 0.5s (dB)" in labels and not any("real range" in label for label in labels)
    horizons = [label for label in labels if label.startswith("PSNR at") and label.endswith("(dB)")]
    assert horizons == ["PSNR at 0.5s (dB)", "PSNR at 1s (dB)", "PSNR at 2s (dB)", "PSNR at 4s (dB)"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.json", "no eval report at"),
        (lambda tmp: ROOT / "models/doom-small/start_0.png", "is not JSON"),
        (lambda tmp: ROOT / "models/doom-small/config.json", "is not a `matrixgame-env eval` report"),
        (lambda tmp: tmp, "no eval report at"),  # a folder without eval.json
    ],
)
def test_what_is_not_a_report_is_refused(tmp_path, capsys, make, message):
    assert main(["compare", str(make(tmp_path)), str(SHIPPED)]) == 2
    assert message in capsys.readouterr().err


def test_names_must_fit_the_reports(capsys):
    assert main(["compare", str(SHIPPED), str(STUDENT), "--names", "only-one"]) == 2
    assert "--names gives 1 names for 2 reports" in capsys.readouterr().err


def test_the_shipped_releases_compared_clip_by_clip(capsys):
    """The model card's paired figures: the release of 2026-12-05 against session 7's, on the same
    32 clips (CPU, float32, no drift): the yaw gain is outside the clips' spread, the PSNR at 2 s is not."""
    change = _release_changes(capsys, "release_session7.json", "release_2026-12-05.json")
    yaw = change("IDM yaw direction")
    assert 0.12 < yaw["low"] < yaw["mean"] < yaw["high"] < 0.21
    at_2s = change("PSNR at 2s")
    assert at_2s["low"] < 0 < at_2s["high"]
    at_half = change("PSNR at 0.5s")
    assert at_half["high"] < 0


def test_the_action_loss_06_release_compared_clip_by_clip(capsys):
    """The model card's paired figures for the release of 2026-12-06 (the student of action loss 0.6)
    against that of 2026-12-05 (0.3), on the same 32 clips (CPU, float32, no drift): more faithful at
    1, 2 and 4 s and more turns read right, with intervals clear of zero; the keys cannot tell them apart."""
    change = _release_changes(capsys, "release_2026-12-05.json", "release_2026-12-06.json")
    for horizon in ("1s", "2s", "4s"):
        psnr = change(f"PSNR at {horizon}")
        assert 0 < psnr["low"] < psnr["mean"] < psnr["high"] < 1.0, (horizon, psnr)
    yaw = change("IDM yaw direction")
    assert 0 < yaw["low"] < yaw["mean"] < yaw["high"] < 0.05
    keys = change("IDM keys")
    assert keys["low"] < 0 < keys["high"]


def test_the_judged_decoder_release_compared_clip_by_clip(capsys):
    """The model card's paired figures for the release of 2026-12-06b (the decoder fine-tuned against a
    second judge, kept to its own frames by --reference-weight) against 2026-12-06, from the two full
    shipped reports (CPU, float32, 10 minutes of drift): more keys and turns read right and more faithful
    from 1 s on, every interval clear of zero; at 0.5 s the two cannot be told apart; neither collapses."""
    before = ROOT / "models/doom-small/eval/release_2026-12-06/eval.json"
    after = ROOT / "models/doom-small/eval/release_2026-12-06b/eval.json"
    comparison = _compare_json(capsys, str(before), str(after), "--names", "before", "after")

    def change(label: str) -> dict:
        return _row(comparison, f"{label}, change from the first report")["values"]["after"]

    keys, yaw = change("IDM keys"), change("IDM yaw direction")
    assert 0.01 < keys["low"] < keys["mean"] < keys["high"] < 0.05, keys
    assert 0.01 < yaw["low"] < yaw["mean"] < yaw["high"] < 0.08, yaw
    for horizon in ("1s", "2s", "4s"):
        psnr = change(f"PSNR at {horizon}")
        assert 0 < psnr["low"] < psnr["mean"] < psnr["high"] < 0.5, (horizon, psnr)
    early = change("PSNR at 0.5s")
    assert early["low"] < 0 < early["high"]
    assert _row(comparison, "collapsed")["values"] == {"before": False, "after": False}
    shipped = json.loads(after.read_text())
    vae_training = json.loads((ROOT / "models/doom-small/config.json").read_text())["extra"]["training"]["vae"]
    decoder_judge = vae_training["decoder_stages"][-1]["action_judge_sha256"]
    assert shipped["idm"]["sha256"] != decoder_judge  # scored by another judge than the decoder trained against
    assert not shipped["idm"].get("trained_against")


def test_the_action_loss_10_release_compared_clip_by_clip(capsys):
    """The model card's paired figures for the release of 2026-12-07 (the student of action loss 1.0)
    against 2026-12-06b (0.6, the same decoder), from the two full shipped reports (CPU, float32, 10
    minutes of drift): more faithful at 0.5, 2 and 4 s with intervals clear of zero, level at 1 s; the
    judge's keys and yaw cannot tell them apart; neither collapses, and the yaw target is met on these clips."""
    before = ROOT / "models/doom-small/eval/release_2026-12-06b/eval.json"
    after = ROOT / "models/doom-small/eval/eval.json"
    comparison = _compare_json(capsys, str(before), str(after), "--names", "before", "after")

    def change(label: str) -> dict:
        return _row(comparison, f"{label}, change from the first report")["values"]["after"]

    for horizon in ("0.5s", "2s", "4s"):
        psnr = change(f"PSNR at {horizon}")
        assert 0 < psnr["low"] < psnr["mean"] < psnr["high"] < 1.0, (horizon, psnr)
    level = change("PSNR at 1s")
    assert level["low"] < 0 < level["high"], level
    for label in ("IDM keys", "IDM yaw direction"):
        judged = change(label)
        assert judged["low"] < 0 < judged["mean"] < judged["high"] < 0.02, (label, judged)
    assert _row(comparison, "collapsed")["values"] == {"before": False, "after": False}
    targets = json.loads(after.read_text())["targets"]
    assert targets["idm_yaw_direction_accuracy"]["passed"] and not targets["idm_keyboard_accuracy"]["passed"]
    assert targets["psnr_above_copy_last_frame_at_1s"]["passed"] and targets["no_collapse"]["passed"]
    distill = json.loads((ROOT / "models/doom-small/config.json").read_text())["extra"]["training"]["distill"]
    assert (distill["action_weight"], distill["steps"], distill["finished"]) == (1.0, 232, False)


def test_the_release_on_an_h100_in_bfloat16_reads_like_on_the_cpu(capsys):
    """The model card's H100 figures for the release of 2026-12-07 (bfloat16, a fresh recording of the
    same 90 minutes) against its CPU report: the judge reads the real frames and the VAE's round trip
    alike in both, and the generated clips' keys and yaw cannot be told apart; the yaw falls just under
    0.9 there, which is why the card calls it the target's edge."""
    cpu = ROOT / "models/doom-small/eval/eval.json"
    gpu = ROOT / "models/doom-small/eval/h100/eval.json"
    reports = {name: json.loads(path.read_text()) for name, path in (("cpu", cpu), ("gpu", gpu))}
    assert (reports["cpu"]["settings"]["device"], reports["gpu"]["settings"]["device"]) == ("cpu", "cuda")
    assert (
        reports["gpu"]["settings"]["dtype"] == "bfloat16"
        and reports["gpu"]["idm"]["sha256"] == reports["cpu"]["idm"]["sha256"]
    )
    for source in ("real_clips", "vae_round_trip"):
        for figure in ("keyboard", "yaw_direction"):
            assert reports["gpu"]["idm"][source][figure] == pytest.approx(
                reports["cpu"]["idm"][source][figure], abs=2e-3
            )
    comparison = _compare_json(capsys, str(cpu), str(gpu), "--names", "cpu", "gpu")
    for label in ("IDM keys", "IDM yaw direction"):
        change = _row(comparison, f"{label}, change from the first report")["values"]["gpu"]
        assert change["low"] < 0 < change["high"], (label, change)
    targets = reports["gpu"]["targets"]
    assert round(targets["idm_keyboard_accuracy"]["value"], 3) == 0.854
    assert round(targets["idm_yaw_direction_accuracy"]["value"], 3) == 0.898
    assert not targets["idm_yaw_direction_accuracy"]["passed"] and not targets["idm_keyboard_accuracy"]["passed"]
    assert targets["psnr_above_copy_last_frame_at_1s"]["passed"] and targets["no_collapse"]["passed"]


def test_the_generation_loses_keys_in_the_first_half_of_each_latent_frame_since_the_motion_vae():
    """The model card's item 4 of what to improve: split by where the judged change falls among a latent
    frame's 4 video frames, the generated keys of every release on the motion VAE read worse in the
    first half than in the second, where the round trip and the real frames read alike at every phase;
    the first VAE's release did not split so."""
    eval_dir = ROOT / "models/doom-small/eval"

    def phases(path: Path, source: str) -> list[float]:
        return json.loads(path.read_text())["idm"][source]["by_phase"]["keyboard"]

    current = eval_dir / "eval.json"
    assert [round(v, 3) for v in phases(current, "generated")] == [0.832, 0.829, 0.869, 0.871]
    assert [round(v, 3) for v in phases(current, "vae_round_trip")] == [0.869, 0.857, 0.868, 0.869]
    assert max(phases(current, "real_clips")) - min(phases(current, "real_clips")) < 0.01
    for name in (
        "eval.json",
        "h100/eval.json",
        *(f"release_{day}/eval.json" for day in ("2026-12-06b", "2026-12-06", "2026-12-05")),
    ):
        generated = phases(eval_dir / name, "generated")
        round_trip = phases(eval_dir / name, "vae_round_trip")
        first, second = sum(generated[:2]) / 2, sum(generated[2:]) / 2
        assert 0.80 <= first <= 0.833 and 0.83 <= second <= 0.876 and second - first > 0.02, (name, generated)
        assert max(round_trip) - min(round_trip) < 0.015, (name, round_trip)
    previous = phases(eval_dir / "eval_previous_release.json", "generated")
    assert round(min(previous), 2) == 0.79 and round(max(previous), 2) == 0.81


def test_the_action_loss_15_student_is_not_told_apart_from_the_release_but_at_half_a_second(capsys):
    """models/next/dit-mapped-motion's last section: the student of action loss 1.5 (300 of 300 steps)
    against the release of 2026-12-07, both full CPU reports on the same clips: less faithful at 0.5 s
    with an interval clear of zero, level from 1 s; keys and yaw within intervals holding zero, the keys
    still below the round trip's and the target; no collapse. Its distillation finished its schedule."""
    folder = ROOT / "models/next/dit-mapped-motion"
    release = ROOT / "models/doom-small/eval/eval.json"
    student = folder / "student300_action15_cpu_eval.json"
    comparison = _compare_json(capsys, str(release), str(student), "--names", "release", "student")

    def change(label: str) -> dict:
        return _row(comparison, f"{label}, change from the first report")["values"]["student"]

    early = change("PSNR at 0.5s")
    assert -0.6 < early["low"] < early["mean"] < early["high"] < 0, early
    for horizon in ("1s", "2s", "4s"):
        level = change(f"PSNR at {horizon}")
        assert level["low"] < 0 < level["high"], (horizon, level)
    for label in ("IDM keys", "IDM yaw direction"):
        judged = change(label)
        assert judged["low"] < 0 < judged["high"] and abs(judged["mean"]) < 0.01, (label, judged)
    assert _row(comparison, "collapsed")["values"] == {"release": False, "student": False}
    idm = json.loads(student.read_text())["idm"]
    assert idm["generated"]["keyboard"] < idm["vae_round_trip"]["keyboard"] < 0.9
    result = json.loads((folder / "student300_action15_distill_result.json").read_text())
    assert (result["step"], result["finished"]) == (300, True)


def _release_changes(capsys, before: str, after: str):
    """`compare` of two paired release reports: a function from a row's label to the later release's
    "change from the first report" (mean, low, high)."""
    comparison = _compare_json(capsys, str(PAIRED / before), str(PAIRED / after), "--names", "before", "after")
    return lambda label: _row(comparison, f"{label}, change from the first report")["values"]["after"]


@pytest.mark.parametrize("name", ["context5_before1", "context7_before2"])
def test_judges_of_longer_context_read_the_release_as_their_readme_says(name):
    """models/next/judges: each judge loads with the config its report names, was trained by that report's
    eval (the weights' hash), and, like the shipped judge, reads the generated keys below the real frames'
    and the VAE round trip's; the 7-frame judge reads the round trip's turns far below the real ones."""
    folder = ROOT / "models/next/judges" / name
    judge = load_idm(folder)
    report = json.loads((ROOT / f"models/next/judges/eval_{name}_h100.json").read_text())["idm"]
    assert report["config"]["context"] == judge.config.context and report["config"]["before"] == judge.config.before
    assert report["config"]["width"] == judge.config.width
    assert report["training"]["steps"] == 6000  # trained by this very eval, on the training episodes
    assert idm_weights_sha256(folder) != idm_weights_sha256(ROOT / "models/doom-small/eval/idm")
    assert json.loads((folder / "idm.json").read_text())["accuracy_real_val"] == report["real_val"]
    generated, real, round_trip = report["generated"], report["real_clips"], report["vae_round_trip"]
    assert generated["frames"] == real["frames"] == round_trip["frames"]
    assert generated["keyboard"] < round_trip["keyboard"] < real["keyboard"]
    assert real["keyboard"] >= 0.9 and generated["keyboard"] < 0.9  # the keys target fails under this judge too
    if name == "context7_before2":
        assert round_trip["yaw_direction"] < 0.75 < 0.9 < real["yaw_direction"]
    else:
        assert generated["yaw_direction"] > 0.9 and round_trip["yaw_direction"] > 0.85
