"""Read ``torch.save`` checkpoints without running code the file names.

A pickle can name any importable callable and have the unpickler call it (``os.system`` via
``__reduce__``). ``torch.load(weights_only=True)`` refuses such files but also refuses the
harmless non-tensor objects that real checkpoints carry (GLoRIA's Lightning checkpoint holds an
OmegaConf ``hyper_parameters`` object). ``restricted_load`` sits in between:

- globals on torch's own ``weights_only`` allowlist (tensor rebuild functions, storages, dtypes,
  ``OrderedDict``, ...) load as themselves;
- globals that can reach the system (``os``, ``subprocess``, ``builtins.eval``, ...) make the
  load fail with a ``CxrfairError`` naming them: such a file is not a checkpoint;
- every other global (``omegaconf.DictConfig``, Lightning callbacks, ...) becomes an inert
  ``PickledStub`` that records its arguments and state and is never imported or called.

Nothing the file names is imported, so no module-level code of it runs either.
``convert_to_safetensors`` uses the same reader to write a tensors-only ``.safetensors`` copy.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_path

# Globals that let a pickle reach the system, the interpreter or other pickles. Refusing them
# turns an obviously hostile file into a clear error. Everything unlisted is stubbed and never
# called anyway, so the lists only need to be informative, and are kept narrow so that harmless
# references in real checkpoints (OmegaConf's ``builtins.dict`` / ``typing.Any`` metadata, a
# ``functools.partial`` in a scheduler state) are stubbed rather than refused.
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "shutil",
    "socket", "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "code", "codeop", "pty",
    "platform", "webbrowser", "multiprocessing", "signal", "pdb", "shelve", "dill", "cloudpickle",
    "joblib", "torch.hub",
})
REFUSED_BUILTINS = frozenset({
    "eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "delattr", "globals",
    "locals", "vars", "input", "breakpoint", "exit", "quit", "help",
})


class PickledStub:
    """Inert stand-in for a class or function a checkpoint names but we do not load.

    Attributes:
        pickle_global: ``"module.name"`` the file asked for (class attribute).
        args: positional arguments the pickle passed when it "called" or instantiated it.
        state: whatever the pickle passed to ``__setstate__`` (None if nothing).
    """

    pickle_global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "PickledStub":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the arguments were kept by __new__
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub of {self.pickle_global}>"


@dataclass(frozen=True)
class RestrictedLoad:
    """What ``restricted_load`` read: the object and the globals it replaced by stubs."""

    obj: Any
    stubbed: tuple[str, ...]  # sorted "module.name" of every stubbed global


def _allowed_globals() -> dict[str, Any]:
    # torch's own vetted list, the same one torch.load(weights_only=True) admits.
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


def _refused(module: str, name: str) -> bool:
    if module == "builtins":
        return name in REFUSED_BUILTINS
    return module in REFUSED_MODULES or module.split(".")[0] in REFUSED_MODULES


def _make_pickle_module(source: str) -> tuple[types.ModuleType, set[str]]:
    """A stand-in for the ``pickle`` module whose Unpickler resolves globals as described above."""
    allowed = _allowed_globals()
    stubbed: set[str] = set()
    stubs: dict[str, type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # Protocol-2 pickles (torch.save's default) spell Python 2 names (``__builtin__``);
            # the stock find_class maps them and ours replaces it, so map them here.
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if _refused(module, name):
                raise CxrfairError(
                    f"{source}: refusing to load: the file asks to call {full}, which no weights "
                    "file needs; it may be malicious. Get the checkpoint from its official source."
                )
            stubbed.add(full)
            if full not in stubs:
                stubs[full] = type(f"Stub[{full}]", (PickledStub,), {"pickle_global": full})
            return stubs[full]

    def load(file: Any, **kwargs: Any) -> Any:  # torch's legacy (pre-1.6) format calls pickle_module.load
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("cxrfair_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = load
    return module, stubbed


def _refuse_torchscript(path: Path) -> None:
    # torch.load hands TorchScript archives to torch.jit.load before any unpickler of ours runs.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist()):
                raise CxrfairError(f"{path}: a TorchScript archive, not a checkpoint; refusing to load it")


def restricted_load(path: Path | str) -> RestrictedLoad:
    """Load a ``torch.save`` file (zip or legacy format) without executing what it names.

    Args:
        path: the checkpoint (``.ckpt``, ``.bin``, ``.pt``).

    Returns:
        RestrictedLoad with the loaded object (tensors on CPU) and the stubbed globals.

    Raises:
        CxrfairError: the file names a refused global, is TorchScript, or is not a torch file.
    """
    import torch

    path = Path(path)
    _refuse_torchscript(path)
    module, stubbed = _make_pickle_module(str(path))
    try:
        # weights_only=False only because torch refuses a custom pickle_module otherwise; our
        # module's Unpickler is the stricter gate.
        obj = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except CxrfairError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CxrfairError(f"{path}: not a readable torch checkpoint ({e})") from e
    return RestrictedLoad(obj=obj, stubbed=tuple(sorted(stubbed)))


def tensors_only(mapping: Any, source: str) -> dict[str, "Any"]:
    """Check that ``mapping`` is a flat ``{str: Tensor}`` state dict and return it as a dict.

    Raises:
        CxrfairError: naming the first key whose value is not a tensor.
    """
    import torch

    if not isinstance(mapping, dict):
        raise CxrfairError(f"{source}: expected a state dict, found {type(mapping).__name__}")
    for key, value in mapping.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CxrfairError(f"{source}: state dict entry {key!r} is not a tensor ({type(value).__name__})")
    return dict(mapping)


def load_state_dict_file(path: Path | str, key: str | None = None) -> dict[str, Any]:
    """A state dict from ``.safetensors`` or a torch file, optionally under ``obj[key]``.

    Args:
        path: the file.
        key: for checkpoints that wrap the weights (Lightning: ``"state_dict"``); None when the
            file is the state dict itself. A torch file without ``key`` is used whole.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = restricted_load(path).obj
    if key is not None and isinstance(obj, dict) and key in obj:
        obj = obj[key]
    return tensors_only(obj, str(path))


def convert_to_safetensors(src: Path | str, dst: Path | str, key: str | None = "state_dict") -> Path:
    """Write the tensors of a torch checkpoint to ``dst`` (``.safetensors``), read restrictedly.

    Run once on a file; later loads read the safetensors copy and never touch pickle.
    """
    from safetensors.torch import save_file

    state = load_state_dict_file(src, key=key)
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    tensors = {k: v.detach().clone().contiguous() for k, v in state.items()}
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        save_file(tensors, str(tmp), metadata={"converted_from": Path(src).name})
    return dst
