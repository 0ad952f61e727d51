"""The learned start: its cache (keyed by both networks, damage rebuilt) and that it starts Step I closer."""

import json

import torch

from isda_viz.classifiers.classifier import Classifier
from isda_viz.classifiers.networks import build_model
from isda_viz.generators.wgan import WGANGenerator
from isda_viz.inversion.encoder import ENCODER_DIR, EncoderOptions, module_fingerprint, train_encoder
from isda_viz.inversion.optimizer import InversionOptions, normalize_latent, reconstruct
from isda_viz.inversion.pipelines import Models, learned_start

TINY = EncoderOptions(samples=256, hidden=32, code_steps=20, batch_size=64, feature_steps=3, feature_batch=16)


def _generator(seed):
    torch.manual_seed(seed)
    return WGANGenerator(latent_dim=8, num_classes=10, width=4).eval().requires_grad_(False)


def _classifier(cache_dir, fingerprint, seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet8", 10, 1).eval().requires_grad_(False)
    return Classifier(model, [str(i) for i in range(10)], [0.5], [0.5], 1, 28, cache_dir=cache_dir,
                      fingerprint=fingerprint)


def _state(encoder):
    return {k: v.clone() for k, v in encoder.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_cache_is_keyed_by_both_networks_and_reused_otherwise(tmp_path):
    generator, classifier = _generator(0), _classifier(tmp_path, "weights-a")
    first, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert not info["cached"] and (tmp_path / ENCODER_DIR).is_dir()
    files = sorted(p.name for p in (tmp_path / ENCODER_DIR).iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".pt")
    again, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert info["cached"] and _same(_state(first), _state(again))
    # The same generator loaded again (equal weights, another object) is the same network.
    _, info = learned_start(Models(classifier, _generator(0)), TINY, progress=False)
    assert info["cached"]
    # Another generator, another classifier (its weights' hash), or other training options: trained anew.
    other_generator, info = learned_start(Models(classifier, _generator(1)), TINY, progress=False)
    assert not info["cached"] and not _same(_state(first), _state(other_generator))
    assert module_fingerprint(_generator(0)) != module_fingerprint(_generator(1))
    _, info = learned_start(Models(_classifier(tmp_path, "weights-b"), generator), TINY, progress=False)
    assert not info["cached"]
    _, info = learned_start(Models(classifier, generator), EncoderOptions(**{**vars(TINY), "code_steps": 21}),
                            progress=False)
    assert not info["cached"]
    assert len(list((tmp_path / ENCODER_DIR).glob("*.pt"))) == 4
    # Each of them is still there and reused.
    _, info = learned_start(Models(classifier, _generator(1)), TINY, progress=False)
    assert info["cached"]


def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, capsys):
    generator, classifier = _generator(0), _classifier(tmp_path, "weights-a")
    trained, info = learned_start(Models(classifier, generator), TINY, progress=False)
    weights = tmp_path / ENCODER_DIR / info["path"].rsplit("/", 1)[-1]
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])                    # a truncated file
    rebuilt, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert not info["cached"] and "unreadable" in capsys.readouterr().err
    assert _same(_state(trained), _state(rebuilt))                 # the same seed trains the same encoder
    assert weights.read_bytes() != good[: len(good) // 2]
    _, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert info["cached"]                                          # the rebuilt file is whole again
    state = torch.load(weights, weights_only=True)                 # NaN weights with a valid key: rebuilt too
    state["state_dict"]["net.0.weight"].fill_(float("nan"))
    torch.save(state, weights)
    rebuilt, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert not info["cached"] and _same(_state(trained), _state(rebuilt))
    key_file = weights.with_suffix(".json")                        # a key that does not match: not reused
    key = json.loads(key_file.read_text())
    key["generator"] = "0" * 64
    key_file.write_text(json.dumps(key))
    _, info = learned_start(Models(classifier, generator), TINY, progress=False)
    assert not info["cached"] and json.loads(key_file.read_text())["generator"] != "0" * 64


def test_the_learned_start_beats_a_random_start_on_generator_samples():
    # A smooth generator whose features determine the code: the encoder can learn the inverse.
    g = torch.Generator().manual_seed(0)
    gen_w = torch.randn(12, 48, generator=g) / 3
    feat_w = torch.randn(48, 24, generator=g) / 6

    def render(z_hat, labels):
        return torch.tanh(z_hat @ gen_w)

    def featurize(images):
        return torch.relu(images @ feat_w)

    def sample_latent(n, rng=None, device=None):
        return torch.randn(n, 12, generator=rng)

    encoder = train_encoder(render, featurize, sample_latent, None, None,
                            EncoderOptions(samples=2048, hidden=64, code_steps=400, batch_size=128, feature_steps=50,
                                           feature_batch=64, lr=3e-3), progress=False)
    true_z = sample_latent(16, torch.Generator().manual_seed(5))
    images = render(normalize_latent(true_z), None)
    target = featurize(images)
    opts = InversionOptions(reconstruct_iterations=15, reconstruct_lr=0.05, eta=0.0)
    learned = reconstruct(render, featurize, target, encoder(target)[:, None], opts, progress=False)
    random = reconstruct(render, featurize, target, sample_latent(16, torch.Generator().manual_seed(6))[:, None],
                         opts, progress=False)
    assert learned.feature_error.median() < 0.5 * random.feature_error.median()
    assert (learned.feature_error < random.feature_error).float().mean() >= 0.75
    # And its codes are near the true ones (up to the normalisation the generator applies).
    close = (normalize_latent(learned.z) - normalize_latent(true_z)).norm(dim=1).median()
    far = (normalize_latent(random.z) - normalize_latent(true_z)).norm(dim=1).median()
    assert close < 0.5 * far


def test_the_pipeline_starts_step_one_from_the_encoder_and_says_so(tmp_path, monkeypatch):
    import isda_viz.inversion.pipelines as pipelines
    from isda_viz.isda.estimator import CovarianceEstimator

    monkeypatch.setattr(pipelines, "EncoderOptions", lambda: TINY)   # the pipeline's encoder: the tiny budget's
    generator, classifier = _generator(0), _classifier(tmp_path, "weights-a")
    estimator = CovarianceEstimator(classifier.model.feature_dim, 10)
    estimator.update(torch.rand(40, classifier.model.feature_dim), torch.arange(40) % 10)
    classifier.estimator = estimator
    models = Models(classifier, generator)
    encoder, _ = learned_start(models, TINY, progress=False)
    images, labels = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    for encoder_on, start in ((True, "encoder"), (False, "random")):
        options = pipelines.VisualizeOptions(num_augmented=1, progress=False,
                                             inversion=InversionOptions.make(iterations=2, restarts=2,
                                                                             encoder=encoder_on))
        result = pipelines.invert_and_augment(models, images, labels, ["a", "b"], options)
        assert pipelines._settings(options, models).options["start"] == start
        assert ("encoder_training" in result.seconds) == encoder_on
        assert len(result.entries) == 2 and result.augmented.shape == (2, 1, 1, 28, 28)
    # No Step I steps from E(a) alone: the reconstruction is the generator's image of E(a) itself.
    zero = InversionOptions.make(restarts=0)
    zero.reconstruct_iterations = zero.augment_iterations = 0
    with torch.no_grad():
        expected = models.adapter().pixels(normalize_latent(encoder(classifier.features(images), labels)), labels)
    result = pipelines.invert_and_augment(models, images, labels, ["a", "b"],
                                          pipelines.VisualizeOptions(num_augmented=1, inversion=zero, progress=False))
    torch.testing.assert_close(result.reconstructions, expected)
