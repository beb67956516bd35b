"""Re-save a CTranslate2 Whisper model with int8 weights, to carry it where a
transfer is size-limited (the lent GPU machine takes 64 MiB per call; the
embedded tiny.en is 75 MB in float16, 40 MB in int8).

CTranslate2 converts weights to the compute type asked for at load time, so a
GPU run can still load this file with ``--asr-compute-type float16``: the
arithmetic is float16, the weights carry int8 rounding (the report says so).
There is no CTranslate2 API to read a saved model back into a spec, so this
parses ``model.bin`` (the layout written by ``ctranslate2.specs.ModelSpec``),
fills a ``WhisperSpec`` with it and lets CTranslate2's own quantizer and writer
do the rest.

    python -m benchmarks.gpu.shrink_whisper SRC_DIR OUT_DIR [--quantization int8]
"""

from __future__ import annotations

import argparse
import re
import shutil
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Order of include/ctranslate2/types.h DataType (as ctranslate2.specs writes it).
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


def _string(f: BinaryIO) -> str:
    (length,) = struct.unpack("H", f.read(2))
    return f.read(length)[:-1].decode("utf-8")


def read_model_bin(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """model.bin -> ({variable name: array}, {alias: variable name})."""
    with path.open("rb") as f:
        (version,) = struct.unpack("I", f.read(4))
        if version < 5:
            raise ValueError(f"{path}: model.bin version {version} is not supported (need >= 5)")
        _string(f)  # model name
        struct.unpack("I", f.read(4))  # revision
        (count,) = struct.unpack("I", f.read(4))
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = _string(f)
            (rank,) = struct.unpack("B", f.read(1))
            shape = struct.unpack(f"{rank}I", f.read(4 * rank)) if rank else ()
            (dtype_id,) = struct.unpack("B", f.read(1))
            (num_bytes,) = struct.unpack("I", f.read(4))
            raw = f.read(num_bytes)
            dtype = _DTYPES[dtype_id]
            if dtype == "bfloat16":
                raise ValueError(f"{path}: bfloat16 variables are not supported here")
            variables[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
        aliases: dict[str, str] = {}
        (n_alias,) = struct.unpack("I", f.read(4))
        for _ in range(n_alias):
            alias = _string(f)
            aliases[alias] = _string(f)
    return variables, aliases


def _layers(variables: dict[str, np.ndarray], stack: str) -> int:
    found = {m.group(1) for n in variables if (m := re.match(stack + r"/layer_(\d+)/", n))}
    return 1 + max(int(i) for i in found)


def shrink(src: Path, out: Path, quantization: str = "int8") -> None:
    from ctranslate2.specs import WhisperSpec
    from ctranslate2.specs.model_spec import NumpyVariable, index_spec

    variables, aliases = read_model_bin(src / "model.bin")
    n_enc = _layers(variables, "encoder")
    n_dec = _layers(variables, "decoder")
    # Heads are not stored; Whisper's head size is 64 in every released size.
    d_model = variables["encoder/layer_norm/gamma"].shape[0]
    spec = WhisperSpec(n_enc, d_model // 64, n_dec, d_model // 64)
    for name, array in {**variables, **{a: variables[v] for a, v in aliases.items()}}.items():
        scope, attr = name.rsplit("/", 1)
        setattr(index_spec(spec, scope), attr, NumpyVariable(array))
    vocabulary = (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    spec.register_vocabulary(vocabulary[:-1] if vocabulary[-1] == "" else vocabulary)
    spec.validate()  # turns the spec's own Python scalars into variables, as the converters do
    spec.optimize(quantization=quantization)
    out.mkdir(parents=True, exist_ok=True)
    spec._serialize(str(out / "model.bin"))  # the writer CTranslate2's converters use
    for extra in src.iterdir():  # config, vocabulary, tokenizer: unchanged
        if extra.name != "model.bin":
            shutil.copy(extra, out / extra.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quantization", default="int8")
    ns = parser.parse_args()
    shrink(ns.src, ns.out, ns.quantization)
    print(f"{ns.out / 'model.bin'}: {(ns.out / 'model.bin').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
