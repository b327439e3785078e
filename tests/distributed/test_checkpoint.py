"""Distributed checkpoints never unpickle: crafted or old-format checkpoints are refused before
anything in them runs, and the optimizer's metadata survives its JSON form unchanged."""

from __future__ import annotations

import math
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from conditioner import SOAP
from conditioner.distributed import checkpoint
from conditioner.distributed.metadata import decode_json, encode_json


class Payload:
    """Unpickling this creates the folder ``marker``: proof that a load ran the checkpoint's code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _trained(steps: int = 3):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = SOAP(model.parameters(), precondition_frequency=2)
    for _ in range(steps):
        model.weight.grad, model.bias.grad = torch.randn(3, 4), torch.randn(3)
        optimizer.step()
    return model, optimizer


def test_an_index_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    model, optimizer = _trained()
    checkpoint.save(tmp_path / "ckpt", optimizer, model)
    marker = tmp_path / "payload-ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))
    fresh_model, fresh_optimizer = _trained(0)
    with pytest.raises(ValueError, match="not a torch.distributed.checkpoint index"):
        checkpoint.load(tmp_path / "ckpt", fresh_optimizer, fresh_model)
    assert not marker.exists()


def test_pickled_entries_are_refused_without_unpickling_them(tmp_path):
    marker = tmp_path / "payload-ran"
    model, optimizer = _trained()
    entries = checkpoint.optimizer_entries(optimizer)
    entries[checkpoint.META] = pickle.dumps({"payload": Payload(str(marker))})  # how old versions stored it
    dcp.save(entries, checkpoint_id=tmp_path / "old")
    fresh_model, fresh_optimizer = _trained(0)
    with pytest.raises(ValueError, match="pickled objects, not tensors"):
        checkpoint.load(tmp_path / "old", fresh_optimizer)
    assert not marker.exists()
    assert fresh_optimizer.state_dict()["state"] == {}  # nothing was loaded


def test_metadata_survives_its_json_form():
    value = {
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.95), "state_dtype": torch.float64, "tolerance": math.inf,
                          "lr_tensor": torch.tensor(0.5), "params": [0, 1], "name": None, "nested": {"a": (1, [2])}}],
        "other": {"group0/3x4:PP": {"step": [3]}},
        "world_size": 2,
    }
    encoded = encode_json(value)
    assert encoded.dtype == torch.uint8 and encoded.ndim == 1
    decoded = decode_json(encoded)
    group, original = decoded["param_groups"][0], value["param_groups"][0]
    assert group.pop("lr_tensor").item() == original["lr_tensor"].item()
    assert group == {k: v for k, v in original.items() if k != "lr_tensor"}
    assert decoded["other"] == value["other"] and decoded["world_size"] == 2
    with pytest.raises(TypeError, match="cannot store"):
        encode_json({"f": lambda: None})


def test_a_saved_checkpoint_resumes_with_its_hyperparameters(tmp_path):
    model, optimizer = _trained()
    checkpoint.save(tmp_path / "ckpt", optimizer, model)
    fresh_model = nn.Linear(4, 3)
    fresh_optimizer = SOAP(fresh_model.parameters(), lr=0.5, precondition_frequency=2)
    assert checkpoint.load(tmp_path / "ckpt", fresh_optimizer, fresh_model) == 1
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for a, b in zip(fresh_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
