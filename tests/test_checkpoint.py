import json
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mama import checkpoint as checkpoint_module
from mama.checkpoint import CheckpointError, find_latest_checkpoint, load_checkpoint, save_checkpoint


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model.register_buffer("logit_scale", torch.tensor(2.5))  # a 0-d tensor, as in CLIP-style models
    return model


def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _save_simple(root, step, keep_last=None):
    return save_checkpoint(root, step, {"model": {"w": torch.full((2, 3), float(step))}}, {"step": step}, keep_last)


def test_round_trip_model_optimizer_and_rng(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), weight_decay=0.1)
    _train_steps(model, optimizer, steps=3, seed=0)

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {
        "step": 3,
        "config": {"lr": 1e-2, "name": "tiny", "tags": ["a", "b"], "nested": {"none": None, "flag": True}},
        "optimizer": optimizer.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "numpy_generator": np.random.default_rng(5).bit_generator.state,
            "torch": torch.get_rng_state(),
        },
        "odd_keys": {0: "int", "0": "str", (1, 2): "tuple", None: "none", 1.5: "float", "__tensor__": "marker"},
    }
    path = save_checkpoint(tmp_path, 3, {"model": model.state_dict()}, state)
    assert path == tmp_path / "step_00000003"
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
        "state_tensors.safetensors",
    ]
    json.loads((path / "state.json").read_text())  # plain JSON, readable without this package

    expected_python, expected_numpy, expected_torch = random.random(), np.random.rand(), torch.rand(3)

    ckpt = load_checkpoint(tmp_path)  # via root/latest
    assert ckpt.step == 3 and ckpt.path == path

    # Model tensors, including the 0-d buffer, come back bit-identical with their shapes.
    reference = model.state_dict()
    assert ckpt.tensors["model"].keys() == reference.keys()
    for key, value in reference.items():
        assert ckpt.tensors["model"][key].shape == value.shape
        assert torch.equal(ckpt.tensors["model"][key], value), key

    assert ckpt.state["config"] == state["config"]
    assert ckpt.state["odd_keys"] == state["odd_keys"]
    assert ckpt.state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)
    assert set(ckpt.state["optimizer"]["state"]) == set(range(len(list(model.parameters()))))  # int keys
    assert ckpt.state["optimizer"]["state"][0]["step"].shape == ()  # AdamW keeps a 0-d step tensor

    # RNG states restore exactly, in the forms the setters demand (random.setstate needs tuples).
    random.setstate(ckpt.state["rng"]["python"])
    np.random.set_state(ckpt.state["rng"]["numpy"])
    torch.set_rng_state(ckpt.state["rng"]["torch"])
    assert random.random() == expected_python
    assert np.random.rand() == expected_numpy
    assert torch.equal(torch.rand(3), expected_torch)
    numpy_state = ckpt.state["rng"]["numpy"]
    assert numpy_state[1].dtype == np.uint32 and np.array_equal(numpy_state[1], state["rng"]["numpy"][1])
    assert ckpt.state["rng"]["numpy_generator"] == state["rng"]["numpy_generator"]


def test_resumed_optimizer_continues_identically(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, optimizer, steps=3, seed=0)
    save_checkpoint(tmp_path, 3, {"model": model.state_dict()}, {"optimizer": optimizer.state_dict()})
    continued = _train_steps(model, optimizer, steps=4, seed=1)

    resumed_model = _model()
    resumed_optimizer = torch.optim.AdamW(resumed_model.parameters(), lr=1e-2, weight_decay=0.1)
    ckpt = load_checkpoint(tmp_path / "step_00000003")
    resumed_model.load_state_dict(ckpt.tensors["model"])
    resumed_optimizer.load_state_dict(ckpt.state["optimizer"])
    resumed = _train_steps(resumed_model, resumed_optimizer, steps=4, seed=1)

    assert resumed == continued
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_views_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"model": {"base": base, "alias": base, "transposed": base.T, "row": base[1], "empty": torch.zeros(0, 3)}}
    state = {"same_twice": [base, base], "grad": torch.ones(2, requires_grad=True) * 2}
    ckpt = load_checkpoint(save_checkpoint(tmp_path, 0, tensors, state))
    for key, value in tensors["model"].items():
        assert torch.equal(ckpt.tensors["model"][key], value), key
    assert torch.equal(ckpt.state["same_twice"][1], base)
    assert torch.equal(ckpt.state["grad"], torch.full((2,), 2.0))


def test_scalars_survive_safetensors_without_0d_support(tmp_path, monkeypatch):
    # Simulate an old safetensors release that cannot store 0-d tensors.
    monkeypatch.setattr(checkpoint_module, "_safetensors_keeps_scalars", lambda: False)
    tensors = {"model": {"scale": torch.tensor(3.0), "w": torch.ones(2)}}
    path = save_checkpoint(tmp_path, 1, tensors, {"t": torch.tensor(7)})
    assert load_file(path / "model.safetensors")["scale"].shape == (1,)  # stored as (1,) ...
    ckpt = load_checkpoint(path)
    assert ckpt.tensors["model"]["scale"].shape == ()  # ... and given back as 0-d
    assert ckpt.state["t"].shape == () and ckpt.state["t"].item() == 7


def test_unsupported_state_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError, match="set"):
        save_checkpoint(tmp_path, 1, {}, {"bad": {1, 2}})
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 1, {"state_tensors": {}}, {})
    assert list(tmp_path.iterdir()) == []


def test_leftover_tmp_dir_is_ignored(tmp_path):
    _save_simple(tmp_path, 1)
    # A crash mid-write leaves a half-written temporary directory behind.
    leftover = tmp_path / ".tmp_step_00000002_123_abcdef00"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stray tmp dir is normal and must not even warn
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
        assert load_checkpoint(tmp_path).step == 1


def test_crash_before_latest_update_still_loads(tmp_path):
    _save_simple(tmp_path, 1)
    _save_simple(tmp_path, 2)
    (tmp_path / "latest").write_text("step_00000001\n")  # as if we died before updating latest
    assert load_checkpoint(tmp_path).step == 1
    (tmp_path / "latest").unlink()
    assert load_checkpoint(tmp_path).step == 2  # no pointer: newest valid step


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_corrupt_safetensors_detected_and_skipped(tmp_path, damage):
    _save_simple(tmp_path, 1)
    bad = _save_simple(tmp_path, 2)
    target = bad / "model.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match="model.safetensors") as error:
        load_checkpoint(bad)
    assert ("size" if damage == "truncate" else "sha256") in str(error.value)

    with pytest.warns(UserWarning, match="model.safetensors"):
        assert find_latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    with pytest.warns(UserWarning):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and torch.equal(ckpt.tensors["model"]["w"], torch.full((2, 3), 1.0))


def test_missing_manifest_and_empty_root(tmp_path):
    bad = _save_simple(tmp_path / "run", 1)
    (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(bad)
    with pytest.warns(UserWarning):
        assert find_latest_checkpoint(tmp_path / "run") is None
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="verification"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    assert find_latest_checkpoint(tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "empty")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in (10, 20, 30, 40):
        _save_simple(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000030", "step_00000040"]
    assert load_checkpoint(tmp_path).step == 40
    # Re-saving an older step (after resuming from it) keeps that one even though its number is lower.
    _save_simple(tmp_path, 35, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000035", "step_00000040"]
    assert load_checkpoint(tmp_path).step == 35


def test_overwrite_same_step(tmp_path):
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.zeros(2)}}, {"v": 1})
    save_checkpoint(tmp_path, 5, {"model": {"w": torch.ones(2)}}, {"v": 2})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state == {"v": 2} and torch.equal(ckpt.tensors["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
