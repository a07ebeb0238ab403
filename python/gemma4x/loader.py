"""Safetensors checkpoint → model parameters, strictly.

Signature (stable; ``from_pretrained`` calls it): ``load_checkpoint(model, path, *, prefix,
device, dtype, ignore_patterns=(), progress=None)``. ``progress`` was added after the first
draft as an optional keyword; nothing else changed.

Contract with the model (``models/``) and the runtime's ``from_pretrained``:

* The caller builds the model on the **meta** device and calls
  ``load_checkpoint(model, path, prefix=..., device=..., dtype=..., ignore_patterns=...)``.
* Every parameter and every *persistent* buffer ``name`` is read from the checkpoint key
  ``prefix + name``. Floating-point tensors are materialised in ``dtype``; integer and bool
  tensors keep the dtype they were declared with, and so does any tensor marked
  ``keep_dtype = True`` (quantized weights and their scales: uint8, float8_e4m3fn, fp32).
  A ``keep_dtype`` tensor needs exactly its dtype in the checkpoint, except that a float
  one (fp32 scales) accepts any of F16/BF16/F32/F64. Tied parameters (one tensor under
  several names) stay tied: any one of their names present in the checkpoint fills them.
* Many keys into one tensor: a tensor carrying ``checkpoint_parts`` (a list of
  :class:`CheckpointPart`) is filled from those keys instead of its own name, each part
  by its own ``load(param, tensor)`` (typically a slice copy). Part keys are relative to
  the module that owns the tensor: per-expert NVFP4 tensors
  ``layers.3.experts.<e>.gate_proj.weight`` fill one fused ``layers.3.experts.gate_up_weight``.
  Missing/unexpected/shape/dtype checks apply to every part as to any key.
* A parameter (or buffer) carrying a ``weight_loader(param, tensor)`` attribute is filled by
  that callable instead of ``param.copy_(tensor)``; ``tensor`` is the checkpoint tensor on
  the target device in its checkpoint dtype. The shape checked against the checkpoint is
  ``param.checkpoint_shape`` when set (a loader that reshapes), else ``param.shape``.
  Python attributes of parameters (``weight_loader`` and friends) survive materialisation.
* Non-persistent buffers (rotary ``inv_freq``, embedding scales) are not in checkpoints.
  They are allocated on the device in the dtype they were declared with, and the loader
  then calls ``model.init_non_persistent_buffers()``, which the model must define when it
  has any such buffer on meta.
* ``ignore_patterns`` are regular expressions matched with ``re.search`` against full
  checkpoint keys; a matching key that the model does not want is skipped silently (KV
  weights of KV-shared layers, towers not loaded, a tied ``lm_head.weight``). They never
  excuse a *missing* tensor.
* A module holding its weights in another layout than the checkpoint's (NVFP4 layers packed
  for the SM90 kernels) defines ``restore_checkpoint_layout_()``; a reload into a real model
  calls it first, so the model's tensors are the checkpoint's again.

Every problem — missing, unexpected, wrong shape, unusable dtype, a corrupt or truncated
file, an inconsistent index — is reported as one :class:`CheckpointError` naming the
tensors and files, before any tensor data is read.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointPart",
    "TensorEntry",
    "load_checkpoint",
    "read_safetensors_header",
    "scan_checkpoint",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Progress bars only where a load takes long enough to want one.
_PROGRESS_MIN_BYTES = 1 << 30
# safetensors itself refuses headers above 100 MB; a larger length field means garbage.
_MAX_HEADER_BYTES = 100_000_000
# How many names of each kind of problem one error message lists.
_MAX_LISTED = 20

# safetensors dtype code → (bits per element, torch dtype or None when torch lacks it).
_ST_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {
    "BOOL": (8, torch.bool),
    "U8": (8, torch.uint8),
    "I8": (8, torch.int8),
    "U16": (16, getattr(torch, "uint16", None)),
    "I16": (16, torch.int16),
    "U32": (32, getattr(torch, "uint32", None)),
    "I32": (32, torch.int32),
    "U64": (64, getattr(torch, "uint64", None)),
    "I64": (64, torch.int64),
    "F16": (16, torch.float16),
    "BF16": (16, torch.bfloat16),
    "F32": (32, torch.float32),
    "F64": (64, torch.float64),
    "F8_E4M3": (8, getattr(torch, "float8_e4m3fn", None)),
    "F8_E5M2": (8, getattr(torch, "float8_e5m2", None)),
    "F8_E8M0": (8, getattr(torch, "float8_e8m0fnu", None)),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}
_FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
_INT_CODES = {"I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}
# Storage formats of quantized checkpoints (NVFP4 weights are packed uint8, scales float8).
_QUANT_CODES = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}


class CheckpointError(ValueError):
    """The checkpoint cannot fill the model: a tensor or file is missing, extra, malformed or mismatched."""


@dataclass(frozen=True)
class CheckpointPart:
    """One checkpoint key feeding part of a model tensor (see ``checkpoint_parts`` above).

    ``key`` is relative to the owning module (``"0.gate_proj.weight"``), ``shape`` the
    checkpoint tensor's shape, and ``load(param, tensor)`` writes it into ``param``.
    """

    key: str
    shape: tuple[int, ...]
    load: Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives, as declared by its file's header."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # byte offset inside the file's data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.dtype][0] // 8


# --------------------------------------------------------------------------------------
# Reading headers (our own parser: it lets us name the file and the fault, and it reads
# a few kilobytes per file, so validating a 50 GB checkpoint costs nothing).
# --------------------------------------------------------------------------------------


def read_safetensors_header(file: str | Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors header; returns entries keyed by tensor name.

    Checks: the 8-byte length field, the JSON, each entry's dtype/shape/offsets, that the
    byte ranges match the shapes, tile the data section without gaps or overlaps, and
    that the file is exactly as long as declared (a shorter one was truncated).
    """
    file = Path(file)

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"corrupt safetensors file {file}: {why}")

    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes is too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER_BYTES, size - 8):
                raise bad(f"header length field says {n} bytes but the file has {size - 8} after it")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {file}: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, expected an object")

    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {name!r} is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in _ST_DTYPES:
            raise bad(f"tensor {name!r} has unknown dtype {code!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise bad(f"tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        entry = TensorEntry(name, file, code, tuple(shape), offsets[0])
        if offsets[1] - offsets[0] != entry.nbytes:
            raise bad(
                f"tensor {name!r}: shape {tuple(shape)} {code} needs {entry.nbytes} bytes, "
                f"data_offsets span {offsets[1] - offsets[0]}"
            )
        entries[name] = entry
        spans.append((offsets[0], offsets[1], name))

    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {end} (gap or overlap)")
        end = stop
    if end != data_len:
        state = "truncated" if end > data_len else "has trailing bytes"
        raise bad(f"{state}: header declares {end} data bytes, file holds {data_len}")
    return entries


def _resolve_files(path: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of a checkpoint path, and its index file if sharded."""
    if path.is_file():
        if path.name.endswith(".index.json"):
            return [], path
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    index = path / INDEX_FILE
    if index.is_file():
        return [], index
    single = path / SINGLE_FILE
    if single.is_file():
        return [single], None
    found = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f"; found {found} but no {INDEX_FILE} to say which to use" if found else ""
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}")


def _read_index(index: Path) -> dict[str, Path]:
    """Key → shard file from an index, checking that every shard exists inside the checkpoint dir."""
    try:
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read checkpoint index {index}: {exc}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"checkpoint index {index} has no 'weight_map' object of key → file name")
    root = index.parent.resolve()
    files: dict[str, Path] = {}
    missing: list[str] = []
    for fname in sorted(set(weight_map.values())):
        f = (root / fname).resolve()
        if f.parent != root and root not in f.parents:
            raise CheckpointError(f"checkpoint index {index} points outside its directory: {fname!r}")
        if not f.is_file():
            missing.append(fname)
        files[fname] = f
    if missing:
        raise CheckpointError(f"checkpoint index {index} lists shard files that do not exist: {missing}")
    return {key: files[fname] for key, fname in weight_map.items()}


def scan_checkpoint(path: str | Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint (file, directory or index) with its location, validated.

    For a sharded checkpoint, the index decides which keys exist; each must be present in
    the shard the index names. Tensors a shard holds but the index omits are not listed.
    """
    files, index = _resolve_files(Path(path))
    if index is None:
        return read_safetensors_header(files[0])
    key_to_file = _read_index(index)
    headers = {f: read_safetensors_header(f) for f in sorted(set(key_to_file.values()))}
    absent = [f"{k} (index says {f.name})" for k, f in key_to_file.items() if k not in headers[f]]
    if absent:
        raise CheckpointError(
            f"checkpoint index {index} maps {len(absent)} keys to shards that do not contain them: "
            f"{_listing(absent)}"
        )
    return {k: headers[f][k] for k, f in key_to_file.items()}


# --------------------------------------------------------------------------------------
# Matching the model against the checkpoint
# --------------------------------------------------------------------------------------


@dataclass
class _Target:
    """One model tensor (all its tied names) and where it is held."""

    names: list[str]
    module_slots: list[tuple[nn.Module, str]]  # (owning module, attribute) for every alias
    meta: torch.Tensor  # the tensor as built (usually on meta)
    is_param: bool
    persistent: bool


def _collect_targets(model: nn.Module) -> list[_Target]:
    """Parameters and buffers of the model, tied aliases merged, in registration order."""
    by_id: dict[int, _Target] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for attr, t in module._parameters.items():
            if t is not None:
                _add_alias(by_id, t, pre + attr, module, attr, is_param=True, persistent=True)
        non_persistent = module._non_persistent_buffers_set
        for attr, t in module._buffers.items():
            if t is not None:
                _add_alias(by_id, t, pre + attr, module, attr, is_param=False, persistent=attr not in non_persistent)
    return list(by_id.values())


def _add_alias(by_id, t, name, module, attr, *, is_param, persistent) -> None:
    target = by_id.get(id(t))
    if target is None:
        by_id[id(t)] = _Target([name], [(module, attr)], t, is_param, persistent)
        return
    if (module, attr) not in target.module_slots:  # a module reached twice by two paths
        target.module_slots.append((module, attr))
    if name not in target.names:
        target.names.append(name)


def _target_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    if getattr(t, "keep_dtype", False):
        return t.dtype
    return dtype if t.is_floating_point() else t.dtype


def _dtype_problem(entry: TensorEntry, want: torch.dtype, exact: bool = False) -> str | None:
    """Why a checkpoint tensor cannot fill a tensor of dtype ``want``, or None if it can.

    ``exact``: a ``keep_dtype`` tensor (quantized storage): the checkpoint must hold that dtype.
    """
    code = entry.dtype
    if exact and not (want.is_floating_point and want.itemsize >= 2):
        have = _ST_DTYPES[code][1]
        if have != want:
            return f"checkpoint dtype {code} ({have}), expected exactly {want} for this quantized tensor"
        return None
    if code in _QUANT_CODES or (code == "U8" and want.is_floating_point):
        return (
            f"checkpoint dtype {code} is a quantized storage format but the model expects a {want} "
            f"tensor here (expected one of {sorted(_FLOAT_CODES)}): is the module missing from the "
            "quantization config, or listed in its exclude_modules?"
        )
    if want.is_floating_point:
        if code not in _FLOAT_CODES:
            return f"checkpoint dtype {code} cannot fill a {want} tensor (expected one of {sorted(_FLOAT_CODES)})"
        return None
    if want == torch.bool:
        return None if code == "BOOL" else f"checkpoint dtype {code} cannot fill a bool tensor"
    if code not in _INT_CODES or _ST_DTYPES[code][1] is None:
        return f"checkpoint dtype {code} cannot fill an integer tensor of dtype {want}"
    return None


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


# One checkpoint read: the target it fills, the entry, and a loader replacing the default fill.
_Read = tuple[_Target, TensorEntry, "Callable[[torch.Tensor, torch.Tensor], None] | None"]


def _plan(
    targets: list[_Target],
    entries: dict[str, TensorEntry],
    prefix: str,
    dtype: torch.dtype,
    ignore: list[re.Pattern[str]],
    where: Path,
) -> list[_Read]:
    """Pair every persistent target with its checkpoint entries; one error listing every problem."""
    plan: list[_Read] = []
    consumed: set[str] = set()
    missing: list[str] = []
    problems: list[str] = []

    def check(target: _Target, entry: TensorEntry, want_shape: tuple[int, ...]) -> None:
        loc = f"{entry.name!r} in {entry.file}"
        if entry.shape != want_shape:
            problems.append(
                f"shape mismatch for {loc}: checkpoint {list(entry.shape)}, model expects {list(want_shape)}"
            )
        exact = bool(getattr(target.meta, "keep_dtype", False))
        why = _dtype_problem(entry, _target_dtype(target.meta, dtype), exact)
        if why:
            problems.append(f"unusable dtype for {loc}: {why}")

    for target in targets:
        if not target.persistent:
            continue
        parts = getattr(target.meta, "checkpoint_parts", None)
        if parts is not None:
            module = target.names[0].rpartition(".")[0]
            base = prefix + (f"{module}." if module else "")
            for part in parts:
                key = base + part.key
                if key not in entries:
                    missing.append(key)
                    continue
                consumed.add(key)
                check(target, entries[key], tuple(part.shape))
                plan.append((target, entries[key], part.load))
            continue
        keys = [prefix + n for n in target.names]
        found = [k for k in keys if k in entries]
        if not found:
            missing.append(keys[0])
            continue
        consumed.update(found)  # every alias of a tied tensor present in the file is accounted for
        entry = entries[found[0]]
        declared = getattr(target.meta, "checkpoint_shape", None)
        check(target, entry, tuple(target.meta.shape if declared is None else declared))
        plan.append((target, entry, None))

    unexpected = [
        f"{k} (in {e.file.name})"
        for k, e in entries.items()
        if k not in consumed and not any(p.search(k) for p in ignore)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected tensors (no model tensor and no ignore pattern matches): "
            f"{_listing(unexpected)}"
        )
    if problems:
        parts.append(f"{len(problems)} tensors do not fit:\n    " + "\n    ".join(problems[:_MAX_LISTED]))
    if any(u.split(" ")[0].endswith(".weight_scale_2") for u in unexpected):
        parts.append(
            "hint: the unexpected tensors include NVFP4 scales (weight_scale_2) that no model tensor takes: "
            "does the checkpoint's hf_quant_config.json / config.json quantization_config exclude_modules "
            "cover modules that are quantized, or is the quantization config missing?"
        )
    if parts:
        raise CheckpointError(f"cannot load checkpoint {where} (key prefix {prefix!r}):\n  " + "\n  ".join(parts))
    return plan


# --------------------------------------------------------------------------------------
# Materialising and filling
# --------------------------------------------------------------------------------------


def _materialise(target: _Target, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Allocate the real tensor for one target and install it under every alias."""
    old = target.meta
    new_dtype = _target_dtype(old, dtype) if target.persistent else old.dtype
    if old.is_meta:
        data = torch.empty(old.shape, device=device, dtype=new_dtype)
    else:  # already real (e.g. a buffer built eagerly): move it, keeping its values
        data = old.detach().to(device=device, dtype=new_dtype)
    new: torch.Tensor = nn.Parameter(data, requires_grad=False) if target.is_param else data
    # weight_loader, checkpoint_shape and similar hints travel with the tensor.
    for k, v in getattr(old, "__dict__", {}).items():
        setattr(new, k, v)
    for module, attr in target.module_slots:
        if target.is_param:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new
    return new


def _open(file: Path, device: torch.device):
    from safetensors import SafetensorError, safe_open

    try:
        # Reading straight onto the GPU keeps the host side to one staging copy per tensor.
        dev = str(device) if device.type == "cuda" else "cpu"
        return safe_open(str(file), framework="pt", device=dev)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot open checkpoint file {file}: {exc}") from exc


def _fill(param: torch.Tensor, tensor: torch.Tensor, entry: TensorEntry, loader=None) -> None:
    loader = loader or getattr(param, "weight_loader", None)
    try:
        with torch.no_grad():
            if loader is not None:
                loader(param, tensor)
            else:
                param.copy_(tensor)  # casts on the target device
    except CheckpointError:
        raise
    except Exception as exc:  # a weight_loader rejecting the tensor names neither tensor nor file
        raise CheckpointError(f"loading {entry.name!r} from {entry.file} failed: {exc}") from exc


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    prefix: str,
    device: str | torch.device,
    dtype: torch.dtype,
    ignore_patterns: Sequence[str] = (),
    progress: bool | None = None,
) -> None:
    """Materialise ``model`` on ``device`` and fill it from the safetensors checkpoint at ``path``.

    Args:
        model: built on the meta device; its tensors are replaced in place.
        path: a checkpoint directory (``model.safetensors`` or ``model.safetensors.index.json``),
            a single ``.safetensors`` file, or an index file.
        prefix: prepended to model tensor names to form checkpoint keys
            (``"model.language_model."`` for ``gemma4``, ``"model."`` for ``gemma4_text``).
        device: where the model lives afterwards.
        dtype: floating-point dtype of parameters and persistent buffers.
        ignore_patterns: regexes (``re.search`` on full keys) of checkpoint tensors to skip.
        progress: force the progress bar on or off; by default it shows for loads over 1 GiB.

    Raises:
        CheckpointError: before any data is read, listing every missing / unexpected /
            mismatched tensor with its file; or naming the file that fails to read.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if isinstance(ignore_patterns, str):  # iterating a str would compile one pattern per character
        raise TypeError("ignore_patterns must be a sequence of regex strings, not a single string")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    path = Path(path)
    try:
        ignore = [re.compile(p) for p in ignore_patterns]
    except re.error as exc:
        raise ValueError(f"invalid ignore pattern: {exc}") from None

    entries = scan_checkpoint(path)
    for module in model.modules():
        restore = getattr(module, "restore_checkpoint_layout_", None)
        if callable(restore):
            restore()
    targets = _collect_targets(model)
    plan = _plan(targets, entries, prefix, dtype, ignore, path)

    pending_init = [t for t in targets if not t.persistent and t.meta.is_meta]
    if pending_init and not callable(getattr(model, "init_non_persistent_buffers", None)):
        names = _listing([t.names[0] for t in pending_init])
        raise TypeError(
            f"{type(model).__name__} has non-persistent buffers on meta ({names}) but no "
            "init_non_persistent_buffers() to compute them after loading"
        )

    real = {id(t): _materialise(t, device, dtype) for t in targets}

    # Read file by file in on-disk order: sequential I/O, each file opened once.
    plan.sort(key=lambda te: (str(te[1].file), te[1].offset))
    total = sum(e.nbytes for _, e, _ in plan)
    show = progress if progress is not None else total > _PROGRESS_MIN_BYTES
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}")
    try:
        for file, group in itertools.groupby(plan, key=lambda te: te[1].file):
            with _open(file, device) as handle:
                for target, entry, part_loader in group:
                    try:
                        tensor = handle.get_tensor(entry.name)
                    except Exception as exc:  # I/O error, or the file changed since it was scanned
                        raise CheckpointError(f"reading {entry.name!r} from {file} failed: {exc}") from exc
                    _fill(real[id(target)], tensor, entry, part_loader)
                    del tensor  # at most one checkpoint tensor alive at a time
                    if bar is not None:
                        bar.update(entry.nbytes)
    finally:
        if bar is not None:
            bar.close()

    if callable(getattr(model, "init_non_persistent_buffers", None)):
        model.init_non_persistent_buffers()
