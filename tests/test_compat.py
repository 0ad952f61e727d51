"""The drop-ins for the public ISDA code's losses (`isda_viz.compat`): the same values as a transcription of the
public modules (`tests/public_isda.py`), the same attributes, a transcription of the public CIFAR `train.py`
loop giving the same losses with either, and its checkpoint read by `isda-viz augment`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.foreign import read_weights_file
from isda_viz.classifiers.public import PUBLIC_CIFAR_MEAN, PUBLIC_CIFAR_STD, FullLayer, build_public_network
from isda_viz.cli.main import main
from isda_viz.compat import cifar, imagenet
from isda_viz.data.datasets import load_split
from isda_viz.data.images import normalize
from isda_viz.data.synthetic import write_cifar10
from isda_viz.errors import IsdaVizError
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator
from public_isda import PublicISDALoss

TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _batches(a_in, c, count, n, seed):
    """Inputs `(n, a_in)` and labels; the last class is absent from the first batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        y = torch.randint(0, c - (b == 0), (n,), generator=g)
        out.append((torch.randn(n, a_in, generator=g) + y[:, None] * 0.3, y))
    return out


def _assert_same_estimator(ours, public):
    torch.testing.assert_close(ours.CoVariance, public.CoVariance, **TOLERANCE)
    torch.testing.assert_close(ours.Ave, public.Ave, **TOLERANCE)
    assert torch.equal(ours.Amount, public.Amount) and ours.Amount.dtype == torch.float32


def test_cifar_drop_in_gives_the_public_losses_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 9), nn.ReLU())
    public_parts = (nn.DataParallel(net), nn.DataParallel(FullLayer(9, 5)))
    our_parts = tuple(copy.deepcopy(m) for m in public_parts)
    public, ours = PublicISDALoss(9, 5), cifar.ISDALoss(9, 5)
    for i, (x, y) in enumerate(_batches(12, 5, 4, 16, seed=1)):
        ratio = 0.4 * i
        results = []
        for criterion, (model, fc) in ((public, public_parts), (ours, our_parts)):
            model.zero_grad()
            fc.zero_grad()
            loss, output = criterion(model, fc, x, y, ratio)
            loss.backward()
            results.append((loss, output, [p.grad for p in (*model.parameters(), *fc.parameters())]))
        (loss_p, out_p, grads_p), (loss_o, out_o, grads_o) = results
        torch.testing.assert_close(loss_o, loss_p, **TOLERANCE)
        torch.testing.assert_close(out_o, out_p, **TOLERANCE)
        for g_o, g_p in zip(grads_o, grads_p):
            torch.testing.assert_close(g_o, g_p, **TOLERANCE)
        _assert_same_estimator(ours.estimator, public.estimator)
    assert ours.class_num == 5 and isinstance(ours.cross_entropy, nn.CrossEntropyLoss)
    cv = ours.estimator.CoVariance
    x, y = _batches(12, 5, 1, 8, seed=2)[0]
    features = net(x)
    logits = our_parts[1](features)
    torch.testing.assert_close(ours.isda_aug(our_parts[1], features, logits, y, cv, 0.9),
                               public.isda_aug(our_parts[1], features, logits, y, cv, 0.9), **TOLERANCE)


class _PublicStyleNet(nn.Module):
    """A network as the public ImageNet ResNets: `forward(x, isda=True)` returns `(logits, features)`."""

    def __init__(self, a_in, a, c):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(a_in, a), nn.ReLU())
        self.fc = nn.Linear(a, c)

    def forward(self, x, isda=False):
        features = self.body(x)
        y = self.fc(features)
        return (y, features) if isda else y


def test_imagenet_drop_in_gives_the_public_losses_outputs_gradients_and_diagonal_statistics():
    torch.manual_seed(0)
    public_model = nn.DataParallel(_PublicStyleNet(10, 8, 6))          # the public code reads model.module.fc
    our_model = copy.deepcopy(public_model)
    public, ours = PublicISDALoss(8, 6, imagenet=True), imagenet.ISDALoss(8, 6)
    for i, (x, y) in enumerate(_batches(10, 6, 4, 20, seed=3)):
        results = []
        for criterion, model in ((public, public_model), (ours, our_model)):
            model.zero_grad()
            loss, output = criterion(model, x, y, 2.0 * i)
            loss.backward()
            results.append((loss, output, [p.grad for p in model.parameters()]))
        (loss_p, out_p, grads_p), (loss_o, out_o, grads_o) = results
        torch.testing.assert_close(loss_o, loss_p, **TOLERANCE)
        torch.testing.assert_close(out_o, out_p, **TOLERANCE)
        for g_o, g_p in zip(grads_o, grads_p):
            torch.testing.assert_close(g_o, g_p, **TOLERANCE)
        _assert_same_estimator(ours.estimator, public.estimator)
    assert ours.estimator.CoVariance.shape == (6, 8)


# ------------------------------------------------------------------------------ the public train.py, transcribed

LAMBDA_0, EPOCHS, BATCH, LR, N_TRAIN = 0.5, 2, 16, 0.01, 48


def _public_train_loop(criterion, data_root, shadow=None, epochs=EPOCHS):
    """The public CIFAR `train.py` (`--model resnet --layers 32 --no-augment`) for `epochs` epochs, as it builds,
    steps and saves: the feature network and `Full_layer` in `nn.DataParallel`, SGD over both (Nesterov, the
    resnet configuration's momentum and weight decay), ratio = λ0 · epoch / epochs,
    `loss, output = criterion(model, fc, x, target, ratio)`; returns the losses of every iteration and the
    dict its `save_checkpoint` writes. `shadow`: a second criterion called on the same model and batch at
    every step (its losses and gradients are returned too; the step is `criterion`'s)."""
    torch.manual_seed(0)
    net, full_layer = build_public_network("resnet32", 10)
    model, fc = nn.DataParallel(net), nn.DataParallel(full_layer)
    parameters = [*model.parameters(), *fc.parameters()]
    optimizer = torch.optim.SGD([{"params": model.parameters()}, {"params": fc.parameters()}], lr=LR,
                                momentum=0.9, nesterov=True, weight_decay=1e-4)
    train = load_split("cifar10", True, data_root)
    inputs = normalize(train.images.float() / 255, PUBLIC_CIFAR_MEAN, PUBLIC_CIFAR_STD)   # ToTensor, Normalize
    losses, shadowed = [], []
    for epoch in range(epochs):
        ratio = LAMBDA_0 * (epoch / epochs)
        model.train()
        fc.train()
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))  # shuffle=True
        for start in range(0, len(order), BATCH):
            idx = order[start:start + BATCH]
            if shadow is not None:
                loss, output = shadow(model, fc, inputs[idx], train.labels[idx], ratio)
                shadowed.append((loss.item(), output.detach(), torch.autograd.grad(loss, parameters)))
            loss, output = criterion(model, fc, inputs[idx], train.labels[idx], ratio)
            assert output.shape == (len(idx), 10)
            if shadow is not None:
                shadowed[-1] += (loss.item(), output.detach(), torch.autograd.grad(loss, parameters, retain_graph=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, {"epoch": epochs, "state_dict": model.state_dict(), "fc": fc.state_dict(), "best_acc": 10.0,
                    "optimizer": optimizer.state_dict(), "isda_criterion": criterion, "val_acc": [10.0]}, shadowed


@pytest.fixture(scope="module")
def public_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    data = write_cifar10(root / "data", n_train=N_TRAIN, n_test=10)
    public = _public_train_loop(PublicISDALoss(64, 10), data)
    ours = _public_train_loop(cifar.ISDALoss(64, 10), data)
    torch.save(ours[1], root / "checkpoint.pth.tar")   # as its save_checkpoint does
    return root, public, ours


def test_the_public_train_loop_gives_the_same_losses_with_the_drop_in(public_runs):
    _, (public_losses, public_ckpt, _), (our_losses, our_ckpt, _) = public_runs
    assert len(our_losses) == EPOCHS * N_TRAIN // BATCH
    # float32 rounding (~1e-7 a step) grows through SGD and small-batch batch norm: 1e-4 over these 6 steps
    assert our_losses == pytest.approx(public_losses, rel=1e-4)
    for key, value in public_ckpt["fc"].items():
        torch.testing.assert_close(our_ckpt["fc"][key], value, rtol=1e-3, atol=1e-5)
    public_est, our_est = public_ckpt["isda_criterion"].estimator, our_ckpt["isda_criterion"].estimator
    # the features the statistics average drift with the weights: entries agree to 1e-3 of the largest one
    scale = public_est.CoVariance.abs().max().item()
    torch.testing.assert_close(our_est.CoVariance, public_est.CoVariance, rtol=1e-3, atol=1e-3 * scale)
    assert torch.equal(our_est.Amount, public_est.Amount) and our_est.Amount.sum() == EPOCHS * N_TRAIN


def test_step_by_step_on_the_same_model_the_losses_and_gradients_agree(public_runs):
    """Longer, λ up to 0.33: at every step, both losses on the same model and batch (each with its own
    estimator, fed the same features): equal to float32 rounding, the ISDA term included."""
    root, _, _ = public_runs
    _, _, steps = _public_train_loop(PublicISDALoss(64, 10), root / "data", shadow=cifar.ISDALoss(64, 10), epochs=3)
    assert len(steps) == 3 * N_TRAIN // BATCH
    for ours, our_output, our_grads, public, public_output, public_grads in steps:
        assert ours == pytest.approx(public, rel=1e-5)
        torch.testing.assert_close(our_output, public_output, **TOLERANCE)
        for g_o, g_p in zip(our_grads, public_grads):
            torch.testing.assert_close(g_o, g_p, rtol=1e-4, atol=1e-5 * g_p.abs().max().item())


def test_its_checkpoint_loads_in_isda_viz_and_in_torch(public_runs):
    root, _, (_, ckpt, _) = public_runs
    path = root / "checkpoint.pth.tar"
    statistics = ckpt["isda_criterion"].estimator
    clf = load_classifier(path, "cpu", arch="resnet32")                 # through the allow-list: no code runs
    torch.testing.assert_close(clf.estimator.covariance, statistics.CoVariance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(clf.estimator.mean, statistics.Ave, rtol=1e-6, atol=1e-7)
    assert torch.equal(clf.estimator.count.float(), statistics.Amount)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net, full_layer = build_public_network("resnet32", 10)
    net.load_state_dict({k[len("module."):]: v for k, v in ckpt["state_dict"].items()})
    full_layer.load_state_dict({k[len("module."):]: v for k, v in ckpt["fc"].items()})
    with torch.no_grad():
        expected = full_layer(net.eval()(normalize(x, PUBLIC_CIFAR_MEAN, PUBLIC_CIFAR_STD)))
    torch.testing.assert_close(clf.logits(x), expected, rtol=1e-5, atol=1e-5)
    resumed = torch.load(path, weights_only=False)["isda_criterion"]    # the script's own --resume
    assert isinstance(resumed, cifar.ISDALoss)
    for key, value in statistics.covariance_estimator.state_dict().items():
        assert value == resumed.estimator.covariance_estimator.state_dict()[key] if not torch.is_tensor(value) \
            else torch.equal(value, resumed.estimator.covariance_estimator.state_dict()[key]), key


def test_isda_viz_augment_reads_the_checkpoint(public_runs, tmp_path):
    root, _, _ = public_runs
    torch.manual_seed(0)
    gan = WGANGenerator(latent_dim=16, num_classes=10, channels=3, image_size=32, width=8)
    recompute_batchnorm_statistics(gan, 2, 32, torch.Generator().manual_seed(0))
    save_generator(gan, tmp_path / "gan" / "generator.pt", iteration=0, dataset="cifar10")
    x, _ = load_split("cifar10", False, root / "data")[0]
    Image.fromarray(x.permute(1, 2, 0).numpy()).save(tmp_path / "cat.png")
    result = CliRunner().invoke(main, [str(a) for a in (
        "augment", "--image", tmp_path / "cat.png", "--classifier", root / "checkpoint.pth.tar", "--classifier-arch",
        "resnet32", "--generator", tmp_path / "gan", "--iterations", 3, "--restarts", 1, "-k", 2, "--inverter", "search",
        "--out", tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["images"][0]["augmented"]) == 2 and (tmp_path / "out" / "grid.png").is_file()


def test_a_damaged_drop_in_state_is_one_line(public_runs, tmp_path):
    _, _, (_, ckpt, _) = public_runs
    broken = copy.deepcopy(ckpt)
    broken["isda_criterion"].estimator.covariance_estimator.count = torch.zeros(3, dtype=torch.float64)
    torch.save(broken, tmp_path / "broken.pth.tar")
    with pytest.raises(IsdaVizError) as e:
        load_classifier(tmp_path / "broken.pth.tar", "cpu", arch="resnet32")
    message = str(e.value)
    assert "isda_criterion.estimator.CoVariance should be a tensor of shape (10, 64, 64)" in message
    assert "\n" not in message


def test_imagenet_checkpoint_with_the_drop_in_reads_its_diagonal_statistics(tmp_path):
    torch.manual_seed(0)
    model = nn.DataParallel(_PublicStyleNet(10, 8, 6))
    criterion = imagenet.ISDALoss(8, 6)
    for x, y in _batches(10, 6, 3, 20, seed=4):
        criterion(model, x, y, 1.0)[0].backward()
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": model.state_dict(), "best_acc1": torch.tensor(1.0),
                "optimizer": {}, "criterion_isda": criterion}, tmp_path / "in.pth.tar")
    covariance, mean, count = read_weights_file(tmp_path / "in.pth.tar").statistics(6, 8)
    est = criterion.estimator
    assert covariance.shape == (6, 8)   # diagonal: per-dimension variances
    torch.testing.assert_close(covariance, est.CoVariance.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean, est.Ave.double(), rtol=1e-6, atol=1e-7)
    assert torch.equal(count, est.Amount.double())


def test_assigning_a_statistic_keeps_the_others_and_the_estimator_follows_to():
    criterion = cifar.ISDALoss(3, 2)
    criterion.estimator.update_CV(torch.randn(10, 3), torch.arange(10) % 2)
    before = criterion.estimator.CoVariance.clone(), criterion.estimator.Ave.clone()
    criterion.estimator.Amount = torch.tensor([50.0, 60.0])
    torch.testing.assert_close(criterion.estimator.CoVariance, before[0])
    torch.testing.assert_close(criterion.estimator.Ave, before[1])
    criterion.estimator.CoVariance = 2 * before[0]
    torch.testing.assert_close(criterion.estimator.CoVariance, 2 * before[0])
    assert criterion.estimator.Amount.tolist() == [50.0, 60.0]
    criterion.to("cpu")                                                  # what .cuda() does on a GPU
    assert criterion.estimator.covariance_estimator.device == torch.device("cpu")
