"""The megatron-core training backend for GLM-4.x MoE (TP / PP / EP / DP).

Modules:
  arch            HF config.json keys -> GlmArch (no torch, no megatron)
  spec, norm,     the GLM-4.x layer spec: dense then MoE layers, GQA with QKV bias and qk-norm,
  core_attention  partial RoPE; our SP-capable RMSNorm and packed (THD) attention without TE
  model           process groups, TransformerConfig, this pipeline stage's GPTModel
  convert,        HF <-> megatron tensor rules (QKV interleave, [gate; up], TP/EP/PP sharding),
  weights         loading an HF state dict, exporting full HF tensors (gathered over TP/EP/PP)
  hf_checkpoint   a lazy per-name view of a safetensors checkpoint directory
  inputs          PackedBatch -> megatron THD inputs; the data-parallel split
  logprobs        vocab-parallel logprobs and entropy
  router_stats    expert-load counts (padding excluded) and the step's moe/* metrics
  routing         routing replay (record in the logprob pass, force in training)
  step            the trainer service's StepBatch -> passes, advantages (gathered over ranks)
  optimizer       megatron's (distributed, optionally CPU-offloaded) Adam on our LR schedule
  checkpoint      megatron dist_checkpointing save/load of model + optimizer
  backend         MegatronBackend (the TrainerBackend) and build_megatron_backend
  memory_plan     per-GPU memory of a parallel plan (no torch, no megatron)

GPU paths, chosen by `trainer.megatron` (configs/services.py) and untested on this CPU-only
machine: `transformer_engine: true` uses megatron's TransformerEngine layer spec (TE linears
with fused norms, TE flash attention on THD packed sequences, TENorm); `grouped_gemm: true`
(needs `transformer_engine`) runs the experts as TEGroupedMLP; conversion knows both naming
schemes (convert.PARAM_NAMES). Process groups come from torch.distributed: NCCL on GPUs (the
caller sets the CUDA device), gloo on CPUs. `cpu_adam` offloads Adam to the host. On a CPU,
megatron-core needs the test-only shim in tests/trainer/megatron/cpu_shim.py; production code
never imports it.

Importing this package does not import megatron; import the submodules you need.
"""
