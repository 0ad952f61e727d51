"""The pretrained BigGAN families (dab-biggan, studiogan-biggan, biggan-pytorch) against their projects' code.

Each layout's file is written here from the original code's facts alone: the key names and shapes its
`Generator.state_dict()` has (BigGAN-PyTorch's `BigGAN.py`/`layers.py`, which DiffAugment-biggan-cifar
forks; StudioGAN's `big_resnet.py`/`ops.py`), random weights, in the torch file format of the project's
era. The expected images come from a functional transcription of each project's eval-mode forward pass
(its spectral norm, its batch norm with the file's statistics), written here, not from the library.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.biggan_pytorch import IMAGENET, IMAGENET_WIDTHS, BrockBigGAN, read_brock_layout
from isda_viz.generators.dab_biggan import CIFAR, CIFAR_WIDTHS
from isda_viz.generators.pretrained import (
    STANDING_CACHE,
    TorchSN,
    brock_sigma,
    recompute_standing_statistics,
    standing_statistics,
    statistics_state,
)
from isda_viz.generators.studiogan_biggan import studio_network

# ------------------------------------------------------------------------------- the projects' layouts, transcribed

# BigGAN-PyTorch's G_arch: per resolution, block input/output widths as multiples of ch.
G_ARCH = {32: ([4, 4, 4], [4, 4, 4]), 128: ([16, 16, 8, 4, 2], [16, 8, 4, 2, 1])}


def brock_shapes(ch, dim_z, n_classes, resolution, shared_dim=0, hier=False, attention=None):
    """`{key: shape}` of BigGAN-PyTorch's `Generator(...).state_dict()` (SN layers: weight, bias, u0, sv0)."""
    ins, outs = [ch * m for m in G_ARCH[resolution][0]], [ch * m for m in G_ARCH[resolution][1]]
    slots = len(ins) + 1 if hier else 1
    chunk = dim_z // slots if hier else 0
    cond = shared_dim + chunk
    shapes = {}

    def sn(prefix, out, *rest, bias=True):
        shapes[prefix + "weight"] = (out, *rest)
        if bias:
            shapes[prefix + "bias"] = (out,)
        shapes[prefix + "u0"], shapes[prefix + "sv0"] = (1, out), (1,)

    if shared_dim:
        shapes["shared.weight"] = (n_classes, shared_dim)
    sn("linear.", ins[0] * 16, dim_z // slots)
    for i, (c_in, c_out) in enumerate(zip(ins, outs)):
        p = f"blocks.{i}.0."
        sn(p + "conv1.", c_out, c_in, 3, 3)
        sn(p + "conv2.", c_out, c_out, 3, 3)
        sn(p + "conv_sc.", c_out, c_in, 1, 1)
        for bn, c in (("bn1.", c_in), ("bn2.", c_out)):
            for which in ("gain.", "bias."):
                if shared_dim:
                    sn(p + bn + which, c, cond, bias=False)
                else:
                    shapes[p + bn + which + "weight"] = (n_classes, c)
            shapes[p + bn + "stored_mean"] = shapes[p + bn + "stored_var"] = (c,)
        if attention == 8 * 2 ** i:
            a = f"blocks.{i}.1."
            sn(a + "theta.", c_out // 8, c_out, 1, 1, bias=False)
            sn(a + "phi.", c_out // 8, c_out, 1, 1, bias=False)
            sn(a + "g.", c_out // 2, c_out, 1, 1, bias=False)
            sn(a + "o.", c_out, c_out // 2, 1, 1, bias=False)
            shapes[a + "gamma"] = ()
    for name in ("gain", "bias", "stored_mean", "stored_var"):
        shapes["output_layer.0." + name] = (outs[-1],)
    sn("output_layer.2.", 3, outs[-1], 3, 3)
    return shapes


def studio_shapes(conv_dim, z_dim, shared_dim, num_classes):
    """`{key: shape}` of StudioGAN's 32 px big_resnet `Generator` (cBN, SN via torch.nn.utils.spectral_norm,
    attention after block 2: attn_g_loc [2])."""
    c, chunk = 4 * conv_dim, z_dim // 4
    cond = chunk + shared_dim
    shapes = {}

    def sn(prefix, out, *rest, bias=True):
        shapes[prefix + "weight_orig"] = (out, *rest)
        if bias:
            shapes[prefix + "bias"] = (out,)
        shapes[prefix + "weight_u"] = (out,)
        shapes[prefix + "weight_v"] = (int(torch.tensor(rest).prod()),)

    sn("linear0.", c * 16, chunk)
    shapes["shared.weight"] = (num_classes, shared_dim)
    for b in (0, 1, 3):
        p = f"blocks.{b}.0."
        for bn in ("bn1.", "bn2."):
            shapes[p + bn + "bn.running_mean"] = shapes[p + bn + "bn.running_var"] = (c,)
            shapes[p + bn + "bn.num_batches_tracked"] = ()
            sn(p + bn + "gain.", c, cond, bias=False)
            sn(p + bn + "bias.", c, cond, bias=False)
        sn(p + "conv2d0.", c, c, 1, 1)
        sn(p + "conv2d1.", c, c, 3, 3)
        sn(p + "conv2d2.", c, c, 3, 3)
    a = "blocks.2.0."
    sn(a + "conv1x1_theta.", c // 8, c, 1, 1, bias=False)
    sn(a + "conv1x1_phi.", c // 8, c, 1, 1, bias=False)
    sn(a + "conv1x1_g.", c // 2, c, 1, 1, bias=False)
    sn(a + "conv1x1_attn.", c, c // 2, 1, 1, bias=False)
    shapes[a + "sigma"] = (1,)
    for name in ("weight", "bias", "running_mean", "running_var"):
        shapes["bn4." + name] = (c,)
    shapes["bn4.num_batches_tracked"] = ()
    sn("conv2d5.", 3, c, 3, 3)
    return shapes


def random_state(shapes: dict, seed: int) -> collections.OrderedDict:
    """Random tensors of those shapes, in ranges the original code would hold (variances > 0, unit u and v)."""
    rng = torch.Generator().manual_seed(seed)
    state = collections.OrderedDict()
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith(("_var", "running_var")):
            state[key] = torch.rand(shape, generator=rng) + 0.5
        elif key.endswith(("_mean", "running_mean")):
            state[key] = 0.1 * torch.randn(shape, generator=rng)
        elif key.endswith(("weight_u", "weight_v")):
            state[key] = F.normalize(torch.randn(shape, generator=rng), dim=0)
        elif key.endswith(("gamma", "sigma")):
            state[key] = 0.5 + torch.rand(shape, generator=rng)  # non-zero, so attention matters
        else:
            state[key] = 0.3 * torch.randn(shape, generator=rng)
    for key in [k for k in state if k.endswith(("weight_u", ".u0"))]:  # as training leaves them: near σ's vectors
        prefix = key[: -len("weight_u")] if key.endswith("weight_u") else key[: -len("u0")]
        w = state[prefix + ("weight_orig" if key.endswith("weight_u") else "weight")].reshape(state[key].numel(), -1)
        u = F.normalize(torch.randn(w.shape[0], generator=rng), dim=0)
        for _ in range(5):
            v = F.normalize(w.t() @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        state[key] = u.reshape(state[key].shape)
        if key.endswith("weight_u"):
            state[prefix + "weight_v"] = v
    return state


# ------------------------------------------------------------------------------ their forward passes, transcribed


class Statistics:
    """How a transcribed batch norm normalises: the file's statistics (`record` None), or the batch's, recorded."""

    def __init__(self, record: dict | None = None):
        self.record = record

    def __call__(self, x, state, prefix, mean_key, var_key, eps, weight=None, bias=None):
        if self.record is None:
            return F.batch_norm(x, state[prefix + mean_key], state[prefix + var_key], weight, bias, False, 0.1, eps)
        self.record.setdefault(prefix + mean_key, []).append(x.double().mean((0, 2, 3)))
        self.record.setdefault(prefix + var_key, []).append(x.double().var((0, 2, 3), unbiased=False))
        return F.batch_norm(x, None, None, weight, bias, True, 0.1, eps)


def brock_weight(state, prefix, eps):
    """`layers.SN.W_()` in eval mode: one power-iteration step from u0, u0 not updated, W / sv."""
    weight = state[prefix + "weight"]
    w_mat = weight.view(weight.size(0), -1)
    u = state[prefix + "u0"]
    v = F.normalize(torch.matmul(u, w_mat), eps=eps)
    u = F.normalize(torch.matmul(v, w_mat.t()), eps=eps)
    sv = torch.squeeze(torch.matmul(torch.matmul(v, w_mat.t()), u.t()))
    return weight / sv


def brock_forward(state, z, y, *, resolution, shared, hier, attention, sn_eps, bn_eps=1e-5, stats=Statistics()):
    """BigGAN-PyTorch's `Generator.forward(z, G.shared(y))` (eval mode), functional."""
    W = lambda p: brock_weight(state, p, sn_eps)  # noqa: E731
    n_blocks = len(G_ARCH[resolution][0])
    y = F.embedding(y, state["shared.weight"]) if shared else y
    if hier:
        zs = torch.split(z, state["linear.weight"].shape[1], 1)
        z, ys = zs[0], [torch.cat([y, item], 1) for item in zs[1:]]
    else:
        ys = [y] * n_blocks

    def ccbn(x, p, cond):
        if shared:
            gain, bias = 1 + F.linear(cond, W(p + "gain.")), F.linear(cond, W(p + "bias."))
        else:
            gain, bias = 1 + F.embedding(cond, state[p + "gain.weight"]), F.embedding(cond, state[p + "bias.weight"])
        out = stats(x, state, p, "stored_mean", "stored_var", bn_eps)
        return out * gain.view(cond.size(0), -1, 1, 1) + bias.view(cond.size(0), -1, 1, 1)

    h = F.linear(z, W("linear."), state["linear.bias"])
    h = h.view(h.size(0), -1, 4, 4)
    for index in range(n_blocks):
        p, x = f"blocks.{index}.0.", h
        h = F.relu(ccbn(x, p + "bn1.", ys[index]))
        h, x = F.interpolate(h, scale_factor=2), F.interpolate(x, scale_factor=2)
        h = F.conv2d(h, W(p + "conv1."), state[p + "conv1.bias"], padding=1)
        h = F.relu(ccbn(h, p + "bn2.", ys[index]))
        h = F.conv2d(h, W(p + "conv2."), state[p + "conv2.bias"], padding=1)
        h = h + F.conv2d(x, W(p + "conv_sc."), state[p + "conv_sc.bias"])
        if attention == 8 * 2 ** index:  # layers.Attention.forward
            a, x, ch = f"blocks.{index}.1.", h, h.shape[1]
            theta = F.conv2d(x, W(a + "theta."))
            phi = F.max_pool2d(F.conv2d(x, W(a + "phi.")), [2, 2])
            g = F.max_pool2d(F.conv2d(x, W(a + "g.")), [2, 2])
            theta = theta.view(-1, ch // 8, x.shape[2] * x.shape[3])
            phi = phi.view(-1, ch // 8, x.shape[2] * x.shape[3] // 4)
            g = g.view(-1, ch // 2, x.shape[2] * x.shape[3] // 4)
            beta = F.softmax(torch.bmm(theta.transpose(1, 2), phi), -1)
            o = F.conv2d(torch.bmm(g, beta.transpose(1, 2)).view(-1, ch // 2, x.shape[2], x.shape[3]), W(a + "o."))
            h = state[a + "gamma"] * o + x
    h = stats(h, state, "output_layer.0.", "stored_mean", "stored_var", bn_eps,
              state["output_layer.0.gain"], state["output_layer.0.bias"])
    h = F.conv2d(F.relu(h), W("output_layer.2."), state["output_layer.2.bias"], padding=1)
    return torch.tanh(h)


def torch_sn_weight(state, prefix):
    """The normalised weight `torch.nn.utils.spectral_norm` itself gives in eval mode, from the file's tensors."""
    weight = state[prefix + "weight_orig"]
    layer = (nn.Linear(weight.shape[1], weight.shape[0], bias=False) if weight.dim() == 2 else
             nn.Conv2d(weight.shape[1], weight.shape[0], weight.shape[2], bias=False))
    layer = nn.utils.spectral_norm(layer, eps=1e-6).eval()
    with torch.no_grad():
        layer.weight_orig.copy_(weight)
        layer.weight_u.copy_(state[prefix + "weight_u"])
        layer.weight_v.copy_(state[prefix + "weight_v"])
        layer(torch.zeros(1, weight.shape[1]) if weight.dim() == 2 else torch.zeros(1, weight.shape[1], 4, 4))
    return layer.weight.detach()


def studio_forward(state, z, y, stats=Statistics()):
    """StudioGAN big_resnet `Generator.forward(z, label, eval=True)` with G in eval mode, functional."""
    W = lambda p: torch_sn_weight(state, p)  # noqa: E731
    chunk = state["linear0.weight_orig"].shape[1]
    zs = torch.split(z, chunk, 1)
    shared = F.embedding(y, state["shared.weight"])
    affines = [torch.cat([shared, item], 1) for item in zs[1:]]
    c = state["bn4.weight"].shape[0]

    def cbn(x, p, affine):
        gain = (1 + F.linear(affine, W(p + "gain."))).view(affine.size(0), -1, 1, 1)
        bias = F.linear(affine, W(p + "bias.")).view(affine.size(0), -1, 1, 1)
        return stats(x, state, p + "bn.", "running_mean", "running_var", 1e-4) * gain + bias

    act = F.linear(zs[0], W("linear0."), state["linear0.bias"]).view(-1, c, 4, 4)
    counter = 0
    for b in range(4):
        p = f"blocks.{b}.0."
        if b == 2:  # ops.SelfAttention.forward
            x = act
            _, ch, h, w = x.size()
            theta = F.conv2d(x, W(p + "conv1x1_theta.")).view(-1, ch // 8, h * w)
            phi = F.max_pool2d(F.conv2d(x, W(p + "conv1x1_phi.")), 2, 2).view(-1, ch // 8, h * w // 4)
            attn = F.softmax(torch.bmm(theta.permute(0, 2, 1), phi), dim=-1)
            g = F.max_pool2d(F.conv2d(x, W(p + "conv1x1_g.")), 2, 2).view(-1, ch // 2, h * w // 4)
            attn_g = torch.bmm(g, attn.permute(0, 2, 1)).view(-1, ch // 2, h, w)
            act = x + state[p + "sigma"] * F.conv2d(attn_g, W(p + "conv1x1_attn."))
            continue
        x0, x = act, act
        x = F.relu(cbn(x, p + "bn1.", affines[counter]))
        x = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), W(p + "conv2d1."), state[p + "conv2d1.bias"],
                     padding=1)
        x = F.relu(cbn(x, p + "bn2.", affines[counter]))
        x = F.conv2d(x, W(p + "conv2d2."), state[p + "conv2d2.bias"], padding=1)
        x0 = F.conv2d(F.interpolate(x0, scale_factor=2, mode="nearest"), W(p + "conv2d0."), state[p + "conv2d0.bias"])
        act, counter = x + x0, counter + 1
    act = stats(act, state, "bn4.", "running_mean", "running_var", 1e-4, state["bn4.weight"], state["bn4.bias"])
    act = F.conv2d(F.relu(act), W("conv2d5."), state["conv2d5.bias"], padding=1)
    return torch.tanh(act)


# ------------------------------------------------------------------------------------------ small files of each

SMALL = {  # widths small enough for the CPU; the structure is each project's
    "dab-biggan": dict(ch=4, dim_z=16, n_classes=10, resolution=32),
    "biggan-pytorch": dict(ch=8, dim_z=24, n_classes=7, resolution=128, shared_dim=6, hier=True, attention=64),
    "studiogan-biggan": dict(conv_dim=4, z_dim=20, shared_dim=6, num_classes=10),
}
SWITCHES = {"dab-biggan": CIFAR, "biggan-pytorch": IMAGENET}


def small_state(kind: str, seed: int = 0):
    if kind == "studiogan-biggan":
        return random_state(studio_shapes(**SMALL[kind]), seed)
    return random_state(brock_shapes(**SMALL[kind]), seed)


def write(kind: str, path, state=None, legacy: bool = False):
    state = small_state(kind) if state is None else state
    obj = {"state_dict": state} if kind == "studiogan-biggan" else state
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def transcribed(kind: str, state, z, y, stats=Statistics()):
    if kind == "studiogan-biggan":
        return studio_forward(state, z, y, stats)
    return brock_forward(state, z, y, stats=stats, **SWITCHES[kind])


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ISDA_VIZ_CACHE", str(tmp_path / "cache"))


def _inputs(generator, n=3, seed=1):
    z = generator.sample_latent(n, torch.Generator().manual_seed(seed))
    return z, torch.arange(n) % generator.num_classes


CASES = [("dab-biggan", True), ("dab-biggan", False), ("biggan-pytorch", True), ("biggan-pytorch", False),
         ("studiogan-biggan", False)]


@pytest.mark.parametrize("kind,legacy", CASES, ids=[f"{k}-{'legacy' if l else 'zip'}" for k, l in CASES])
def test_a_file_in_the_projects_layout_loads_strictly_and_matches_its_forward_pass(kind, legacy, tmp_path):
    state = small_state(kind)
    path = write(kind, tmp_path / "G_ema.pth", state, legacy)
    assert (path.read_bytes()[:2] == b"PK") != legacy  # the zip format, or the legacy pickle one
    for spec in (f"{kind}:{path}", str(path)):  # KIND:FILE, and the bare file recognised by its keys
        generator = load_generator(spec, "cpu", standing_statistics=False)
        assert generator.kind == kind and not generator.training
        assert not any(p.requires_grad for p in generator.parameters())
        z, y = _inputs(generator)
        with torch.no_grad():
            images = generator.generate(z, y)
            expected = transcribed(kind, state, z, y)
        size = SMALL[kind].get("resolution", 32)
        assert images.shape == (3, 3, size, size) and expected.abs().max() < 1
        assert images.std() > 0.05                               # not a constant: the comparison means something
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    z = z.clone().requires_grad_(True)  # frozen, but differentiable in z: what the inversion needs
    generator.generate(z, y).square().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_the_published_widths_give_exactly_the_projects_keys_and_shapes():
    """At the released files' real widths (built on the meta device: no memory, no time)."""
    meta = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # noqa: E731
    published = {
        "dab-biggan": (brock_shapes(n_classes=100, resolution=32, **CIFAR_WIDTHS), CIFAR),
        "biggan-pytorch": (brock_shapes(resolution=128, hier=True, attention=64, **IMAGENET_WIDTHS), IMAGENET),
    }
    for kind, (shapes, switches) in published.items():
        net = BrockBigGAN(read_brock_layout(meta(shapes), kind, **switches))
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes, kind
    # BigGAN-PyTorch ImageNet: 6 chunks of 20, 1536 channels at 4x4, attention at 64 px (block 3) of 192 channels
    assert published["biggan-pytorch"][0]["linear.weight"] == (1536 * 16, 20)
    assert published["biggan-pytorch"][0]["blocks.3.1.theta.weight"] == (24, 192, 1, 1)
    shapes = studio_shapes(conv_dim=96, z_dim=80, shared_dim=128, num_classes=10)
    net = studio_network(meta(shapes), "studiogan-biggan")
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    assert shapes["blocks.0.0.bn1.gain.weight_orig"] == (384, 148)


def test_a_released_size_dab_file_in_the_legacy_format_loads_and_matches(tmp_path):
    state = random_state(brock_shapes(n_classes=10, resolution=32, **CIFAR_WIDTHS), seed=3)
    path = write("dab-biggan", tmp_path / "DiffAugment-biggan-cifar10.pth", state, legacy=True)
    generator = load_generator(str(path), "cpu", standing_statistics=False)
    assert (generator.latent_dim, generator.num_classes, generator.image_size) == (128, 10, 32)
    z, y = _inputs(generator, n=2)
    with torch.no_grad():
        torch.testing.assert_close(generator.generate(z, y), transcribed("dab-biggan", state, z, y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["dab-biggan", "biggan-pytorch", "studiogan-biggan"])
def test_a_file_one_key_off_is_refused_naming_the_key(kind, tmp_path):
    state = small_state(kind)
    victim = "blocks.0.0.bn1.bn.running_var" if kind == "studiogan-biggan" else "blocks.0.0.bn1.stored_var"
    state[victim.replace("bn1", "bn9")] = state.pop(victim)  # one key renamed
    path = write(kind, tmp_path / "off.pth", state)
    with pytest.raises(IsdaVizError) as error:
        load_generator(f"{kind}:{path}", "cpu")
    message = str(error.value)
    assert "\n" not in message and victim in message and "missing" in message and "unexpected" in message
    short = small_state(kind)
    del short["blocks.0.0.conv2d1.bias" if kind == "studiogan-biggan" else "blocks.0.0.conv1.bias"]
    with pytest.raises(IsdaVizError, match=r"missing: blocks\.0\.0\.conv"):
        load_generator(f"{kind}:{write(kind, tmp_path / 'short.pth', short)}", "cpu")


def test_spectral_norm_folding_equals_the_layers_own_normalised_weight():
    torch.manual_seed(0)
    for layer in (nn.Conv2d(6, 5, 3), nn.Linear(7, 4)):
        layer = nn.utils.spectral_norm(layer, eps=1e-6)
        for _ in range(3):  # training steps move u and v away from their start
            layer(torch.randn(2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 7))
        layer.eval()
        layer(torch.randn(1, 6, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(1, 7))
        shape = tuple(layer.weight_orig.shape)
        ours = TorchSN(shape[0], shape[1:], padding=0 if len(shape) == 4 else None)
        ours.load_state_dict({k: v for k, v in layer.state_dict().items()}, strict=True)
        ours.fold_()
        torch.testing.assert_close(ours.weight_orig, layer.weight.detach(), atol=1e-6, rtol=1e-6)
        ours.fold_()  # a second call changes nothing
        torch.testing.assert_close(ours.weight_orig, layer.weight.detach(), atol=1e-6, rtol=1e-6)


def test_brock_sigma_from_the_top_singular_vector_is_the_largest_singular_value():
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, s, _ = torch.linalg.svd(weight.reshape(6, -1))
    assert float(brock_sigma(weight, u[:, 0][None], eps=1e-12)) == pytest.approx(float(s[0]), rel=1e-12)
    # from a random u, one step gives a lower bound of it (a Rayleigh quotient)
    assert float(brock_sigma(weight, torch.randn(1, 6, dtype=torch.float64), 1e-12)) <= float(s[0]) + 1e-12


def test_standing_statistics_average_the_batch_statistics_are_seeded_cached_and_batch_independent(tmp_path):
    kind, state = "dab-biggan", small_state("dab-biggan")
    path = write(kind, tmp_path / "g.pth", state)
    generator = load_generator(str(path), "cpu", standing_statistics=False)
    stored = {k: v.clone() for k, v in statistics_state(generator.net).items()}
    torch.testing.assert_close(stored["blocks.1.0.bn2.stored_var"], state["blocks.1.0.bn2.stored_var"])

    recompute_standing_statistics(generator, batches=3, batch_size=8, seed=5, progress=False)
    standing = {k: v.clone() for k, v in statistics_state(generator.net).items()}
    # brute force: the same draws through the transcription in batch-statistics mode, averaged in float64
    record, rng = {}, torch.Generator().manual_seed(5)
    for _ in range(3):
        z = torch.randn(8, generator.latent_dim, generator=rng)
        y = torch.randint(generator.num_classes, (8,), generator=rng)
        with torch.no_grad():
            transcribed(kind, state, z, y, Statistics(record))
    assert set(record) == set(standing)
    for name, values in record.items():
        torch.testing.assert_close(standing[name].double(), torch.stack(values).mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(standing["blocks.2.0.bn1.stored_var"], stored["blocks.2.0.bn1.stored_var"])

    recompute_standing_statistics(generator, batches=3, batch_size=8, seed=5, progress=False)
    assert all(torch.equal(v, standing[k]) for k, v in statistics_state(generator.net).items())  # same seed
    recompute_standing_statistics(generator, batches=3, batch_size=8, seed=6, progress=False)
    assert not torch.equal(statistics_state(generator.net)["output_layer.0.stored_mean"],
                           standing["output_layer.0.stored_mean"])

    # eval mode: one image's output does not depend on the batch it is in
    z, y = _inputs(generator, n=4)
    with torch.no_grad():
        batch = generator.generate(z, y)
        for i in range(4):
            torch.testing.assert_close(generator.generate(z[i:i + 1], y[i:i + 1]), batch[i:i + 1], atol=1e-6, rtol=0)

    # load_generator's default: computed once, cached beside the file's hash, read back the second time
    first = load_generator(str(path), "cpu")
    entries = list((tmp_path / "cache" / STANDING_CACHE).glob("dab-biggan-*.pt"))
    assert len(entries) == 1
    cached = torch.load(entries[0], weights_only=True)
    assert cached["settings"]["weights_sha256"] and cached["settings"]["seed"] == 0
    assert all(torch.equal(cached["statistics"][k], v) for k, v in statistics_state(first.net).items())
    import isda_viz.generators.pretrained as pretrained
    original = pretrained.recompute_standing_statistics
    pretrained.recompute_standing_statistics = lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed"))
    try:
        second = load_generator(f"dab-biggan:{path}", "cpu")
    finally:
        pretrained.recompute_standing_statistics = original
    assert all(torch.equal(v, statistics_state(first.net)[k]) for k, v in statistics_state(second.net).items())
    z, y = _inputs(first)
    with torch.no_grad():
        assert torch.equal(first.generate(z, y), second.generate(z, y))
    # a damaged entry is recomputed, to the same statistics
    entries[0].write_bytes(b"damaged")
    third = load_generator(str(path), "cpu")
    assert all(torch.equal(v, statistics_state(first.net)[k]) for k, v in statistics_state(third.net).items())


def test_standing_statistics_helper_returns_its_cache_file(tmp_path):
    path = write("studiogan-biggan", tmp_path / "s.pth")
    generator = load_generator(str(path), "cpu", standing_statistics=False)
    entry = standing_statistics(generator, path, batches=2, batch_size=4)
    assert entry.is_file() and entry.parent == tmp_path / "cache" / STANDING_CACHE
    held = torch.load(entry, weights_only=True)["statistics"]
    assert set(held) == set(statistics_state(generator.net)) and "bn4.running_var" in held


def test_bad_inputs_are_one_line_errors(tmp_path):
    dab = write("dab-biggan", tmp_path / "dab.pth")
    studio = write("studiogan-biggan", tmp_path / "studio.pth")

    def error(spec, *fragments):
        with pytest.raises(IsdaVizError) as caught:
            load_generator(spec, "cpu", standing_statistics=False)
        message = str(caught.value)
        assert "\n" not in message, message
        for fragment in fragments:
            assert fragment in message, message
        return message

    # a state dict of another layout, given as this kind
    error(f"dab-biggan:{studio}", "no state dict", "its layout is studiogan-biggan's")
    error(f"studiogan-biggan:{dab}", "missing: linear0.weight_orig", "its layout is dab-biggan's")
    error(f"biggan-pytorch:{dab}", "missing: shared.weight", "its layout is dab-biggan's")
    error(f"dab-biggan:{write('biggan-pytorch', tmp_path / 'bp.pth')}", "keys differ", "unexpected: shared.weight",
          "its layout is biggan-pytorch's")
    # a bare file whose keys no family knows lists the known layouts
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    message = error(str(tmp_path / "other.pth"), "no known generator layout")
    for kind in ("wgan", "biggan-deep", "dab-biggan", "studiogan-biggan", "biggan-pytorch"):
        assert kind in message
    error(f"nosuchkind:{dab}", "unknown generator kind 'nosuchkind'", "dab-biggan")
    error(f"studiogan-biggan:{tmp_path}", "is a folder, not a weight file")
    # NaN weights, a truncated file
    state = small_state("dab-biggan")
    state["blocks.1.0.conv2.weight"][0, 0, 0, 0] = float("nan")
    error(str(write("dab-biggan", tmp_path / "nan.pth", state)), "non-finite", "blocks.1.0.conv2.weight")
    (tmp_path / "cut.pth").write_bytes(dab.read_bytes()[:1000])
    error(f"dab-biggan:{tmp_path / 'cut.pth'}", "corrupt")
    # a class index beyond the generator's classes
    generator = load_generator(str(dab), "cpu", standing_statistics=False)
    z = generator.sample_latent(2, torch.Generator().manual_seed(0))
    with pytest.raises(IsdaVizError, match="class index 10 is beyond the 10 classes"):
        generator.generate(z, torch.tensor([3, 10]))
    with pytest.raises(IsdaVizError, match="class-conditional"):
        generator.generate(z)


def test_the_command_line_says_one_error_line_and_writes_nothing(tmp_path):
    state = small_state("dab-biggan")
    state["linear.bias"][0] = float("nan")
    weights = write("dab-biggan", tmp_path / "nan.pth", state)
    work = tmp_path / "work"
    work.mkdir()
    from PIL import Image
    Image.new("L", (28, 28), 128).save(tmp_path / "image.png")
    env = {**os.environ, "ISDA_VIZ_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "ISDA_VIZ_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "isda_viz.cli", "augment", "--image", str(tmp_path / "image.png"),
                             "--generator", f"dab-biggan:{weights}", "--out", "out"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "linear.bias" in lines[0] and "Traceback" not in result.stderr
    assert list(work.iterdir()) == []
