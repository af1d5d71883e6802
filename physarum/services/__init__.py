"""The job's services on Ray: the buffer (redis-server + store), the trainer group, rollout."""
