"""The GGUF -> HF folder conversion for vLLM (llm/models.py) when two
processes convert the same model at once (two replicas on one data
directory). The conversion itself takes minutes and runs in
tests/test_vllm_engine.py; here a stand-in writes the folder, so the race
can be put on cue."""

from __future__ import annotations

from pathlib import Path

import pytest

import llm.models
from llm.models import CONVERSION_VERSION, hf_folder_for_vllm


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path: Path, monkeypatch) -> None:
    """The other process renamed its folder into place while this one
    converted, and may be loading it: this one used to delete it (it only
    checked that the target existed) and put its own in its place."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "data" / "vllm-models" / "model"

    def convert_while_the_other_finishes(source: Path, out: Path) -> None:
        (out / "weights").write_text("this process's")
        (out / llm.models._MARKER).write_text(CONVERSION_VERSION + "\n")
        # Meanwhile the other process's conversion lands.
        target.mkdir(parents=True)
        (target / "weights").write_text("the other process's")
        (target / llm.models._MARKER).write_text(CONVERSION_VERSION + "\n")

    monkeypatch.setattr(llm.models, "_convert", convert_while_the_other_finishes)
    assert hf_folder_for_vllm(gguf, tmp_path / "data") == target
    assert (target / "weights").read_text() == "the other process's"
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # its own copy is gone


def test_a_stale_conversion_is_replaced(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "data" / "vllm-models" / "model"
    target.mkdir(parents=True)
    (target / llm.models._MARKER).write_text("an older version\n")

    def convert(source: Path, out: Path) -> None:
        (out / llm.models._MARKER).write_text(CONVERSION_VERSION + "\n")

    monkeypatch.setattr(llm.models, "_convert", convert)
    assert hf_folder_for_vllm(gguf, tmp_path / "data") == target
    assert (target / llm.models._MARKER).read_text().strip() == CONVERSION_VERSION
    with pytest.raises(FileNotFoundError):
        hf_folder_for_vllm(tmp_path / "missing.gguf", tmp_path / "data")
