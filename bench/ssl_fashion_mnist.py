"""Test error on Fashion-MNIST: CE vs ISDA (supervised), and mean teacher vs mean teacher + ISDA with 1,000 labels.

Evidence for the paper's claim that ISDA lowers the error in both settings, at a size that runs on
two CPU cores: ResNet-8, the first 4,000 training images for the supervised pair and the first
5,000 (1,000 labeled, class-balanced; 4,000 unlabeled) for the semi-supervised pair, 8 epochs,
seeds 0, 1, 2. Each pair shares epochs, seeds, batches and every other option; only the loss
differs. The error is measured on all 10,000 test images after the last epoch. The
supervised ISDA runs also log the bound and its Monte-Carlo estimate (`--track-bound`),
and the seed-0 runs are drawn with `isda-viz plot`.

    python bench/ssl_fashion_mnist.py                  # the full bench (~15-20 min on 2 idle cores)
    python bench/ssl_fashion_mnist.py --smoke          # tiny sizes, one seed: checks that it runs (~1 min)

Writes `OUT/results.json` (every run's config, error and time; mean ± std per method), the run
directories `OUT/runs/<method>-seed<k>`, and `OUT/supervised.png`, `OUT/semi_supervised.png`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.data.datasets import load_split
from isda_viz.outputs.plot import plot_runs
from isda_viz.runs import write_json_atomic
from isda_viz.training.loop import TrainConfig, evaluate, fit

# method: (setting, TrainConfig options)
METHODS = {
    "ce": ("supervised", dict(loss="ce")),
    "isda": ("supervised", dict(loss="isda", track_bound=True)),
    "mean-teacher": ("semi-supervised", dict(loss="ce", ssl="mean-teacher", eta1=0.0)),
    "mean-teacher+isda": ("semi-supervised", dict(loss="isda", ssl="mean-teacher", eta1=1.0)),
}
FULL = dict(epochs=8, supervised_train=4000, ssl_train=5000, labeled=1000, limit_test=1000, final_test=None)
SMOKE = dict(epochs=1, supervised_train=256, ssl_train=320, labeled=100, limit_test=128, final_test=500)


def test_error(run_dir: Path, limit: int | None) -> float:
    """Top-1 error in [0, 1] of the run's final checkpoint on the first `limit` test images (all when None)."""
    clf = load_classifier(run_dir, torch.device("cpu"))
    return 1.0 - evaluate(clf.model, load_split(clf.dataset, False, limit=limit), clf.mean, clf.std, clf.device)


def run_bench(out: Path, seeds: list[int], sizes: dict) -> dict:
    results = []
    for seed in seeds:
        for method, (setting, options) in METHODS.items():
            run_dir = out / "runs" / f"{method}-seed{seed}"
            common = dict(out=str(run_dir), arch="resnet8", epochs=sizes["epochs"], batch_size=128, seed=seed,
                          limit_test=sizes["limit_test"], lambda0=0.5)
            if setting == "supervised":
                cfg = TrainConfig(**common, limit_train=sizes["supervised_train"], **options)
            else:
                cfg = TrainConfig(**common, limit_train=sizes["ssl_train"], labeled=sizes["labeled"],
                                  labeled_batch=32, **options)
            started = time.time()
            resume = (run_dir / "checkpoint.pt").exists()  # a bench stopped half way continues where it was
            fit(cfg, resume=resume, progress=False, log=lambda *a: None)
            error = test_error(run_dir, sizes["final_test"])
            seconds = time.time() - started
            results.append({"method": method, "setting": setting, "seed": seed, "test_error": error,
                            "seconds": seconds, "run": str(run_dir),
                            "config": {k: v for k, v in vars(cfg).items() if k != "out"}})
            print(f"  {method:<18} seed {seed}: test error {100 * error:.2f}%  ({seconds:.0f} s)", flush=True)
    summary = {}
    for method, (setting, _) in METHODS.items():
        errors = [r["test_error"] for r in results if r["method"] == method]
        summary[method] = {"setting": setting, "seeds": len(errors), "mean": statistics.mean(errors),
                           "std": statistics.stdev(errors) if len(errors) > 1 else 0.0, "errors": errors}
    return {"sizes": sizes, "seeds": seeds, "test_images": sizes["final_test"] or 10000, "summary": summary,
            "runs": results, "torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_ssl_fashion_mnist"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one seed: check that the bench runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    seeds = args.seeds[:1] if args.smoke else args.seeds
    started = time.time()
    report = run_bench(args.out, seeds, sizes)
    report["total_seconds"] = time.time() - started
    for setting, methods in (("supervised", ("ce", "isda")), ("semi_supervised", ("mean-teacher",
                                                                                   "mean-teacher+isda"))):
        plot_runs([args.out / "runs" / f"{m}-seed{seeds[0]}" for m in methods], args.out / f"{setting}.png",
                  progress=False)
    write_json_atomic(report, args.out / "results.json")
    labels = sizes["labeled"]
    print(f"\nFashion-MNIST, ResNet-8, {sizes['epochs']} epochs, test error on {report['test_images']} test images "
          f"(mean ± std over seeds {', '.join(map(str, seeds))})")
    print(f"{'setting':<32} {'method':<20} {'test error (%)':>16}")
    for method, row in report["summary"].items():
        setting = (f"supervised ({sizes['supervised_train']} labels)" if row["setting"] == "supervised"
                   else f"semi-sup. ({labels} of {sizes['ssl_train']} labeled)")
        print(f"{setting:<32} {method:<20} {100 * row['mean']:>8.2f} ± {100 * row['std']:.2f}")
    print(f"\nnumbers: {args.out / 'results.json'}; figures: {args.out / 'supervised.png'}, "
          f"{args.out / 'semi_supervised.png'}; total {report['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
