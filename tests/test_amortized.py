"""The amortized inverter (`inversion.amortized`), its cache per pair (`inversion.inverter_cache`), the one
pipeline (`inversion.pipeline.invert_batch`) and its seam (`inversion.starts`), on a tiny pair: a ResNet-8
trained for one epoch and a small random WGAN generator."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from click.testing import CliRunner

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.classifiers.statistics import class_statistics
from isda_viz.cli.main import main
from isda_viz.errors import IsdaVizError
from isda_viz.generators import load_generator
from isda_viz.generators.wgan import WGANGenerator, recompute_batchnorm_statistics, save_generator
from isda_viz.inversion.adapter import Models
from isda_viz.inversion.amortized import InverterOptions, train_inverter
from isda_viz.inversion.inverter_cache import (
    INVERTER_DIR,
    find_inverter,
    inverter_data,
    inverter_key,
    save_inverter,
    train_pair_inverter,
)
from isda_viz.inversion.optimizer import InversionOptions, augment, normalize_latent, reconstruct
from isda_viz.inversion.pipeline import draw_prior, invert_batch
from isda_viz.inversion.pipelines import VisualizeOptions, images_per_class, invert_and_augment
from isda_viz.inversion.starts import REFINE_LR, AmortizedStart, PriorSearch
from isda_viz.isda.sampling import sample_augmented_features

TINY = InverterOptions(steps=12, batch_size=16, real_images=128, hidden=32, rank=4, lr=3e-3,
                       reconstruct_passes=2, augment_passes=2)


def _generator(folder, seed=0, num_classes=10):
    torch.manual_seed(seed)
    generator = WGANGenerator(latent_dim=16, num_classes=num_classes, width=8)
    recompute_batchnorm_statistics(generator, 2, 32, torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    save_generator(generator, folder / "generator.pt", iteration=0, dataset="fashion-mnist")
    return folder


@pytest.fixture(scope="module")
def pair(tiny_run, tmp_path_factory):
    """The tiny pair, its classifier's run folder copied so that cached inverters stay in this module's folder."""
    import shutil
    run = tmp_path_factory.mktemp("pair") / "run"
    shutil.copytree(tiny_run, run)
    gan = _generator(tmp_path_factory.mktemp("gan") / "gan")
    return run, gan


def _models(run, gan, class_map=None) -> Models:
    return Models(load_classifier(run, "cpu"), load_generator(str(gan), "cpu"), None, class_map)


def _render_features(models: Models):
    adapter = models.adapter()

    def render_features(z_hat, labels):
        image = adapter(z_hat, labels)
        return image, models.classifier.model.features(image)
    return render_features


def _trained(models: Models, options: InverterOptions = TINY):
    data = inverter_data(models, options, progress=False)
    return train_inverter(_render_features(models), models.generator.sample_latent, models.generator.latent_dim,
                          data, options, progress=False)


def test_training_is_deterministic_and_lowers_the_objective_against_its_untrained_start(pair):
    models = _models(*pair)
    first, second = _trained(models), _trained(models)
    for name, tensor in first.network.state_dict().items():
        assert torch.equal(tensor, second.network.state_dict()[name]), name
    untrained = _trained(models, InverterOptions(**{**vars(TINY), "lr": 0.0, "steps": 1}))

    images, labels, _ = images_per_class(models.classifier, 2, None)
    features, pixels = models.classifier.features(images), models.classifier.preprocess(images)
    statistics = class_statistics(models.classifier)
    wanted = sample_augmented_features(features, labels, statistics.estimator, 0.5, 2,
                                       torch.Generator().manual_seed(3)).flatten(0, 1)
    render_features = _render_features(models)

    def errors(inverter):
        """Each step's training objective on test images: Step I's (features + pixels) / ||a||^2, Step II's
        squared reached-shift error."""
        z_star, star = inverter.reconstruct(render_features, features, labels, pixels)
        with torch.no_grad():
            image = render_features(z_star, labels)[0]
        step1 = (((star - features).pow(2).sum(1) + TINY.eta * (image - pixels).pow(2).flatten(1).sum(1))
                 / features.pow(2).sum(1)).mean()
        rows = labels.repeat_interleave(2)
        _, reached = inverter.augment(render_features, wanted, rows, z_star.repeat_interleave(2, 0),
                                      star.repeat_interleave(2, 0))
        shift = wanted - features.repeat_interleave(2, 0)
        return step1, ((reached - wanted).pow(2).sum(1) / shift.pow(2).sum(1)).mean()

    trained_errors, untrained_errors = errors(first), errors(untrained)
    assert trained_errors[0] < untrained_errors[0] and trained_errors[1] < untrained_errors[1]


def test_its_passes_equal_one_call_of_the_exported_forward(pair):
    models = _models(*pair)
    inverter = _trained(models)
    render_features = _render_features(models)
    images, labels, _ = images_per_class(models.classifier, 1, None)
    target, pixels = models.classifier.features(images), models.classifier.preprocess(images)
    z_hat = normalize_latent(inverter.network.start[labels])
    with torch.no_grad():
        image, current = render_features(z_hat, labels)
        for _ in range(inverter.reconstruct_passes):   # the passes written out, as the docstring states them
            z_hat = inverter.network.step(target, current, z_hat, labels, 0.0, pixels - image)
            image, current = render_features(z_hat, labels)
        exported = inverter.export(render_features)
        assert torch.equal(exported(target, labels, pixels), z_hat)
        wanted = target + 0.1 * target.std()
        z_two, current_two = z_hat, current
        for _ in range(inverter.augment_passes):
            z_two = inverter.network.step(wanted, current_two, z_two, labels, 1.0)
            current_two = render_features(z_two, labels)[1]
        assert torch.equal(exported(wanted, labels, z_star=z_hat, star_features=current), z_two)


def test_the_cache_is_keyed_by_both_networks_the_class_map_the_options_device_and_dtype(pair, tiny_ce_run, tmp_path):
    run, gan = pair
    models = _models(run, gan)
    base = inverter_key(models, TINY)
    other_generator = _models(run, _generator(tmp_path / "other-gan", seed=1))
    other_classifier = _models(tiny_ce_run, gan)
    mapped = _models(run, gan, torch.arange(10).flip(0))
    other_options = InverterOptions(**{**vars(TINY), "steps": 13})
    assert inverter_key(other_generator, TINY)["generator"] != base["generator"]
    assert inverter_key(other_classifier, TINY)["classifier"] != base["classifier"]
    assert inverter_key(mapped, TINY)["class_map"] != base["class_map"]
    assert inverter_key(models, other_options) != base
    double = _models(run, gan)
    double.classifier.model.double()
    assert inverter_key(double, TINY)["dtype"] != base["dtype"]
    meta = _models(run, gan)
    meta.classifier.model.to("meta")
    assert inverter_key(meta, TINY)["device"] == "meta" != base["device"] == "cpu"
    assert len({json.dumps(k, sort_keys=True) for k in (
        base, inverter_key(other_generator, TINY), inverter_key(other_classifier, TINY), inverter_key(mapped, TINY),
        inverter_key(models, other_options))}) == 5


def test_train_caches_reuses_and_retrains_for_other_options(pair, monkeypatch):
    import isda_viz.inversion.inverter_cache as cache
    models = _models(*pair)
    inverter, path = train_pair_inverter(models, TINY, progress=False)
    assert path.parent == models.classifier.cache_dir / INVERTER_DIR and path.is_file()
    assert json.loads(path.with_suffix(".json").read_text()) == inverter_key(models, TINY)
    found = find_inverter(models, TINY)
    for name, tensor in inverter.network.state_dict().items():
        assert torch.equal(found.network.state_dict()[name], tensor)
    trained = []
    original = cache.train_inverter
    monkeypatch.setattr(cache, "train_inverter", lambda *a, **k: trained.append(1) or original(*a, **k))
    again, same = train_pair_inverter(models, TINY, progress=False)    # same options: read, not trained
    assert not trained and same == path and again.info["cached"]
    other = InverterOptions(**{**vars(TINY), "seed": 1})
    _, other_path = train_pair_inverter(models, other, progress=False)    # another option: trained
    assert trained == [1] and other_path != path
    assert find_inverter(_models(*pair), None) is not None                   # without options: the pair's newest


def test_a_damaged_entry_is_not_used_and_is_trained_again(pair, capsys):
    models = _models(*pair)
    options = InverterOptions(**{**vars(TINY), "seed": 7})
    _, path = train_pair_inverter(models, options, progress=False)
    path.write_bytes(path.read_bytes()[:100])
    assert find_inverter(models, options) is None
    assert "unusable" in capsys.readouterr().err
    _, again = train_pair_inverter(models, options, progress=False)
    assert again == path and find_inverter(models, options) is not None


class _Payload:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['MARKER'], 'w').write('ran')",))


def test_a_cached_file_carrying_a_pickled_global_is_refused_and_never_runs(pair, tmp_path, monkeypatch, capsys):
    models = _models(*pair)
    options = InverterOptions(**{**vars(TINY), "seed": 8})
    inverter, path = train_pair_inverter(models, options, progress=False)
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    torch.save({"shape": inverter.network.shape(), "passes": {"reconstruct": 1, "augment": 1},
                "state_dict": _Payload()}, path)
    pickle.loads(pickle.dumps(0))  # (the pickle module itself is fine)
    assert find_inverter(models, options) is None
    assert not marker.exists() and "unusable" in capsys.readouterr().err


def test_micro_batches_give_the_codes_of_one_batch_and_bound_peak_memory(pair):
    models = _models(*pair)
    inverter = _trained(models)
    images, labels, _ = images_per_class(models.classifier, 2, [0, 1, 2, 3])
    features = models.classifier.features(images)
    wanted = features[:, None] + 0.05 * torch.randn(len(images), 3, features.shape[1],
                                                    generator=torch.Generator().manual_seed(0))
    prior = draw_prior(models, len(images), 1, torch.Generator().manual_seed(0))

    def run(rows, steps):
        return invert_batch(models, images, labels, wanted, AmortizedStart(inverter, steps), prior, micro_batch=rows,
                            progress=False)

    whole, parts = run(10_000, 0), run(3, 0)    # the passes alone: batched kernels' rounding only
    assert torch.allclose(whole.z_star, parts.z_star, atol=1e-5) and torch.allclose(whole.z, parts.z, atol=1e-5)
    # Adam divides each coordinate's gradient by its own running scale, so rounding in a near-zero gradient
    # can move that coordinate by up to a step (lr) per step, whichever way the CPU's kernels round: so the
    # codes agree within 2·lr·steps everywhere and closely on almost all coordinates, the errors closely.
    steps, lr = 3, REFINE_LR["augment_lr"]
    whole, parts = run(10_000, steps), run(3, steps)
    difference = (whole.z - parts.z).abs()
    assert difference.max() <= 2 * lr * steps and (difference > 1e-3).float().mean() < 0.05
    assert torch.allclose(whole.reached_shift_error, parts.reached_shift_error, rtol=1e-2, atol=1e-3)
    assert _peak_bytes(lambda: run(3, 3)) < 0.6 * _peak_bytes(lambda: run(10_000, 3))


def _peak_bytes(fn) -> int:
    """Peak CPU bytes allocated by torch while `fn` runs: the profiler's allocations and frees, in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, change in sorted((event.time_range.start, event.self_cpu_memory_usage) for event in prof.events()):
        current += change
        peak = max(peak, current)
    return peak


def test_the_search_is_todays_search_bit_for_bit(pair):
    """`invert_and_augment` with `PriorSearch` equals Step I and Step II composed by hand as before the seam:
    prior starts drawn first, then a~ from the same generator, Step II from z*."""
    models = _models(*pair)
    options = VisualizeOptions(inversion=InversionOptions(reconstruct_iterations=6, augment_iterations=5, restarts=2),
                               num_augmented=2, progress=False, inverter="search", seed=4)
    images, labels, _ = images_per_class(models.classifier, 1, [0, 5])
    result = invert_and_augment(models, images, labels, ["a", "b"], options)

    classifier, adapter, opts = models.classifier, models.adapter(), options.inversion
    rng = torch.Generator().manual_seed(4)
    starts = models.generator.sample_latent(2 * 2, rng, classifier.device).view(2, 2, -1)
    target = classifier.features(images)
    statistics = class_statistics(classifier)
    wanted = sample_augmented_features(target, labels, statistics.estimator, 0.5, 2, rng)

    def render(z_hat, owner):
        return adapter(z_hat, labels[owner])

    step1 = reconstruct(render, classifier.model.features, target, starts, opts,
                        pixel_target=classifier.preprocess(images), progress=False)
    step2 = augment(render, classifier.model.features, target, wanted, step1.z, opts, progress=False)
    with torch.no_grad():
        recon = adapter.pixels(normalize_latent(step1.z), labels)
        pictures = adapter.pixels(normalize_latent(step2.z.flatten(0, 1)), labels.repeat_interleave(2))
    assert torch.equal(result.reconstructions, recon) and torch.equal(result.augmented.flatten(0, 1), pictures)
    assert [e.reconstruction.feature_error for e in result.entries] == step1.feature_error.tolist()
    assert [a.reached_shift_error for e in result.entries for a in e.augmented] == \
        step2.reached_shift_error.flatten().tolist()


def test_amortized_and_search_settings_and_the_default_choice(pair, tmp_path, capsys):
    run, gan = pair
    fresh = _generator(tmp_path / "fresh", seed=5)                     # a pair nobody trained an inverter for
    options = VisualizeOptions(classifier=str(run), generator=str(fresh), progress=False)
    from isda_viz.inversion.pipelines import code_source
    models = options.load_models()
    assert isinstance(code_source(models, options), PriorSearch)
    assert "isda-viz train-inverter" in capsys.readouterr().err
    with pytest.raises(IsdaVizError, match="train-inverter"):
        code_source(models, VisualizeOptions(classifier=str(run), generator=str(fresh), inverter="amortized"))
    trained_models = _models(run, gan)
    save_inverter(trained_models, _trained(trained_models))
    chosen = code_source(trained_models, VisualizeOptions(refine_steps=2))
    assert isinstance(chosen, AmortizedStart) and chosen.refinement.reconstruct_iterations == 2
    assert chosen.settings()["inverter"] == "amortized" and chosen.settings()["refine_steps"] == 2


def _error_line(result):
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_bad_inverter_options_are_one_error_line_and_write_nothing(pair, tmp_path, monkeypatch):
    run, _ = pair
    monkeypatch.chdir(tmp_path)
    fresh = _generator(tmp_path / "fresh", seed=6)
    for bad in (["--refine-steps", "-1"], ["--refine-steps", "nan"], ["--inverter", "magic"]):
        result = CliRunner().invoke(main, ["grid", "--classifier", str(run), "--generator", str(fresh),
                                           *bad, "--out", "fig.png"])
        assert len(_error_line(result)) == 1 and not (tmp_path / "fig.png").exists()
    result = CliRunner().invoke(main, ["grid", "--classifier", str(run), "--generator", str(fresh), "--inverter",
                                       "amortized", "--out", "fig.png"])
    lines = _error_line(result)
    assert len(lines) == 1 and "isda-viz train-inverter" in lines[0] and not (tmp_path / "fig.png").exists()
    twenty = _generator(tmp_path / "twenty", seed=6, num_classes=20)   # 20 classes: the classifier has 10
    before = sorted(p.name for p in run.iterdir())
    result = CliRunner().invoke(main, ["train-inverter", "--classifier", str(run), "--generator", str(twenty),
                                       "--steps", "2"])
    lines = _error_line(result)
    assert len(lines) == 1 and "20 classes" in lines[0]
    assert sorted(p.name for p in run.iterdir()) == before
