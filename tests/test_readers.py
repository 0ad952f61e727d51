"""Every format reader, fed random mutations of a valid file, ends in a clean `IsdaVizError` or a valid object.

Property-style (seeded, so a failure reproduces): for each format a valid file is made by the code that
writes it, then mutated many ways, as bytes (truncations, a byte that is not UTF-8, deep nesting, numbers
beyond float64, NaN) and as values (a key deleted, a value swapped for another type, a huge number, an
empty list, a tensor of another shape, a sparse, NaN or 1e40 tensor). The reader must raise `IsdaVizError`
(with a one-line message naming the file) or return an object of its type; any other exception fails.
The pieces of `isda_viz.readers` (bounded strict JSON, regular files only) are tested directly too.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import pytest
import torch

from isda_viz.errors import IsdaVizError
from isda_viz.readers import build_typed, json_depth, parse_json, read_json, read_text, regular_file

MUTATIONS = 40           # per format: enough to hit every kind of mutation several times, fast


# ------------------------------------------------------------------------------------------------ the pieces


def test_strict_json_refuses_what_python_accepts(tmp_path):
    for text, why in (("[NaN]", "NaN is not a JSON number"), ('{"a": Infinity}', "Infinity"),
                      ("[1e999]", "beyond float64"), ('{"a": 1, "a": 2}', "appears twice"),
                      ("[" * 5000 + "]" * 5000, "nests 5000 levels"), ("[1, 2", "line 1, column 6")):
        with pytest.raises(IsdaVizError, match=why):
            parse_json(text, "f.json", "the file")
    assert parse_json('{"a": [1, 2.5, "x{[", null]}', "f.json", "the file") == {"a": [1, 2.5, "x{[", None]}
    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3


def test_only_regular_files_are_read_and_sizes_are_bounded(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    with pytest.raises(IsdaVizError, match="named pipe"):
        read_json(fifo, "the config")        # would block forever if it were opened
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(IsdaVizError, match="loop"):
        regular_file(tmp_path / "loop", "the config")
    with pytest.raises(IsdaVizError, match="a folder"):
        read_text(tmp_path, "the names")
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(300 << 20)                 # 300 MB, sparse: refused from its size, nothing read
    with pytest.raises(IsdaVizError, match="more than the 1.0 MB"):
        read_json(big, "the config", limit=1 << 20)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(IsdaVizError, match="not UTF-8 text .byte 0xe9 at offset 3"):
        read_text(latin, "--class-names")


# ------------------------------------------------------------------------------------------------ mutations

ODD_VALUES = [None, True, False, -1, 0, 2**70, 1e308, -1e308, 0.5, "", "abc", "\u202egnp.exe", [], [[[]]], {},
              {"x": 1}, [1, "a", None]]


def _paths(value, at=()):
    """Every path (tuple of keys/indices) into a JSON value, the root included."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:5]):
            yield from _paths(v, at + (i,))


def _set(value, path, new):
    if not path:
        return new
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return value


def _delete(value, path):
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    return value


def json_mutations(valid, rng: random.Random, count: int = MUTATIONS) -> list[bytes]:
    """`count` mutated files of the JSON value `valid`: value-level edits and byte-level damage."""
    text = json.dumps(valid, indent=1)
    paths = list(_paths(valid))
    out = []
    for _ in range(count):
        kind = rng.randrange(8)
        value = copy.deepcopy(valid)
        path = rng.choice(paths)
        if kind == 0 and path:
            out.append(json.dumps(_delete(value, path)).encode())
        elif kind in (1, 2):
            out.append(json.dumps(_set(value, path, copy.deepcopy(rng.choice(ODD_VALUES)))).encode())
        elif kind == 3:
            out.append(text[:rng.randrange(len(text))].encode())                     # truncated
        elif kind == 4:
            raw = bytearray(text.encode())
            raw[rng.randrange(len(raw))] = 0xff                                      # not UTF-8
            out.append(bytes(raw))
        elif kind == 5:
            out.append(json.dumps(_set(value, path, "__DEEP__")).replace('"__DEEP__"', "[" * 3000 + "]" * 3000)
                       .encode())
        elif kind == 6:
            out.append(json.dumps(_set(value, path, "__NUM__")).replace('"__NUM__"', rng.choice(
                ["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000])).encode())
        else:
            out.append(json.dumps(_set(value, path, [copy.deepcopy(rng.choice(ODD_VALUES))] * 3)).encode())
    return out


def check_reader(read, files: list[bytes], path: Path, valid_type):
    """Write each mutated file at `path` and read it: an `IsdaVizError` (one line, naming the file) or a
    `valid_type`."""
    outcomes = {"error": 0, "read": 0}
    for i, data in enumerate(files):
        path.write_bytes(data)
        try:
            result = read(path)
        except IsdaVizError as e:
            assert "\n" not in str(e) and (path.name in str(e) or str(path) in str(e)), (i, str(e))
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 (the property: nothing else escapes)
            raise AssertionError(f"mutation {i} ({data[:200]!r}...) raised {type(e).__name__}: {e}") from e
        else:
            assert isinstance(result, valid_type), (i, type(result))
            outcomes["read"] += 1
    assert outcomes["error"] > 0
    return outcomes


# ------------------------------------------------------------------------------------------------ JSON formats


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A real augment output (report.json), directions figure (FIG.json) and audit (audit.json)."""
    from isda_viz.audit.run import AuditConfig, run_audit
    from isda_viz.inversion.directions import DirectionsOptions, make_directions
    from isda_viz.inversion.optimizer import InversionOptions
    from isda_viz.inversion.pipelines import VisualizeOptions, make_grid

    root = tmp_path_factory.mktemp("outputs")
    options = VisualizeOptions(num_augmented=1, progress=False, inversion=InversionOptions(
        reconstruct_iterations=1, augment_iterations=1, restarts=1))
    make_grid(out=root / "g.png", classes=["Shirt"], num_samples=0, options=options)
    make_directions(out=root / "d.png", options=DirectionsOptions(visualize=options, classes=["Shirt"], directions=1,
                                                                 steps=3))
    run_audit(AuditConfig(out=str(root / "audit"), from_dir=str(root / "g_files"), limit_train=200, limit_test=50),
              progress=False, log=lambda m: None)
    return root


def test_report_readers_take_only_their_own_shape(outputs, tmp_path):
    from isda_viz.outputs.audit_report import AuditReport, read_audit
    from isda_viz.outputs.directions import DirectionsReport, read_directions_report
    from isda_viz.outputs.folders import read_manifest
    from isda_viz.outputs.report import Report, read_report
    from isda_viz.outputs.summary import DemoSummary, read_summary

    rng = random.Random(29)
    summary = {"quick": True, "from_scratch": False, "classifier_test_accuracy": 0.9, "judge_test_accuracy": None,
               "gan_class_agreement": 0.8, "step1_median_feature_error": 0.03,
               "reconstruction_true_label_rate": 1.0, "step2_median_reached_shift_error": 0.6,
               "augmented_judge_label_kept_rate": 1.0, "median_pixel_distance_to_reconstruction": 0.1,
               "audit_queries": 10, "audit_flagged_copies": 0, "seconds": {"grid": 1.5}, "models": {"judge": None}}
    cases = [(read_report, json.loads((outputs / "g_files" / "report.json").read_text()), Report, "report.json"),
             (read_directions_report, json.loads((outputs / "d.json").read_text()), DirectionsReport, "d.json"),
             (read_audit, json.loads((outputs / "audit" / "audit.json").read_text()), AuditReport, "audit.json"),
             (read_summary, summary, DemoSummary, "summary.json"),
             (lambda p: read_manifest(p.parent), json.loads((outputs / "g_files" / "isda-viz-output.json").read_text()),
              type(read_manifest(outputs / "g_files")), "isda-viz-output.json")]
    for read, valid, kind, name in cases:
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        path = folder / name
        path.write_text(json.dumps(valid))
        assert isinstance(read(path), kind)                                  # the valid file reads
        check_reader(read, json_mutations(valid, rng), path, kind)


def test_config_and_name_readers(tmp_path):
    from isda_viz.classifiers.classifier import load_classifier, read_class_names
    from isda_viz.classifiers.statistics import read_statistics_key
    from isda_viz.generators.biggan_weights import read_biggan_config
    from isda_viz.inversion.adapter import read_class_map
    from isda_viz.pretrained import default_classifier

    rng = random.Random(30)
    classifier = load_classifier(default_classifier())

    class Conditional:
        conditional, num_classes = True, 10

    timm_models = pytest.importorskip("isda_viz.classifiers.timm_models")
    cases = [
        (timm_models.read_timm_config, {"architecture": "resnet18", "num_classes": 3, "model_args": {"drop_rate": 0.1},
                                        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5],
                                                           "std": [0.2, 0.2, 0.2]},
                                        "label_names": ["a", "b", "c"]}, dict),
        (read_biggan_config, {"output_dim": 128, "z_dim": 128, "class_embed_dim": 128, "channel_width": 8,
                              "num_classes": 10, "layers": [[False, 4, 4], [True, 4, 2]],
                              "attention_layer_position": 1, "eps": 1e-4, "n_stats": 51}, dict),
        (read_statistics_key, {"weights": "ab" * 32, "covariance": "full", "classes": [0, 3],
                               "data": {"0": "f0", "3": "f3"}}, dict),
        (lambda p: read_class_map(p, classifier, Conditional()), {"Shirt": 6, "0": 1}, torch.Tensor),
        (read_class_names, classifier.class_names, list),
    ]
    for i, (read, valid, kind) in enumerate(cases):
        path = tmp_path / f"case{i}.json"
        path.write_text(json.dumps(valid))
        assert isinstance(read(path), kind)
        check_reader(read, json_mutations(valid, rng), path, kind)


def test_typed_builder_names_the_key_that_is_wrong():
    from isda_viz.outputs.report import Summary

    good = {"images": 1, "step1_median_feature_error": 0.1, "step1_median_psnr": None,
            "reconstruction_true_label_rate": 1.0, "step2_median_reached_shift_error": 0.5,
            "step2_median_negative_target_floor": 0.2, "augmented_label_kept_rate": 1.0,
            "augmented_judge_label_kept_rate": None, "median_pixel_distance_to_reconstruction": 0.1}
    assert build_typed(Summary, good, "s.json").images == 1
    with pytest.raises(IsdaVizError, match="s.json: images must be an integer, not True"):
        build_typed(Summary, {**good, "images": True}, "s.json")
    with pytest.raises(IsdaVizError, match="step1_median_psnr must be a finite number, not 'x'"):
        build_typed(Summary, {**good, "step1_median_psnr": "x"}, "s.json")
    with pytest.raises(IsdaVizError, match="augmented_label_kept_rate is missing"):
        build_typed(Summary, {k: v for k, v in good.items() if k != "augmented_label_kept_rate"}, "s.json")


# ------------------------------------------------------------------------------------------------ tensor formats


def tensor_mutations(valid: dict, rng: random.Random, count: int = MUTATIONS) -> list[object]:
    """Mutated copies of a checkpoint dict: keys deleted, values swapped for other types, tensors replaced by
    ones of another shape, sparse, NaN or 1e40 ones (finite in float64, not in float32)."""
    def leaves(value, at=()):
        if isinstance(value, dict):
            for k, v in value.items():
                yield at + (k,)
                yield from leaves(v, at + (k,))
    paths = list(leaves(valid))
    out = []
    for _ in range(count):
        value = copy.deepcopy(valid)
        path = rng.choice(paths)
        kind = rng.randrange(6)
        old = value
        for key in path:
            old = old[key]
        if kind == 0:
            _delete(value, path)
        elif kind == 1:
            _set(value, path, copy.deepcopy(rng.choice(ODD_VALUES)))
        elif kind == 2 and isinstance(old, torch.Tensor) and old.dim():
            _set(value, path, torch.zeros(*[s + 1 for s in old.shape], dtype=old.dtype))
        elif kind == 3 and isinstance(old, torch.Tensor) and old.is_floating_point() and old.numel():
            new = old.clone().double()
            new.view(-1)[rng.randrange(new.numel())] = rng.choice([float("nan"), 1e40, -1e40])
            _set(value, path, new)
        elif kind == 4 and isinstance(old, torch.Tensor) and old.dim() == 2:
            _set(value, path, old.to_sparse())
        else:
            out.append(torch.ones(3))                                               # a bare tensor
            continue
        out.append(value)
    out.append([1, 2, 3])
    return out


def _save_all(mutations, path: Path) -> list[bytes]:
    files = []
    for value in mutations:
        torch.save(value, path)
        files.append(path.read_bytes())
    data = files[0]
    files += [data[:len(data) // 2], data[:100], b"", b"PK\x03\x04" + b"\0" * 100]     # truncated, empty, broken
    return files


def test_checkpoint_readers_take_only_their_own_shape(tmp_path):
    from isda_viz.classifiers.covariance_file import read_covariance_file
    from isda_viz.classifiers.run_checkpoint import RunCheckpoint, read_run_checkpoint
    from isda_viz.generators.wgan import WGANGenerator, load_wgan
    from isda_viz.isda.estimator import CovarianceEstimator
    from isda_viz.pretrained import default_classifier, default_generator

    rng = random.Random(31)
    run = torch.load(default_classifier() / "checkpoint.pt", weights_only=True)
    run["model"] = {k: v for k, v in run["model"].items() if k.startswith(("fc.", "conv1."))}  # small, still read
    generator = torch.load(default_generator() / "generator.pt", weights_only=True)
    sigma = torch.eye(4, dtype=torch.float64).repeat(3, 1, 1)
    covariance = {"covariance": sigma, "mean": torch.zeros(3, 4, dtype=torch.float64)}
    cases = [(read_run_checkpoint, run, RunCheckpoint, "checkpoint.pt"),
             (load_wgan, generator, WGANGenerator, "generator.pt"),
             (lambda p: read_covariance_file(p, 3, 4), covariance, CovarianceEstimator, "sigma.pt")]
    for read, valid, kind, name in cases:
        folder = tmp_path / name.replace(".", "-")
        folder.mkdir()
        path = folder / name
        files = _save_all(tensor_mutations(valid, rng), path)
        check_reader(read, files, path, kind)
