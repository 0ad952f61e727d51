"""`isda-viz generator-report`: how much a generator can reach in a classifier's feature space, for any pair.

The measure itself is `isda_viz.generators.reach` (also run at the end of `train-gan`); this loads the pair the
command names (the shipped Fashion-MNIST pair by default), a `--class-map` where their classes differ, and
returns the pair's report, measured now or read from its cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isda_viz.classifiers.classifier import load_classifier
from isda_viz.devices import pick_device
from isda_viz.generators import load_generator
from isda_viz.generators.reach import ReachOptions, generator_reach
from isda_viz.inversion.adapter import read_class_map
from isda_viz.outputs.generator_report import GeneratorReport
from isda_viz.pretrained import default_classifier, default_generator


@dataclass(kw_only=True)
class GeneratorReportOptions:
    """Everything `generator-report` takes. `classifier`: a RUN_DIR, or a weights file with `classifier_arch`
    (`class_names` naming its classes); `generator`: a GAN_DIR, a BigGAN folder or name (`truncation`: BigGAN's);
    None: the shipped pair. `class_map`: a `--class-map` file when the generator's classes are not the
    classifier's. `data_root`: the classifier's training images (default: where it was trained). `reach`: sample
    counts, k and seed (checked when built)."""
    classifier: str | None = None
    classifier_arch: str | None = None
    class_names: str | None = None
    generator: str | None = None
    truncation: float | None = None
    class_map: str | None = None
    data_root: str | None = None
    reach: ReachOptions = field(default_factory=ReachOptions)
    device: str | None = None


def generator_report(options: GeneratorReportOptions, progress: bool = True, log=None) -> GeneratorReport:
    """The report of the pair `options` names (`generators.reach.generator_reach`): from its cache when measured
    so before, else measured now (one pass over `2 · per_class` training images per class and `per_class`
    samples per class through the classifier) and cached; `path` is where it is kept."""
    device = pick_device(options.device)
    classifier = load_classifier(options.classifier or default_classifier(), device, arch=options.classifier_arch,
                                 class_names=options.class_names, data_root=options.data_root)
    extra = {} if options.truncation is None else {"truncation": options.truncation}
    generator = load_generator(str(options.generator or default_generator()), device, **extra)
    class_map = read_class_map(options.class_map, classifier, generator) if options.class_map else None
    kwargs = {} if log is None else {"log": log}
    return generator_reach(classifier, generator, options.reach, options.data_root, class_map, progress, **kwargs)
