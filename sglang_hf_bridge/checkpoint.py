"""Reading and writing HF masked-LM checkpoint directories without running code from them.

safetensors first; ``.bin`` files only through ``torch.load(weights_only=True)`` (memory-mapped when
they are in torch's zip format, read whole when they are in the legacy format). ``config.json`` is
read as JSON first: ``auto_map`` (custom code) is refused before transformers sees the file, which
is then read with ``trust_remote_code=False``. Tokenizer files are only ever parsed as JSON/text
(the mask token id). Paths and configs are validated before any engine starts. Shared by the face
(validation, saving) and the engine's worker ranks (each reads the checkpoint itself), so it
belongs to neither.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from .errors import CheckpointError, CheckpointNotFoundError
from .sglang_models.families import SUPPORTED_MODEL_TYPES

logger = logging.getLogger(__name__)

NEUTRAL_HEAD_HINT = (
    "; give a BERT encoder the neutral masked-LM head with `python -m sglang_hf_bridge.convert --bert "
    "PATH --out DIR` (dense = identity, decoder tied to the word embeddings, bias 0) and load DIR"
)
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Format -> (its sharded index, its single file).
WEIGHT_FILES = {"safetensors": (SAFE_INDEX, "model.safetensors"), "bin": (BIN_INDEX, "pytorch_model.bin")}


@dataclass
class CheckpointFiles:
    directory: str
    weight_files: List[str]
    format: str  # "safetensors" | "bin"


def locate_checkpoint(path, use_safetensors: Optional[bool] = None) -> CheckpointFiles:
    """Validate ``path`` as a local HF checkpoint directory and list its weight files.

    ``use_safetensors`` as in transformers: ``None`` prefers safetensors, ``True`` requires them,
    ``False`` prefers ``.bin`` files."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"checkpoint path must be a local directory path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path!r} has no config.json: not a Hugging Face checkpoint")
    found = {fmt: _weight_files(path, fmt) for fmt in WEIGHT_FILES}
    for fmt in weight_formats(use_safetensors):
        if found[fmt]:
            return CheckpointFiles(path, found[fmt], fmt)
    if use_safetensors and found["bin"]:
        raise CheckpointError(
            f"use_safetensors=True but {path!r} has only pytorch_model.bin weights: pass use_safetensors=None "
            "(read with torch.load(weights_only=True)) or convert the checkpoint to safetensors"
        )
    raise CheckpointError(
        f"{path!r} has no model.safetensors or pytorch_model.bin (nor a sharded index)"
    )


def weight_formats(use_safetensors: Optional[bool]) -> Tuple[str, ...]:
    """Weight formats in transformers' order: ``None`` prefers safetensors, ``True`` requires them,
    ``False`` prefers ``.bin`` files."""
    if use_safetensors:
        return ("safetensors",)
    return ("bin", "safetensors") if use_safetensors is False else ("safetensors", "bin")


def index_shards(index_file: str) -> List[str]:
    """The shard file names a sharded checkpoint's index lists: plain names in the index's own
    directory (checked by name, not by resolved path: the HF cache's snapshot files are links)."""
    try:
        with open(index_file) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read the shard index {index_file!r}: {e}") from e
    for shard in shards:
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"shard {shard!r} listed in {index_file!r} lies outside the checkpoint")
    return shards


def _weight_files(path: str, fmt: str) -> List[str]:
    """The weight files of one format (a sharded index first, then the single file), or []."""
    index_name, single = WEIGHT_FILES[fmt]
    index = os.path.join(path, index_name)
    if os.path.isfile(index):
        files = [os.path.join(path, s) for s in index_shards(index)]
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"shard {f!r} listed in {index_name} is missing")
        return files
    f = os.path.join(path, single)
    return [f] if os.path.isfile(f) else []


def read_config_dict(path: str) -> Dict[str, Any]:
    """``config.json`` (of a directory, or the file itself) as plain JSON, never running code."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file!r} as JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file!r} is not a JSON object")
    return data


def refuse_remote_code(data: Dict[str, Any], where: str) -> None:
    """A config that asks for custom code (``auto_map``) is refused: the bridge never runs code
    from a checkpoint directory (transformers would import it, or ask whether to)."""
    auto_map = data.get("auto_map")
    if auto_map:
        targets = sorted(set(auto_map.values())) if isinstance(auto_map, dict) else auto_map
        raise CheckpointError(
            f"{where!r} declares auto_map (custom code: {targets}); the bridge never runs code from a checkpoint "
            "(trust_remote_code is not supported). Use a checkpoint with a built-in model_type: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )


def read_config(path: str, config_class=None):
    """The transformers config at ``path`` (a directory or a config.json), read with
    ``trust_remote_code=False`` after :func:`refuse_remote_code`: no prompt, no import from the
    directory. A config without ``model_type`` (written by transformers 2.x/3.x) is read as
    ``config_class``'s family, as ``BertForMaskedLM.from_pretrained`` reads it."""
    from transformers import AutoConfig

    data = read_config_dict(path)
    refuse_remote_code(data, path)
    model_type = data.get("model_type")
    if model_type is None and config_class is not None:
        reader = config_class
    elif model_type in SUPPORTED_MODEL_TYPES:
        reader = AutoConfig
    elif model_type is None:
        raise CheckpointError(f"{path!r}: config.json has no model_type; load it with the family's class "
                              "(SGLangBertForMaskedLM, SGLangRobertaForMaskedLM, ...)")
    else:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; expected one of {sorted(SUPPORTED_MODEL_TYPES)}")
    try:
        return reader.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - re-raise with the path named
        raise CheckpointError(f"cannot read the config in {path!r}: {e}") from e


def validate_masked_lm_config(config) -> None:
    """Raise CheckpointError unless ``config`` is of a supported family. ``architectures`` is not
    read: owners name their own classes there, and transformers decides the head by the tensors
    present (``modeling.load_plan``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; expected one of {sorted(SUPPORTED_MODEL_TYPES)}"
        )


def iter_checkpoint_tensors(files: CheckpointFiles, progress: bool = False,
                            skip: Iterable[str] = ()) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor not in ``skip``, one shard at a time."""
    skip = frozenset(skip)
    shards = files.weight_files
    if progress and len(shards) > 1:
        from transformers.utils.logging import tqdm

        shards = tqdm(shards, desc="Loading checkpoint shards")
    for shard in shards:
        if files.format == "safetensors":
            with _open_safetensors(shard) as f, _SafetensorsReader(shard) as reader:
                for name in f.keys():
                    if name not in skip:
                        yield name, reader.read(f, name)
        else:
            for name, tensor in load_bin(shard).items():
                if name not in skip:
                    yield name, tensor


def iter_engine_tensors(files: CheckpointFiles, skip: Iterable[str] = (), extra_files: Iterable[str] = (),
                        progress: bool = False) -> Iterator[Tuple[str, torch.Tensor]]:
    """What a rank loads: the checkpoint's tensors (less ``skip``), then those of ``extra_files``
    (safetensors the library wrote: a newly initialised task head)."""
    yield from iter_checkpoint_tensors(files, progress=progress, skip=skip)
    extra = list(extra_files)
    if extra:
        yield from iter_checkpoint_tensors(CheckpointFiles(os.path.dirname(extra[0]), extra, "safetensors"))


@contextlib.contextmanager
def _open_safetensors(path: str):
    """``safe_open`` whose failures (empty, truncated, corrupt header) name the file."""
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError: name the file
        raise CheckpointError(f"cannot read {path!r} as safetensors (empty, truncated or corrupt?): {e}") from e
    with handle as f:
        yield f


def _read_tensor(f, name: str, path: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - name the file and the tensor
        raise CheckpointError(f"cannot read tensor {name!r} from {path!r}: {e}") from e


# safetensors' dtype names -> torch dtypes this reader copies itself (anything else: ``get_tensor``).
_SAFETENSORS_DTYPES = {
    name: getattr(torch, attr) for name, attr in (
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("I32", "int32"), ("I64", "int64"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F32", "float32"), ("F64", "float64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)
}


class _SafetensorsReader:
    """Each tensor of a safetensors file read into memory of its own (``readinto``), not handed out
    as a view of the file's memory map.

    ``safe_open(...).get_tensor`` returns views of one ``mmap`` of the file that lives as long as the
    handle (here: the whole shard): every page a consumer has read stays in this process's resident
    set until the handle closes, so loading a shard into the engine held the engine's copy AND the
    whole shard's pages at once (roberta-base float32: +476 MiB at the peak, see docs/memory.md). Read
    this way, the only transient is the one tensor the consumer is copying; the page cache still
    serves the reads, but it is not this process's memory. The file is validated by ``safe_open``
    first (the caller opens it); this reads the same header for the byte offsets and cross-checks
    every entry against ``safe_open``'s own dtype and shape, falling back to ``get_tensor`` for a
    dtype it does not copy itself, a mismatch, or a big-endian host (safetensors is little-endian)."""

    def __init__(self, path: str):
        self.path = path
        self.file = None
        self.header: Dict[str, Any] = {}
        self.data_start = 0

    def __enter__(self) -> "_SafetensorsReader":
        import sys

        if sys.byteorder != "little":
            return self
        try:
            self.file = open(self.path, "rb", buffering=0)
            size = int.from_bytes(self.file.read(8), "little")
            header = json.loads(self.file.read(size))
        except (OSError, ValueError) as e:
            self.close()
            raise CheckpointError(f"cannot read the safetensors header of {self.path!r}: {e}") from e
        self.header = header if isinstance(header, dict) else {}
        self.data_start = 8 + size
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _entry(self, f, name: str) -> Optional[Tuple[torch.dtype, Tuple[int, ...], int, int]]:
        """``(dtype, shape, start, nbytes)`` when the header entry agrees with ``safe_open``, else None."""
        entry = self.header.get(name) if self.file is not None else None
        if not isinstance(entry, dict):
            return None
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if dtype is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            return None
        view = f.get_slice(name)
        if view.get_dtype() != entry["dtype"] or list(view.get_shape()) != shape:
            return None
        begin, end = offsets
        numel = 1
        for n in shape:
            numel *= n
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                and end - begin == numel * dtype.itemsize):
            return None
        return dtype, tuple(shape), self.data_start + begin, end - begin

    def read(self, f, name: str) -> torch.Tensor:
        entry = self._entry(f, name)
        if entry is None:
            return _read_tensor(f, name, self.path)
        dtype, shape, start, nbytes = entry
        tensor = torch.empty(shape, dtype=dtype)
        if nbytes:
            buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
            self.file.seek(start)
            done = 0
            while done < nbytes:
                got = self.file.readinto(buffer[done:])
                if not got:
                    raise CheckpointError(f"cannot read tensor {name!r} from {self.path!r}: the file ends early")
                done += got
        return tensor


def checkpoint_tensor_shapes(files: CheckpointFiles) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor, from the safetensors headers (no data read) or the ``.bin``
    state dicts (memory-mapped where torch's zip format allows)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for shard in files.weight_files:
        if files.format == "safetensors":
            with _open_safetensors(shard) as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        else:
            shapes.update((name, tuple(t.shape)) for name, t in load_bin(shard).items())
    return shapes


def load_bin(path: str) -> Dict[str, torch.Tensor]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``: memory-mapped in torch's
    zip format, read whole in the legacy (pre-1.6) format that ``mmap`` cannot open."""
    mmap = zipfile.is_zipfile(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - name the file; weights_only refusals say what they met
        raise CheckpointError(f"cannot read {path!r} with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return state


def checkpoint_tensor_names(files: CheckpointFiles) -> List[str]:
    return list(checkpoint_tensor_shapes(files))


def write_tensors_file(tensors: Dict[str, torch.Tensor], directory: str) -> str:
    """``tensors`` as ``directory/new_tensors.safetensors`` (contiguous CPU copies); its path."""
    from safetensors.torch import save_file

    path = os.path.join(directory, "new_tensors.safetensors")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)
    return path


def write_safetensors(state: Dict[str, torch.Tensor], directory: str, config) -> None:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(directory)


# ---------------------------------------------------------------------- the tokenizer's mask token
# Parsed as JSON/text only: a tokenizer is never instantiated (no code, no sentencepiece).
DEFAULT_MASK_TOKENS = ("<mask>", "[MASK]")  # RobertaTokenizer's and BertTokenizer's defaults


def _json_file(directory: str, name: str) -> Optional[Any]:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s while looking for the mask token: %s", path, e)
        return None


def _token_content(token) -> Optional[str]:
    """A special token as tokenizer files write it: a string or an AddedToken dict."""
    if isinstance(token, str):
        return token
    if isinstance(token, dict) and isinstance(token.get("content"), str):
        return token["content"]
    return None


def _vocab_lookups(directory: str, tokenizer_config, tokenizer_json):
    """``(file name, {token: id})`` tables, most specific first."""
    if isinstance(tokenizer_config, dict) and isinstance(tokenizer_config.get("added_tokens_decoder"), dict):
        table = {}
        for key, tok in tokenizer_config["added_tokens_decoder"].items():
            content = _token_content(tok)
            if content is not None and str(key).lstrip("-").isdigit():
                table[content] = int(key)
        yield "tokenizer_config.json added_tokens_decoder", table
    if isinstance(tokenizer_json, dict):
        added = tokenizer_json.get("added_tokens")
        if isinstance(added, list):
            yield "tokenizer.json added_tokens", {
                t["content"]: t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)
                and isinstance(t.get("content"), str)}
        vocab = (tokenizer_json.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            yield "tokenizer.json vocab", vocab
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], the index is the id
            yield "tokenizer.json vocab", {
                e[0]: i for i, e in enumerate(vocab) if isinstance(e, (list, tuple)) and e and isinstance(e[0], str)}
    vocab_json = _json_file(directory, "vocab.json")
    if isinstance(vocab_json, dict):
        yield "vocab.json", vocab_json
    vocab_txt = os.path.join(directory, "vocab.txt")
    if os.path.isfile(vocab_txt):
        with open(vocab_txt, encoding="utf-8") as f:
            yield "vocab.txt", {line.rstrip("\n"): i for i, line in reversed(list(enumerate(f)))}


def read_mask_token_id(directory: str, vocab_size: int) -> Optional[Tuple[int, str]]:
    """``(id, where it was found)`` of the mask token the checkpoint's tokenizer files declare
    (``tokenizer_config.json`` / ``special_tokens_map.json`` ``mask_token``, else the tokenizer
    classes' defaults ``<mask>`` / ``[MASK]``), resolved through ``added_tokens_decoder``,
    ``tokenizer.json`` (added tokens, vocabulary), ``vocab.json`` or ``vocab.txt``. ``None`` when
    the directory has no such files or the token is not in them."""
    tokenizer_config = _json_file(directory, "tokenizer_config.json")
    special = _json_file(directory, "special_tokens_map.json")
    declared = [(_token_content(d.get("mask_token")), name) for d, name in
                ((tokenizer_config, "tokenizer_config.json"), (special, "special_tokens_map.json"))
                if isinstance(d, dict)]
    declared = [(tok, name) for tok, name in declared if tok]
    candidates = declared or [(tok, "the tokenizer default") for tok in DEFAULT_MASK_TOKENS]
    tables = list(_vocab_lookups(directory, tokenizer_config, _json_file(directory, "tokenizer.json")))
    for token, declared_in in candidates:
        for table_name, table in tables:
            token_id = table.get(token)
            if not isinstance(token_id, int) or isinstance(token_id, bool):
                continue
            if not 0 <= token_id < vocab_size:
                logger.warning("ignoring mask token %r = %d from %s: outside the vocabulary [0, %d)",
                               token, token_id, table_name, vocab_size)
                continue
            return token_id, f"{token!r} ({declared_in}, id from {table_name})"
    return None
