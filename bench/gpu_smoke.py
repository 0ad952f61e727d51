"""One command that runs every CUDA path of isda-viz on one GPU and prints a table of what held.

    python bench/gpu_smoke.py                 # needs CUDA; about 5-10 min on one GPU
    python bench/gpu_smoke.py --only train_bf16,factorisations
    python bench/gpu_smoke.py --device cpu    # the same commands on the CPU (checks the script, not CUDA)

Works offline from synthetic CIFAR-10/100 files and image folders (`isda_viz.data.synthetic`, written into
a temporary folder) and the shipped Fashion-MNIST weights. Every command runs in its own process, as a
user would run it. The checks:

  train_bf16, train_fp16   `train --amp bf16|fp16` (fp16: the GradScaler), killed after epoch 1 and resumed;
                           the largest weight difference to an uninterrupted run (0 expected only with
                           --deterministic, see the `deterministic` check)
  explicit, bound          `--loss explicit --samples 4`; `--track-bound` (bound >= Monte-Carlo - 3 s.e.)
  wrn28_10_full            WRN-28-10 on CIFAR-100 with full 640 x 640 covariances: finite, symmetric, PSD
  semi_supervised          `--labeled --ssl mean-teacher --eta1 1`
  train_gan_resume         `train-gan --deterministic`, killed and resumed: generator.pt bit-identical
  augment_cpu_vs_cuda      `augment` with the shipped weights on both devices: medians within 0.01
  audit_gpu_features       `audit --space feature` on both devices: the same nearest neighbours
  factorisations           Cholesky (with its jitter) and eigh of rank-deficient covariances on the GPU
  inversion_bench          `bench/inversion.py --device cuda` (its own table is printed after ours)
  inversion_memory         peak GPU memory of `augment` for 2 and 8 images: bytes per inverted row
  deterministic            ops without a deterministic kernel in train, train-gan and augment (listed);
                           `train --deterministic` twice and killed/resumed, `augment --deterministic` twice:
                           bit-identical
  torchrun_nccl            2+ GPUs: torchrun + NCCL + --sync-bn, a folder test set of 501 images (the
                           last evaluation batch leaves a rank empty); with --device cpu: gloo

Without CUDA it says so and exits with status 0 having checked nothing (`--device cpu` to run it anyway).
Exit status 1 when any check did not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS: dict[str, callable] = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


class NotHeld(Exception):
    """A check ran and its expectation did not hold (the message says what was found)."""


class Smoke:
    """The shared state of one smoke run: device, scratch folder, synthetic data and runs made once."""

    def __init__(self, device: str, work: Path, inversion_args: list[str], quick: bool = False,
                 timeout_scale: float = 1.0):
        self.device, self.work, self.inversion_args, self.timeout_scale = device, work, inversion_args, timeout_scale
        self.size = (lambda full, small: small) if quick else (lambda full, small: full)   # --quick: small sizes
        self.cuda = device.startswith("cuda")
        self.amp = "bf16" if self.cuda else "off"
        self._made: dict[str, Path] = {}

    # ---------------------------------------------------------------- processes

    def run(self, cmd: list, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        """`cmd` in a fresh process (one thread per CPU op); `NotHeld` with its last error line if it fails."""
        full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                                timeout=timeout * self.timeout_scale, env=full_env, cwd=ROOT)
        if result.returncode != 0:
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            error = next((line for line in reversed(lines) if line.startswith(("Error", "RuntimeError"))),
                         lines[-1] if lines else "")
            raise NotHeld(f"exit {result.returncode}: {error[:300]}")
        return result

    def cli(self, *args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "isda_viz.cli", *args], timeout, env)

    def killed_after(self, module: str, key: str, at: int, *args) -> None:
        """The command `args`, killed (os._exit) right after `module`'s metrics line with `key` >= `at` is written."""
        code = textwrap.dedent(f"""
            import os, sys, {module} as m
            write = m.append_jsonl
            def write_then_die(record, path):
                write(record, path)
                if record.get({key!r}, 0) >= {at}:
                    os._exit(3)
            m.append_jsonl = write_then_die
            from isda_viz.cli.main import main
            main(sys.argv[1:])
        """)
        try:
            self.run([sys.executable, "-c", code, *args])
        except NotHeld as e:
            if not str(e).startswith("exit 3"):
                raise

    # ---------------------------------------------------------------- data and runs made once

    def cifar(self, name: str = "cifar10") -> Path:
        if name not in self._made:
            from isda_viz.data.synthetic import write_cifar10, write_cifar100

            writer = write_cifar10 if name == "cifar10" else write_cifar100
            self._made[name] = writer(self.work / name, n_train=self.size(512, 128), n_test=self.size(64, 32))
        return self._made[name]

    def train(self, name: str, *extra, epochs: int = 2) -> Path:
        """A cifar10 ResNet-32 run (`extra` options), made once per name; returns its folder."""
        if name not in self._made:
            out = self.work / "runs" / name
            self.cli("train", "--dataset", "cifar10", "--data-root", self.cifar(), "--arch", "resnet32", "--epochs",
                     epochs, "--batch-size", 64, "--device", self.device, *extra, "--out", out)
            self._made[name] = out
        return self._made[name]

    def query_images(self, count: int = 6) -> Path:
        """`count` synthetic CIFAR-10 test images as PNG files (audit queries)."""
        folder = self.work / "queries"
        if not folder.exists():
            from PIL import Image

            from isda_viz.data.datasets import load_split

            folder.mkdir()
            test = load_split("cifar10", False, self.cifar())
            for i in range(count):
                Image.fromarray(test[i][0].permute(1, 2, 0).numpy()).save(folder / f"test_{i}.png")
        return folder

    def shipped_images(self, count: int) -> list[Path]:
        """`count` images drawn by the shipped Fashion-MNIST generator on the CPU, as PNG files (seeded)."""
        folder = self.work / f"shipped_{count}"
        if not folder.exists():
            from isda_viz.generators import load_generator
            from isda_viz.outputs.figures import to_pil
            from isda_viz.pretrained import default_generator

            folder.mkdir()
            generator = load_generator(str(default_generator()), torch.device("cpu"))
            z = generator.sample_latent(count, torch.Generator().manual_seed(0))
            with torch.no_grad():
                images = generator.to_unit(generator.generate(z, torch.arange(count) % generator.num_classes))
            for i, image in enumerate(images):
                to_pil(image).save(folder / f"{i}.png")
        return sorted(folder.glob("*.png"))


def _weights(run: Path, file: str = "checkpoint.pt", key: str = "model") -> dict:
    state = torch.load(run / file, map_location="cpu", weights_only=True)
    return state[key] if key else state


def _largest_difference(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max().item() if a[k].is_floating_point()
                else float(not torch.equal(a[k], b[k]))) for k in a)


def _metrics(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


def _amp_resume(smoke: Smoke, label: str) -> str:
    amp = label if smoke.cuda else "off"
    straight = smoke.train(f"{label}_straight", "--amp", amp)
    resumed = smoke.work / "runs" / f"{label}_resumed"
    args = ["train", "--dataset", "cifar10", "--data-root", smoke.cifar(), "--arch", "resnet32", "--epochs", 2,
            "--batch-size", 64, "--device", smoke.device, "--amp", amp, "--out", resumed]
    smoke.killed_after("isda_viz.training.loop", "epoch", 1, *args)
    smoke.cli(*args, "--resume")
    metrics = _metrics(resumed)
    if [m["epoch"] for m in metrics] != [1, 2] or not all(map(_finite, (m["train_loss"] for m in metrics))):
        raise NotHeld(f"metrics after resuming: {metrics}")
    difference = _largest_difference(_weights(straight), _weights(resumed))
    estimator = _weights(resumed, key="estimator")
    if not torch.isfinite(estimator["m2"]).all():
        raise NotHeld("the estimator holds inf/NaN")
    return (f"test acc {metrics[-1]['test_accuracy']:.3f}; resumed vs uninterrupted: largest weight difference "
            f"{difference:.1e}")


def _finite(x) -> bool:
    return x == x and abs(x) != float("inf")


@check
def check_train_bf16(smoke: Smoke) -> str:
    return _amp_resume(smoke, "bf16")


@check
def check_train_fp16(smoke: Smoke) -> str:
    return _amp_resume(smoke, "fp16")


@check
def check_explicit(smoke: Smoke) -> str:
    run = smoke.train("explicit", "--loss", "explicit", "--samples", 4, "--amp", smoke.amp, epochs=1)
    loss = _metrics(run)[-1]["train_loss"]
    if not _finite(loss):
        raise NotHeld(f"train loss {loss}")
    return f"train loss {loss:.3f}"


@check
def check_bound(smoke: Smoke) -> str:
    run = smoke.train("bound", "--track-bound", "--bound-samples", 200, "--bound-subset", 64, "--amp", smoke.amp,
                      epochs=1)
    m = _metrics(run)[-1]
    if not m["bound"] >= m["expected_ce_mc"] - 3 * m["expected_ce_mc_stderr"]:
        raise NotHeld(f"bound {m['bound']:.4f} below Monte-Carlo {m['expected_ce_mc']:.4f}")
    return f"bound {m['bound']:.4f} >= MC {m['expected_ce_mc']:.4f} ± {m['expected_ce_mc_stderr']:.4f}"


@check
def check_wrn28_10_full(smoke: Smoke) -> str:
    out = smoke.work / "runs" / "wrn"
    smoke.cli("train", "--dataset", "cifar100", "--data-root", smoke.cifar("cifar100"), "--arch", "wrn28_10",
              "--limit-train", smoke.size(256, 64), "--limit-test", 32, "--epochs", 1, "--batch-size", 64,
              "--amp", smoke.amp, "--device", smoke.device, "--out", out, timeout=600)
    state = _weights(out, key="estimator")
    m2, count = state["m2"], state["count"]
    covariance = m2 / count.clamp(min=1)[:, None, None]
    asymmetry = (covariance - covariance.transpose(1, 2)).abs().max().item()
    lowest = torch.linalg.eigvalsh(covariance).min().item()
    scale = covariance.diagonal(dim1=1, dim2=2).max().item()
    if m2.shape[1:] != (640, 640) or count.sum() != smoke.size(256, 64) or not torch.isfinite(m2).all():
        raise NotHeld(f"estimator {tuple(m2.shape)}, count {count.sum():.0f}")
    if asymmetry > 1e-9 * scale or lowest < -1e-9 * scale:
        raise NotHeld(f"asymmetry {asymmetry:.1e}, smallest eigenvalue {lowest:.1e} (scale {scale:.1e})")
    return f"(100, 640, 640) float64, symmetric, smallest eigenvalue {lowest:.1e} of {scale:.1e}"


@check
def check_semi_supervised(smoke: Smoke) -> str:
    run = smoke.train("semi", "--labeled", smoke.size(100, 20), "--labeled-batch", smoke.size(32, 16), "--ssl",
                      "mean-teacher", "--eta1", 1,
                      "--amp", smoke.amp, epochs=1)
    m = _metrics(run)[-1]
    terms = {k: m[k] for k in m if k.startswith("train_") and k.endswith("_loss")}
    if not all(map(_finite, terms.values())):
        raise NotHeld(f"{terms}")
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(terms.items()))


@check
def check_train_gan_resume(smoke: Smoke) -> str:
    half = smoke.size(20, 5)
    common = ["--dataset", "cifar10", "--data-root", smoke.cifar(), "--iterations", 2 * half, "--sample-every", half,
              "--batch-size", 32, "--device", smoke.device, "--deterministic"]
    straight, resumed = smoke.work / "gan_straight", smoke.work / "gan_resumed"
    smoke.cli("train-gan", *common, "--out", straight)
    smoke.killed_after("isda_viz.generators.wgan_train", "iteration", half, "train-gan", *common, "--out", resumed)
    smoke.cli("train-gan", *common, "--out", resumed, "--resume")
    a, b = (_weights(d, "generator.pt", "state_dict") for d in (straight, resumed))
    difference = _largest_difference(a, b)
    if difference != 0:
        raise NotHeld(f"resumed generator differs by up to {difference:.1e}")
    return "generator.pt bit-identical after kill + resume (--deterministic)"


def _augment(smoke: Smoke, device: str, out: Path, images: list[Path], *extra) -> dict:
    smoke.cli("augment", *[a for p in images for a in ("--image", p)], "--iterations", smoke.size(60, 8),
              "--restarts", 2, "-k", 2,
              "--seed", 0, "--device", device, *extra, "--out", out)
    return json.loads((out / "report.json").read_text())


@check
def check_augment_cpu_vs_cuda(smoke: Smoke) -> str:
    images = smoke.shipped_images(smoke.size(4, 2))
    cpu = _augment(smoke, "cpu", smoke.work / "augment_cpu", images)["summary"]
    gpu = _augment(smoke, smoke.device, smoke.work / "augment_gpu", images)["summary"]
    keys = ("step1_median_feature_error", "step2_median_reached_shift_error")
    differences = {k: abs(cpu[k] - gpu[k]) for k in keys}
    detail = ", ".join(f"{k.split('_median_')[1]} {cpu[k]:.4f} vs {gpu[k]:.4f}" for k in keys)
    if max(differences.values()) > 0.01:
        raise NotHeld(detail)
    return detail


@check
def check_audit_gpu_features(smoke: Smoke) -> str:
    run = smoke.train("bf16_straight", "--amp", smoke.amp)       # the run of check train_bf16
    found = {}
    for device in ("cpu", smoke.device):
        out = smoke.work / f"audit_{device.replace(':', '')}"
        smoke.cli("audit", "--images", smoke.query_images(), "--dataset", "cifar10", "--data-root", smoke.cifar(),
                  "--space", "feature", "--classifier", run, "--k", 5, "--device", device,
                  "--index-dir", smoke.work / f"index_{device.replace(':', '')}", "--out", out)
        queries = json.loads((out / "audit.json").read_text())["queries"]
        found[device] = [[n["index"] for n in q["neighbors"]] for q in queries]
    pairs = list(zip(found["cpu"], found[smoke.device]))
    same_first = sum(a[0] == b[0] for a, b in pairs) / len(pairs)
    overlap = statistics.mean(len(set(a) & set(b)) / len(a) for a, b in pairs)
    if same_first < 0.8:
        raise NotHeld(f"nearest neighbour the same for {same_first:.2f} of queries, top-5 overlap {overlap:.2f}")
    return f"nearest neighbour the same for {same_first:.2f} of queries (CPU index vs GPU), top-5 overlap {overlap:.2f}"


@check
def check_factorisations(smoke: Smoke) -> str:
    """`covariance_factors` (batched Cholesky with its jitter retry, on the covariance's device) and the draws
    of eps from it, on rank-deficient covariances (A > features seen, as estimates often are). (The eigen-
    directions are computed on the CPU in float64 whatever the device: nothing to check here.)"""
    from isda_viz.isda.sampling import covariance_factors, sample_offsets

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(10, 64, 5, dtype=torch.float64, generator=g)
    sigma = (basis @ basis.transpose(1, 2)).float()                 # rank 5 of 64: singular
    sigma[3] = 0                                                    # a class never seen
    device, classes = torch.device(smoke.device), torch.arange(10)
    factors = covariance_factors(sigma.to(device), classes.to(device))
    if not torch.isfinite(factors).all():
        raise NotHeld("a Cholesky factor holds inf/NaN")
    rebuilt = (factors @ factors.transpose(1, 2)).cpu()
    scale = sigma.double().diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
    error = ((rebuilt - sigma.double()).abs().amax((1, 2)) / scale).max().item()
    eps = sample_offsets(factors, classes.to(device).repeat(20), 8, 0.5, torch.Generator().manual_seed(1))
    cpu_eps = sample_offsets(covariance_factors(sigma, classes), classes.repeat(20), 8, 0.5,
                             torch.Generator().manual_seed(1))
    draws = (eps.cpu() - cpu_eps).abs().max().item() / cpu_eps.abs().max().item()
    diagonal = covariance_factors(sigma.diagonal(dim1=1, dim2=2).to(device), classes.to(device))
    # (the draws are reported, not required equal: each device may settle on another jitter for a singular class)
    if error > 1.01e-4 or not torch.isfinite(eps).all() or not torch.isfinite(diagonal).all():
        raise NotHeld(f"L L^T off by {error:.1e} of the mean variance; draws CPU vs GPU {draws:.1e}")
    return f"L L^T = Sigma + jitter (within {error:.1e} of the mean variance); eps CPU vs GPU {draws:.1e}"


@check
def check_inversion_bench(smoke: Smoke) -> str:
    result = smoke.run([sys.executable, ROOT / "bench" / "inversion.py", "--device", smoke.device,
                        *smoke.inversion_args], timeout=420)
    smoke.inversion_output = result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return f"ran ({len(lines)} lines of output, printed below the table)"


@check
def check_inversion_memory(smoke: Smoke) -> str:
    if not smoke.cuda:
        return "skipped: peak GPU memory needs CUDA"
    code = textwrap.dedent("""
        import sys, torch
        from isda_viz.cli.main import main
        try:
            main(sys.argv[1:])
        except SystemExit as e:
            if e.code:
                raise
        print("PEAK", torch.cuda.max_memory_allocated())
    """)
    peaks = {}
    for count in (2, 8):
        images = smoke.shipped_images(count)
        result = smoke.run([sys.executable, "-c", code, "augment", *[a for p in images for a in ("--image", p)],
                            "--iterations", 20, "--restarts", 4, "-k", 4, "--device", smoke.device,
                            "--out", smoke.work / f"memory_{count}"])
        peaks[count] = int(result.stdout.split("PEAK")[-1].split()[0])
    per_row = (peaks[8] - peaks[2]) / (6 * 4)       # 6 more images x K = 4 augmented rows (Step II)
    return (f"peak {peaks[2] / 2**20:.0f} MiB (2 images) / {peaks[8] / 2**20:.0f} MiB (8 images): "
            f"{per_row / 2**20:.2f} MiB per augmented row")


_REFUSALS = textwrap.dedent("""
    import json, sys, warnings
    import torch
    from isda_viz.devices import use_deterministic
    use_deterministic(torch.device(sys.argv[1]), warn_only=True)
    from isda_viz.cli.main import main
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            main(sys.argv[2:])
        except SystemExit as e:
            if e.code:
                raise
    ops = sorted({str(w.message).split(" does not have")[0] for w in caught
                  if "does not have a deterministic implementation" in str(w.message)})
    print("REFUSED", json.dumps(ops))
""")


def _refused(smoke: Smoke, *args) -> list[str]:
    result = smoke.run([sys.executable, "-c", _REFUSALS, smoke.device, *args], timeout=400)
    return json.loads(result.stdout.split("REFUSED")[-1])


@check
def check_deterministic(smoke: Smoke) -> str:
    train = ["train", "--dataset", "cifar10", "--data-root", smoke.cifar(), "--arch", "resnet32", "--epochs", 2,
             "--batch-size", 64, "--device", smoke.device, "--amp", smoke.amp]
    refused = {"train": _refused(smoke, *train, "--out", smoke.work / "refusals_train"),
               "train-gan": _refused(smoke, "train-gan", "--dataset", "cifar10", "--data-root", smoke.cifar(),
                                     "--iterations", 5, "--sample-every", 5, "--device", smoke.device,
                                     "--out", smoke.work / "refusals_gan"),
               "augment": _refused(smoke, "augment", "--image", smoke.shipped_images(4)[0], "--iterations", 10,
                                   "--device", smoke.device, "--out", smoke.work / "refusals_augment")}
    listed = "; ".join(f"{k}: {', '.join(v) or 'none'}" for k, v in refused.items())
    if any(refused.values()):
        raise NotHeld(f"ops without a deterministic kernel: {listed}")
    runs = [smoke.work / "runs" / f"deterministic_{i}" for i in range(3)]
    for out in runs[:2]:
        smoke.cli(*train, "--deterministic", "--out", out)
    smoke.killed_after("isda_viz.training.loop", "epoch", 1, *train, "--deterministic", "--out", runs[2])
    smoke.cli(*train, "--deterministic", "--resume", "--out", runs[2])
    differences = [_largest_difference(_weights(runs[0]), _weights(r)) for r in runs[1:]]
    images = smoke.shipped_images(4)[:2]
    reports = [_augment(smoke, smoke.device, smoke.work / f"augment_det_{i}", images, "--deterministic")
               for i in range(2)]
    same_reports = [r["images"] for r in reports[:1]] == [r["images"] for r in reports[1:]]
    if any(differences) or not same_reports:
        raise NotHeld(f"train twice: {differences[0]:.1e}, killed/resumed: {differences[1]:.1e}; "
                      f"augment reports equal: {same_reports}")
    return f"refused: {listed}; train twice, killed/resumed and augment twice: bit-identical"


@check
def check_torchrun_nccl(smoke: Smoke) -> str:
    if smoke.cuda and torch.cuda.device_count() < 2:
        return "skipped: needs 2 or more GPUs"
    from isda_viz.data.synthetic import write_image_folders

    data = write_image_folders(smoke.work / "folder501", per_class_train=16, per_class_val=167, size=40)
    out = smoke.work / "runs" / "torchrun"
    smoke.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "-m", "isda_viz.cli", "train",
               "--dataset", "folder", "--data-root", data, "--arch", "resnet8", "--epochs", 1, "--batch-size", 16,
               "--sync-bn", "--workers", 2, "--device", "cuda" if smoke.cuda else "cpu", "--out", out], timeout=400)
    m = _metrics(out)[-1]
    backend = "NCCL" if smoke.cuda else "gloo (CPU)"
    return f"2 ranks, {backend}, --sync-bn, 501 test images (last batch: 1): test acc {m['test_accuracy']:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu: run the commands on the CPU)")
    parser.add_argument("--only", default="", help=f"comma-separated checks: {', '.join(CHECKS)}")
    parser.add_argument("--inversion-args", default="", help="extra arguments for bench/inversion.py")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every command's time limit (a slow or busy machine)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller data and fewer steps (to check the script itself, e.g. with --device cpu)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench/gpu_smoke.py checks the CUDA paths, and CUDA is not available here (torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda or 'none'}); nothing was checked. Run it on a machine with a GPU, "
              "or with --device cpu to run the same commands on the CPU.")
        return 0
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    work = Path(tempfile.mkdtemp(prefix="isda-viz-gpu-smoke-"))
    smoke = Smoke(args.device, work, args.inversion_args.split(), args.quick, args.timeout_scale)
    smoke.inversion_output = ""
    rows, started = [], time.time()
    for name in names:
        t0 = time.time()
        try:
            held, detail = True, CHECKS[name](smoke)
        except NotHeld as e:
            held, detail = False, str(e)
        except Exception as e:  # a bug or a crash in a check: reported as not held, the others still run
            held, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append((name, held, detail, time.time() - t0))
        print(f"{name}: {'held' if held else 'NOT HELD'} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    _print_table(args.device, rows, time.time() - started)
    if smoke.inversion_output:
        print("\nbench/inversion.py --device", args.device, "\n" + smoke.inversion_output)
    if args.keep:
        print(f"scratch folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(held for _, held, _, _ in rows) else 1


def _print_table(device: str, rows: list, seconds: float) -> None:
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    print(f"\n{name} ({device}), torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{torch.cuda.device_count() if device.startswith('cuda') else 0} GPU(s); {seconds / 60:.1f} min")
    print("| check | held | what was found | s |")
    print("|---|---|---|---|")
    for check_name, held, detail, took in rows:
        print(f"| {check_name} | {'yes' if held else '**no**'} | {detail.replace('|', '/')} | {took:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
