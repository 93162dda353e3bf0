"""`RolloutBatch`: what every front end has after generation and scoring, in one object.

A front end converts its own batch (cepo-train's lists, TRL's `output` dict, verl's `DataProto`) into a
RolloutBatch, hands it to the reweight phase (`step.reweight`) and converts the result back.

Rows are this process's responses (the ones it computes A_hat for); the r- choice reads the whole batch
(every process's responses), so `texts`, `rewards` and `references` cover the whole batch and this
process's row i is row `offset + i` of it. Groups are contiguous runs of `group_size` rows of the whole
batch unless `groups` lists each group's rows (verl groups rows by uid, in any order).
`extra` carries what a later phase needs (images, other algorithms' teachers) without a new field here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["RolloutBatch"]


@dataclass
class RolloutBatch:
    """One rollout batch (see the module docstring). Shapes: n rows, R response columns.

    prompt_ids: each row's prompt token ids (a sequence or a mapping by row; rows of a group may share one
        list); responses: each row's response token ids; advantages: A [n] fp32; mask: [n, R] bool, the
        tokens the loss sees.
    group_size: responses per prompt (None when `groups` is given and sizes differ).
    texts, rewards, references: the decoded response, its reward and its r+ (reference answer) for every
        row of the whole batch; None when the front end does not choose r- for this batch.
    groups: the whole batch's row indices of each group (default: contiguous runs of group_size).
    offset: this process's row i is the whole batch's row offset + i.
    questions: each row's question (for teacher templates with {question}); system_prompt: the system
        message the prompts were rendered with.
    old_logp: [n, R] the rollout policy's log-probs (RLSD's baseline; the value of unscored teacher rows).
    """

    prompt_ids: Sequence | Mapping
    responses: list[list[int]]
    advantages: torch.Tensor
    mask: torch.Tensor
    group_size: int | None
    texts: list[str] | None = None
    rewards: list[float] | None = None
    references: list[str] | None = None
    groups: list[list[int]] | None = None
    offset: int = 0
    questions: Sequence | Mapping | None = None
    system_prompt: str | None = None
    old_logp: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.responses)
        if not isinstance(self.advantages, torch.Tensor) or self.advantages.shape != (n,):
            raise ValueError(f"advantages: expected a tensor of shape ({n},) (one A per row), got "
                             f"{getattr(self.advantages, 'shape', type(self.advantages).__name__)}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.dim() != 2 or self.mask.shape[0] != n:
            raise ValueError(f"mask: expected a tensor of shape ({n}, R), got "
                             f"{getattr(self.mask, 'shape', type(self.mask).__name__)}")
        if self.old_logp is not None and self.old_logp.shape != self.mask.shape:
            raise ValueError(f"old_logp: expected shape {tuple(self.mask.shape)}, "
                             f"got {tuple(self.old_logp.shape)}")
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise ValueError(f"group_size: expected a positive int or None, got {gs!r}")
        if self.texts is None:
            return
        total = len(self.texts)
        if len(self.rewards or ()) != total or len(self.references or ()) != total:
            raise ValueError(f"texts, rewards, references: expected one entry per row of the whole batch, "
                             f"got {total}, {len(self.rewards or ())} and {len(self.references or ())}")
        if not 0 <= self.offset <= total - n:
            raise ValueError(f"offset: expected this process's {n} rows inside the whole batch of {total}, "
                             f"got offset {self.offset}")
        if self.groups is None:
            if gs is None or total % gs:
                raise ValueError(f"group_size: expected the whole batch ({total} rows) to be groups of "
                                 f"group_size, got {gs!r}")
            self.groups = [list(range(g, g + gs)) for g in range(0, total, gs)]

    # row and group views
    @property
    def n_rows(self) -> int:
        return len(self.responses)

    @property
    def resp_len(self) -> int:
        return self.mask.shape[1]

    @property
    def whole(self) -> bool:
        """Whether this process's rows are the whole batch (one process, rows in batch order)."""
        return self.offset == 0 and self.texts is not None and len(self.texts) == self.n_rows

    def group_of(self, row: int) -> int:
        """The group of this process's `row`."""
        if "_group_of" not in self.__dict__:
            self.__dict__["_group_of"] = {i: g for g, rows in enumerate(self.groups) for i in rows}
        return self.__dict__["_group_of"][self.offset + row]

    def group(self, g: int) -> tuple[list[str], list[float], str]:
        """(texts, rewards, r+) of group g, in the whole batch's row order."""
        rows = self.groups[g]
        return [self.texts[i] for i in rows], [self.rewards[i] for i in rows], self.references[rows[0]]

    def per_row(self, per_group: Sequence) -> list:
        """Values given per group, as one per row of this process."""
        return [per_group[self.group_of(i)] for i in range(self.n_rows)]
