"""Run one torchrun-style job on Ray workers: one actor per rank, torchrun's environment for each.

    from weightzoo.train.ray_launch import run_on_ray
    run_on_ray(["train", "-d", "D", "-t", "cord", "--out", "/shared/runs/cord", "--ddp"], workers=4)

Each actor sets RANK, WORLD_SIZE, LOCAL_RANK (its index among the ranks on its node), LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT (rank 0's node and a port free there) and calls the `weightzoo` CLI; the
training loops then join the process group as under torchrun (weightzoo.train.distributed). The data
set and the output folder must be on a file system all nodes share. A rank that dies fails the job
(Ray does not restart it); calling run_on_ray again resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def _rank_actor(num_cpus: float, num_gpus: float) -> Any:
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)
    class Rank:
        def node_and_port(self) -> tuple[str, str, int]:
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), port

        def run(self, env: dict[str, str], argv: list[str]) -> int:
            os.environ.update(env)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(num_cpus))))
            from weightzoo.cli import main

            return main(argv)

    return Rank


def run_on_ray(
    argv: list[str], workers: int, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0
) -> list[int]:
    """Run `weightzoo <argv>` (which must include --ddp or --local-sgd) on `workers` Ray actors;
    returns every rank's exit code (0 = success, 2 = a one-line input error)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    actor = _rank_actor(num_cpus, num_gpus)
    ranks = [actor.remote() for _ in range(workers)]
    where = ray.get([a.node_and_port.remote() for a in ranks])
    nodes = [node for node, _, _ in where]
    master_ip, master_port = where[0][1], where[0][2]
    envs = []
    for r, node in enumerate(nodes):
        envs.append(
            {
                "RANK": str(r),
                "WORLD_SIZE": str(workers),
                "LOCAL_RANK": str(nodes[:r].count(node)),
                "LOCAL_WORLD_SIZE": str(nodes.count(node)),
                "MASTER_ADDR": master_ip,
                "MASTER_PORT": str(master_port),
            }
        )
    try:
        return list(ray.get([a.run.remote(e, argv) for a, e in zip(ranks, envs, strict=True)]))
    finally:
        for a in ranks:
            ray.kill(a)
