"""Physarum trainer: the training service's backends, losses and batching.

backend.py        the contract: PackedBatch (one packed micro-batch) and TrainerBackend
batch.py          episodes -> StepBatch of packed micro-batches (first-fit decreasing by tokens)
sft_data.py       chat rows -> SFT episodes (mask on the assistant's tokens)
step_prep.py      a rank's step -> old/ref logprobs, critic values, advantages (any backend)
losses/           the algorithms as pure functions, one registry, the composed objectives
torch_backend.py  the plain-torch backend (DP over gloo/NCCL, FSDP2 option, critic, ref, MoE)
optim.py, critic.py, moe_balance.py, distributed.py, fsdp.py, checkpoint.py: its parts
service.py        one trainer rank's loop body between the buffer and a backend
megatron/         the Megatron-core backend (same contract, same losses)
"""
