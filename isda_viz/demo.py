"""`isda-viz demo`: the whole pipeline on Fashion-MNIST, resumable stage by stage.

Stages (each skipped, with a status line saying so, when DIR already holds its finished output):
  1-3. with `from_scratch`: train the ISDA classifier, the CE judge (other seed) and the WGAN-GP;
       otherwise use the weights shipped in `isda_viz/pretrained`.
  4.   the figure grid: one test image per class, its reconstruction, K augmented, random same-class samples.
  5.   the FAISS audit of the augmented images against the training set.
  6.   `summary.json` and a table of the figures, and the page `index.html` joining the figure's
       images to their audit neighbours (`isda_viz.outputs.html`).
  7.   (run before 6) the directions figure `directions.png` (`isda-viz directions --test`): each class's
       top eigen-directions of Sigma_y, one at a time, and the semantic test; its rates join the summary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from isda_viz import locks
from isda_viz.bounds import check_seed, derived_seed
from isda_viz.audit.run import AuditConfig, run_audit
from isda_viz.classifiers.run_checkpoint import finished_epochs
from isda_viz.devices import pick_device
from isda_viz.generators.wgan_train import GanConfig, train_gan
from isda_viz.inversion.directions import DirectionsOptions, make_directions
from isda_viz.inversion.optimizer import InversionOptions
from isda_viz.inversion.pipelines import VisualizeOptions, make_grid
from isda_viz.inversion.starts import DIRECTIONS_REFINE_STEPS
from isda_viz.outputs.audit_report import AuditReport, read_audit
from isda_viz.outputs.directions import DirectionsReport, read_directions_report
from isda_viz.outputs.folders import FIGURE_LINKS, check_name_lengths, claim_resumable, figure_files_dir, published
from isda_viz.outputs.html import PAGE, write_html
from isda_viz.outputs.report import Report, read_report
from isda_viz.outputs.summary import SUMMARY, DemoSummary, read_summary, write_summary
from isda_viz.pretrained import default_classifier, default_generator, default_judge
from isda_viz.readers import read_json
from isda_viz.runs import CHECKPOINT, read_jsonl
from isda_viz.training.loop import TrainConfig, fit


def _figure_entries(name: str) -> tuple[str, ...]:
    png = Path(name)
    return (*(png.with_suffix(s).name for s in FIGURE_LINKS), figure_files_dir(png).name)


DEMO_ENTRIES = ("classifier", "judge", "gan", *_figure_entries("figure.png"), "audit",
                *_figure_entries("directions.png"), SUMMARY, PAGE)
"""What a demo folder may hold (its manifest lists them): the runs trained with --from-scratch, the grid, the
audit, the directions figure, summary.json and the page."""


@dataclass
class DemoPlan:
    """Sizes of each stage: the full demo, or the CI-sized `quick` one. `inversion`: the search's options
    (`--inverter search`, and pairs without a trained inverter); `refine_steps`: the amortized inverter's
    (None: `starts.REFINE_STEPS`), `directions_refine_steps` the directions figure's (its batch is about 11x
    the grid's); `inverter` as `VisualizeOptions.inverter`."""
    classifier_epochs: int = 4
    judge_epochs: int = 2
    classifier_arch: str = "resnet32"
    limit_train: int | None = None
    limit_test: int | None = None
    gan_iterations: int | None = None     # None: train-gan's default
    inversion: InversionOptions = None
    inverter: str | None = None
    refine_steps: int | None = None
    num_augmented: int = 4
    audit_limit_train: int | None = None
    audit_limit_test: int | None = None
    directions: int = 5                   # the directions figure: top K, frames, semantic-test draws
    directions_steps: int = 7
    test_draws: int = 1000
    pixel_draws: int = 4
    directions_inversion: InversionOptions = None   # None: `inversion`; the full demo searches less (below)
    directions_refine_steps: int | None = DIRECTIONS_REFINE_STEPS

    @classmethod
    def make(cls, quick: bool, inverter: str | None = None, refine_steps: int | None = None) -> "DemoPlan":
        """The plan for `quick` (CI-sized: a few search steps; pairs trained from scratch have no inverter)
        or the full demo, with `inverter` and `refine_steps` as the command line gives them."""
        if not quick:
            # directions: 10 x 31 frames and 120 test targets in one Step II batch, 11x the grid's, so the
            # search there takes 60 + 90 iterations instead of 200 + 300 (the README's figure too)
            return cls(inversion=InversionOptions.make(), directions_inversion=InversionOptions.make(iterations=60),
                       inverter=inverter, refine_steps=refine_steps,
                       directions_refine_steps=DIRECTIONS_REFINE_STEPS if refine_steps is None else refine_steps)
        quick_search = InversionOptions(reconstruct_iterations=30, augment_iterations=20, restarts=2)
        return cls(classifier_epochs=1, judge_epochs=1, classifier_arch="resnet8", limit_train=1024, limit_test=500,
                   gan_iterations=30, inversion=quick_search, inverter=inverter, refine_steps=refine_steps,
                   num_augmented=2, audit_limit_train=5000, audit_limit_test=500, directions=2, directions_steps=3,
                   test_draws=100, pixel_draws=1, directions_refine_steps=refine_steps)


def _train_finished(run_dir: Path, epochs: int) -> bool:
    return finished_epochs(run_dir / CHECKPOINT) >= epochs


def _gan_finished(gan_dir: Path, iterations: int) -> bool:
    history = read_jsonl(gan_dir / "metrics.jsonl")
    return (gan_dir / "generator.pt").exists() and bool(history) and history[-1].get("iteration", 0) >= iterations


def run_demo(out, device: str | None = None, quick: bool = False, from_scratch: bool = False,
             seed: int = 0, log=print, progress: bool = True, embed: bool = False, inverter: str | None = None,
             refine_steps: int | None = None) -> DemoSummary:
    """Run every stage into `out`; returns the summary (also written as `out/summary.json`), and
    writes the page `out/index.html` (`embed`: its images inline, as the grid's and audit's pages).
    `inverter`, `refine_steps`: how codes are found (`VisualizeOptions`; default: the pair's amortized
    inverter where it has one, with `starts.REFINE_STEPS` steps, else the search)."""

    pick_device(device)  # a device that is not there fails before anything is written
    check_seed(seed)
    out = Path(out)
    check_name_lengths([out])
    with locks.exclusive(out):  # one demo per folder (each stage also locks its own output)
        claim_resumable(out, "demo", DEMO_ENTRIES)  # a resumable folder: what it holds are the demo's own stages
        return _run_demo(out, device, quick, from_scratch, seed, log, progress, embed,
                         DemoPlan.make(quick, inverter, refine_steps))


def _run_demo(out: Path, device, quick: bool, from_scratch: bool, seed: int, log, progress: bool,
              embed: bool, plan: DemoPlan) -> DemoSummary:
    out.mkdir(parents=True, exist_ok=True)
    previous = out / SUMMARY  # stages reused now keep the time they took when they ran
    seconds: dict[str, float] = dict(read_summary(previous).seconds) if previous.exists() else {}
    models = _models_stage(out, plan, device, from_scratch, seed, log, progress, seconds)
    report = _grid_stage(out, plan, models, device, seed, log, progress, seconds, embed)
    audit = _audit_stage(out, plan, device, log, progress, seconds, embed)
    directions = _directions_stage(out, plan, models, device, seed, log, progress, seconds, embed)
    summary = _summary(models, report, audit, seconds, quick, from_scratch, directions)
    write_summary(summary, out / SUMMARY)
    write_html(out, embed=embed)
    return summary


def _status(log, stage: str, message: str) -> None:
    log(f"[{stage}] {message}")


def _timed(seconds: dict, name: str, fn):
    started = time.time()
    result = fn()
    seconds[name] = round(time.time() - started, 1)
    return result


def _models_stage(out, plan, device, from_scratch, seed, log, progress, seconds) -> dict:
    """Paths of the classifier, judge and generator: trained here, or the shipped ones."""
    if not from_scratch:

        models = {"classifier": default_classifier(), "judge": default_judge(), "generator": default_generator()}
        _status(log, "models", f"using the shipped weights in {models['classifier'].parent}")
        return models


    runs = {"classifier": out / "classifier", "judge": out / "judge", "generator": out / "gan"}
    jobs = [("classifier", "isda", seed, plan.classifier_epochs), ("judge", "ce", derived_seed(seed + 1), plan.judge_epochs)]
    for name, loss, run_seed, epochs in jobs:
        run_dir = runs[name]
        if _train_finished(run_dir, epochs):
            _status(log, name, f"reusing the finished run in {run_dir}")
            continue
        resume = (run_dir / CHECKPOINT).exists()
        _status(log, name, f"{'resuming' if resume else 'training'} {plan.classifier_arch} with {loss} into {run_dir}")
        cfg = TrainConfig(out=str(run_dir), arch=plan.classifier_arch, loss=loss, epochs=epochs, seed=run_seed,
                          limit_train=plan.limit_train, limit_test=plan.limit_test, device=device)
        _timed(seconds, f"train_{name}", lambda: fit(cfg, resume=resume, progress=progress, log=log))
    gan_cfg = GanConfig(out=str(runs["generator"]), classifier=str(runs["classifier"]), seed=seed, device=device,
                        limit_train=plan.limit_train)
    if plan.gan_iterations:
        gan_cfg.iterations = plan.gan_iterations
        gan_cfg.sample_every = max(1, plan.gan_iterations // 2)
        gan_cfg.agreement_per_class = 10
    if _gan_finished(runs["generator"], gan_cfg.iterations):
        _status(log, "generator", f"reusing the finished GAN in {runs['generator']}")
    else:
        resume = (runs["generator"] / "metrics.jsonl").exists()
        _status(log, "generator", f"{'resuming' if resume else 'training'} the WGAN-GP into {runs['generator']}")
        _timed(seconds, "train_generator", lambda: train_gan(gan_cfg, resume=resume, progress=progress, log=log))
    return runs


def _grid_stage(out, plan, models, device, seed, log, progress, seconds, embed) -> Report:

    figure = out / "figure.png"
    if published(figure):
        _status(log, "grid", f"reusing the finished figure {figure}")
        return read_report(figure.with_suffix(".json"))
    options = VisualizeOptions(classifier=str(models["classifier"]), generator=str(models["generator"]),
                               judge=str(models["judge"]) if models.get("judge") else None, device=device,
                               strength=0.5, num_augmented=plan.num_augmented, inversion=plan.inversion, seed=seed,
                               progress=progress, embed=embed, inverter=plan.inverter, refine_steps=plan.refine_steps)
    _status(log, "grid", f"inverting one test image per class, {plan.num_augmented} augmentations each")
    return _timed(seconds, "grid", lambda: make_grid(out=figure, per_class=1, options=options))


def _audit_stage(out, plan, device, log, progress, seconds, embed) -> AuditReport:

    audit_dir = out / "audit"
    if published(audit_dir):
        _status(log, "audit", f"reusing the finished audit in {audit_dir}")
        return read_audit(audit_dir)
    _status(log, "audit", "nearest training images of each augmented image (FAISS, pixel space)")
    cfg = AuditConfig(out=str(audit_dir), dataset="fashion-mnist", from_dir=str(out / "figure_files"), device=device,
                      limit_train=plan.audit_limit_train, limit_test=plan.audit_limit_test, embed=embed)
    result = _timed(seconds, "audit", lambda: run_audit(cfg, progress=progress, log=log))
    _status(log, "audit", result.summary())
    return result.report


def _directions_stage(out, plan, models, device, seed, log, progress, seconds, embed) -> DirectionsReport:
    figure = out / "directions.png"
    if published(figure):
        _status(log, "directions", f"reusing the finished directions figure {figure}")
        return read_directions_report(figure)
    visualize = VisualizeOptions(classifier=str(models["classifier"]), generator=str(models["generator"]),
                                 judge=str(models["judge"]) if models.get("judge") else None, device=device,
                                 strength=0.5, inversion=plan.directions_inversion or plan.inversion, seed=seed,
                                 progress=progress, embed=embed, inverter=plan.inverter,
                                 refine_steps=plan.directions_refine_steps)
    options = DirectionsOptions(visualize=visualize, directions=plan.directions, steps=plan.directions_steps,
                                test=True, feature_draws=plan.test_draws, pixel_draws=plan.pixel_draws)
    _status(log, "directions", f"the top {plan.directions} directions of each class covariance, one test image "
                               "per class, and the semantic test")
    return _timed(seconds, "directions", lambda: make_directions(out=figure, options=options))


def _directions_summary(report: DirectionsReport) -> dict:
    """The semantic test's overall rates (class kept under each noise), for summary.json and the page."""
    test = report.test
    rates = {f"semantic_feature_{noise}": getattr(test.overall_feature, noise).rate
             for noise in ("isda", "isotropic", "other_class")}
    if test.overall_pixels is not None:
        rates |= {f"semantic_pixels_{noise}": getattr(test.overall_pixels, noise).rate
                  for noise in ("isda", "isotropic", "other_class")}
    return rates


def _inverter_label(report: Report) -> str:
    """How the figure's codes were found: "search" or "amortized + N steps"."""
    settings = report.settings
    if settings is None or settings.inverter != "amortized":
        return "search"
    return f"amortized + {settings.refine_steps} steps"


def _metrics_of(run_dir) -> dict:
    history = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if not history:  # shipped weights keep their metrics in provenance.json
        provenance = Path(run_dir) / "provenance.json"
        return read_json(provenance, "the provenance file", limit=1 << 20).get("metrics", {}) \
            if provenance.exists() else {}
    return history[-1]


def _summary(models, report: Report, audit: AuditReport, seconds, quick, from_scratch,
             directions: DirectionsReport | None = None) -> DemoSummary:
    s = report.summary
    gan = _metrics_of(models["generator"])
    return DemoSummary(
        quick=quick, from_scratch=from_scratch,
        classifier_test_accuracy=_metrics_of(models["classifier"]).get("test_accuracy"),
        judge_test_accuracy=_metrics_of(models["judge"]).get("test_accuracy") if models.get("judge") else None,
        gan_class_agreement=gan.get("agreement"),
        step1_median_feature_error=s.step1_median_feature_error,
        reconstruction_true_label_rate=s.reconstruction_true_label_rate,
        step2_median_reached_shift_error=s.step2_median_reached_shift_error,
        step2_median_negative_target_floor=s.step2_median_negative_target_floor,
        augmented_judge_label_kept_rate=s.augmented_judge_label_kept_rate,
        median_pixel_distance_to_reconstruction=s.median_pixel_distance_to_reconstruction,
        inverter=_inverter_label(report),
        audit_queries=len(audit.queries),
        audit_flagged_copies=sum(q.flagged for q in audit.queries),
        seconds=seconds,
        models={k: str(v) if v else None for k, v in models.items()},
        **(_directions_summary(directions) if directions is not None else {}),
    )
