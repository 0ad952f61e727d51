"""Generators: one interface test suite run on both kinds (a WGAN trained by `train-gan`, a tiny random BigGAN
loaded from a folder in the package's format), the adapter, `train-gan` end to end, and one-line errors."""

from __future__ import annotations

import json
import shutil

import click
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from isda_viz.data.images import LUMINANCE, map_channels, resize
from isda_viz.generators.base import to_classifier_input
from isda_viz.inversion.adapter import GeneratorAdapter, check_compatible, read_class_map
from isda_viz.classifiers.classifier import load_classifier
from isda_viz.cli.common import device_option
from isda_viz.cli.main import IsdaVizGroup, main
from isda_viz.data.images import normalize
from isda_viz.devices import pick_device
from isda_viz.errors import IsdaVizError
from isda_viz.generators.biggan import BigGANGenerator
from isda_viz.generators.wgan_train import GanConfig, train_gan
from isda_viz.generators.wgan import WGANGenerator
from isda_viz.generators import load_generator
from isda_viz.generators.biggan_weights import save_biggan
from isda_viz.generators.wgan_train import samples_picture

TINY_GAN = ["--limit-train", 256, "--batch-size", 16, "--n-critic", 1, "--sample-every", 2]


def _invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


def _one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tiny_biggan(num_classes: int = 10, seed: int = 0):
    """A random BigGAN-deep of channel width 8, its untouched parameters initialised and statistics calibrated.

    `BigGAN(config)` leaves the final batch-norm's weight/bias uninitialised and every
    running mean/variance at 0/1, which overflows to inf/NaN a few blocks in: give
    the batch-norm weight 1, bias 0, and set each layer's statistics (for every
    truncation) to the mean/variance of its input in one forward pass.
    """
    from pytorch_pretrained_biggan import BigGAN, BigGANConfig
    from pytorch_pretrained_biggan.model import BigGANBatchNorm

    torch.manual_seed(seed)
    # Attention at 8x8 rather than the default 64x64, where its 4096x1024 maps would dominate the test's time.
    model = BigGAN(BigGANConfig(channel_width=8, num_classes=num_classes, z_dim=16, class_embed_dim=16,
                                attention_layer_position=2)).eval()
    with torch.no_grad():
        model.generator.bn.weight.fill_(1.0)
        model.generator.bn.bias.zero_()

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_means.copy_(x.mean(dim=(0, 2, 3)).expand_as(module.running_means))
        module.running_vars.copy_(x.var(dim=(0, 2, 3)).expand_as(module.running_vars))

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, BigGANBatchNorm)]
    with torch.no_grad():
        model(torch.randn(16, 16).clamp(-2, 2) * 0.5, F.one_hot(torch.arange(16) % num_classes, num_classes).float(),
              0.5)
    for hook in hooks:
        hook.remove()
    return model


@pytest.fixture(scope="module")
def biggan_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("biggan") / "tiny-biggan"
    save_biggan(tiny_biggan(), folder)
    return folder


@pytest.fixture(scope="module")
def gan_dir(tmp_path_factory, tiny_run):
    """A WGAN trained for 4 iterations by the CLI on 256 Fashion-MNIST images, agreement measured against tiny_run."""
    out = tmp_path_factory.mktemp("gan") / "gan"
    result = _invoke(main, "train-gan", *TINY_GAN, "--iterations", 4, "--classifier", tiny_run, "--out", out)
    assert result.exit_code == 0, result.output
    assert "class agreement" in result.output and f"GAN written to {out}" in result.output
    return out


@pytest.fixture(params=["wgan", "biggan"])
def generator(request, gan_dir, biggan_dir):
    return load_generator(str(gan_dir if request.param == "wgan" else biggan_dir), "cpu")


# ------------------------------------------------------------------------------------------------ the interface

EXPECTED = {WGANGenerator: dict(channels=1, image_size=28, latent_dim=128),
            BigGANGenerator: dict(channels=3, image_size=128, latent_dim=16)}


def test_interface_attributes_and_frozen(generator):
    for key, value in EXPECTED[type(generator)].items():
        assert getattr(generator, key) == value
    assert generator.conditional and generator.num_classes == 10
    assert generator.output_range == (-1.0, 1.0)
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())


def test_generate_shape_range_finite_and_conditioned(generator):
    z = generator.sample_latent(6, torch.Generator().manual_seed(0))
    assert z.shape == (6, generator.latent_dim)
    y = torch.tensor([0, 1, 2, 3, 4, 9])
    with torch.no_grad():
        images = generator.generate(z, y)
        same_z_other_classes = generator.generate(z, (y + 1) % 10)
        one_at_a_time = torch.cat([generator.generate(z[i:i + 1], y[i:i + 1]) for i in range(6)])
    s, c = generator.image_size, generator.channels
    assert images.shape == (6, c, s, s) and torch.isfinite(images).all()
    lo, hi = generator.output_range
    assert images.min() >= lo and images.max() <= hi and images.std() > 1e-3  # not a constant image
    assert (images - same_z_other_classes).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # the label changes the image
    torch.testing.assert_close(one_at_a_time, images, atol=1e-5, rtol=1e-4)  # frozen: no batch statistics
    unit = generator.to_unit(images)
    torch.testing.assert_close(unit, (images - lo) / (hi - lo))


def test_gradients_flow_to_z(generator):
    z = generator.sample_latent(3, torch.Generator().manual_seed(1)).requires_grad_(True)
    generator.generate(z, torch.tensor([0, 5, 7])).square().sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and (z.grad.abs().sum(1) > 0).all()


def test_loading_twice_gives_identical_outputs(generator, gan_dir, biggan_dir):
    spec = gan_dir if isinstance(generator, WGANGenerator) else biggan_dir
    again = load_generator(str(spec), "cpu")
    z = generator.sample_latent(2, torch.Generator().manual_seed(2))
    y = torch.tensor([3, 8])
    with torch.no_grad():
        assert torch.equal(generator.generate(z, y), again.generate(z, y))


def test_biggan_latents_are_truncated_normal(biggan_dir):
    g = load_generator(str(biggan_dir), "cpu", truncation=0.4)
    z = g.sample_latent(4000, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 0.8 + 1e-6  # |N(0,1)| <= 2, times truncation
    assert abs(z.std().item() - 0.4 * 0.8796) < 0.01  # std of N(0,1) truncated to [-2, 2] is 0.8796


# --------------------------------------------------------------------------------------------------- the adapter


class _FakeClassifier:
    """What the adapter reads from an isda_viz.classifiers.classifier.Classifier."""

    def __init__(self, channels, image_size, num_classes=10, mean=(0.5,), std=(0.25,)):
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.mean, self.std, self.source = list(mean) * channels, list(std) * channels, "fake"

    def preprocess(self, x):
        return normalize(x, self.mean, self.std)


def test_adapter_maps_a_constant_rgb_image_to_its_normalised_luminance():
    rgb = torch.tensor([0.2, -0.6, 1.0])  # in [-1, 1]
    images = rgb.view(1, 3, 1, 1).expand(2, 3, 128, 128)
    x = to_classifier_input(images, (-1.0, 1.0), _FakeClassifier(1, 28))
    unit = (rgb.double() + 1) / 2
    expected = ((unit * torch.tensor(LUMINANCE, dtype=torch.float64)).sum() - 0.5) / 0.25
    assert x.shape == (2, 1, 28, 28)
    torch.testing.assert_close(x, torch.full_like(x, expected.item()), atol=1e-5, rtol=0)


def test_adapter_gray_to_rgb_and_antialiased_resize():
    checker = (torch.arange(128).view(1, -1) + torch.arange(128).view(-1, 1)) % 2  # 1-pixel checkerboard
    images = checker.float().view(1, 1, 128, 128) * 2 - 1
    x = to_classifier_input(images, (-1.0, 1.0), _FakeClassifier(3, 30))
    assert x.shape == (1, 3, 30, 30) and torch.equal(x[:, 0], x[:, 2])
    # Antialiasing averages the checkerboard to mid-gray 0.5 everywhere; plain bilinear at 128 → 30 would alias
    # it (values off by up to 0.44).
    assert (x * 0.25).abs().max() < 0.02  # x = (v - 0.5) / 0.25
    assert resize(images, 128) is images and map_channels(images, 1) is images
    with pytest.raises(IsdaVizError, match="2-channel"):
        map_channels(torch.zeros(1, 2, 4, 4), 3)


def test_adapter_with_a_real_classifier_is_differentiable(biggan_dir, tiny_run):
    generator, classifier = load_generator(str(biggan_dir), "cpu"), load_classifier(tiny_run)
    adapter = GeneratorAdapter(generator, classifier)
    z = generator.sample_latent(2, torch.Generator().manual_seed(0)).requires_grad_(True)
    logits = adapter.logits(z, torch.tensor([1, 2]))
    assert adapter(z.detach(), torch.tensor([1, 2])).shape == (2, 1, 28, 28) and logits.shape == (2, 10)
    logits[:, 0].sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_class_count_and_channel_mismatch_are_errors():
    with pytest.raises(IsdaVizError, match="7 classes.*10"):
        check_compatible(WGANGenerator(num_classes=7), _FakeClassifier(1, 28))
    check_compatible(WGANGenerator(num_classes=None), _FakeClassifier(1, 28, num_classes=3))  # unconditional: fine
    rgb_wgan = WGANGenerator(channels=3, image_size=32)
    with pytest.raises(IsdaVizError, match="3-channel"):
        check_compatible(rgb_wgan, _FakeClassifier(2, 32))


def test_class_map_for_an_unconditional_generator_says_so(tmp_path):
    class_map = tmp_path / "map.tsv"
    class_map.write_text("0\t3\n")
    unconditional = WGANGenerator(num_classes=None)
    for check in (lambda: read_class_map(class_map, _FakeClassifier(1, 28), unconditional),
                  lambda: check_compatible(unconditional, _FakeClassifier(1, 28), torch.zeros(10, dtype=torch.long))):
        with pytest.raises(IsdaVizError, match="class-conditional generator; .* has none"):
            check()


# ----------------------------------------------------------------------------------------------------- train-gan


def test_train_gan_writes_what_it_should(gan_dir):
    ckpt = torch.load(gan_dir / "generator.pt", weights_only=True)
    assert ckpt["format"] == "isda-viz-wgan" and ckpt["iteration"] == 4 and ckpt["dataset"] == "fashion-mnist"
    assert ckpt["config"]["num_classes"] == 10 and ckpt["config"]["class_names"][1] == "Trouser"
    assert set(ckpt["state_dict"]) == set(WGANGenerator(**ckpt["config"]).state_dict())
    state = torch.load(gan_dir / "training_state.pt", weights_only=True)
    assert state["iteration"] == 4 and {"critic", "opt_g", "opt_d", "rng"} <= set(state)

    records = [json.loads(line) for line in (gan_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    for r in records:
        # The logged critic loss is -Wasserstein + lambda * penalty of the same (last) critic step.
        assert r["critic_loss"] == pytest.approx(-r["wasserstein"] + 10 * r["gradient_penalty"], rel=1e-4, abs=1e-4)
        assert r["gradient_penalty"] >= 0 and 0 <= r["agreement"] <= 1
    assert 0 < records[0]["seconds"] <= records[1]["seconds"]
    assert json.loads((gan_dir / "config.json").read_text())["n_critic"] == 1

    picture = Image.open(gan_dir / "samples.png")
    cell = 2 * (28 + 2)  # 28 px + padding, shown 2x
    assert picture.size == (90 + 10 * cell + 4, 10 * cell + 4)  # class names, then 10 columns; 10 class rows
    # It shows the saved generator: rows are classes, columns share the latent codes drawn from seed + 1.
    generator = load_generator(str(gan_dir), "cpu")
    z = torch.randn(10, 128, generator=torch.Generator().manual_seed(0 + 1))
    expected = samples_picture(generator, z, ckpt["config"]["class_names"])
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(expected))
    cells = np.asarray(picture.convert("L"), dtype=np.float32)[4:, 90 + 4:]
    assert cells.std() > 1


class _Killed(Exception):
    pass


def test_resume_continues_and_ends_identical_to_an_uninterrupted_run(tmp_path):
    cfg = dict(limit_train=256, batch_size=16, n_critic=1, sample_every=2, iterations=6, seed=4, width=8,
               critic_width=8)  # the resumed run takes its widths from the saved state, not the CLI
    train_gan(GanConfig(out=str(tmp_path / "straight"), **cfg), progress=False, log=lambda *a: None)

    def kill_at_iteration_4(message):
        if message.startswith("iteration 4/"):
            raise _Killed

    with pytest.raises(_Killed):
        train_gan(GanConfig(out=str(tmp_path / "resumed"), **cfg), progress=False, log=kill_at_iteration_4)
    assert torch.load(tmp_path / "resumed" / "generator.pt", weights_only=True)["iteration"] == 4

    again = _invoke(main, "train-gan", *TINY_GAN, "--iterations", 6, "--seed", 4, "--out", tmp_path / "resumed")
    _one_line_error(again, "--resume")
    result = _invoke(main, "train-gan", *TINY_GAN, "--iterations", 6, "--seed", 4, "--out", tmp_path / "resumed",
                     "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "at iteration 4/6" in result.output
    a = torch.load(tmp_path / "straight" / "generator.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "generator.pt", weights_only=True)
    assert b["iteration"] == 6
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    iterations = [json.loads(line)["iteration"] for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
    assert iterations == [2, 4, 6]


def test_unconditional_gan(tmp_path):
    result = _invoke(main, "train-gan", *TINY_GAN, "--iterations", 2, "--unconditional", "--out", tmp_path / "u")
    assert result.exit_code == 0, result.output
    g = load_generator(str(tmp_path / "u"), "cpu")
    assert not g.conditional and g.generate(g.sample_latent(3)).shape == (3, 1, 28, 28)
    assert Image.open(tmp_path / "u" / "samples.png").size == (10 * 60 + 4, 64)  # one row of 10


# ---------------------------------------------------------------------- --generator on the command line, errors


@click.command("probe")
@click.option("--generator", required=True)
@click.option("--truncation", type=float, default=0.5)
@click.option("--classifier", default=None)
@device_option
def _probe(generator, truncation, classifier, device):
    """What a command driving a generator does: load it (and fit it to a classifier), generate."""
    g = load_generator(generator, pick_device(device), truncation)
    z, y = g.sample_latent(2, torch.Generator().manual_seed(0)), torch.tensor([0, 1])
    x = GeneratorAdapter(g, load_classifier(classifier))(z, y) if classifier else g.generate(z, y)
    click.echo(f"{type(g).__name__} {tuple(x.shape)} finite={bool(torch.isfinite(x).all())}")


probe = IsdaVizGroup(commands=[_probe])  # under the CLI's error boundary, as every isda-viz command


def test_generator_option_loads_both_kinds(gan_dir, biggan_dir, tiny_run):
    result = _invoke(probe, "probe", "--generator", biggan_dir, "--classifier", tiny_run, "--device", "cpu")
    assert result.exit_code == 0 and result.output.strip() == "BigGANGenerator (2, 1, 28, 28) finite=True"
    result = _invoke(probe, "probe", "--generator", biggan_dir / "pytorch_model.bin", "--truncation", 1.0)
    assert result.exit_code == 0 and result.output.strip() == "BigGANGenerator (2, 3, 128, 128) finite=True"
    result = _invoke(probe, "probe", "--generator", gan_dir / "generator.pt")
    assert result.exit_code == 0 and result.output.strip() == "WGANGenerator (2, 1, 28, 28) finite=True"


def test_biggan_names_resolve_to_local_copies_offline(biggan_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ISDA_VIZ_OFFLINE", "1")
    monkeypatch.setenv("ISDA_VIZ_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("PYTORCH_PRETRAINED_BIGGAN_CACHE", str(tmp_path / "theirs"))
    # No copy anywhere: one line naming the local-directory option, no network, no random weights.
    _one_line_error(_invoke(probe, "probe", "--generator", "biggan-deep-128"), "biggan-deep-128", "--generator PATH")
    # A copy in the package's cache (hashed file names, URL in a .json sidecar) is found without a request.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for i, (name, file) in enumerate((("config", "config.json"), ("pytorch_model", "pytorch_model.bin"))):
        shutil.copy(biggan_dir / file, theirs / f"hash{i}")
        url = f"https://s3.amazonaws.com/models.huggingface.co/biggan/biggan-deep-128-{name}.{file.split('.')[1]}"
        (theirs / f"hash{i}.json").write_text(json.dumps({"url": url, "etag": None}))
    result = _invoke(probe, "probe", "--generator", "biggan-deep-128")
    assert result.output.startswith("BigGANGenerator (2, 3, 128, 128)")
    # Our own cache comes first.
    shutil.copytree(biggan_dir, tmp_path / "ours" / "biggan" / "biggan-deep-256")
    result = _invoke(probe, "probe", "--generator", "biggan-deep-256")
    assert result.output.startswith("BigGANGenerator (2, 3, 128, 128)")


def test_missing_and_corrupt_files_are_one_line_errors(gan_dir, biggan_dir, tmp_path):
    _one_line_error(_invoke(probe, "probe", "--generator", tmp_path / "nowhere"), "not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(_invoke(probe, "probe", "--generator", tmp_path / "empty"), "holds neither", "generator.pt",
                    "config.json + pytorch_model.bin")

    weights_only = tmp_path / "no-weights"
    weights_only.mkdir()
    shutil.copy(biggan_dir / "config.json", weights_only)
    _one_line_error(_invoke(probe, "probe", "--generator", weights_only), "no pytorch_model.bin")

    truncated = tmp_path / "truncated"
    shutil.copytree(biggan_dir, truncated)
    data = (truncated / "pytorch_model.bin").read_bytes()
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    _one_line_error(_invoke(probe, "probe", "--generator", truncated), "corrupt")

    incomplete = tmp_path / "incomplete"  # a key short: the package's strict=False would keep a random layer
    shutil.copytree(biggan_dir, incomplete)
    state = torch.load(incomplete / "pytorch_model.bin", weights_only=True)
    del state["generator.conv_to_rgb.weight_orig"]
    torch.save(state, incomplete / "pytorch_model.bin")
    _one_line_error(_invoke(probe, "probe", "--generator", incomplete), "do not match", "Missing key", "conv_to_rgb")

    mismatched = tmp_path / "mismatched"  # weights of width 8 under a config of width 16
    shutil.copytree(biggan_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "channel_width": 16}))
    _one_line_error(_invoke(probe, "probe", "--generator", mismatched), "do not match")

    broken_gan = tmp_path / "broken-gan"
    shutil.copytree(gan_dir, broken_gan)
    (broken_gan / "generator.pt").write_bytes(b"not a checkpoint")
    _one_line_error(_invoke(probe, "probe", "--generator", broken_gan), "corrupt")
    (broken_gan / "generator.pt").unlink()
    _one_line_error(_invoke(probe, "probe", "--generator", broken_gan), "generator.pt", "not found")


def test_class_count_mismatch_with_a_classifier_run_is_a_one_line_error(tmp_path, tiny_run):
    save_biggan(tiny_biggan(num_classes=5), tmp_path / "five")
    _one_line_error(_invoke(probe, "probe", "--generator", tmp_path / "five", "--classifier", tiny_run),
                    "5 classes", "10")
    _one_line_error(_invoke(main, "train-gan", *TINY_GAN, "--iterations", 1, "--unconditional", "--classifier",
                            tiny_run, "--out", tmp_path / "u"), "class-conditional")


def test_biggan_names_download_where_online(biggan_dir, tmp_path, monkeypatch):
    """A local HTTP server stands in for the model host: a name downloads once into our cache, then loads offline."""
    import functools
    import http.server
    import threading

    import isda_viz.generators.biggan_weights as biggan

    served = tmp_path / "served"
    served.mkdir()
    for file in ("config.json", "pytorch_model.bin"):
        shutil.copy(biggan_dir / file, served / f"biggan-deep-512-{file}")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("ISDA_VIZ_OFFLINE", raising=False)
    monkeypatch.setenv("ISDA_VIZ_CACHE", str(tmp_path / "ours"))
    monkeypatch.setenv("PYTORCH_PRETRAINED_BIGGAN_CACHE", str(tmp_path / "theirs"))
    try:
        monkeypatch.setattr(biggan, "BIGGAN_URL", f"http://127.0.0.1:{server.server_address[1]}/{{name}}-{{file}}")
        result = _invoke(probe, "probe", "--generator", "biggan-deep-512")  # a progress bar, then the probe's line
        assert result.exit_code == 0 and result.output.strip().endswith("BigGANGenerator (2, 3, 128, 128) finite=True")
        cached = tmp_path / "ours" / "biggan" / "biggan-deep-512" / "pytorch_model.bin"
        assert cached.read_bytes() == (biggan_dir / "pytorch_model.bin").read_bytes()
    finally:
        server.shutdown()
        server.server_close()
    # The host gone, the cached copy still loads; a name never fetched is one line naming the folder option.
    monkeypatch.setattr(biggan, "BIGGAN_URL", "http://127.0.0.1:9/{name}-{file}")  # port 9: connection refused
    assert _invoke(probe, "probe", "--generator", "biggan-deep-512").output.startswith("BigGANGenerator")
    _one_line_error(_invoke(probe, "probe", "--generator", "biggan-deep-128"), "could not be downloaded",
                    "--generator PATH")
