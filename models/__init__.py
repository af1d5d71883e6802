"""Physarum models: the GLM-4.x MoE architecture (training and KV-cache paths), HF checkpoint
I/O, blockwise FP8 and the trainer -> rollout weight-update message."""

from models.checkpoint import from_pretrained, save_pretrained
from models.config import PRESETS, ModelConfig, count_params, get_preset
from models.fp8 import (
    Fp8Linear,
    dequantize_blockwise,
    fp8_quantization_config,
    is_quantized_name,
    quantize_blockwise,
    quantize_model_,
)
from models.glm4moe import Glm4MoeForCausalLM, PackedOutput, TokenLogprobs
from models.kv_cache import KVCache
from models.moe import RoutingCapture, RoutingReplay
from models.weight_update import (
    WeightBucket,
    WeightUpdate,
    apply_weight_update,
    build_weight_update,
    decode_weight_update,
    encode_weight_update,
    iter_bucket_tensors,
)

__all__ = [
    "PRESETS",
    "Fp8Linear",
    "Glm4MoeForCausalLM",
    "KVCache",
    "ModelConfig",
    "PackedOutput",
    "RoutingCapture",
    "RoutingReplay",
    "TokenLogprobs",
    "WeightBucket",
    "WeightUpdate",
    "apply_weight_update",
    "build_weight_update",
    "count_params",
    "decode_weight_update",
    "dequantize_blockwise",
    "encode_weight_update",
    "fp8_quantization_config",
    "from_pretrained",
    "get_preset",
    "is_quantized_name",
    "iter_bucket_tensors",
    "quantize_blockwise",
    "quantize_model_",
    "save_pretrained",
]
