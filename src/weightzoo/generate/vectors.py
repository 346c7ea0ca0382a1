"""Checkpoints of single- and multi-task runs as vectors of ONE layout: the generator's task layout.

A zoo holds single-task networks (1 sigmoid output) and multi-task networks (one output per task) of
the same body. They differ only in their seg layers (`decoder.seg_layers.*`: weight [K, C, 1, 1], bias
[K]): row k of a seg layer is output channel k = the run's task k. `TaskLayout` fixes a task vocabulary
(`tasks`, sorted) and the body, and embeds any run's state into the vocabulary-sized network
(`spec`, num_classes = len(tasks)): body tensors as they are, seg row of task t at row tasks.index(t).
Rows of tasks the run did not learn are absent: zero in the vector and False in the returned mask,
so losses skip them and the generator sees "no such output" as zeros.

`extract(vec, tasks)` goes back: the state of a network with outputs `tasks` (any subset, any order).
`perm_index(generator)` is a random channel permutation of the whole vector (weightzoo.zoo.params'
`permute_unet` applied to element indices), so augmenting a batch is one gather.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from weightzoo.errors import ModelError, UnknownNameError
from weightzoo.nets.unet import ArchSpec
from weightzoo.zoo.params import ParamLayout, permute_unet, random_permutations


def base_key(spec: ArchSpec) -> str:
    """Hash of everything but the number of outputs: runs with equal keys share a body."""
    return spec.with_classes(1).hash()


@dataclass(frozen=True)
class _SegTensor:
    name: str
    offset: int  # in the task-layout vector
    row: int  # elements per output row
    rows: int  # = len(tasks)


class TaskLayout:
    """The vector layout of `base` with one output channel per task of `tasks`."""

    def __init__(self, base: ArchSpec, tasks: Sequence[str]):
        if not tasks or len(set(tasks)) != len(tasks):
            raise ModelError(f"a task layout needs distinct tasks, got {list(tasks)}")
        self.tasks = list(tasks)
        self.spec = base.with_classes(len(self.tasks))
        self.layout = ParamLayout.for_spec(self.spec)
        non_float = [t.name for t in self.layout.tensors if not t.dtype.startswith("float")]
        if non_float:
            raise ModelError(
                f"the generator models float tensors only; the architecture has {non_float[0]}",
                "use a preset with InstanceNorm (weightzoo's presets)",
            )
        seg_names = {n for layer in self.layout.layers if layer.kind == "seg" for n in layer.tensors}
        self.seg = [
            _SegTensor(t.name, t.offset, t.numel // len(self.tasks), len(self.tasks))
            for t in self.layout.tensors
            if t.name in seg_names
        ]
        self.numel = self.layout.numel

    # ---- names ----------------------------------------------------------------------------------
    def task_index(self, task: str, where: str | None = None) -> int:
        if task not in self.tasks:
            raise UnknownNameError("task", task, self.tasks, where)
        return self.tasks.index(task)

    def mask(self, tasks: Sequence[str]) -> torch.Tensor:
        """[numel] bool: body plus the seg rows of `tasks`."""
        m = torch.ones(self.numel, dtype=torch.bool)
        keep = {self.task_index(t) for t in tasks}
        for s in self.seg:
            for k in range(s.rows):
                if k not in keep:
                    m[s.offset + k * s.row : s.offset + (k + 1) * s.row] = False
        return m

    # ---- states <-> vectors ---------------------------------------------------------------------
    def embed(
        self, state: Mapping[str, torch.Tensor], run_tasks: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A run's real state dict (output k = run_tasks[k]) -> (vector [numel] float32, mask [numel])."""
        rows = [self.task_index(t) for t in run_tasks]
        full = {}
        seg = {s.name for s in self.seg}
        for t in self.layout.tensors:
            v = state.get(t.name)
            if v is None:
                raise ModelError(f"checkpoint lacks {t.name}", "it belongs to another architecture")
            v = v.detach().to("cpu", torch.float32)
            if t.name in seg:
                if v.shape[0] != len(rows) or tuple(v.shape[1:]) != t.shape[1:]:
                    raise ModelError(f"{t.name} has shape {tuple(v.shape)} for tasks {list(run_tasks)}")
                out = torch.zeros(t.shape)
                out[rows] = v
                v = out
            elif tuple(v.shape) != t.shape:
                raise ModelError(f"{t.name} has shape {tuple(v.shape)}, expected {t.shape}")
            full[t.name] = v
        return self.layout.flatten(full), self.mask(run_tasks)

    def extract(self, vec: torch.Tensor, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
        """[numel] vector -> real state dict of the network with outputs `tasks` (in that order)."""
        rows = [self.task_index(t) for t in tasks]
        state = self.layout.unflatten(vec.detach().to("cpu", torch.float32))
        for s in self.seg:
            state[s.name] = state[s.name][rows].clone()
        return state

    def out_spec(self, tasks: Sequence[str]) -> ArchSpec:
        return self.spec.with_classes(len(tasks))

    # ---- permutation augmentation ---------------------------------------------------------------
    def perm_index(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """[numel] int64 gather index of a random hidden-channel permutation (outputs unchanged)."""
        idx = {
            t.name: torch.arange(t.offset, t.offset + t.numel, dtype=torch.long).reshape(t.shape)
            for t in self.layout.tensors
        }
        perms = random_permutations(self.spec, generator)
        permuted = permute_unet(idx, self.spec, perms)
        return torch.cat([permuted[t.name].reshape(-1) for t in self.layout.tensors])

    # ---- per-tensor summaries -------------------------------------------------------------------
    def tensor_rms(self, vec: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[..., numel] -> [..., n_tensors] root mean square of each tensor's present elements."""
        ids = self.layout.segment_ids().to(vec.device)
        n_t = len(self.layout.tensors)
        m = mask.to(vec.dtype).expand_as(vec)
        sq = torch.zeros(*vec.shape[:-1], n_t, dtype=vec.dtype, device=vec.device)
        cnt = torch.zeros_like(sq)
        sq.index_add_(-1, ids, vec.pow(2) * m)
        cnt.index_add_(-1, ids, m)
        return (sq / cnt.clamp_min(1)).sqrt()
