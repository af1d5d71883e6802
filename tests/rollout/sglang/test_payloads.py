"""Weight-sync payloads without a server: SGLang launch flags, the FP8 pairs a block-FP8 SGLang
server needs, the broadcast layout SGLang's receiver allocates, the disk format, and our
serialized buckets decoded by SGLang's own deserializer in the SGLang environment."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.services import SGLangConfig
from models.fp8 import is_quantized_name
from models.weight_update import build_weight_update, iter_bucket_tensors
from rollout.http_client import serialize_named_tensors
from rollout.sglang.payloads import (
    WeightSyncError,
    broadcast_layout,
    check_fp8_pairs,
    flattened_bucket,
    serialize_object,
)
from rollout.sglang.server import CPU_FLAGS, ServerArgs
from rollout.sglang.weight_sync import DiskSync, TensorSync

BLOCK = (32, 32)  # the toy model's linears are 32..128 wide: several blocks per weight

_DECODE = r"""
import json, sys
from sglang.srt.utils.common import MultiprocessingSerializer
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata
out = []
for line in open(sys.argv[1]):
    kind, payload = line.split(" ", 1)
    obj = MultiprocessingSerializer.deserialize(payload.strip())
    if kind == "flat":  # what the scheduler does for load_format="flattened_bucket"
        meta = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype,
                start_idx=m.start_idx, end_idx=m.end_idx, numel=m.numel) for m in obj["metadata"]]
        obj = FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"],
                                    metadata=meta).reconstruct_tensors()
    out.append({n: [str(t.dtype), list(t.shape), t.float().sum().item()] for n, t in obj})
print(json.dumps(out))
"""


def _summary(named) -> dict:
    return {n: [str(t.dtype), list(t.shape), t.float().sum().item()] for n, t in named}


def test_server_args_map_config_to_flags():
    cfg = SGLangConfig(tp=2, dtype="float32", mem_fraction_static=0.5, context_length=256)
    args = ServerArgs.from_config(cfg, model_path="/m", port=31234, max_total_tokens=2048)
    argv = args.to_argv()
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert pairs["--model-path"] == "/m" and pairs["--port"] == "31234"
    assert pairs["--tp-size"] == "2" and pairs["--dtype"] == "float32"
    assert pairs["--mem-fraction-static"] == "0.5" and pairs["--context-length"] == "256"
    assert pairs["--max-total-tokens"] == "2048" and pairs["--host"] == "127.0.0.1"
    assert "--quantization" not in argv and "--api-key" not in argv
    assert argv[-len(CPU_FLAGS) :] == list(CPU_FLAGS)
    assert args.command("/py")[1].endswith("cpu_launch.py")
    gpu = ServerArgs.from_config(
        SGLangConfig(cpu=False, quantization="fp8"), model_path="/m", port=1
    )
    assert gpu.command("/py")[1:3] == ["-m", "sglang.launch_server"]
    assert "--device" not in gpu.to_argv() and "--quantization" in gpu.to_argv()
    with pytest.raises(TypeError, match="unknown field"):
        ServerArgs.from_config(cfg, model_path="/m", port=1, max_tokens=5)
    # a key that starts with "-" (secrets.token_urlsafe makes one in 64) stays one argument
    keyed = ServerArgs.from_config(cfg, model_path="/m", port=1, api_key="-Xk_9")
    assert "--api-key=-Xk_9" in keyed.to_argv() and "-Xk_9" not in keyed.to_argv()


def test_fp8_update_has_the_pairs_a_block_fp8_server_loads(reference_model):
    update = build_weight_update(reference_model.hf_state_dict(), 3, fp8_block=BLOCK)
    named = [kv for b in update.buckets for kv in iter_bucket_tensors(b)]
    tensors = dict(named)
    quantized = [n for n, _ in reference_model.hf_state_dict() if is_quantized_name(n)]
    assert quantized and check_fp8_pairs(named, BLOCK) == len(quantized)
    for name in quantized:
        w, s = tensors[name], tensors[name + "_scale_inv"]
        assert name.endswith(".weight") and w.dtype == torch.float8_e4m3fn
        assert s.dtype == torch.float32
        assert tuple(s.shape) == (math.ceil(w.shape[0] / 32), math.ceil(w.shape[1] / 32))
    for name, t in tensors.items():  # norms, embeddings, router, lm_head are not FP8
        if name not in quantized and not name.endswith("_scale_inv"):
            assert t.dtype in (torch.bfloat16, torch.float32), name
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    names, dtypes, _, flat = broadcast_layout(update.buckets[0])
    assert "float8_e4m3fn" in dtypes and "float32" in dtypes
    sizes = [torch.empty((), dtype=getattr(torch, d)).element_size() for d in dtypes]
    assert sizes == sorted(sizes, reverse=True)  # every offset is a multiple of its itemsize
    assert flat.dtype == torch.uint8 and len(names) == len(update.buckets[0].names)


def test_check_fp8_pairs_names_the_broken_tensor():
    w = torch.zeros(64, 96).to(torch.float8_e4m3fn)
    with pytest.raises(WeightSyncError, match="has no a.weight_scale_inv"):
        check_fp8_pairs([("a.weight", w)], BLOCK)
    with pytest.raises(WeightSyncError, match=r"expected torch.float32 \(2, 3\)"):
        check_fp8_pairs([("a.weight", w), ("a.weight_scale_inv", torch.ones(2, 2))], BLOCK)
    with pytest.raises(WeightSyncError, match="has no b.weight"):
        check_fp8_pairs([("b.weight_scale_inv", torch.ones(1, 1))], BLOCK)
    assert check_fp8_pairs([("a.weight", w), ("a.weight_scale_inv", torch.ones(2, 3))], BLOCK) == 1


def test_disk_sync_writes_loadable_fp8_safetensors(reference_model, tmp_path: Path):
    update = build_weight_update(reference_model.hf_state_dict(), 5, fp8_block=BLOCK)
    sync = DiskSync(staging_dir=tmp_path, keep=1)
    path = sync.write(update)
    loaded = load_file(str(path / "model.safetensors"))
    named = dict(kv for b in update.buckets for kv in iter_bucket_tensors(b))
    assert set(loaded) == set(named)
    for name, t in named.items():
        assert loaded[name].dtype == t.dtype and torch.equal(
            loaded[name].view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)
        )
    update.version = 6
    assert sync.write(update).name == "v6" and [p.name for p in tmp_path.iterdir()] == ["v6"]


@pytest.mark.sglang
def test_sglang_deserializes_our_payloads(sglang_env, reference_model, tmp_path: Path):
    """Our serializer, without sglang, produces what SGLang's MultiprocessingSerializer and
    FlattenedTensorBucket read back: same names, dtypes (FP8 included), shapes and values."""
    TensorSync()  # sets the "file_system" sharing strategy, as the engine does
    bf16 = build_weight_update(reference_model.hf_state_dict(), 1, bucket_bytes=1 << 20)
    fp8 = build_weight_update(reference_model.hf_state_dict(), 2, fp8_block=BLOCK)
    plain = list(iter_bucket_tensors(bf16.buckets[0]))
    lines = [
        "flat " + serialize_object(flattened_bucket(bf16.buckets[0])),
        "flat " + serialize_object(flattened_bucket(fp8.buckets[0])),
        "plain " + serialize_named_tensors(plain),
    ]
    (tmp_path / "payloads.txt").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [str(sglang_env.python), "-c", _DECODE, str(tmp_path / "payloads.txt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = [_summary(plain), _summary(iter_bucket_tensors(fp8.buckets[0])), _summary(plain)]
    assert [list(g) for g in got] == [list(w) for w in want]  # same names, same order
    for g, w in zip(got, want):
        for name in w:
            assert g[name][:2] == w[name][:2], name
            assert g[name][2] == pytest.approx(w[name][2], rel=1e-6, abs=1e-6), name
    assert any(v[0] == "torch.float8_e4m3fn" for v in got[1].values())
