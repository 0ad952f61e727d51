"""The CUDA findings a CPU can exercise (issue 28): each test fails on the code before its fix.

1 sharded evaluation with empty parts; 2 native bf16 of the device asked for; 3 `--deterministic`;
4 caches keyed by device type and precision; 5 the suite on the CPU; 7 an fp16 overflow and the estimator;
8 Cholesky factors that report success but hold NaN; 9 per-item seeds of folder augmentation; 11 `ISDALoss`
under a caller's autocast; 12 device checks. CUDA itself is simulated by monkeypatching torch's queries.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import isda_viz.devices as devices
from isda_viz.audit.index import Embedder, prepare_index
from isda_viz.classifiers import statistics as statistics_module
from isda_viz.classifiers.classifier import Classifier, load_classifier
from isda_viz.cli.main import main
from isda_viz.data.batches import iterate_batches
from isda_viz.data.datasets import load_split
from isda_viz.data.images import resize_matrix
from isda_viz.data.synthetic import write_image_folders
from isda_viz.errors import IsdaVizError
from isda_viz.isda.estimator import CovarianceEstimator
from isda_viz.isda.loss import ISDALoss
from isda_viz.isda.sampling import covariance_factors
from isda_viz.training import loop
from isda_viz.training.loop import TrainConfig, Views, amp_dtype, fit, training_loss

_quiet = lambda *a, **k: None  # noqa: E731


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """3 classes × 8 training and × 3 test images, ImageNet layout."""
    return write_image_folders(tmp_path_factory.mktemp("folder"))


# ------------------------------------------------------------------------ 1: sharded evaluation, empty parts

def test_1_every_rank_evaluates_a_folder_whose_last_batch_has_fewer_images_than_ranks(folder_data):
    test = load_split("folder", False, folder_data)       # 9 images in batches of 8: the last holds 1
    seen = []
    for rank in range(4):
        for images, labels in iterate_batches(test, 8, shuffle=False, shard=(rank, 4)):
            assert len(labels) > 0 and images.shape[0] == len(labels)
            seen += labels.tolist()
    assert sorted(seen) == sorted(test.labels.tolist())  # every image once, over the ranks


# ------------------------------------------------------------------------ 2: bf16 where the GPU has it

def _gpu(monkeypatch, capability, count=2, arch=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
    """This machine, as torch would describe a CUDA machine of `count` GPUs of `capability`; returns the
    device indices the capability was asked for."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Simulated GPU")
    monkeypatch.setattr(torch.version, "hip", None)
    return asked


def test_2_amp_picks_bf16_only_where_the_gpu_asked_for_computes_in_it(monkeypatch):
    asked = _gpu(monkeypatch, (7, 5))                            # a T4: bf16 only emulated
    assert amp_dtype(None, torch.device("cuda", 1)) is None
    with pytest.raises(IsdaVizError, match="no native bfloat16"):
        amp_dtype("bf16", torch.device("cuda", 1))
    assert amp_dtype("fp16", torch.device("cuda", 1)) == torch.float16
    assert asked and set(asked) == {1}                           # cuda:1's capability, not device 0's
    _gpu(monkeypatch, (8, 0))                                    # an A100
    assert amp_dtype(None, torch.device("cuda", 1)) == torch.bfloat16
    assert amp_dtype("bf16", torch.device("cuda")) == torch.bfloat16


# ------------------------------------------------------------------------ 3: --deterministic

@pytest.fixture()
def restore_determinism():
    """`use_deterministic` is process-wide: put torch's switches back after the test."""
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = state[2], state[3]
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    if state[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = state[4]


def test_3_the_switch_sets_every_setting_it_names(restore_determinism, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    devices.use_deterministic(torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    devices.use_fast_kernels(torch.device("cuda"))               # benchmarking stays off when deterministic
    assert not torch.backends.cudnn.benchmark


def test_3_train_deterministic_on_the_cpu_gives_the_same_run(tmp_path, restore_determinism):
    args = ["train", "--arch", "resnet8", "--limit-train", 64, "--limit-test", 32, "--batch-size", 32,
            "--epochs", 1, "--device", "cpu"]
    for name, extra in (("plain", []), ("deterministic", ["--deterministic"])):
        result = CliRunner().invoke(main, [str(a) for a in [*args, *extra, "--out", tmp_path / name]])
        assert result.exit_code == 0, result.output
    plain, strict = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("plain", "deterministic"))
    for key, value in plain["model"].items():
        assert torch.equal(strict["model"][key], value), key
    assert strict["config"]["deterministic"] is True and plain["config"]["deterministic"] is False


def test_3_an_operation_without_a_deterministic_kernel_is_one_error_line_naming_it(tmp_path, monkeypatch,
                                                                                  restore_determinism):
    real = loop.augment_batch

    def augment_with_put(x, generator, pad):  # `put_` has no deterministic kernel, on the CPU either
        torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))
        return real(x, generator, pad)

    monkeypatch.setattr(loop, "augment_batch", augment_with_put)
    result = CliRunner().invoke(main, ["train", "--arch", "resnet8", "--limit-train", "32", "--limit-test", "32",
                                       "--epochs", "1", "--device", "cpu", "--deterministic",
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "the operation put_ has no deterministic implementation" in errors[0], result.output
    assert not (tmp_path / "run").exists()  # failed before its first checkpoint: nothing left


@pytest.mark.parametrize("source, size", [(128, 224), (128, 28), (32, 28), (28, 64), (256, 128)])
def test_3_the_deterministic_resize_is_the_antialiased_interpolation(source, size):
    # On CUDA under --deterministic `resize` multiplies by these matrices (interpolation's backward there has
    # no deterministic kernel): the same values and gradients as the interpolation, in float64.
    g = torch.Generator().manual_seed(source + size)
    x = torch.randn(2, 3, source, source, dtype=torch.float64, generator=g, requires_grad=True)
    reference = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    rows = resize_matrix(source, size)
    ours = rows @ x @ rows.T
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(reference.shape, dtype=torch.float64, generator=g)
    (g_ref,) = torch.autograd.grad((reference * upstream).sum(), x)
    (g_ours,) = torch.autograd.grad((ours * upstream).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------ 4: caches keyed by device and dtype

def _on_a_gpu(monkeypatch):
    """Classifiers report their features as computed on a GPU in bfloat16 (what a GPU run leaves in a cache)."""
    monkeypatch.setattr(Classifier, "computed_on", property(lambda self: {"device": "cuda", "dtype": "bfloat16"}))


def test_4_class_statistics_of_a_gpu_run_are_not_reused_on_the_cpu(tiny_ce_run, tmp_path, monkeypatch):
    run = shutil.copytree(tiny_ce_run, tmp_path / "ce")
    passes = []
    real_pass = statistics_module._statistics_pass
    monkeypatch.setattr(statistics_module, "_statistics_pass",
                        lambda *a, **k: passes.append(a[2]) or real_pass(*a, **k))
    with monkeypatch.context() as gpu:
        _on_a_gpu(gpu)
        statistics_module.class_statistics(load_classifier(run, "cpu"), classes=[1], progress=False)
    cpu = load_classifier(run, "cpu")
    statistics_module.class_statistics(cpu, classes=[1], progress=False)   # a pass of its own
    statistics_module.class_statistics(cpu, classes=[1], progress=False)   # then its own cache
    assert passes == [[1], [1]]
    keys = [json.loads(p.read_text()) for p in (run / statistics_module.STATISTICS_DIR).glob("*.json")]
    assert sorted(k["computed_on"]["device"] for k in keys) == ["cpu", "cuda"]


def test_4_the_feature_index_of_a_gpu_run_is_rebuilt_on_the_cpu(tiny_ce_run, tmp_path, monkeypatch):
    train, test = load_split("fashion-mnist", True, limit=200), load_split("fashion-mnist", False, limit=100)
    clf = load_classifier(tiny_ce_run, "cpu")
    logs = []
    with monkeypatch.context() as gpu:
        _on_a_gpu(gpu)
        _, status = prepare_index(tmp_path / "index", "fashion-mnist", "feature", train, test,
                                  Embedder("feature", clf), progress=False, log=logs.append)
    assert status == "built"
    _, status = prepare_index(tmp_path / "index", "fashion-mnist", "feature", train, test, Embedder("feature", clf),
                              progress=False, log=logs.append)
    assert status == "rebuilt" and "another device or in another precision" in logs[-1]
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["computed_on"] == {"device": "cpu", "dtype": "float32"}


# ------------------------------------------------------------------------ 5: the suite runs on the CPU

def test_5_the_default_device_of_the_suite_is_the_cpu_on_a_gpu_machine_too(monkeypatch):
    _gpu(monkeypatch, (8, 0))
    assert os.environ[devices.DEVICE_ENV] == os.environ.get("ISDA_VIZ_TEST_DEVICE", "cpu")
    monkeypatch.setenv(devices.DEVICE_ENV, "cpu")
    assert devices.pick_device(None) == torch.device("cpu")
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert devices.pick_device(None).type == "cuda"               # outside the suite: CUDA where present
    monkeypatch.setenv(devices.DEVICE_ENV, "gpu")
    with pytest.raises(IsdaVizError, match=r"\$ISDA_VIZ_DEVICE: unknown device 'gpu'"):
        devices.pick_device(None)


# ------------------------------------------------------------------------ 7: an fp16 overflow

def test_7_an_overflowing_batch_leaves_the_estimator_and_the_weights_as_they_were():
    """One training step whose features overflowed (inf, as an fp16 forward pass gives): the GradScaler skips the
    step and the estimator skips the batch, so the next step is the one it would have been without it."""
    g = torch.Generator().manual_seed(0)
    cfg = TrainConfig(out="unused", loss="isda")
    fc = nn.Linear(6, 4)
    estimator = CovarianceEstimator(6, 4)
    optimizer = torch.optim.SGD(fc.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    y = torch.randint(0, 4, (16,), generator=g)

    def step(features):
        views = Views(x=features, y=y, second=None, global_labeled=len(y), global_unlabeled=0)
        loss, terms, _ = training_loss(cfg, fc, estimator, features, views, strength=0.5)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return float(terms["loss"])

    step(torch.randn(16, 6, generator=g))
    before = ({k: v.clone() for k, v in estimator.state_dict().items() if torch.is_tensor(v)},
              fc.weight.detach().clone())
    overflowed = torch.randn(16, 6, generator=g)
    overflowed[3, 2] = float("inf")
    assert not torch.isfinite(torch.tensor(step(overflowed)))
    for key, value in before[0].items():
        assert torch.equal(estimator.state_dict()[key], value), key
    assert torch.equal(fc.weight.detach(), before[1])             # the scaler skipped the step
    assert torch.isfinite(torch.tensor(step(torch.randn(16, 6, generator=g))))
    assert torch.isfinite(estimator.covariance).all() and estimator.count.sum() == 32


def test_7_the_skip_is_the_callers_choice_and_reported():
    est = CovarianceEstimator(3, 2)
    bad = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, 2.0]])
    assert est.update(bad, torch.tensor([0, 1]), skip_non_finite=True) is False and est.count.sum() == 0
    assert est.update(bad[1:], torch.tensor([1]), skip_non_finite=True) is True and est.count.tolist() == [0, 1]


# ------------------------------------------------------------------------ 8: Cholesky with NaN and info 0

def test_8_a_factor_reported_as_success_but_not_finite_gets_the_jitter(monkeypatch):
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(3, 6, 2, dtype=torch.float64, generator=g)
    sigma = basis @ basis.transpose(1, 2)                         # rank 2 of 6: singular
    real = torch.linalg.cholesky_ex
    calls = []

    def cuda_like(matrix, **kwargs):  # what CUDA's batched Cholesky can return for a singular matrix
        factor, info = real(matrix, **kwargs)
        calls.append(len(matrix))
        if len(calls) == 1:  # class 1: "success" with NaN; the others fail as they do on the CPU
            factor, info = factor.clone(), info.clone()
            factor[1], info[1] = float("nan"), 0
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", cuda_like)
    factors = covariance_factors(sigma, torch.arange(3))
    assert torch.isfinite(factors).all() and len(calls) >= 2
    for k in range(3):  # L L^T is Sigma up to the jitter (at most 1e-4 of the mean variance)
        scale = sigma[k].diagonal().mean()
        assert (factors[k] @ factors[k].T - sigma[k]).abs().max() <= 1.01e-4 * scale


# ------------------------------------------------------------------------ 9: per-item seeds, folders

def test_9_random_crops_depend_on_the_epoch_and_image_only(folder_data):
    train = load_split("folder", True, folder_data)

    def epoch(shard=None, workers=0, seed=3):
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([x for x, _ in iterate_batches(train, 10, True, generator, workers, shard)])

    single = epoch()
    assert torch.equal(torch.cat([epoch((r, 2)) for r in range(2)]), _interleave(single, 10, 2))  # ranks: their parts
    assert torch.equal(epoch(workers=2), single)                  # worker processes draw the same crops
    torch.manual_seed(12345)                                      # the process's own random state plays no part
    assert torch.equal(epoch(), single)
    assert not torch.equal(epoch(seed=4)[:len(single)], single)   # another epoch, other crops


def _interleave(batches: torch.Tensor, batch_size: int, world: int) -> torch.Tensor:
    """A single process's images reordered as rank 0's parts of every batch, then rank 1's, ..."""
    from isda_viz.distributed import shard

    parts = [[] for _ in range(world)]
    for start in range(0, len(batches), batch_size):
        batch = batches[start:start + batch_size]
        for r in range(world):
            parts[r].append(batch[shard(len(batch), r, world)])
    return torch.cat([torch.cat(p) for p in parts])


class _Killed(Exception):
    pass


def test_9_a_killed_and_resumed_folder_run_ends_bit_identical(folder_data, tmp_path, monkeypatch):
    run = dict(dataset="folder", data_root=str(folder_data), arch="resnet8", batch_size=12, epochs=2, device="cpu")
    fit(TrainConfig(out=str(tmp_path / "straight"), **run), progress=False, log=_quiet)
    append = loop.append_jsonl

    def append_then_die(record, path):  # killed right after epoch 1's checkpoint and metrics line
        append(record, path)
        raise _Killed

    with monkeypatch.context() as killed:
        killed.setattr(loop, "append_jsonl", append_then_die)
        with pytest.raises(_Killed):
            fit(TrainConfig(out=str(tmp_path / "resumed"), **run), progress=False, log=_quiet)
    torch.manual_seed(999)  # a new process: another random state
    fit(TrainConfig(out=str(tmp_path / "resumed"), **run), resume=True, progress=False, log=_quiet)
    straight, resumed = (torch.load(tmp_path / n / "checkpoint.pt", weights_only=True) for n in ("straight", "resumed"))
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert torch.equal(resumed["estimator"]["m2"], straight["estimator"]["m2"])


# ------------------------------------------------------------------------ 11: ISDALoss under autocast

def test_11_isda_loss_under_a_callers_bf16_autocast_is_computed_in_float32():
    g = torch.Generator().manual_seed(5)
    fc = nn.Linear(16, 5)
    features = (torch.randn(40, 16, generator=g) * 4).bfloat16()   # what a bf16 network hands over
    targets = torch.randint(0, 5, (40,), generator=g)
    earlier = torch.randn(200, 16, generator=g) * 3, torch.arange(200) % 5
    reference, ours = ISDALoss(16, 5), ISDALoss(16, 5)
    for criterion in (reference, ours):  # earlier batches: covariances that matter
        criterion.estimator.update(*earlier)
    expected = reference(features.double(), copy.deepcopy(fc).double(), targets, 2.0)   # float64, same inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ours(features, fc, targets, 2.0)
    assert loss.dtype == torch.float32
    # float32 arithmetic: ~1e-7 relative; bf16 logits and quadratic forms would be ~1e-2 off
    assert abs(loss.item() - expected.item()) < 1e-5 * abs(expected.item()), (loss.item(), expected.item())
    loss.backward()
    assert fc.weight.grad.dtype == torch.float32 and torch.isfinite(fc.weight.grad).all()


# ------------------------------------------------------------------------ 12: the device checks

def test_12_a_gpu_without_kernels_in_this_build_and_a_missing_index_are_refused(monkeypatch):
    _gpu(monkeypatch, (7, 0))                                    # a V100: sm_70, below the build's sm_75
    with pytest.raises(IsdaVizError, match=r"compute capability 7\.0\) has no kernels in this torch build"):
        devices.pick_device("cuda")
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert devices.pick_device(None) == torch.device("cpu")      # the default falls back, with a note
    _gpu(monkeypatch, (8, 6), count=2)
    assert devices.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(IsdaVizError, match=r"--device cuda:7: this machine has 2 GPU\(s\), cuda:0 to cuda:1"):
        devices.pick_device("cuda:7")
    assert devices.has_kernels_for((8, 9), ["sm_80"]) and devices.has_kernels_for((9, 0), ["compute_80"])
    assert not devices.has_kernels_for((6, 0), ["sm_75", "compute_75"]) and not devices.has_kernels_for((8, 0), [])


def test_12_an_old_driver_is_named_when_the_default_falls_back_to_the_cpu(monkeypatch, capsys):
    def old_driver():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 11040).\n"
                      "Please update your GPU driver.", UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    monkeypatch.delenv(devices.DEVICE_ENV)
    assert devices.pick_device(None) == torch.device("cpu")
    assert "note: CUDA is not available (CUDA initialization: The NVIDIA driver on your system is too old" \
        in capsys.readouterr().err
    with pytest.raises(IsdaVizError, match="CUDA is not available on this machine .*driver on your system is too old"):
        devices.pick_device("cuda")


def test_12_the_gpu_smoke_test_says_plainly_that_it_needs_cuda():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "CUDA is not available here" in result.stdout and "nothing was checked" in result.stdout
