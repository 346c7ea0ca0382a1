"""The checkpoint zoo: many training runs stored as a safe, queryable dataset of checkpoints.

    from weightzoo.zoo import Zoo
    zoo = Zoo("zoo/")
    best = zoo.checkpoints(task="cord", site="A", split="train", metric="val_dice", min_value=0.8)
    state = zoo.load(best[0].ckpt_id)           # {name: float32 tensor}, the network's real_state_dict

Modules: `store` (the Zoo: SQLite manifest + safetensors files), `grid` (what to train), `build`
(train and commit, resumable), `batched` + `grouped` (many runs of one architecture as one grouped-convolution network),
`executors` (Ray), `params` (parameter layout, permutation symmetry), `nnunet` (ingest/export),
`base` (base networks, deltas), `soup` (model soups of fine-tunes of one base).
Only the store is imported here, so `import weightzoo.zoo` stays light.
"""

from weightzoo.zoo.store import CheckpointRecord, PendingCheckpoint, RunRecord, VerifyReport, Zoo

__all__ = ["CheckpointRecord", "PendingCheckpoint", "RunRecord", "VerifyReport", "Zoo"]
