"""Compare two checkpoints on the same frames: paired PSNR differences between two `worldsim eval` runs.

Both runs must have scored the same test episodes with the same session seeds, context and
generated lengths (e.g. the same `worldsim eval --data D --episodes N --seed S` command with two
`--checkpoint`s); then each frame's PSNR under one checkpoint is paired with the same frame under
the other, and the interval is a bootstrap over episodes, as in `worldsim eval`'s own differences.

    python scripts/compare_evals.py runs/eval-new runs/eval-old

prints, for each condition both runs have (long context, sliding window, memory control,
teacher-forced), the mean PSNR of each run and NEW - OLD on all frames, revisit frames and the
other frames, with its 95% interval and the number of episodes where NEW is ahead.

    python scripts/compare_evals.py runs/eval-new runs/eval-old --by-frame 16,48

adds the same comparison by generated-frame range (here frames 1-16, 17-48, 49-last), mean of
the episodes' means: a model can trade its first frames, which still follow the ground-truth
context, against the late ones, where its own drift dominates.

Where the runs report them, it also prints each condition's sharpness and motion (the generated
frames' detail and frame-to-frame change over the recorded frames'): a PSNR gain that comes with
lower ratios may be a smoother or stiller dream rather than a better one. Generation settings that
differ between the runs (sampler steps, CFG, shift, temperature, noise; precision; long-context
cache) are named above the table: such a comparison is of two samplers, not only two checkpoints.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from worldsim import metrics
from worldsim.evaluate import results_shape_problem

# the dataset itself is compared by its frames (same_frames_problem), not by the --data string
MUST_MATCH = ("dataset_split", "episode_ids", "session_seeds", "context", "generate", "window")
CONDITIONS = {  # results.json name -> label
    "multilevel": "long context (multilevel)",
    "sliding": "sliding window only",
    "other_memory": "control: another maze's memory",
}


def load_results(path: str) -> tuple[Path, dict[str, Any]]:
    file = Path(path)
    if file.is_dir():
        file = file / "results.json"
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{file}: cannot read a worldsim eval results.json ({exc})") from None
    problem = results_shape_problem(results)
    if problem:
        raise SystemExit(f"{file}: not a worldsim eval results file ({problem})")
    return file, results


def same_frames_problem(new: dict[str, Any], old: dict[str, Any]) -> str | None:
    """Why two runs did not score the same frames (None: they did). The episodes are compared by
    what each run measured of its recorded frames (their detail and change, the copy-last floor),
    so one dataset under two paths matches and two datasets under one path (a moved link) do not;
    runs written before those numbers were stored fall back to the --data path."""
    for key in MUST_MATCH:
        if new["config"].get(key) != old["config"].get(key):
            return f"their '{key}' differs ({new['config'].get(key)!r} vs {old['config'].get(key)!r})"
    def fingerprints(e: dict[str, Any]) -> list:
        truth = e.get("truth") or {}
        return [truth.get("detail"), truth.get("change"), (e["per_frame"].get("copy_last") or {}).get("psnr")]

    compared = True
    for a, b in zip(new["ground_truth"]["episodes"], old["ground_truth"]["episodes"]):
        for key in ("id", "maze_seed", "length"):
            if a.get(key) != b.get(key):
                return f"episode {a.get('id')}'s '{key}' differs ({a.get(key)!r} vs {b.get(key)!r})"
        pairs = [(x, y) for x, y in zip(fingerprints(a), fingerprints(b)) if x is not None and y is not None]
        compared = compared and bool(pairs)
        for x, y in pairs:
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if x.shape != y.shape or not np.allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True):
                return f"episode {a.get('id')}'s recorded frames differ"
    if not compared and new["config"].get("dataset") != old["config"].get("dataset"):
        return f"their 'dataset' differs ({new['config'].get('dataset')!r} vs {old['config'].get('dataset')!r})"
    return None


def gap_cells(gap: dict[str, Any]) -> list[str]:
    """The difference, its interval and the episodes ahead, as table cells."""
    interval = "n/a" if gap["ci_low"] is None else f"{gap['ci_low']:+.2f} .. {gap['ci_high']:+.2f}"
    return [f"{gap['gap']:+.2f}", interval, f"{gap['episodes_positive']} of {gap['episodes']}"]


def rows_for(name: str, new: list[dict], old: list[dict], new_summary: dict, old_summary: dict,
             seed: int) -> list[list[str]]:
    """One table row per frame selection (all, revisit, rest) for one condition; the means are the
    ones `worldsim eval` stored (TECO overall, pooled revisit / rest), the differences paired here."""
    a = [np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) for e in new]
    b = [np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) for e in old]
    selections: list[tuple[str, str, list[int], list[np.ndarray] | None]] = [
        ("all frames", "overall", list(range(len(new))), None)]
    posed = [i for i, e in enumerate(new) if e.get("revisit") is not None]  # as eval pools them
    if posed:
        revisit = [np.asarray(new[i]["revisit"], dtype=bool) for i in posed]
        selections += [("revisit frames", "revisit", posed, revisit),
                       ("other frames", "rest", posed, [~r for r in revisit])]
    rows = []
    for label, key, picked, masks in selections:
        gap = metrics.paired_gap([a[i] for i in picked], [b[i] for i in picked], masks, pooled=masks is not None,
                                 seed=seed)
        if gap["gap"] is None:
            continue
        means = []
        for summary in (new_summary, old_summary):
            entry = summary[name]["psnr"][key]
            if entry is None:  # an eval from before it pooled the posed episodes left these blank
                break
            means.append(entry if masks is None else entry["mean"])
        if len(means) < 2:
            continue
        rows.append([CONDITIONS.get(name, name), label, f"{means[0]:.2f}", f"{means[1]:.2f}", *gap_cells(gap)])
    return rows


def frame_range_rows(name: str, new: list[dict], old: list[dict], edges: list[int], seed: int) -> list[list[str]]:
    """One row per generated-frame range [lo, hi) for one condition (ranges cut at `edges`)."""
    a = [np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) for e in new]
    b = [np.asarray(e["per_frame"][name]["psnr"], dtype=np.float64) for e in old]
    count = min(len(x) for x in a)
    cuts = [0, *[e for e in edges if 0 < e < count], count]
    rows = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        masks = [(np.arange(len(x)) >= lo) & (np.arange(len(x)) < hi) for x in a]
        gap = metrics.paired_gap(a, b, masks, pooled=False, seed=seed)
        means = [np.mean([x[lo:hi].mean() for x in runs]) for runs in (a, b)]
        rows.append([CONDITIONS.get(name, name), f"frames {lo + 1}-{hi}", f"{means[0]:.2f}", f"{means[1]:.2f}",
                     *gap_cells(gap)])
    return rows


def frame_edges(text: str) -> list[int]:
    try:
        edges = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--by-frame wants frame counts like 16,48, got {text!r}") from None
    if not edges or edges[0] < 1:
        raise argparse.ArgumentTypeError(f"--by-frame wants positive frame counts like 16,48, got {text!r}")
    return edges


def ratio_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def setting_differences(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """The generation settings two runs used that differ: the sampler (as resolved against each
    checkpoint's defaults), the precision, the long-context cache, its memory bound and span."""
    def used(config: dict[str, Any]) -> dict[str, Any]:
        # only what a run recorded: older results.json lack sampler_used's later keys, precision_used
        # or long_cache, and an absent setting is not a different one. memory_frames and the memory span
        # are the exceptions: eval kept every frame (0) at its frame index (0) before it had the options
        return {**(config.get("sampler_used") or {}), "precision": config.get("precision_used"),
                "long_cache": config.get("long_cache"), "memory_frames": config.get("memory_frames", 0),
                "memory_span": config.get("memory_span_used", 0)}

    a, b = used(new), used(old)
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in sorted(set(a) & set(b), key=str)
            if a[k] is not None and b[k] is not None and a[k] != b[k]]


def print_table(header: list[str], table: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in table:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("new", help="eval output folder (or its results.json) of the checkpoint under test")
    ap.add_argument("old", help="eval output folder (or its results.json) to compare against")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--by-frame", type=frame_edges, default=None, metavar="N,M,...",
                    help="also compare by generated-frame range, cut after these frame counts (e.g. 16,48)")
    args = ap.parse_args()

    new_file, new = load_results(args.new)
    old_file, old = load_results(args.old)
    problem = same_frames_problem(new, old)
    if problem:
        raise SystemExit(f"{new_file} and {old_file} did not score the same frames: {problem}; run both evals "
                         f"with the same --data, --episodes, --seed, --context and --generate, and checkpoints "
                         f"of the same window")

    header = ["condition", "frames", "new", "old", "new - old (dB)", "95% interval", "episodes new ahead"]
    table = []
    gt_new, gt_old = new["ground_truth"], old["ground_truth"]
    new_eps, old_eps = gt_new["episodes"], gt_old["episodes"]
    for name in CONDITIONS:
        if all(name in e["per_frame"] for e in new_eps + old_eps):
            table += rows_for(name, new_eps, old_eps, gt_new["summary"], gt_old["summary"], args.seed)
    new_tf, old_tf = gt_new.get("teacher_forced_episodes"), gt_old.get("teacher_forced_episodes")
    if new_tf and old_tf and len(new_tf) == len(old_tf):
        for row in rows_for("teacher_forced", new_tf, old_tf, gt_new["teacher_forced_summary"],
                            gt_old["teacher_forced_summary"], args.seed):
            table.append(["teacher-forced next frame", *row[1:]])
    if not table:
        raise SystemExit(f"{new_file} and {old_file}: no condition in common to compare")

    # still frames change how the generated conditions start, not which frames are scored: a comparison
    # of two starts is fair, but say which each had (results written before the option had none)
    still = [r["config"].get("still_frames", 0) for r in (new, old)]
    print(f"new: {new['config'].get('checkpoint')} ({new_file})" + (f", {still[0]} still frames" if any(still) else ""))
    print(f"old: {old['config'].get('checkpoint')} ({old_file})" + (f", {still[1]} still frames" if any(still) else ""))
    differ = setting_differences(new["config"], old["config"])
    if differ:  # a fair comparison of two samplers, or an accident: either way it must be seen
        print(f"settings that differ (new vs old): {'; '.join(differ)}")
    print(f"{len(new_eps)} episodes of {new['config']['dataset']}; PSNR in dB; all frames = mean of the episodes' "
          f"means, revisit / other frames pooled; intervals: bootstrap over episodes\n")
    print_table(header, table)
    ratio_rows = []
    for name, label in CONDITIONS.items():
        a, b = gt_new["summary"].get(name) or {}, gt_old["summary"].get(name) or {}
        if any(run.get(key) is not None for run in (a, b) for key in ("sharpness", "motion")):
            ratio_rows.append([label] + [ratio_cell(run.get(key)) for key in ("sharpness", "motion") for run in (a, b)])
    if ratio_rows:
        print("\nSharpness and motion (generated / recorded frames; 1 = as in reality, below 1 = smoother or "
              "stiller):\n")
        print_table(["condition", "sharpness new", "sharpness old", "motion new", "motion old"], ratio_rows)
    if args.by_frame:
        by_frame = []
        for name in CONDITIONS:
            if all(name in e["per_frame"] for e in new_eps + old_eps):
                by_frame += frame_range_rows(name, new_eps, old_eps, args.by_frame, args.seed)
        print("\nBy generated-frame range (mean of the episodes' means):\n")
        print_table(header, by_frame)


if __name__ == "__main__":
    main()
