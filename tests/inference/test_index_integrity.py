"""A search index is never trusted blindly, and queries are checked (issue 13, classes 3 and 6).

Every damaged index below is refused through ``mama search`` with exit code 2 and a message naming the
file, never a traceback or a silent ranking; an index built by one model is refused with another one
exported over it; ``mama export`` replaces an existing folder only with ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.cli import main
from mama.config import load_config
from mama.inference.embed import Encoder, build_index, list_inputs, load_index, search
from mama.tasks import train

pytestmark = pytest.mark.slow

QUERY = "a red circle moves left"


@pytest.fixture(scope="module")
def setup(tiny_synthvl: Path, tiny_overrides: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs A and B (different seeds), A exported, and an index of 6 videos built with it."""
    out = tmp_path_factory.mktemp("integrity")
    torch.set_num_threads(1)
    for name, seed in (("run_a", 0), ("run_b", 1)):
        train(load_config(None, [*tiny_overrides(tiny_synthvl, out / name), "train.steps=2", f"train.seed={seed}"]))
    assert main(["export", "--checkpoint", str(out / "run_a"), "--out", str(out / "model")]) == 0
    videos = out / "videos"
    videos.mkdir()
    for path in sorted((tiny_synthvl / "videos").rglob("*.mp4"))[:6]:
        shutil.copy(path, videos / path.name)
    index = out / "index"
    argv = ["embed", "--model", str(out / "model"), "--videos", str(videos), "--out", str(index), "--no-progress"]
    assert main(argv) == 0
    return {"run_a": out / "run_a", "run_b": out / "run_b", "model": out / "model", "videos": videos, "index": index}


@pytest.fixture
def index(setup: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the intact index, to damage."""
    return Path(shutil.copytree(setup["index"], tmp_path / "index"))


def _search_cli(index: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["search", QUERY, "--index", str(index), *args])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def _rechecksum(index: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in index.json, as if the damage had been done before indexing."""
    manifest = json.loads((index / "index.json").read_text())
    data = (index / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (index / "index.json").write_text(json.dumps(manifest))


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_embeddings(path: Path, emb: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"embeddings": emb.contiguous()}, str(path))


def test_the_manifest_holds_checksums_and_the_model_fingerprint(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    info = json.loads((setup["index"] / "index.json").read_text())
    assert info["format"] == "mama-index" and info["num_videos"] == 6
    assert set(info["files"]) == {"videos.safetensors", "videos.jsonl", "videos.faiss", "failed.txt"}
    assert info["vector_index"] == {
        "file": "videos.faiss",
        "type": "flat",
        "metric": "inner_product",
        "params": {},
        "requested": "auto",
        "faiss_version": info["vector_index"]["faiss_version"],
    }
    for name, record in info["files"].items():
        data = (setup["index"] / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    fingerprint = info["model_fingerprint"]
    assert fingerprint == Encoder.from_pretrained(setup["model"]).fingerprint()
    assert set(fingerprint["weights"]) == {"model.safetensors"} and fingerprint["tokenizer"]
    assert fingerprint["settings"]["num_frames"] == 4 and fingerprint["settings"]["model"]["frame_size"] == 16
    code, out, _ = _search_cli(setup["index"], capsys, "--top-k", "3")
    assert code == 0 and out.count("\n") == 4


def test_a_flipped_byte_in_the_embeddings_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = index / "videos.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the exponent byte of the last float32: about 0.3 becomes about 1e38
    path.write_bytes(bytes(data))
    code, out, err = _search_cli(index, capsys)
    assert code == 2 and out == ""
    assert str(path) in err and "sha256" in err


def test_a_corrupt_faiss_index_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = index / "videos.faiss"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one stored vector changes; FAISS itself would read it without complaint
    path.write_bytes(bytes(data))
    code, out, err = _search_cli(index, capsys)
    assert code == 2 and out == "" and str(path) in err and "sha256" in err
    with pytest.raises(ValueError, match="videos.faiss: sha256 differs"):
        load_index(index)
    _rechecksum(index, "videos.faiss")  # written that way: its vectors no longer match the embeddings
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(path) in err and "differ from the embeddings in videos.safetensors" in err


def test_a_faiss_index_of_other_rows_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mama.inference.vector_index import VectorIndex

    _, emb, _ = load_index(index)
    VectorIndex.build(emb[:4].numpy(), "flat").save(index / "videos.faiss")
    _rechecksum(index, "videos.faiss")
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and "videos.faiss: 4 vectors of width 16, but videos.safetensors holds 6 embeddings" in err
    VectorIndex.build(emb.numpy(), "hnsw").save(index / "videos.faiss")
    _rechecksum(index, "videos.faiss")
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and "videos.faiss: a IndexHNSWFlat, not the flat inner-product index expected" in err


def test_an_index_written_before_faiss_is_searched_exactly(
    index: Path, setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((index / "index.json").read_text())
    del manifest["vector_index"], manifest["files"]["videos.faiss"]
    (index / "index.json").write_text(json.dumps(manifest))
    (index / "videos.faiss").unlink()
    assert search(index, [QUERY], top_k=6) == search(setup["index"], [QUERY], top_k=6)


def test_a_truncated_embeddings_file_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = index / "videos.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(path) in err and "truncated" in err
    _rechecksum(index, "videos.safetensors")  # even with a matching checksum it is refused, not a traceback
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(path) in err and "unreadable" in err


def test_a_rows_file_shorter_than_the_embeddings_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = index / "videos.jsonl"
    rows.write_text("".join(rows.read_text().splitlines(keepends=True)[:-1]))
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(rows) in err
    _rechecksum(index, "videos.jsonl")
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(rows) in err and "5 rows, but videos.safetensors holds 6 embeddings" in err


@pytest.mark.parametrize(("damage", "message"), [("inf", "NaN or infinite"), ("scale", "not L2-normalised")])
def test_non_finite_or_non_unit_embeddings_are_refused(
    index: Path, capsys: pytest.CaptureFixture[str], damage: str, message: str
) -> None:
    """Damage that passes the checksum (the file was written that way) is still caught row by row."""
    _, emb, _ = load_index(index)
    emb = emb.clone()
    if damage == "inf":
        emb[2, 0] = float("inf")
    else:
        emb[2] *= 1e27
    _save_embeddings(index / "videos.safetensors", emb)
    _rechecksum(index, "videos.safetensors")
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(index / "videos.safetensors") in err and message in err


def test_an_index_without_checksums_is_refused(index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = json.loads((index / "index.json").read_text())
    old = {k: manifest[k] for k in ("model", "num_frames", "dim", "num_videos", "num_failed")}
    (index / "index.json").write_text(json.dumps(old))  # what an index looked like before checksums
    code, _, err = _search_cli(index, capsys)
    assert code == 2 and str(index / "index.json") in err and "older mama" in err


def test_an_index_refuses_another_model_exported_over_its_own(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, index = tmp_path / "model", tmp_path / "index"
    assert main(["export", "--checkpoint", str(setup["run_a"]), "--out", str(model)]) == 0
    embed = ["embed", "--model", str(model), "--videos", str(setup["videos"]), "--out", str(index), "--no-progress"]
    assert main(embed) == 0
    assert _search_cli(index, capsys)[0] == 0

    assert main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(model), "--overwrite"]) == 0
    code, out, err = _search_cli(index, capsys)
    assert code == 2 and out == ""
    assert str(index / "index.json") in err and "another model" in err and "weights differ" in err
    with pytest.raises(ValueError, match="another model"):  # an encoder given to the library, too
        search(index, [QUERY], encoder=Encoder.from_pretrained(setup["run_b"]))
    with pytest.raises(ValueError, match="; settings differ"):  # the same model with other frames
        search(index, [QUERY], encoder=Encoder.from_pretrained(setup["model"], num_frames=2))
    before = _folder_bytes(index)
    code = main([*embed, "--append"])  # appending with the new model is refused too, and changes nothing
    err = capsys.readouterr().err
    assert code == 2 and str(index / "index.json") in err and "cannot append to this index" in err
    assert "weights differ" in err and _folder_bytes(index) == before


def test_export_refuses_an_existing_folder_without_overwrite(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    before = _folder_bytes(model)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(model)]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "--overwrite" in err and "Traceback" not in err
    assert _folder_bytes(model) == before

    notes = tmp_path / "notes"  # --overwrite replaces a model folder, never a folder of something else
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(notes), "--overwrite"]) == 2
    assert str(notes) in capsys.readouterr().err and (notes / "todo.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(empty)]) == 0


def test_an_overwrite_that_crashes_leaves_the_old_model(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    before = _folder_bytes(model)

    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("killed while writing the weights")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="killed"):
        main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(model), "--overwrite"])
    assert _folder_bytes(model) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_resumed_embedding_redoes_a_corrupt_part(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = Encoder.from_pretrained(setup["model"])
    videos, _ = list_inputs(videos=setup["videos"])
    calls: list[int] = []
    real = Encoder.encode_videos

    def crash_on_third_part(self: Encoder, paths: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, paths, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_videos", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        build_index(encoder, videos, tmp_path / "index", part_size=2, progress=False)
    part = tmp_path / "index" / "parts" / "part_00000.safetensors"
    data = bytearray(part.read_bytes())
    data[-1] ^= 0x40
    part.write_bytes(bytes(data))
    calls.clear()
    with pytest.warns(UserWarning, match="embedding part part_00000.safetensors again: .*sha256"):
        build_index(encoder, videos, tmp_path / "index", part_size=2, progress=False)
    assert calls == [2, 2], "the corrupt part and the one in flight are embedded again"
    _, emb, _ = load_index(tmp_path / "index")
    torch.testing.assert_close(emb, load_index(setup["index"])[1])


def test_a_resumed_embedding_drops_the_parts_of_a_model_exported_over_its_own(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted with model A, resumed after model B was exported into the same folder: no part of A is kept."""
    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    videos, _ = list_inputs(videos=setup["videos"])
    calls: list[int] = []
    real = Encoder.encode_videos

    def crash_on_third_part(self: Encoder, paths: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(paths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, paths, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode_videos", crash_on_third_part)
    with pytest.raises(KeyboardInterrupt):
        build_index(Encoder.from_pretrained(model), videos, tmp_path / "index", part_size=2, progress=False)
    monkeypatch.setattr(Encoder, "encode_videos", real)
    assert main(["export", "--checkpoint", str(setup["run_b"]), "--out", str(model), "--overwrite"]) == 0
    model_b = Encoder.from_pretrained(model)
    build_index(model_b, videos, tmp_path / "index", part_size=2, progress=False)
    _, emb, _ = load_index(tmp_path / "index")
    torch.testing.assert_close(emb, real(model_b, [path for _, path in videos])[0])


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_an_empty_query_is_refused(setup: dict[str, Path], capsys: pytest.CaptureFixture[str], query: str) -> None:
    capsys.readouterr()
    assert main(["search", query, "--index", str(setup["index"])]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="query 2 is empty"):
        search(setup["index"], ["a red circle", query])
    with pytest.raises(ValueError, match="no query"):
        search(setup["index"], [])


@pytest.mark.parametrize("top_k", ["0", "-1", "abc", "1.5"])
def test_top_k_must_be_a_positive_integer(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str], top_k: str
) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["search", QUERY, "--index", str(setup["index"]), "--top-k", top_k])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--top-k: expected a positive integer" in err and "Traceback" not in err
    if top_k.lstrip("-").isdigit():
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            search(setup["index"], [QUERY], top_k=int(top_k))


def test_a_top_k_above_the_index_size_shows_every_video(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _search_cli(setup["index"], capsys, "--top-k", "50", "--json")
    assert code == 0 and "holds 6 videos, fewer than --top-k 50" in err
    assert [hit["rank"] for hit in json.loads(out)[0]["results"]] == [1, 2, 3, 4, 5, 6]
