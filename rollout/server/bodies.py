"""Request bodies of the control routes, field for field as SGLang 0.5.23's io_struct.py.

FastAPI validates them: a wrong type or an invalid `mode` is a 422 whose `detail` names the
field (SGLang's behaviour too, since its bodies are pydantic-validated). Unknown keys are
ignored, as SGLang does.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class BeginWeightUpdateReq(_Body):
    selector: Literal["target", "draft", "all"] = "all"


class EndWeightUpdateReq(_Body):
    pass


class UpdateWeightsFromTensorReq(_Body):
    serialized_named_tensors: list[str] = []  # one base64 payload per TP rank (we use [0])
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    selector: Literal["target", "draft", "all"] = "all"
    torch_empty_cache: bool = False
    # Physarum extension: base64 of models.weight_update.encode_weight_update(update)
    physarum_weight_update: str | None = None


class UpdateWeightFromDiskReq(_Body):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True


class UpdateWeightVersionReq(_Body):
    new_version: str
    abort_all_requests: bool = True


class PauseGenerationReq(_Body):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueGenerationReq(_Body):
    torch_empty_cache: bool = True


class AbortReq(_Body):
    rid: str | None = None
    abort_all: bool = False
