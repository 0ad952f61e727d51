"""Online class-conditional feature statistics (the paper's Eqs. 1-3).

For each class c the estimator holds the count n_c, the mean mu_c and the
population covariance Sigma_c (divide by n) of every feature of class c it has
seen. A batch with m_c features of class c, batch mean mu_b and centred
scatter S_b is merged by Chan's parallel rule, which is Eqs. 1-3 written for a
whole batch:

    M2_new = M2 + S_b + (n m / (n + m)) (mu - mu_b)(mu - mu_b)^T,
    mu_new = (n mu + m mu_b) / (n + m),     Sigma = M2 / n.

The running sums live in float64 (statistics accumulate over hundreds of
thousands of features); `mean` and `covariance` are float32 copies refreshed
for the classes each update touches, ready for the per-step ISDA product.
Only the classes present in a batch are touched. Under torch.distributed the
batch statistics are all-reduced first, so every rank merges the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Classes whose (A, A) float64 block is at least this big are merged one at a time, in place.
_PER_CLASS_BYTES = 512 * 2**10


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CovarianceEstimator:
    """Running per-class mean `(C, A)`, covariance `(C, A, A)` (or `(C, A)` diagonal) and count `(C,)`."""

    def __init__(self, num_features: int, num_classes: int, diagonal: bool = False, device=None):
        self.num_features, self.num_classes, self.diagonal = num_features, num_classes, diagonal
        a, c = num_features, num_classes
        shape = (c, a) if diagonal else (c, a, a)
        self._m2 = torch.zeros(shape, dtype=torch.float64, device=device)
        self._mean = torch.zeros(c, a, dtype=torch.float64, device=device)
        self.count = torch.zeros(c, dtype=torch.float64, device=device)
        self.mean = torch.zeros(c, a, device=device)
        self.covariance = torch.zeros(shape, device=device)

    @property
    def device(self) -> torch.device:
        return self._m2.device

    def to(self, device) -> "CovarianceEstimator":
        for name in ("_m2", "_mean", "count", "mean", "covariance"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Merge a batch: `features (N, A)`, `targets (N,)` int class indices."""
        x = features.detach().to(self.device, torch.float64)
        y = targets.to(self.device)
        counts = torch.bincount(y, minlength=self.num_classes).to(torch.float64)
        sums = torch.zeros_like(self._mean).index_add_(0, y, x)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        classes = torch.nonzero(counts).flatten()
        if classes.numel() == 0:
            return
        m = counts[classes]
        batch_mean = sums[classes] / m[:, None]                       # (K, A)
        n = self.count[classes]
        delta = self._mean[classes] - batch_mean                        # (K, A)
        cross = n * m / (n + m)                                         # weight of delta delta^T
        # Centre each feature on its class's (global) batch mean.
        slot = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        slot[classes] = torch.arange(len(classes), device=self.device)
        centred = x - batch_mean[slot[y]]
        rank0 = not _distributed() or dist.get_rank() == 0
        total = n + m
        if self.diagonal:
            scatter = torch.zeros(len(classes), self.num_features, dtype=torch.float64, device=self.device)
            scatter.index_add_(0, slot[y], centred * centred)
            if _distributed():
                dist.all_reduce(scatter)
            self._m2[classes] += scatter + cross[:, None] * delta * delta
            self.covariance[classes] = (self._m2[classes] / total[:, None]).float()
        else:
            self._merge_full(classes, slot[y], centred, delta, cross, total, rank0)
        self.count[classes] = total
        self._mean[classes] += (m / total)[:, None] * (batch_mean - self._mean[classes])
        self.mean[classes] = self._mean[classes].float()

    def _merge_full(self, classes, slot_of_row, centred, delta, cross, total, rank0: bool) -> None:
        """M2[c] += Xc^T Xc + cross_c delta_c delta_c^T for every present class c.

        Each class's centred rows, plus sqrt(cross_c) delta_c as one extra row, are
        stacked zero-padded into `rows (K, L, A)` (under torch.distributed, every
        rank's rows, gathered), so the merge is a rank-L update `rows_c^T rows_c`.
        Small A: one batched product for all classes. Large A: one in-place
        `addmm_` per class on its own float64 storage, followed by the float32
        refresh of that class, so each (A, A) block is read and written once per
        pass and no `(K, A, A)` temporary is made.
        """
        k, a = len(classes), self.num_features
        per_class = torch.bincount(slot_of_row, minlength=k)
        longest = int(per_class.max()) + 1
        if _distributed():  # every rank pads to the same length, then gathers all ranks' rows
            longest_t = torch.tensor([longest], device=self.device)
            dist.all_reduce(longest_t, op=dist.ReduceOp.MAX)
            longest = int(longest_t)
        order = torch.argsort(slot_of_row, stable=True)
        first = torch.cumsum(per_class, 0) - per_class
        position = torch.arange(len(order), device=self.device) - first[slot_of_row[order]]
        rows = torch.zeros(k, longest, a, dtype=torch.float64, device=self.device)
        rows[slot_of_row[order], position] = centred[order]
        if rank0:  # the delta term belongs to the merge once, not once per rank
            rows[:, -1] = cross.sqrt()[:, None] * delta
        if _distributed():
            gathered = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, rows)
            rows = torch.cat(gathered, dim=1)                               # (K, world * L, A)
        if a * a * 8 < _PER_CLASS_BYTES:
            self._m2.index_add_(0, classes, rows.transpose(1, 2) @ rows)
            self.covariance[classes] = (self._m2[classes] / total[:, None, None]).float()
            return
        rows_t = rows.transpose(1, 2)
        for i, (c, n) in enumerate(zip(classes.tolist(), total.tolist())):
            m2 = self._m2[c]
            m2.addmm_(rows_t[i], rows[i])
            # cast, then scale in float32: two light passes beat one float64 divide into a float32 output
            self.covariance[c].copy_(m2).mul_(1.0 / n)

    def state_dict(self) -> dict:
        return {
            "num_features": self.num_features, "num_classes": self.num_classes, "diagonal": self.diagonal,
            "m2": self._m2.cpu(), "mean64": self._mean.cpu(), "count": self.count.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["num_features"], state["num_classes"], state["diagonal"]) != (
                self.num_features, self.num_classes, self.diagonal):
            raise ValueError("estimator state is for another feature size, class count or covariance type")
        self._m2 = state["m2"].to(self.device, torch.float64)
        self._mean = state["mean64"].to(self.device, torch.float64)
        self.count = state["count"].to(self.device, torch.float64)
        self.mean = self._mean.float()
        denom = self.count.clamp(min=1).view(-1, *[1] * (self._m2.dim() - 1))
        self.covariance = (self._m2 / denom).float()

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "CovarianceEstimator":
        est = cls(state["num_features"], state["num_classes"], state["diagonal"], device=device)
        est.load_state_dict(state)
        return est
