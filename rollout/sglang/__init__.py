"""The SGLang rollout backend: SGLang 0.5.23 servers run from their own environment.

  environment    find and check the SGLang interpreter (`rollout.sglang.python`)
  server         launch/stop one `sglang.launch_server` process (CPU flags included)
  cpu_launch     the entry point a CPU server runs under (runs in the SGLang env only)
  router         `sglang-router` in front of the workers (POST /workers)
  worker         a worker as the engine sees it (URL, client, TP size, process)
  process_group  rank 0 of SGLang's weight-update process group, without sglang
  payloads       what the sync paths send (flattened buckets, FP8 pairs), built without sglang
  weight_sync    the tensor / distributed / disk weight-update paths
  engine         `SGLangEngine`, the Engine protocol over all of the above
  launch         servers + router + sync path from the job config (`rollout.engine: sglang`)

Nothing here imports sglang: the main environment talks to SGLang over HTTP and
torch.distributed only.
"""
