"""Read torch checkpoints written elsewhere without running code they carry.

`torch.load(weights_only=True)` reads plain state dicts (torchvision weights,
isda-viz checkpoints) and is always tried first. A checkpoint of the public ISDA
CIFAR code also holds its whole pickled loss object (`isda_criterion`, an
`ISDA.ISDALoss` holding an `ISDA.EstimatorCV`), which weights_only refuses and
`weights_only=False` with the standard unpickler would import and run. Such files
are read through `AllowListUnpickler`: exactly the globals in `ALLOWED_GLOBALS`
resolve, their classes become inert attribute bags (`PickledObject`), and any
other global refuses the whole file with a one-line `IsdaVizError` naming it.

Both of torch's on-disk formats go through the same unpickler: the zip archive
(torch >= 1.6, `data.pkl` + `data/<key>` records) and the legacy stream of
torch < 1.6 (`torch.save(..., _use_new_zipfile_serialization=False)`: magic
number, protocol, sys info, the object pickle, storage keys, raw storages).
Tensors saved on CUDA load on the CPU (`map_location="cpu"`).

Files written by torch 1.0.1, which the public code pins, also name the
reducer `torch.nn.backends.thnn._get_thnn_function_backend` (every pickled
`nn.Module`'s `_backend`; it becomes an inert `PickledFunctionBackend`) and
storages as `torch.cuda.FloatStorage` etc. at location `cuda:0` (restored on
the CPU like any storage). A `.safetensors` file is read by the safetensors
package instead: a flat dict of tensors, no pickle at all.

Why no foreign code can run: pickle calls code only through callables it
obtains by name (GLOBAL / STACK_GLOBAL / EXT opcodes, all routed to
`find_class`) or from `persistent_load`. torch's own reader subclasses our
Unpickler; its `find_class` answers names containing "Storage" with torch's
inert dtype carrier `StorageType` and passes everything else to ours, and its
`persistent_load` only turns `('storage', type, key, location, numel)` records
into CPU storages (and, in the legacy format, returns the class that was itself
unpickled through `find_class`). Ours returns only the objects listed below:
callers of torch's two tensor-rebuild functions (they make a tensor view of a
loaded storage), `OrderedDict`, `set`, and `PickledObject` subclasses whose only
code is `object.__new__` and the default `__dict__` update on BUILD. None of
them can be altered by the file: BUILD (pickle's "set attributes") applied to a
global itself fails, since `OrderedDict` and `set` are immutable builtin types,
the stand-in classes' metaclass refuses attribute assignment and the rebuild
callers have neither `__dict__` nor slots. The other metadata torch reads with
`pickle_module.load` (magic number, protocol, sys info, storage keys) goes
through the same unpickler. TorchScript archives (which torch.load would hand
to `torch.jit.load`) and pre-0.4 tar checkpoints are refused before torch sees
them.
"""

from __future__ import annotations

import pickle
import tarfile
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch._utils
from torch.serialization import StorageType

from isda_viz.errors import IsdaVizError
from isda_viz.runs import check_checkpoint_start


class _ReadOnlyClass(type):
    """Metaclass of the stand-ins: a pickle that BUILDs on the class object itself cannot change it."""
    def __setattr__(cls, name, value):
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name):
        raise AttributeError(f"{cls.__name__} is read-only")


class PickledObject(metaclass=_ReadOnlyClass):
    """Inert stand-in for an instance of an allowed class: its pickled `__dict__`, nothing else.

    `pickled_as` is the "module.name" the file used; attributes are whatever
    the file stored (tensors, numbers, dicts, other stand-ins).
    """

    pickled_as = "object"
    # torch's legacy reader compares an nn.Module class's saved source with ours and,
    # if `dump_patches` is true, writes a .patch file; ours is always false.
    dump_patches = False

    def __repr__(self) -> str:
        return f"<{self.pickled_as} from a checkpoint: {', '.join(sorted(vars(self)))}>"


class PickledISDALoss(PickledObject):
    """`ISDA.ISDALoss` of the public code: `.estimator`, `.class_num`, `.cross_entropy`."""
    pickled_as = "ISDA.ISDALoss"


class PickledEstimatorCV(PickledObject):
    """`ISDA.EstimatorCV`: `.CoVariance (C, A, A)`, `.Ave (C, A)`, `.Amount (C,)`, `.class_num`."""
    pickled_as = "ISDA.EstimatorCV"


class PickledCrossEntropyLoss(PickledObject):
    """`torch.nn.CrossEntropyLoss` inside the public `ISDALoss` (never called)."""
    pickled_as = "torch.nn.modules.loss.CrossEntropyLoss"


class PickledImageNetISDALoss(PickledISDALoss):
    """`ISDA_imagenet.ISDALoss` of the public ImageNet code: `.estimator`, `.class_num`, `.cross_entropy`."""
    pickled_as = "ISDA_imagenet.ISDALoss"


class PickledImageNetEstimatorCV(PickledEstimatorCV):
    """`ISDA_imagenet.EstimatorCV`: diagonal `.CoVariance (C, A)`, `.Ave (C, A)`, `.Amount (C,)`, `.class_num`."""
    pickled_as = "ISDA_imagenet.EstimatorCV"


def _drop_in_statistic(estimator: PickledObject, name: str):
    """`CoVariance` (M2 / n, population), `Ave` or `Amount` of a pickled drop-in estimator's `isda_viz_state`,
    float64; None where the state is malformed (the checkpoint reader then names what it expected)."""
    state = vars(estimator).get("isda_viz_state")
    parts = [state.get(k) for k in ("m2", "mean64", "count")] if isinstance(state, dict) else []
    if len(parts) != 3 or not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in parts):
        return None
    m2, mean, count = (t.to(torch.float64) for t in parts)
    if count.dim() != 1 or m2.dim() not in (2, 3) or m2.shape[:1] != count.shape or mean.shape[:1] != count.shape:
        return None
    if name == "CoVariance":  # zero for classes never seen, as the public estimator's
        return m2 / count.clamp(min=1).view(-1, *[1] * (m2.dim() - 1))
    return mean if name == "Ave" else count


class PickledDropInEstimatorCV(PickledEstimatorCV):
    """`isda_viz.compat.cifar.EstimatorCV`, the drop-in for `ISDA.EstimatorCV`: pickled as `.class_num` and
    `.isda_viz_state` (a `CovarianceEstimator.state_dict()`: `m2`, `mean64`, `count`, float64). `.CoVariance`,
    `.Ave` and `.Amount` are read from it (float64), as the public estimator's (properties: a file cannot
    replace them)."""
    pickled_as = "isda_viz.compat.cifar.EstimatorCV"
    CoVariance = property(lambda self: _drop_in_statistic(self, "CoVariance"))
    Ave = property(lambda self: _drop_in_statistic(self, "Ave"))
    Amount = property(lambda self: _drop_in_statistic(self, "Amount"))


class PickledDropInISDALoss(PickledISDALoss):
    """`isda_viz.compat.cifar.ISDALoss`, the drop-in for `ISDA.ISDALoss`: `.estimator`, `.class_num`,
    `.cross_entropy`."""
    pickled_as = "isda_viz.compat.cifar.ISDALoss"


class PickledDropInImageNetEstimatorCV(PickledDropInEstimatorCV):
    """`isda_viz.compat.imagenet.EstimatorCV`: as `PickledDropInEstimatorCV`, diagonal `.CoVariance (C, A)`."""
    pickled_as = "isda_viz.compat.imagenet.EstimatorCV"


class PickledDropInImageNetISDALoss(PickledISDALoss):
    """`isda_viz.compat.imagenet.ISDALoss`, the drop-in for `ISDA_imagenet.ISDALoss`."""
    pickled_as = "isda_viz.compat.imagenet.ISDALoss"


class PickledFunctionBackend(PickledObject):
    """What torch < 1.2 stored as every pickled `nn.Module`'s `_backend` (its THNN function table): nothing."""
    pickled_as = "torch.nn.backends.thnn.THNNFunctionBackend"


class _ThnnBackendReducer:
    """Stands in for `torch.nn.backends.thnn._get_thnn_function_backend`, the reducer torch 1.0.1 pickled
    `_backend` as (called with no arguments): returns a fresh inert `PickledFunctionBackend`."""
    __slots__ = ()

    def __call__(self):
        return PickledFunctionBackend()


class _RebuildTensor:
    """Calls `torch._utils._rebuild_tensor_v2`; unlike the function object, it has no attribute to overwrite."""
    __slots__ = ()

    def __call__(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                               backward_hooks, metadata)


class _RebuildParameter:
    """Calls `torch._utils._rebuild_parameter` (an `nn.Parameter` around a rebuilt tensor)."""
    __slots__ = ()

    def __call__(self, data, requires_grad, backward_hooks):
        return torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)


_STORAGE_NAMES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")

ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("ISDA", "ISDALoss"): PickledISDALoss,
    ("ISDA", "EstimatorCV"): PickledEstimatorCV,
    ("torch.nn.modules.loss", "CrossEntropyLoss"): PickledCrossEntropyLoss,
    ("ISDA_imagenet", "ISDALoss"): PickledImageNetISDALoss,
    ("ISDA_imagenet", "EstimatorCV"): PickledImageNetEstimatorCV,
    # isda-viz's drop-ins for those two (`isda_viz.compat`), as a public training script pickles them.
    ("isda_viz.compat.cifar", "ISDALoss"): PickledDropInISDALoss,
    ("isda_viz.compat.cifar", "EstimatorCV"): PickledDropInEstimatorCV,
    ("isda_viz.compat.imagenet", "ISDALoss"): PickledDropInImageNetISDALoss,
    ("isda_viz.compat.imagenet", "EstimatorCV"): PickledDropInImageNetEstimatorCV,
    # torch 1.0.1 (which the public code pins) pickles every nn.Module's `_backend` as this call.
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _ThnnBackendReducer(),
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # how pickle protocol 2 (torch.save's default) spells builtins.set
    ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor(),
    ("torch._utils", "_rebuild_parameter"): _RebuildParameter(),
    # torch's reader answers "...Storage" names itself with a fresh StorageType; this does the same.
    **{(module, f"{kind}Storage"): StorageType
       for module in ("torch", "torch.cuda") for kind in _STORAGE_NAMES},
}
"""Every global a checkpoint of the public ISDA code (CIFAR `train.py`, ImageNet `imagenet_DDP.py`, as written
by torch 1.0.1 or a later torch, with the public losses or isda-viz's drop-ins) needs, and nothing else."""


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle named a global outside `ALLOWED_GLOBALS`; `.name` is "module.name"."""
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class AllowListUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` resolves `ALLOWED_GLOBALS` only."""
    def find_class(self, module: str, name: str):
        try:
            found = ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise ForbiddenGlobal(f"{module}.{name}") from None
        return StorageType(name) if found is StorageType else found


def _load(file, **kwargs):
    return AllowListUnpickler(file, **kwargs).load()


# What torch.load needs of a `pickle_module`: `Unpickler`, `load` and a `__name__`.
allow_list_pickle = types.ModuleType("isda_viz_allow_list_pickle")
allow_list_pickle.Unpickler = AllowListUnpickler
allow_list_pickle.load = _load


def _refuse_foreign_containers(path: Path, what: str) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.split("/", 1)[-1] == "constants.pkl" for n in z.namelist()):
                raise IsdaVizError(f"{what} {path} is a TorchScript archive, not a checkpoint; "
                                   "save its state_dict with torch.save instead")
    elif tarfile.is_tarfile(path):
        raise IsdaVizError(f"{what} {path} is in torch's pre-0.4 tar format, which isda-viz does not read; "
                           "re-save it with a current torch")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def load_allow_listed(path, what: str = "checkpoint"):
    """Unpickle a torch checkpoint (zip or legacy format) through `AllowListUnpickler`, tensors on CPU."""
    path = Path(path)
    _refuse_foreign_containers(path, what)
    try:
        with warnings.catch_warnings():
            # The legacy format stores nn.Module classes' source; ours differs, which is expected.
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            # weights_only=False is safe here only because every global goes through the allow-list.
            return torch.load(path, map_location="cpu", pickle_module=allow_list_pickle, weights_only=False,
                              mmap=False)
    except ForbiddenGlobal as e:
        raise IsdaVizError(f"refusing {what} {path}: it names the Python global {e.name}, which is not on "
                           "isda-viz's allow-list of checkpoint contents (nothing was run)") from None
    except Exception as e:
        raise IsdaVizError(f"{what} {path} is truncated, corrupt or not a torch checkpoint "
                           f"({_first_line(e)})") from None


SAFETENSORS_SUFFIX = ".safetensors"


def load_safetensors(path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A `.safetensors` file as a dict of CPU tensors (no pickle); a one-line `IsdaVizError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise IsdaVizError(f"{what} not found: {path}")
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise IsdaVizError(f"{what} {path} is a safetensors file, which needs the safetensors package: "
                           "pip install 'isda-viz[timm]'") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:
        raise IsdaVizError(f"{what} {path} is truncated, corrupt or not a safetensors file "
                           f"({_first_line(e)})") from None


def load_torch_file(path, what: str = "checkpoint"):
    """Any torch checkpoint file, tensors on CPU, without running code it carries.

    A `.safetensors` file: `load_safetensors`. Otherwise `torch.load(weights_only=True)`
    first (plain state dicts, isda-viz files); if torch refuses, `load_allow_listed`
    (the public ISDA code's checkpoints).
    Errors are one-line `IsdaVizError`s: missing, truncated, or naming the
    global that is not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise IsdaVizError(f"{what} not found: {path}")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return load_safetensors(path, what)
    check_checkpoint_start(path, what)
    _refuse_foreign_containers(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception:
        # Either a global weights_only does not know (the public format) or a broken file;
        # the allow-listed reader tells which, naming the global or the failure.
        return load_allow_listed(path, what)
