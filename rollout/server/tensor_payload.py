"""Decoding `/update_weights_from_tensor` payloads with a restricted unpickler.

SGLang's plain format is `MultiprocessingSerializer.serialize(list[(name, tensor)],
output_str=True)`: torch's ForkingPickler output, base64-encoded; CPU storages travel as
shared-memory file names (`rebuild_storage_filename`, the sender set the `file_system`
sharing strategy). Unpickling arbitrary data runs arbitrary code, so `RestrictedUnpickler`
resolves only plain containers, torch dtypes/sizes/storage classes and torch's tensor-rebuild
functions; anything else is refused with an error naming the global.

Our extension field `physarum_weight_update` carries instead the compact, pickle-free
`models.weight_update` encoding (base64 of `encode_weight_update(update)`).
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
from typing import Any

import torch

_TORCH_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("builtins", n)
        for n in ("bool", "bytes", "bytearray", "dict", "float", "int", "list", "str", "tuple")
    }
    | {("collections", "OrderedDict"), ("copyreg", "__newobj__")}
    | {("torch", n) for n in _TORCH_DTYPES}
    | {("torch", n) for n in ("Size", "Tensor", "device", "dtype", "UntypedStorage")}
    | {("torch.storage", n) for n in ("UntypedStorage", "TypedStorage", "_UntypedStorage")}
    | {("torch.nn.parameter", "Parameter")}
    | {("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")}
    | {("torch._tensor", "_rebuild_from_type_v2")}
    | {
        ("torch.multiprocessing.reductions", n)
        for n in (
            "rebuild_tensor",
            "rebuild_storage_filename",
            "rebuild_storage_fd",
            "rebuild_storage_empty",
            "rebuild_typed_storage",
            "rebuild_typed_storage_child",
        )
    }
)


class PayloadError(ValueError):
    """A weight payload that cannot be decoded; the message names the field and the cause."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals (see module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a weight payload")


def decode_named_tensors(payload: str | bytes, field: str = "serialized_named_tensors") -> list:
    """base64 SGLang MultiprocessingSerializer payload -> [(name, tensor)] (tensors copied
    out of shared memory so the sender may free them)."""
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"{field}: not valid base64 ({e})") from None
    import torch.multiprocessing  # noqa: F401  (the rebuild functions live there)

    try:
        obj = RestrictedUnpickler(io.BytesIO(raw)).load()
    except Exception as e:
        raise PayloadError(f"{field}: cannot unpickle: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        obj = list(obj.items())
    if not isinstance(obj, list | tuple) or not all(
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], str)
        and isinstance(item[1], torch.Tensor)
        for item in obj
    ):
        raise PayloadError(f"{field}: expected a list of (name, tensor) pairs")
    return [(name, tensor.clone()) for name, tensor in obj]


def decode_weight_update_field(payload: str, field: str = "physarum_weight_update") -> Any:
    """base64 of models.weight_update.encode_weight_update bytes -> WeightUpdate."""
    from models.weight_update import decode_weight_update

    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PayloadError(f"{field}: not valid base64 ({e})") from None
    try:
        return decode_weight_update(raw)
    except Exception as e:
        raise PayloadError(f"{field}: cannot decode: {type(e).__name__}: {e}") from None
