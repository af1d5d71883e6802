"""The megatron-core training backend for GLM-4.x MoE (TP / PP / EP / DP).

Modules: `arch` (HF config -> GLM shape), `spec` / `norm` / `core_attention` (the layer
spec), `model` (process groups, TransformerConfig, GPTModel), `convert` / `weights`
(HF <-> megatron weights), `logprobs` (vocab-parallel logprobs and entropy), `backend` (the
TrainerBackend), `memory_plan` (per-GPU memory of a parallel plan).

Importing this package does not import megatron; import the submodules you need. The
memory plan and `arch` work without megatron-core installed.
"""
