"""`--executor ray`: fan zoo runs (or batches of runs) out as Ray tasks; ONE writer commits.

The driver (the `weightzoo zoo build` process) loads the slices once and puts them in Ray's object
store, so workers need weightzoo installed but no access to the dataset folder. Each task trains a
group of runs (batched or sequentially, chosen on the worker's device) and returns their
checkpoints; only the driver writes to the zoo, with the store's atomic protocol, committing a run
and its `done` mark together. A worker that dies (node lost, OOM kill) makes Ray retry its task
(`max_retries`); if that fails too, the driver submits the group again, up to `RESUBMITS` times.
Nothing of a lost task was ever committed, so a retry cannot duplicate anything, and a killed
driver resumes like a local build. See docs/zoo.md for running on a SLURM or Kubernetes Ray cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from weightzoo.data.raw import RawDataset
from weightzoo.data.slices import Preprocessing
from weightzoo.errors import InputError, WeightzooError
from weightzoo.zoo.grid import RunPlan
from weightzoo.zoo.runs import ZooData, load_zoo_data
from weightzoo.zoo.store import PendingCheckpoint

RAY_RETRIES = 3  # Ray's own retries of a task whose worker died
RESUBMITS = 2  # then the driver's


def train_remote(
    data: ZooData,
    plan_dicts: list[dict[str, Any]],
    mode: str,
    device: str,
    skips: list[list[int]],
    crash_once: str | None = None,
) -> tuple[str, list[PendingCheckpoint]]:
    """Body of a Ray task: train a group of runs, return (mode used, their checkpoints on the CPU).

    crash_once (tests): a marker path; the first worker to see it absent creates it and dies, as a
    lost node would."""
    if crash_once is not None and not Path(crash_once).exists():
        Path(crash_once).touch()
        os._exit(1)
    from weightzoo.segmenter import resolve_device
    from weightzoo.zoo.build import train_group

    plans = [RunPlan.from_dict(d) for d in plan_dicts]
    dev = resolve_device(device)
    datas = [data.run_data(p, dev) for p in plans]
    out: list[PendingCheckpoint] = []
    used = train_group(plans, datas, dev, out.append, [set(s) for s in skips], mode)
    return used, out


def run_ray(
    work: list[tuple[list[RunPlan], str]],
    ds: RawDataset,
    prep: Preprocessing,
    device: str,
    address: str | None,
    skips: dict[str, set[int]],
    commit: Callable[[PendingCheckpoint], None],
    log: Callable[[str], None] = print,
    crash_once: str | None = None,
) -> dict[str, int]:
    """Train `work` ((group, mode) pairs) as Ray tasks; hand every returned checkpoint to `commit`
    (the build's CheckpointWriter) in the driver. Returns mode -> number of runs trained that way."""
    try:
        import ray
    except ImportError:
        raise InputError(
            "the ray executor needs Ray, which is not installed",
            "pip install 'weightzoo[ray]' (or use --executor local)",
        ) from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InputError(
                f"cannot connect to a Ray cluster at {address} ({str(e).splitlines()[0][:100]})",
                "start one with `ray start --head` or give --address HOST:PORT of its head node",
            ) from None
    try:
        data_ref = ray.put(load_zoo_data(ds, [p for g, _ in work for p in g], prep))
        gpus = 1 if device.startswith("cuda") else 0
        task = ray.remote(train_remote).options(max_retries=RAY_RETRIES, num_cpus=1, num_gpus=gpus)

        def submit(group: list[RunPlan], mode: str) -> Any:
            dicts = [p.to_dict() for p in group]
            return task.remote(
                data_ref, dicts, mode, device, [sorted(skips[p.run_id]) for p in group], crash_once
            )

        pending = {submit(g, m): (g, m, 0) for g, m in work}
        modes: dict[str, int] = {}
        log(
            f"ray: {len(pending)} task(s) for {sum(len(g) for g, _ in work)} run(s) on {ray.cluster_resources()}"
        )
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            group, mode, attempt = pending.pop(ready[0])
            try:
                used, checkpoints = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:  # an error raised by our code: no retry
                cause = getattr(e, "cause", None)
                if isinstance(cause, WeightzooError):
                    raise cause from None
                raise
            except ray.exceptions.RayError as e:  # the worker or its node was lost
                if attempt >= RESUBMITS:
                    raise InputError(
                        f"Ray lost the workers of {len(group)} run(s) {RESUBMITS + 1} times ({type(e).__name__})",
                        "check the cluster, then run the same build again (finished runs are kept)",
                    ) from None
                log(f"ray: lost a worker ({type(e).__name__}); submitting its {len(group)} run(s) again")
                pending[submit(group, mode)] = (group, mode, attempt + 1)
                continue
            for ck in checkpoints:
                commit(ck)
            modes[used] = modes.get(used, 0) + len(group)
        return modes
    finally:
        if started:
            ray.shutdown()
