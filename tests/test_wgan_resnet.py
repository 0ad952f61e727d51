"""`train-gan --arch resnet`: Gulrajani et al.'s ResNet generator and critic (against a transcription of their
`gan_cifar_resnet.py`, and its parameter list), the moving average that is saved, bit-identical resuming, the
generator registry, `--recipe gulrajani`, and bad options."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from isda_viz.cli.main import main
from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.wgan_resnet import (
    GULRAJANI,
    ResNetCritic,
    ResNetGenerator,
    resnet_critic_parameters,
    resnet_generator_parameters,
)
from isda_viz.generators.wgan_train import GanConfig, apply_gan_recipe, average_weights, train_gan

TINY = ["--arch", "resnet", "--width", 8, "--limit-train", 128, "--batch-size", 8, "--n-critic", 1,
        "--sample-every", 2]


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result) -> str:
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


# ---------------------------------------------------------------- the networks, against their code

def _their_generator_parameters(dim: int, classes: int, z: int = 128, channels: int = 3) -> int:
    """The parameters `gan_cifar_resnet.py`'s Generator creates (CONDITIONAL, NORMALIZATION_G), listed by name."""
    shapes = [("Generator.Input.W", (z, 4 * 4 * dim)), ("Generator.Input.b", (4 * 4 * dim,))]
    for i in (1, 2, 3):
        block = f"Generator.{i}"
        shapes += [(f"{block}.Shortcut.Filters", (1, 1, dim, dim)), (f"{block}.Shortcut.Biases", (dim,)),
                   (f"{block}.N1.offset", (classes, dim)), (f"{block}.N1.scale", (classes, dim)),
                   (f"{block}.Conv1.Filters", (3, 3, dim, dim)), (f"{block}.Conv1.Biases", (dim,)),
                   (f"{block}.N2.offset", (classes, dim)), (f"{block}.N2.scale", (classes, dim)),
                   (f"{block}.Conv2.Filters", (3, 3, dim, dim)), (f"{block}.Conv2.Biases", (dim,))]
    shapes += [("Generator.OutputN.offset", (dim,)), ("Generator.OutputN.scale", (dim,)),
               ("Generator.Output.Filters", (3, 3, dim, channels)), ("Generator.Output.Biases", (channels,))]
    return sum(torch.Size(shape).numel() for _, shape in shapes)


def _their_critic_parameters(dim: int, classes: int, channels: int = 3) -> int:
    """`gan_cifar_resnet.py`'s Discriminator (NORMALIZATION_D False), its AC-GAN head `Linear(dim, classes)` swapped
    for our projection embedding `(classes, dim)`."""
    conv = lambda cin, cout, k: k * k * cin * cout + cout  # noqa: E731  (filters and biases)
    first = conv(channels, dim, 3) + conv(dim, dim, 3) + conv(channels, dim, 1)
    down = conv(dim, dim, 3) + conv(dim, dim, 3) + conv(dim, dim, 1)
    plain = 2 * (conv(dim, dim, 3) + conv(dim, dim, 3))
    return first + down + plain + (dim + 1) + classes * dim


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("width, classes, channels", [(128, 10, 3), (8, 10, 1), (16, None, 3)])
def test_parameter_counts_are_the_published_architecture_s(width, classes, channels):
    with torch.device("meta"):
        generator = ResNetGenerator(num_classes=classes, channels=channels, width=width)
        critic = ResNetCritic(num_classes=classes, channels=channels, width=width)
    assert _count(generator) == resnet_generator_parameters(width, classes, channels)
    assert _count(critic) == resnet_critic_parameters(width, classes, channels)
    if classes is not None:
        assert _count(generator) == _their_generator_parameters(width, classes, channels=channels)
        assert _count(critic) == _their_critic_parameters(width, classes, channels=channels)


def _their_generator(s: dict, z: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """`Generator(n, labels, noise)` of `gan_cifar_resnet.py`, functionally, reading our parameters by role:
    cond batch norm = batch statistics, then the label's scale and offset; UpsampleConv = 4 copies + depth_to_space
    (nearest 2x) then the conv."""
    def cond_bn(x, name):
        scale, shift = s[f"{name}.embed.weight"][y].chunk(2, dim=1)
        return F.batch_norm(x, None, None, training=True, eps=1e-5) * scale[..., None, None] + shift[..., None, None]

    def depth_to_space(x):  # TensorFlow's, on NCHW: out[c, 2h + i, 2w + j] = in[(2i + j)·C + c, h, w]
        n, channels, height, width = x.shape
        x = x.view(n, 2, 2, channels // 4, height, width)
        return x.permute(0, 3, 4, 1, 5, 2).reshape(n, channels // 4, 2 * height, 2 * width)

    def upsample_conv(x, name, padding):
        x = depth_to_space(torch.cat([x, x, x, x], 1))
        return F.conv2d(x, s[f"{name}.weight"], s[f"{name}.bias"], padding=padding)

    out = (z @ s["linear.weight"].T + s["linear.bias"]).view(-1, dim, 4, 4)
    for i in range(3):
        b = f"blocks.{i}"
        shortcut = upsample_conv(out, f"{b}.shortcut", 0)
        h = upsample_conv(F.relu(cond_bn(out, f"{b}.bn1")), f"{b}.conv1", 1)
        h = F.conv2d(F.relu(cond_bn(h, f"{b}.bn2")), s[f"{b}.conv2.weight"], s[f"{b}.conv2.bias"], padding=1)
        out = shortcut + h
    out = F.batch_norm(out, None, None, s["bn.weight"], s["bn.bias"], training=True, eps=1e-5)
    return torch.tanh(F.conv2d(F.relu(out), s["to_image.weight"], s["to_image.bias"], padding=1))


def _their_critic(s: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`Discriminator` of `gan_cifar_resnet.py`, functionally (mean pool = the average of the 4 strided slices), with
    our projection head in place of the AC-GAN one."""
    conv = lambda x, name, pad: F.conv2d(x, s[f"{name}.weight"], s[f"{name}.bias"], padding=pad)  # noqa: E731
    pool = lambda x: (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2]) / 4  # noqa

    out = conv(pool(x), "blocks.0.shortcut", 0) + pool(conv(F.relu(conv(x, "blocks.0.conv1", 1)), "blocks.0.conv2", 1))
    out = pool(conv(out, "blocks.1.shortcut", 0)) + pool(
        conv(F.relu(conv(F.relu(out), "blocks.1.conv1", 1)), "blocks.1.conv2", 1))
    for i in (2, 3):
        out = out + conv(F.relu(conv(F.relu(out), f"blocks.{i}.conv1", 1)), f"blocks.{i}.conv2", 1)
    h = F.relu(out).mean(dim=(2, 3))
    return (h @ s["linear.weight"].T + s["linear.bias"]).squeeze(1) + (s["embed.weight"][y] * h).sum(1)


def test_the_networks_compute_what_their_code_computes():
    torch.manual_seed(0)
    width, classes = 16, 10
    generator, critic = ResNetGenerator(num_classes=classes, width=width), ResNetCritic(classes, 3, width)
    with torch.no_grad():  # class-conditional scales away from 1, so that a wrong label lookup shows
        for module in generator.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_()
    z, y = torch.randn(6, 128), torch.tensor([0, 3, 3, 9, 1, 0])
    with torch.no_grad():
        images = generator.train()(z, y)
        assert images.shape == (6, 3, 32, 32) and images.abs().max() <= 1
        torch.testing.assert_close(images, _their_generator(generator.state_dict(), z, y, width), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(critic(images, y), _their_critic(critic.state_dict(), images, y), rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(IsdaVizError, match="4·2\\^k px"):
        ResNetGenerator(image_size=28)


def test_the_moving_average_is_the_recurrence_in_float64():
    torch.manual_seed(1)
    model, average = nn.Linear(3, 2), nn.Linear(3, 2)
    average.load_state_dict(model.state_dict())
    expected = [p.detach().double().clone() for p in model.parameters()]
    for step in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average_weights(average, model, 0.9, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.parameters(), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- train-gan --arch resnet

class _Killed(Exception):
    pass


def test_it_trains_saves_its_moving_average_and_resumes_bit_identically(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = _invoke("train-gan", *TINY, "--iterations", 6, "--out", straight)
    assert result.exit_code == 0, result.output
    state = torch.load(straight / "training_state.pt", weights_only=True)
    saved = torch.load(straight / "generator.pt", weights_only=True)
    assert saved["format"] == "isda-viz-wgan-resnet" and saved["config"]["width"] == 8
    assert all(torch.equal(saved["state_dict"][k], state["average"][k]) for k in saved["state_dict"])
    assert any(not torch.equal(state["average"][k], state["generator"][k]) for k in state["generator"]
               if "running" not in k and "num_batches" not in k)  # the average, not the last weights
    config = json.loads((straight / "config.json").read_text())
    assert (config["arch"], config["width"], config["critic_width"], config["ema_decay"]) == ("resnet", 8, 8, 0.999)

    def kill_at_iteration_4(message):
        if message.startswith("iteration 4/"):
            raise _Killed

    cfg = GanConfig(out=str(resumed), arch="resnet", width=8, limit_train=128, batch_size=8, n_critic=1,
                    sample_every=2, iterations=6)
    with pytest.raises(_Killed):
        train_gan(cfg, progress=False, log=kill_at_iteration_4)
    result = _invoke("train-gan", *TINY, "--iterations", 6, "--out", resumed, "--resume")
    assert result.exit_code == 0 and "at iteration 4/6" in result.output, result.output
    for name in ("generator.pt", "training_state.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (straight, resumed))
        for part in ("state_dict",) if name == "generator.pt" else ("generator", "average", "critic"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (name, part)
    generator = load_generator(str(resumed))
    assert isinstance(generator, ResNetGenerator) and generator.kind == "wgan-resnet" and not generator.training
    assert generator.generate(generator.sample_latent(2), torch.tensor([1, 2])).shape == (2, 1, 32, 32)


def test_the_registry_tells_the_two_wgans_apart(tmp_path):
    out = tmp_path / "gan"
    assert _invoke("train-gan", *TINY, "--iterations", 2, "--out", out).exit_code == 0
    with pytest.raises(IsdaVizError) as e:
        load_generator(f"wgan:{out}")
    assert "not a wgan generator" in str(e.value) and f"give wgan-resnet:{out}" in str(e.value)
    assert "\n" not in str(e.value)
    assert isinstance(load_generator(f"wgan-resnet:{out / 'generator.pt'}"), ResNetGenerator)


def test_the_gulrajani_recipe_and_explicit_options(tmp_path):
    cfg = apply_gan_recipe(GanConfig(out="x", recipe="gulrajani", n_critic=2), explicit={"n_critic"})
    assert (cfg.n_critic, cfg.lr_g, cfg.lr_d, cfg.beta1, cfg.beta2, cfg.iterations, cfg.batch_size,
            cfg.generator_batch_size, cfg.gp) == (2, 2e-4, 2e-4, 0.0, 0.9, 100_000, 64, 128, 10.0)
    assert {k: getattr(cfg, k) for k in GULRAJANI if k != "n_critic"} == {k: v for k, v in GULRAJANI.items()
                                                                         if k != "n_critic"}
    out = tmp_path / "gan"
    result = _invoke("train-gan", "--arch", "resnet", "--width", 4, "--limit-train", 64, "--recipe", "gulrajani",
                     "--iterations", 1, "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["iterations"], config["n_critic"], config["lr_g"], config["beta1"], config["batch_size"],
            config["generator_batch_size"]) == (1, 5, 2e-4, 0.0, 64, 128)


@pytest.mark.parametrize("option, value, message", [("--width", 0, "--width must be a positive integer"),
                                                    ("--critic-width", -3, "--critic-width must be a positive"),
                                                    ("--ema-decay", 1, "--ema-decay must be in [0, 1)")])
def test_bad_options_are_one_error_line_and_write_nothing(tmp_path, option, value, message):
    out = tmp_path / "gan"
    assert message in _one_error_line(_invoke("train-gan", "--arch", "resnet", option, value, "--out", out))
    assert not out.exists() and list(tmp_path.iterdir()) == []
