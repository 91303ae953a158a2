"""The restricted checkpoint reader: tensors load, hostile pickles never run."""

import functools
import os
import sys
import types
import typing
from collections import OrderedDict

import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.safe_load import (
    PickledStub,
    convert_to_safetensors,
    load_state_dict_file,
    restricted_load,
    tensors_only,
)


def _write_marker(path):
    """What a hostile pickle would like to run; the tests assert it never does."""
    with open(path, "w") as f:
        f.write("executed")


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


class _UnknownCallable:
    """Reduces to a function from a module the reader does not know (this test module)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (str(self.marker),))


def _state():
    return OrderedDict(weight=torch.randn(3, 2), bias=torch.arange(3.0))


@pytest.fixture()
def fake_omegaconf(monkeypatch):
    """A class pickled as ``omegaconf.dictconfig.DictConfig`` (the real package is not needed)."""
    package, module = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, content):
            self.__dict__["_content"] = content

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", package)
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    return DictConfig


@pytest.mark.parametrize("hostile", [_SystemCall, _Exec])
@pytest.mark.parametrize("zip_format", [True, False])
def test_system_reaching_pickle_is_refused_and_never_runs(tmp_path, hostile, zip_format):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _state(), "hyper_parameters": hostile(marker)}, ckpt,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(CxrfairError, match="refusing to load"):
        restricted_load(ckpt)
    assert not marker.exists()


def test_unknown_callable_is_stubbed_not_called(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = tmp_path / "odd.ckpt"
    state = _state()
    torch.save({"state_dict": state, "callbacks": _UnknownCallable(marker)}, ckpt)
    loaded = restricted_load(ckpt)
    assert not marker.exists()
    stub = loaded.obj["callbacks"]
    assert isinstance(stub, PickledStub) and stub.args == (str(marker),)
    assert loaded.stubbed == (f"{__name__}._write_marker",)
    for k, v in state.items():
        assert torch.equal(loaded.obj["state_dict"][k], v)


def test_lightning_style_checkpoint_loads_tensors_and_stubs_config(tmp_path, fake_omegaconf):
    ckpt = tmp_path / "model.ckpt"
    state = _state()
    # OmegaConf metadata refers to types such as typing.Any and dict; a plateau scheduler's state
    # may hold a functools.partial: all harmless references that must not block loading.
    config = {"model": {"text": {"bert_type": "x"}}, "key_type": typing.Any, "object_type": dict}
    torch.save({"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.1.4", "state_dict": state,
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(2)}}}],
                "lr_schedulers": [{"is_better": functools.partial(max, 0)}],
                "hyper_parameters": fake_omegaconf(config)}, ckpt)
    loaded = restricted_load(ckpt)
    assert loaded.stubbed == ("builtins.dict", "builtins.max", "functools.partial",
                              "omegaconf.dictconfig.DictConfig", "typing.Any")
    hp = loaded.obj["hyper_parameters"]
    assert isinstance(hp, PickledStub) and hp.state["_content"]["model"] == {"text": {"bert_type": "x"}}
    got = load_state_dict_file(ckpt, key="state_dict")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_parameters_and_legacy_format_load(tmp_path):
    ckpt = tmp_path / "legacy.pt"
    torch.save({"w": torch.nn.Parameter(torch.ones(2, 2)), "s": {1, 2}}, ckpt, _use_new_zipfile_serialization=False)
    got = restricted_load(ckpt)
    assert isinstance(got.obj["w"], torch.nn.Parameter) and torch.equal(got.obj["w"], torch.ones(2, 2))
    assert got.obj["s"] == {1, 2} and got.stubbed == ()  # __builtin__.set (protocol 2) maps to builtins.set


def test_non_tensor_state_dict_entry_is_refused():
    with pytest.raises(CxrfairError, match="'lr' is not a tensor"):
        tensors_only({"w": torch.ones(1), "lr": 0.1}, "x.ckpt")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CxrfairError, match="TorchScript"):
        restricted_load(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(CxrfairError, match="not a readable torch checkpoint"):
        restricted_load(path)


def test_convert_to_safetensors_round_trips(tmp_path, fake_omegaconf):
    from safetensors.torch import load_file

    state = OrderedDict(a=torch.randn(4, 4), b=torch.arange(5))
    state["tied"] = state["a"]  # shared storage, which safetensors refuses unless copied
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": fake_omegaconf({})}, ckpt)
    out = convert_to_safetensors(ckpt, tmp_path / "m.safetensors")
    got = load_file(str(out))
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
