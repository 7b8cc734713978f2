#!/usr/bin/env python
"""Study v2 (RESULTS.md): faithful FOTF on CamVid with one fixed initialisation, scored on test.

    FOTF_CAMVID_ROOT=../shared/datasets/camvid python scripts/camvid_study_v2.py [--stage pilot] [--dry_run]

Stages (each resumable: a finished run is skipped, an interrupted one resumes from its checkpoint):

1. `pretrain`: DeepLabV3-R18 trained with CE on generated synthetic-streets (no CamVid image), a
   stand-in for the paper's ImageNet backbone.
2. `init`: `results/camvid_v2/init_r18`, the one starting point of every CamVid model: the
   pretrained backbone plus CamVid heads drawn from a fixed seed (`INIT_SEED`). Seeds then vary only
   data order, augmentation and dropout masks.
3. `teacher`: DeepLabV3-R18 from that init, CE, 3x the students' steps; scored on val and test; its
   weights are copied to `results/camvid_v2/teacher/`.
4. `pilot`: KD students with seeds 0..2, scored on val and test; `results/camvid_v2/pilot.md` gets
   their seed spread and the number of seed pairs needed to see a 1-point mIoU effect (80% power,
   two-sided 5%), `fotf_hf.report.pairs_needed`.
5. `sweep`: KD + FOTF (faithful default) with seed 0 at each (kappa, m) of `SWEEP`, scored on val
   only (the choice is made there); `results/camvid_v2/sweep.md` lists each point's val mIoU next to
   the pilot's KD seed 0 and how strongly FOTF acted (the logged weight mean / p99 / max over training).
6. `arms`: every arm of `ARMS` with the same seeds, scored on val and test, in `arm_queue()` order
   (the KD vs KD + FOTF pairs first: more pairs beat more arms). The KD + FOTF arms use the sweep's
   best val point. KD and KD + FOTF students are also scored with T = 5 MC-dropout passes on test
   (AUROC of sigma for their errors, NLL, Brier, AURC) and measured by `scripts/fotf_mechanism.py`
   (FOTF weights on boundary vs interior pixels) while their weights exist: only the small JSONs
   are kept.
7. `report`: `scripts/camvid_v2_report.py` writes `results/camvid_v2/report.md` (and
   `fotf_weights.png`) from the kept copies of every run finished so far.

A run whose kept copy already holds what its stage needs is not run again; one that lacks something
(e.g. the sweep's seed-0 run, scored on val only, when the arms also need test) is trained again
with its seed, since students' weights are not kept.

Every command run is appended to `results/camvid_v2/commands.sh`, each run's output to
`results/camvid_v2/logs/`, and each run's small artefacts (metrics.json, resolved config, card,
reliability diagram) are copied to `results/camvid_v2/<run>/`. Weights stay under outputs/camvid_v2/,
except those of the two shared starting points (init and teacher, 54 MB each), which are kept in
`results/camvid_v2/` and committed: the study spans sessions on fresh machines where `outputs/` is
gone, and every later run starts from exactly these weights.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("scripts/configs/camvid_v2")
OUT = Path("outputs/camvid_v2")
RESULTS = Path("results/camvid_v2")
INIT = RESULTS / "init_r18"
SHARED_WEIGHTS = ("config.json", "model.safetensors")  # what from_pretrained reads
INIT_SEED = 20261201
SPLITS = {"validation": "val", "test": "test"}
EVAL_SIZE = (180, 240)
PILOT_SEEDS = (0, 1, 2)
# The paper's CamVid tuple for DeepLabV3 vanilla KD + FOTF is (10, 10) and its grid kappa 1..10 x m
# {1, 3, 10}; these points span it from mild to the paper's choice.
SWEEP = ((3, 1), (10, 1), (10, 10))
# arm -> (config, extra overrides); KD + FOTF arms add the chosen kappa/m. CE + FOTF uses the paper's
# CamVid DeepLabV3 Baseline+FOTF tuple (3, 1) (appendix A.3.2): the sweep budget goes to KD + FOTF.
ARMS = {
    "kd": ("kd.yaml", []),
    "kd_fotf": ("kd_fotf.yaml", []),
    "ce": ("ce.yaml", []),
    "ce_fotf": ("ce_fotf.yaml", ["--fotf.kappa", "3", "--fotf.m", "1"]),
    "kd_fotf_other_merge": ("kd_fotf.yaml", ["--fotf.merge_kd", "per_class", "--fotf.merge_ce", "per_pixel"]),
    "kd_fotf_classifier": ("kd_fotf.yaml", ["--fotf.mode", "classifier"]),
}
FIRST_SEEDS = range(5)  # every arm: at least 5 seed pairs per comparison
MORE_PAIRS = range(5, 10)  # then KD vs KD + FOTF up to the pilot's 9 (and one spare)
MC_SAMPLES = 5
STAGES = ("pretrain", "init", "teacher", "pilot", "sweep", "arms", "report")


def run(cmd, log: Path, dry_run: bool) -> None:
    """Run one command from the repo root; append it to commands.sh and its output to `log`."""
    line = shlex.join(cmd)
    print(f"$ {line}", flush=True)
    if dry_run:
        return
    (REPO / RESULTS).mkdir(parents=True, exist_ok=True)
    with open(REPO / RESULTS / "commands.sh", "a") as f:
        f.write(line + "\n")
    (REPO / log).parent.mkdir(parents=True, exist_ok=True)
    with open(REPO / log, "a") as f:
        f.write(f"\n$ {line}\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def kept(folder: Path) -> Path:
    """Where `keep` copies the small artefacts of the run in `folder` (under outputs/camvid_v2/)."""
    return RESULTS / folder.relative_to(OUT)


def evaluations(folder: Path) -> dict:
    """The run's scores: from its output folder, else from its kept copy (a previous session's)."""
    for where in (folder, kept(folder)):
        metrics = REPO / where / "metrics.json"
        if metrics.is_file():
            return json.loads(metrics.read_text()).get("evaluations", {})
    return {}


def eval_key(split: str, mc_samples: int = 0) -> str:
    from fotf_hf.evaluation import evaluation_key

    return evaluation_key({"split": split, "eval_size": list(EVAL_SIZE), "mc_samples": mc_samples})


def done(folder: Path, splits=tuple(SPLITS), mechanism: bool = False) -> bool:
    """Whether the run already has all a stage needs: these evaluations (and, with `mechanism`, the
    MC evaluation on test and mechanism_test.json), in its output folder or its kept copy. Students'
    weights are not kept, so a run a later stage needs more from is trained again (same seed)."""
    have = evaluations(folder)
    keys = [eval_key(s) for s in splits] + ([eval_key("test", MC_SAMPLES)] if mechanism else [])
    if not all(k in have for k in keys):
        return False
    return not mechanism or any((REPO / w / "mechanism_test.json").is_file() for w in (folder, kept(folder)))


def log_path(folder: Path) -> Path:
    """Where the commands of the run in `folder` (under outputs/camvid_v2/) append their output."""
    return RESULTS / "logs" / f"{folder.relative_to(OUT).as_posix().replace('/', '_')}.log"


def train(config: str, folder: Path, overrides, dry_run: bool) -> None:
    """`scripts/distill.py` unless `folder` already holds the final weights (resumes a checkpoint)."""
    for where in (folder, kept(folder)):
        if (REPO / where / "model.safetensors").is_file() and (REPO / where / "metrics.json").is_file():
            print(f"[study] {folder}: trained already ({where})", flush=True)
            return
    resume = ["--resume", "latest"] if (REPO / folder / "checkpoints").is_dir() else []
    run([sys.executable, "scripts/distill.py", "--config", str(CONFIGS / config), "--run.output_dir", str(folder),
         *overrides, *resume], log_path(folder), dry_run)


def score(folder: Path, camvid_root: str, dry_run: bool, weights: bool = False, splits=tuple(SPLITS)) -> None:
    """`scripts/evaluate.py` on `splits` (val and test by default; each split once), then copy the
    small artefacts (and the weights too with `weights`)."""
    if not dry_run and all(eval_key(split) in evaluations(folder) for split in splits):
        return
    for split in splits:
        if not dry_run and eval_key(split) in evaluations(folder):
            continue
        run([sys.executable, "scripts/evaluate.py", "--model", str(folder), "--dataset", "camvid", "--root", camvid_root,
             "--split", split, "--eval_size", *map(str, EVAL_SIZE), "--batch_size", "4"],
            log_path(folder), dry_run)
    if not dry_run:
        keep(folder, weights)


def keep(folder: Path, weights: bool = False) -> None:
    """Copy a run's small artefacts (and its final weights with `weights`, never checkpoints) to
    results/camvid_v2/<run>/; a file is written under a temporary name and renamed into place."""
    dst = REPO / kept(folder)
    dst.mkdir(parents=True, exist_ok=True)
    names = ("metrics.json", "fotf_config.yaml", "README.md", "reliability.png", "log_history.jsonl",
             "mechanism_test.json")
    for name in names + (SHARED_WEIGHTS if weights else ()):
        if (REPO / folder / name).is_file():
            shutil.copy2(REPO / folder / name, dst / f".tmp_{name}")
            os.replace(dst / f".tmp_{name}", dst / name)


def build_init(dry_run: bool) -> None:
    """The CamVid starting point: synthetic-streets backbone + CamVid heads from `INIT_SEED`."""
    print(f"[study] init: backbone of {OUT / 'pretrain_r18'} + heads from seed {INIT_SEED} -> {INIT}", flush=True)
    if dry_run or (REPO / INIT / "model.safetensors").is_file():
        return
    import torch
    from transformers import AutoModelForSemanticSegmentation

    import fotf_hf  # noqa: F401  (registers our model types with the Auto classes)
    from fotf_hf.data.info import CAMVID_CLASSES
    from fotf_hf.models import create_model

    source = AutoModelForSemanticSegmentation.from_pretrained(str(REPO / OUT / "pretrain_r18"))
    torch.manual_seed(INIT_SEED)
    model = create_model("deeplabv3", "resnet18", num_labels=11, id2label=dict(enumerate(CAMVID_CLASSES)))
    model.pretrained.load_state_dict(source.pretrained.state_dict())
    tmp = REPO / INIT.parent / f".tmp_{INIT.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    os.replace(tmp, REPO / INIT)


def pilot_report() -> str:
    """Markdown: the pilot's KD scores per seed on val and test, their spread, and the power plan."""
    from fotf_hf.report import minimum_detectable_effect, pairs_needed

    lines = ["# Study v2 pilot: seed spread of KD from one fixed initialisation", "",
             "Generated by `scripts/camvid_study_v2.py --stage pilot`.", ""]
    teacher = evaluations(OUT / "teacher")
    lines += ["| run | " + " | ".join(f"{s} mIoU (%)" for s in SPLITS.values()) + " |",
              "| --- |" + " --- |" * len(SPLITS)]
    rows = {"teacher": teacher, **{f"kd seed {s}": evaluations(OUT / "kd" / f"seed{s}") for s in PILOT_SEEDS}}
    for name, evals in rows.items():
        cells = [f"{100 * evals[eval_key(s)]['metrics']['mean_iou']:.2f}" if eval_key(s) in evals else "n/a"
                 for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    import statistics

    test = [100 * e[eval_key("test")]["metrics"]["mean_iou"] for n, e in rows.items()
            if n.startswith("kd") and eval_key("test") in e]
    if len(test) >= 2:
        sd = statistics.stdev(test)
        # Two arms with the same seed share the init, data order and augmentation; until paired runs
        # exist, the paired difference is assumed as noisy as two independent runs (sd * sqrt(2)).
        sd_diff = sd * 2 ** 0.5
        n = pairs_needed(sd_diff, 1.0)
        lines += ["", f"KD test mIoU over {len(test)} seeds: mean {statistics.fmean(test):.2f}, std {sd:.2f} points.",
                  f"Assumed paired-difference std: {sd_diff:.2f} points (std x sqrt(2), no pairing benefit assumed).",
                  f"Seed pairs needed to detect a 1.0-point difference at 80% power (two-sided 5%): **{n}**.",
                  f"Minimum detectable effect with 5 pairs: {minimum_detectable_effect(sd_diff, 5):.2f} points; "
                  f"with 10 pairs: {minimum_detectable_effect(sd_diff, 10):.2f} points.", ""]
    return "\n".join(lines) + "\n"


def fotf_folder(kappa: float, m: float, seed: int) -> Path:
    """Where KD + FOTF (faithful default) at (kappa, m) with `seed` trains."""
    return OUT / f"kd_fotf_k{kappa:g}_m{m:g}" / f"seed{seed}"


def weight_stats(folder: Path) -> dict:
    """Mean over the logged intervals of `fotf/sigma_mean`, `fotf/weight_kd_mean` and `fotf/weight_kd_p99`, and the
    largest `fotf/weight_kd_max`, from the run's log_history.jsonl (or its kept copy)."""
    from fotf_hf.training import LOG_HISTORY_FILE, read_log_history

    for where in (folder, kept(folder)):
        path = REPO / where / LOG_HISTORY_FILE
        if path.is_file():
            rows = [r for r in read_log_history(path) if "fotf/weight_kd_mean" in r]
            if rows:
                return {"sigma": sum(r["fotf/sigma_mean"] for r in rows) / len(rows),
                        "mean": sum(r["fotf/weight_kd_mean"] for r in rows) / len(rows),
                        "p99": sum(r["fotf/weight_kd_p99"] for r in rows) / len(rows),
                        "max": max(r["fotf/weight_kd_max"] for r in rows)}
    return {}


def sweep_report() -> str:
    """Markdown: val mIoU of KD + FOTF at each sweep point (seed 0) next to KD seed 0, with the
    strength of the weighting it trained with."""
    val = eval_key("validation")

    def miou(folder: Path) -> str:
        evals = evaluations(folder)
        return f"{100 * evals[val]['metrics']['mean_iou']:.2f}" if val in evals else "n/a"

    lines = ["# Study v2 sweep: kappa and m of KD + FOTF, chosen on val (seed 0)", "",
             "A run that stopped (e.g. a loss that turned non-finite) shows n/a; its log in `logs/` says why.", "",
             "Generated by `scripts/camvid_study_v2.py --stage sweep`. Weight statistics are the KD-term",
             "weights `(1 + m sigma)^kappa` merged `per_pixel`, averaged over the logged intervals of",
             "training (max: the largest logged).", "",
             "| run | val mIoU (%) | sigma mean | weight mean | weight p99 | weight max |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| KD (no FOTF) | {miou(OUT / 'kd' / 'seed0')} | - | 1 | 1 | 1 |"]
    for kappa, m in SWEEP:
        folder = fotf_folder(kappa, m, 0)
        w = weight_stats(folder)
        cells = [f"{w[k]:.3g}" if k in w else "n/a" for k in ("sigma", "mean", "p99", "max")]
        lines.append(f"| KD + FOTF kappa {kappa:g}, m {m:g} | {miou(folder)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chosen_point() -> tuple:
    """The sweep's `(kappa, m)` with the best val mIoU (seed 0); ValueError before the sweep ran."""
    val = eval_key("validation")
    scored = {(k, m): evaluations(fotf_folder(k, m, 0)).get(val) for k, m in SWEEP}
    scored = {point: e["metrics"]["mean_iou"] for point, e in scored.items() if e}
    if not scored:
        raise ValueError("no sweep point is scored on val yet: run --stage sweep first")
    return max(scored, key=scored.get)


def arm_queue() -> list:
    """`(arm, seed)` in the order they run: KD and KD + FOTF for the first seeds, the other arms for
    the same seeds, then more KD / KD + FOTF pairs."""
    queue = [(arm, s) for s in FIRST_SEEDS for arm in ("kd", "kd_fotf")]
    queue += [(arm, s) for arm in ARMS if arm not in ("kd", "kd_fotf") for s in FIRST_SEEDS]
    return queue + [(arm, s) for s in MORE_PAIRS for arm in ("kd", "kd_fotf")]


def arm_folder(arm: str, seed: int, point: tuple) -> Path:
    """Run folder of one arm and seed; KD + FOTF at the chosen point shares the sweep's folders, its
    variants name the point too."""
    if arm == "kd_fotf":
        return fotf_folder(*point, seed)
    if arm.startswith("kd_fotf"):
        return OUT / f"{arm}_k{point[0]:g}_m{point[1]:g}" / f"seed{seed}"
    return OUT / arm / f"seed{seed}"


def measure_mechanism(folder: Path, point: tuple, camvid_root: str, dry_run: bool) -> None:
    """T-pass MC evaluation on test (sigma's AUROC for errors, NLL, Brier, AURC) and the FOTF weights
    on boundary vs interior pixels at `point`, each once; needs the run's weights (this session's)."""
    log = log_path(folder)
    if dry_run or eval_key("test", MC_SAMPLES) not in evaluations(folder):
        run([sys.executable, "scripts/evaluate.py", "--model", str(folder), "--dataset", "camvid", "--root", camvid_root,
             "--split", "test", "--eval_size", *map(str, EVAL_SIZE), "--batch_size", "4",
             "--mc_samples", str(MC_SAMPLES)], log, dry_run)
    mechanism = folder / "mechanism_test.json"
    if dry_run or not ((REPO / mechanism).is_file() or (REPO / kept(folder) / mechanism.name).is_file()):
        run([sys.executable, "scripts/fotf_mechanism.py", "--model", str(folder), "--dataset", "camvid",
             "--root", camvid_root, "--split", "test", "--eval_size", *map(str, EVAL_SIZE),
             "--kappa", f"{point[0]:g}", "--m", f"{point[1]:g}", "--mc_samples", str(MC_SAMPLES)], log, dry_run)
    if not dry_run:
        keep(folder)


def run_arms(root: list, camvid_root: str, dry_run: bool) -> None:
    """Train and score every `(arm, seed)` of `arm_queue()` (finished ones are skipped)."""
    point = (10, 1) if dry_run and not any(evaluations(fotf_folder(k, m, 0)) for k, m in SWEEP) else chosen_point()
    print(f"[study] arms: KD + FOTF at kappa {point[0]:g}, m {point[1]:g} (best val mIoU of the sweep)", flush=True)
    fotf_args = ["--fotf.kappa", f"{point[0]:g}", "--fotf.m", f"{point[1]:g}"]
    for arm, seed in arm_queue():
        config, extra = ARMS[arm]
        folder = arm_folder(arm, seed, point)
        if not dry_run and done(folder, mechanism=arm in ("kd", "kd_fotf")):
            continue
        overrides = [*root, "--run.seed", str(seed), *(fotf_args if config == "kd_fotf.yaml" else []), *extra]
        train(config, folder, overrides, dry_run)
        score(folder, camvid_root, dry_run)
        if arm in ("kd", "kd_fotf"):
            measure_mechanism(folder, point, camvid_root, dry_run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES, default="pilot", help="run every stage up to this one")
    parser.add_argument("--camvid_root", default=os.environ.get("FOTF_CAMVID_ROOT"),
                        help="CamVid folder (default: $FOTF_CAMVID_ROOT)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if not args.camvid_root:
        parser.error("CamVid's folder is needed: pass --camvid_root <folder> or set FOTF_CAMVID_ROOT")
    stages = STAGES[: STAGES.index(args.stage) + 1]
    root = ["--data.root", args.camvid_root]
    start = time.time()
    if not (REPO / INIT / "model.safetensors").is_file():  # only the init needs the pretraining
        train("pretrain.yaml", OUT / "pretrain_r18", [], args.dry_run)
    if not args.dry_run and (REPO / OUT / "pretrain_r18").is_dir():
        keep(OUT / "pretrain_r18")
    if "init" in stages:
        build_init(args.dry_run)
    if "teacher" in stages:
        train("teacher.yaml", OUT / "teacher", root, args.dry_run)
        score(OUT / "teacher", args.camvid_root, args.dry_run, weights=True)
    if "pilot" in stages:
        for seed in PILOT_SEEDS:
            folder = OUT / "kd" / f"seed{seed}"
            if not args.dry_run and done(folder):
                continue
            train("kd.yaml", folder, [*root, "--run.seed", str(seed)], args.dry_run)
            score(folder, args.camvid_root, args.dry_run)
        if not args.dry_run:
            (REPO / RESULTS / "pilot.md").write_text(pilot_report())
            print((REPO / RESULTS / "pilot.md").read_text())
    if "sweep" in stages:
        for kappa, m in SWEEP:
            folder = fotf_folder(kappa, m, 0)
            if not args.dry_run and done(folder, splits=("validation",)):
                continue
            try:
                train("kd_fotf.yaml", folder, [*root, "--run.seed", "0", "--fotf.kappa", str(kappa), "--fotf.m", str(m)],
                      args.dry_run)
            except subprocess.CalledProcessError:  # e.g. a loss that turned non-finite: the table says n/a
                print(f"[study] {folder} failed; its log says why", flush=True)
                continue
            score(folder, args.camvid_root, args.dry_run, splits=("validation",))
        if not args.dry_run:
            (REPO / RESULTS / "sweep.md").write_text(sweep_report())
            print((REPO / RESULTS / "sweep.md").read_text())
    if "arms" in stages:
        run_arms(root, args.camvid_root, args.dry_run)
    if "report" in stages:  # reads only the kept copies (`python scripts/camvid_v2_report.py` alone trains nothing)
        run([sys.executable, "scripts/camvid_v2_report.py"], RESULTS / "logs" / "report.log", args.dry_run)
    print(f"[study] finished {args.stage} in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
