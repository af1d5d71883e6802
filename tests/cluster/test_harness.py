"""The netns cluster itself: three Ray nodes on three addresses, reachable only from inside."""

from __future__ import annotations

import json
import subprocess

from tests.cluster.conftest import NODE_IPS, NetnsCluster

PROBE = """
import json, ray
ray.init()
@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()
seen = {}
for node in ray.nodes():
    if not node["Alive"]:
        continue
    pin = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    seen[node["NodeManagerAddress"]] = {
        "ran_on": ray.get(where.options(scheduling_strategy=pin).remote()),
        "resources": node["Resources"],
    }
print("PROBE " + json.dumps(seen))
"""


def test_a_task_runs_on_each_node_with_its_resources(netns_cluster: NetnsCluster) -> None:
    done = netns_cluster.run("head", ["python", "-c", PROBE], timeout=120)
    assert done.returncode == 0, done.stdout[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE "))
    seen = json.loads(line.removeprefix("PROBE "))
    assert sorted(seen) == sorted(NODE_IPS.values())
    for ip, info in seen.items():
        assert info["ran_on"] == ip
    assert seen[NODE_IPS["head"]]["resources"]["buffer_node"] == 1
    assert seen[NODE_IPS["n2"]]["resources"]["trainer_node"] == 1
    assert seen[NODE_IPS["n3"]]["resources"]["rollout_node"] == 2


def test_nodes_have_no_route_out(netns_cluster: NetnsCluster) -> None:
    for node in NODE_IPS:
        routes = subprocess.run(
            ["ip", "-n", netns_cluster.namespace(node), "route"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "default" not in routes, routes
        assert all(line.startswith("198.18.0.0/24") for line in routes.splitlines()), routes
