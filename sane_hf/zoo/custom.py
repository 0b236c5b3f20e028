"""Your own architecture and task, given by import path: the zoos the registries do not know.

A zoo of an architecture that :func:`~sane_hf.zoo.architectures.list_architectures` does not
have, trained on data that :func:`~sane_hf.zoo.tasks.list_tasks` does not know, is imported with
two *entry points*, each ``"module:callable"`` (an importable module, e.g. ``my_pkg.nets:build``)
or ``"path/to/file.py:callable"`` (a Python file, imported from that path)::

    sane-hf zoo import --format folder runs/ --out zoos/mine --arch my_code.py:build_net --task my_code.py:load_data

- the **architecture** callable takes no arguments (or the zoo's ``arch_kwargs``) and returns the
  ``nn.Module`` every checkpoint belongs to; the importer checks that every checkpoint loads into
  it with ``load_state_dict(strict=True)`` and names the keys that differ when one does not;
- the **task** callable takes no arguments and returns ``(x_train, y_train, x_test, y_test)``
  (or ``(x_train, y_train, x_val, y_val, x_test, y_test)``): float inputs and int64 class labels,
  tensors or numpy arrays. Without a validation split, a seeded fifth of the training split is
  held out as one (used where the sampling protocol needs one).

Both are recorded in the zoo's ``zoo_config.json`` (``arch_entrypoint``, ``task_entrypoint``;
files by absolute path) so that ``sane-hf train`` (permutation views, derived from your module's
graph), ``probe`` and ``sample`` find them again. **This imports and runs your own code**, as
``python -c "import my_code"`` would: only use entry points you trust. When the module cannot be
imported later (moved file, other machine), those commands stop with a one-line error that names
the entry point. From Python, pass the objects themselves (``import_folder(..., build=fn,
task=fn)``); they are recorded by their import path when they have one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from sane_hf.zoo.schema import ZooConfig
    from sane_hf.zoo.tasks import TaskData

__all__ = [
    "is_entrypoint",
    "entrypoint_name",
    "normalize_entrypoint",
    "resolve_entrypoint",
    "entrypoint_of",
    "task_from_callable",
    "zoo_task",
    "architecture_builder",
    "state_dict_difference",
]


def is_entrypoint(value: Any) -> bool:
    """True for ``"module:callable"`` / ``"file.py:callable"`` strings (a name with a colon)."""
    if not isinstance(value, str) or ":" not in value:
        return False
    module, _, attr = value.rpartition(":")
    return bool(module) and bool(attr) and attr.replace("_", "a").replace(".", "a").isalnum()


def _is_file_module(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def normalize_entrypoint(value: str) -> str:
    """The entry point as recorded: a file module by its absolute path, a module name as given."""
    if not is_entrypoint(value):
        raise ValueError(f"{value!r} is not an entry point; expected 'module:callable' or 'path/to/file.py:callable'")
    module, _, attr = value.rpartition(":")
    if _is_file_module(module):
        module = str(Path(module).expanduser().resolve())
    return f"{module}:{attr}"


def entrypoint_name(value: str) -> str:
    """A short display name: ``"/abs/dir/my_code.py:build"`` → ``"my_code:build"``."""
    module, _, attr = value.rpartition(":")
    if _is_file_module(module):
        module = Path(module).stem
    return f"{module}:{attr}"


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"sane_hf_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    added = str(path.parent) not in sys.path
    if added:  # the file may import its siblings
        sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(path.parent))
    return module


def resolve_entrypoint(value: str, what: str = "--arch") -> Callable[..., Any]:
    """Import ``value`` (``"module:callable"`` or ``"path/to/file.py:callable"``) and return the callable.

    Raises:
        ValueError: one line naming the entry point, what went wrong and how to fix it.
    """
    if not is_entrypoint(value):
        raise ValueError(f"{what} {value!r} is not 'module:callable' or 'path/to/file.py:callable'")
    module_name, _, attr = value.rpartition(":")
    fix = "make the module importable (on PYTHONPATH) or give the file, as path/to/file.py:callable"
    try:
        if _is_file_module(module_name):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"{what} {value!r}: the file {path} does not exist; {fix}")
            module = _import_file(path)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any error while importing user code
        raise ValueError(f"{what} {value!r}: cannot import {module_name!r} ({type(err).__name__}: {err}); {fix}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise ValueError(f"{what} {value!r}: {module_name!r} has no attribute {attr!r}; it defines {public[:10]}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {value!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def entrypoint_of(obj: Callable[..., Any]) -> str | None:
    """``"module:qualname"`` when ``obj`` can be imported back by that path (else None: e.g. ``__main__``, lambdas)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    if module == "__main__" or module.startswith("sane_hf_user_"):
        file = getattr(sys.modules.get(module), "__file__", None)
        return f"{Path(file).resolve()}:{qualname}" if file and module != "__main__" else None
    try:
        return f"{module}:{qualname}" if resolve_entrypoint(f"{module}:{qualname}") is obj else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------


def _as_tensor(value: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"task {what}: {name} is a {type(value).__name__}, expected a tensor or numpy array")
    return value.detach().cpu()


def task_from_callable(fn: Callable[[], Any], name: str, *, seed: int = 0) -> TaskData:
    """A :class:`~sane_hf.zoo.tasks.TaskData` from a task callable (see the module docs).

    ``in_channels`` is the inputs' second dimension (features for ``(N, F)`` inputs) and
    ``image_size`` their last for image-shaped ``(N, C, H, W)`` inputs, else 1.
    """
    from sane_hf.zoo.tasks import TaskData

    try:
        data = fn()
    except Exception as err:  # noqa: BLE001 - any error in user code
        raise ValueError(f"task {name}: calling it raised {type(err).__name__}: {err}") from err
    if not isinstance(data, (tuple, list)) or len(data) not in (4, 6):
        got = f"a {len(data)}-tuple" if isinstance(data, (tuple, list)) else f"a {type(data).__name__}"
        raise ValueError(f"task {name}: must return (x_train, y_train, x_test, y_test) (or with x_val, y_val), got {got}")
    labels = ("x_train", "y_train", "x_test", "y_test") if len(data) == 4 else (
        "x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    t = {k: _as_tensor(v, name, k) for k, v in zip(labels, data)}
    for split in ("train", "val", "test"):
        if f"x_{split}" not in t:
            continue
        x, y = t[f"x_{split}"], t[f"y_{split}"]
        if not x.is_floating_point():
            t[f"x_{split}"] = x = x.float()
        if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
            raise ValueError(f"task {name}: y_{split} must be 1-D integer class labels, got {y.dtype} {tuple(y.shape)}")
        t[f"y_{split}"] = y = y.long()
        if x.dim() < 2 or len(x) != len(y) or len(y) == 0:
            raise ValueError(
                f"task {name}: x_{split} {tuple(x.shape)} and y_{split} {tuple(y.shape)} must be non-empty with one "
                "label per input (inputs (N, ...) with N >= 1)"
            )
        if int(y.min()) < 0:
            raise ValueError(f"task {name}: y_{split} holds negative labels; classes are 0..num_classes-1")
    if "x_val" not in t:  # hold out a seeded fifth of train as validation
        n = len(t["y_train"])
        if n < 2:
            raise ValueError(f"task {name}: needs at least 2 training examples to hold out a validation split")
        perm = torch.from_numpy(np.random.default_rng([seed, 3]).permutation(n))
        n_val = max(1, n // 5)
        val, train = perm[:n_val].sort().values, perm[n_val:].sort().values
        t["x_val"], t["y_val"] = t["x_train"][val], t["y_train"][val]
        t["x_train"], t["y_train"] = t["x_train"][train], t["y_train"][train]
    x = t["x_train"]
    num_classes = int(max(int(t[f"y_{s}"].max()) for s in ("train", "val", "test")) + 1)
    return TaskData(
        name=name, x_train=x.contiguous(), y_train=t["y_train"].contiguous(), x_val=t["x_val"].contiguous(),
        y_val=t["y_val"].contiguous(), x_test=t["x_test"].contiguous(), y_test=t["y_test"].contiguous(),
        num_classes=num_classes, in_channels=int(x.shape[1]), image_size=int(x.shape[-1]) if x.dim() == 4 else 1,
        seed=seed,
    )


def zoo_task(config: ZooConfig, *, required: bool = False, task: Callable[[], Any] | None = None) -> TaskData | None:
    """The zoo's task data: the user's task callable, a registered task, or None when neither is known.

    Args:
        config: the zoo's config (``task``, ``task_entrypoint``, ``image_size``, subsets, seed).
        required: raise instead of returning None when the task is unknown.
        task: a task callable to use instead of the recorded one (the Python API's ``task=``).
    """
    from sane_hf.zoo.tasks import list_tasks, load_task

    if task is not None:
        return task_from_callable(task, config.task, seed=config.seed)
    entry = getattr(config, "task_entrypoint", None)
    if entry:
        fn = resolve_entrypoint(entry, "task_entrypoint in zoo_config.json")
        return task_from_callable(fn, config.task, seed=config.seed)
    if config.task in list_tasks():
        return load_task(
            config.task, image_size=config.image_size, train_subset=config.train_subset,
            eval_subset=config.eval_subset, seed=config.seed,
        )
    if required:
        raise ValueError(
            f"the zoo's task {config.task!r} is neither a registered task {list_tasks()} nor an entry point: "
            "import the zoo with --task module:callable (a function returning x_train, y_train, x_test, y_test)"
        )
    return None


# ----------------------------------------------------------------------------------------------
# architectures
# ----------------------------------------------------------------------------------------------


def _call_builder(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str) -> nn.Module:
    try:
        module = fn(**kwargs)
    except Exception as err:  # noqa: BLE001 - any error in user code
        raise ValueError(f"{what}: calling it raised {type(err).__name__}: {err}") from err
    if not isinstance(module, nn.Module):
        raise ValueError(f"{what}: must return a torch.nn.Module, got {type(module).__name__}")
    return module


def architecture_builder(
    config: ZooConfig, *, activation: str | None = None, build: Callable[..., nn.Module] | None = None
) -> Callable[..., nn.Module] | None:
    """``build(num_classes=None, seed=None, init="default") -> nn.Module`` for the zoo's architecture.

    The user's architecture (``build``, else ``config.arch_entrypoint``, called with
    ``config.arch_kwargs``) is built under ``torch.manual_seed(seed)`` when a seed is given (its own
    initialisation; ``init`` is ignored) and gets a fresh head for another ``num_classes``. A
    registered architecture is built with :func:`~sane_hf.zoo.architectures.create_model` and the
    zoo's dimensions, ``activation`` (default relu) and no dropout. None when neither applies.
    """
    from sane_hf.zoo.architectures import create_model, list_architectures

    entry = getattr(config, "arch_entrypoint", None)
    if build is None and entry:
        build = resolve_entrypoint(entry, "arch_entrypoint in zoo_config.json")
    if build is not None:
        fn, what = build, f"architecture {entry or getattr(build, '__name__', build)!r}"
        kwargs = dict(config.arch_kwargs)

        def user_build(num_classes: int | None = None, seed: int | None = None, init: str = "default") -> nn.Module:
            if seed is None:
                module = _call_builder(fn, kwargs, what)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    module = _call_builder(fn, kwargs, what)
            if num_classes is not None:
                from sane_hf.sampling import reset_head

                heads = [m for m in module.modules() if isinstance(m, nn.Linear)]
                if heads and heads[-1].out_features != num_classes:
                    module = reset_head(module, num_classes=num_classes, seed=0 if seed is None else seed)
            return module

        return user_build
    if config.arch not in list_architectures():
        return None
    act = "relu" if activation in (None, "unknown", "auto") else activation
    model_kwargs = config.model_kwargs()

    def registered_build(num_classes: int | None = None, seed: int | None = None, init: str = "default") -> nn.Module:
        kw = dict(model_kwargs)
        if num_classes is not None:
            kw["num_classes"] = num_classes
        return create_model(config.arch, activation=act, dropout=0.0, init=init, seed=seed, **kw)

    return registered_build


def state_dict_difference(expected: Mapping[str, Any], got: Mapping[str, Any], *, shapes: bool = True) -> str:
    """Why ``got`` does not load strictly where ``expected`` (a state_dict or ``{key: shape}``) does; "" if it does.

    ``shapes=False`` compares the keys only.
    """

    def shapes_of(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in sd.items()}

    a, b = shapes_of(expected), shapes_of(got)
    if not shapes:
        b = {k: a.get(k, v) for k, v in b.items()}
    parts = []
    missing, unexpected = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing:
        parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {b[k]} vs {a[k]} expected" for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    if wrong:
        parts.append("shapes " + "; ".join(wrong[:3]) + (" …" if len(wrong) > 3 else ""))
    return ", ".join(parts)
