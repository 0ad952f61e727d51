"""Online class-conditional feature statistics (the paper's Eqs. 1-3).

For each class c the estimator holds the count n_c, the mean mu_c and the
population covariance Sigma_c (divide by n) of every feature of class c it has
seen. A batch with m_c features of class c, batch mean mu_b and centred
scatter S_b is merged by Chan's parallel rule, which is Eqs. 1-3 written for a
whole batch:

    M2_new = M2 + S_b + (n m / (n + m)) (mu - mu_b)(mu - mu_b)^T,
    mu_new = (n mu + m mu_b) / (n + m),     Sigma = M2 / n.

Both added terms are sums of outer products of rows: the centred features and
sqrt(n m / (n + m)) (mu - mu_b). The running sums live in float64 (statistics
accumulate over hundreds of thousands of features); `mean` and `covariance` are
float32, ready for the per-step ISDA product. Only the classes present in a
batch are touched.

With full covariance and a large feature size A, writing a class's (A, A)
float64 block and its float32 copy every step would cost more than the ISDA
product itself, so a class's rows wait in a small float64 buffer (a few dozen
rows) and are merged into M2 when it fills or when `covariance` is read. In
between, `multiply_covariance` applies the exact current Sigma_c as
(n_merged / n) Sigma_merged + R^T R / n without forming it.

Under torch.distributed the batch counts and sums are all-reduced and the rows
all-gathered, so every rank holds the same statistics as a single process that
saw the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from isda_viz import distributed
from isda_viz.errors import IsdaVizError
from isda_viz.readers import Fields, check_tensor

COVARIANCES = ("full", "diagonal")   # per class: an (A, A) matrix, or (A,) per-dimension variances


def check_covariance(kind: str) -> None:
    """The one check (and message) of a covariance type option: `IsdaVizError` unless full or diagonal."""
    if kind not in COVARIANCES:
        raise IsdaVizError(f"unknown covariance '{kind}'; choose full or diagonal")

# Full covariance with A >= this: rows wait in a per-class buffer of A // _FEATURES_PER_BUFFERED_ROW rows
# and classes merge one at a time, in place; buffered rows add at most 2 / _FEATURES_PER_BUFFERED_ROW to the
# cost of the ISDA product. Smaller A: every update merges at once, batched over classes.
_DEFER_MIN_FEATURES = 256
_FEATURES_PER_BUFFERED_ROW = 32
# Upper bound on the batched path's temporary (k, A, A) float64 products, in bytes.
_CHUNK_BYTES = 16 * 2**20


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
        self._covariance = torch.zeros(shape, device=device)          # float32 M2 / n as of the last merge
        self._merged_count = torch.zeros(c, dtype=torch.float64, device=device)
        capacity = a // _FEATURES_PER_BUFFERED_ROW if not diagonal and a >= _DEFER_MIN_FEATURES else 0
        self._pending = torch.zeros(c, capacity, a, dtype=torch.float64, device=device)
        self._pending_len = [0] * c

    @property
    def device(self) -> torch.device:
        return self._m2.device

    @property
    def defers_merges(self) -> bool:
        """Full covariance with large A: rows are buffered, see `multiply_covariance`."""
        return self._pending.shape[1] > 0

    @property
    def covariance(self) -> torch.Tensor:
        """`(C, A, A)` or `(C, A)` float32 population covariance of every feature seen (zero if none)."""
        self._merge_pending(range(self.num_classes))
        return self._covariance

    def to(self, device) -> "CovarianceEstimator":
        for name in ("_m2", "_mean", "count", "mean", "_covariance", "_merged_count", "_pending"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, targets: torch.Tensor, skip_non_finite: bool = False) -> bool:
        """Merge a batch: `features (N, A)`, `targets (N,)` int class indices; returns True when merged.

        `skip_non_finite`: a batch holding an inf or NaN feature (on any rank) is left out whole, and False
        returned. Mixed-precision training needs this: an fp16 overflow in the forward pass makes the step's
        loss non-finite and the GradScaler skips that step, but merged into the float64 running sums the
        same features would make every later covariance, and so every later loss, NaN.
        """
        x = features.detach().to(self.device, torch.float64)
        y = targets.to(self.device)
        counts = torch.bincount(y, minlength=self.num_classes).to(torch.float64)
        if skip_non_finite:  # the flag rides on the counts' all-reduce: every rank decides alike
            bad = (~torch.isfinite(x)).any().to(torch.float64).view(1)
            counts = torch.cat([counts, bad])
        sums = torch.zeros_like(self._mean).index_add_(0, y, x)
        if distributed.active():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        if skip_non_finite:
            counts, bad = counts[:-1], counts[-1]
            if bad > 0:
                return False
        classes = torch.nonzero(counts).flatten()
        if classes.numel() == 0:
            return True
        m = counts[classes]
        batch_mean = sums[classes] / m[:, None]                       # (K, A)
        n = self.count[classes]
        delta = self._mean[classes] - batch_mean                        # (K, A)
        cross = n * m / (n + m)                                         # weight of delta delta^T
        # Centre each feature on its class's (global) batch mean.
        slot = torch.full((self.num_classes,), -1, dtype=torch.long, device=self.device)
        slot[classes] = torch.arange(len(classes), device=self.device)
        centred = x - batch_mean[slot[y]]
        rank0 = distributed.is_main()
        total = n + m
        self.count[classes] = total
        self._mean[classes] += (m / total)[:, None] * (batch_mean - self._mean[classes])
        self.mean[classes] = self._mean[classes].float()
        if self.diagonal:
            scatter = torch.zeros(len(classes), self.num_features, dtype=torch.float64, device=self.device)
            scatter.index_add_(0, slot[y], centred * centred)
            if distributed.active():
                dist.all_reduce(scatter)
            self._m2[classes] += scatter + cross[:, None] * delta * delta
            self._refresh(classes)
        else:
            rows, valid = self._class_rows(classes, slot[y], centred, cross.sqrt()[:, None] * delta, rank0)
            self._add_rows(classes, rows, valid)
        return True

    def _class_rows(self, classes, slot_of_row, centred, delta_row, rank0: bool):
        """`rows (K, L, A)` float64: each present class's centred features, then its delta row; `valid (K, L)`.

        Classes are zero-padded to a common length L; under torch.distributed every
        rank pads to the same L and the ranks' rows are gathered side by side.
        """
        k, a = len(classes), self.num_features
        per_class = torch.bincount(slot_of_row, minlength=k)
        longest = int(per_class.max()) + 1
        if distributed.active():
            longest_t = torch.tensor([longest], device=self.device)
            dist.all_reduce(longest_t, op=dist.ReduceOp.MAX)
            longest = int(longest_t)
        order = torch.argsort(slot_of_row, stable=True)
        first = torch.cumsum(per_class, 0) - per_class
        position = torch.arange(len(order), device=self.device) - first[slot_of_row[order]]
        rows = torch.zeros(k, longest, a, dtype=torch.float64, device=self.device)
        rows[slot_of_row[order], position] = centred[order]
        valid = (torch.arange(longest, device=self.device) < per_class[:, None]).to(torch.uint8)
        if rank0:  # the delta term belongs to the merge once, not once per rank
            rows[:, -1] = delta_row
            valid[:, -1] = 1
        if distributed.active():
            gathered = [torch.empty_like(rows) for _ in range(distributed.world_size())]
            dist.all_gather(gathered, rows)
            gathered_valid = [torch.empty_like(valid) for _ in range(distributed.world_size())]
            dist.all_gather(gathered_valid, valid)
            rows, valid = torch.cat(gathered, dim=1), torch.cat(gathered_valid, dim=1)   # (K, world * L, A)
        return rows, valid.bool()

    def _add_rows(self, classes, rows, valid) -> None:
        """M2[c] += rows_c^T rows_c for each present class, now or (large A) via the pending buffer."""
        capacity = self._pending.shape[1]
        if capacity == 0:
            self._merge_now(classes, rows)
            return
        n_new = valid.sum(1).tolist()
        fits = []
        for i, c in enumerate(classes.tolist()):
            if self._pending_len[c] + n_new[i] > capacity:
                self._merge_pending([c], extra=rows[i, valid[i]])
            else:
                fits.append(i)
        if not fits:
            return
        fits = torch.tensor(fits, device=self.device)
        cls, rows, valid = classes[fits], rows[fits], valid[fits]
        start = torch.tensor([self._pending_len[c] for c in cls.tolist()], device=self.device)
        position = start[:, None] + torch.cumsum(valid, 1) - 1                  # (K', L) slot in the buffer
        which = valid.nonzero(as_tuple=True)
        self._pending[cls[which[0]], position[which]] = rows[which]
        for c, extra in zip(cls.tolist(), valid.sum(1).tolist()):
            self._pending_len[c] += extra

    def _merge_now(self, classes, rows) -> None:
        """Small A: batched `rows^T rows` products, in chunks of classes to bound the temporary."""
        per_chunk = max(1, _CHUNK_BYTES // (8 * self.num_features ** 2))
        for start in range(0, len(classes), per_chunk):
            chunk = slice(start, start + per_chunk)
            self._m2.index_add_(0, classes[chunk], rows[chunk].transpose(1, 2) @ rows[chunk])
            self._refresh(classes[chunk])

    def _refresh(self, classes) -> None:
        """float32 covariance of `classes` from M2, as float32(M2) * float32(1 / n) (the same rounding as
        `_merge_class`, so the result does not depend on which path merged a class)."""
        inv = (1.0 / self.count[classes].clamp(min=1)).float()
        self._covariance[classes] = self._m2[classes].float() * inv.view(-1, *[1] * (self._m2.dim() - 1))
        self._merged_count[classes] = self.count[classes]

    def _merge_class(self, c: int, rows) -> None:
        """M2[c] += rows^T rows in place, then refresh the class's float32 covariance."""
        m2 = self._m2[c]
        m2.addmm_(rows.T, rows)
        # cast, then scale in float32 (as `_refresh`): two light passes beat a float64 divide into float32
        self._covariance[c].copy_(m2).mul_(1.0 / float(self.count[c]))
        self._merged_count[c] = self.count[c]

    def _merge_pending(self, classes, extra=None) -> None:
        """Merge the buffered rows (and `extra (L, A)` rows, if given) of `classes` into M2."""
        if not self.defers_merges:
            return
        for c in classes:
            size = self._pending_len[c]
            if size == 0 and extra is None:
                continue
            rows = self._pending[c, :size]
            if extra is not None:
                rows = torch.cat([rows, extra])
            self._merge_class(c, rows)
            self._pending_len[c] = 0

    def multiply_covariance(self, c: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """`x (M, A) @ Sigma_c` for the current covariance of class c, without merging buffered rows.

        Sigma_c = (n_merged / n) Sigma_merged + R^T R / n for the float32 covariance
        as of the last merge and the R rows buffered since. Result in `x.dtype`.
        """
        out = torch.mm(x, self._covariance[c].to(x.dtype), out=out)
        size = self._pending_len[c] if not self.diagonal else 0
        if size:
            n = float(self.count[c])
            rows = self._pending[c, :size].to(x.dtype)
            out.addmm_(x @ rows.T, rows, beta=float(self._merged_count[c]) / n, alpha=1.0 / n)
        return out

    def state_dict(self) -> dict:
        """Plain tensors; buffered rows are merged first, so the state is the same however it was reached."""
        self._merge_pending(range(self.num_classes))
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
        self._covariance = torch.zeros_like(self._m2, dtype=torch.float32)
        self._merged_count = torch.zeros_like(self.count)
        self._refresh(torch.arange(self.num_classes, device=self.device))
        self._pending.zero_()
        self._pending_len = [0] * self.num_classes

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "CovarianceEstimator":
        """From a state this process made (`state_dict`); a state read from a file goes through `read_state`."""
        est = cls(state["num_features"], state["num_classes"], state["diagonal"], device=device)
        est.load_state_dict(state)
        return est

    @classmethod
    def from_moments(cls, mean: torch.Tensor, covariance: torch.Tensor, count: torch.Tensor,
                     device=None) -> "CovarianceEstimator":
        """The estimator holding per-class `mean (C, A)`, population `covariance (C, A, A)` (or its diagonal
        `(C, A)`) and `count (C,)` features seen (M2 = Σ · n, float64): the one way statistics estimated
        elsewhere (a covariance file, a public checkpoint's `CoVariance`) become an estimator."""
        count = count.to(torch.float64)
        covariance = covariance.to(torch.float64)
        state = {"num_features": mean.shape[1], "num_classes": mean.shape[0], "diagonal": covariance.dim() == 2,
                 "m2": covariance * count.view(-1, *[1] * (covariance.dim() - 1)),
                 "mean64": mean.to(torch.float64), "count": count}
        return cls.from_state_dict(state, device=device)

    @classmethod
    def read_state(cls, state, where: str, num_features: int | None = None, num_classes: int | None = None,
                   device=None) -> "CovarianceEstimator":
        """The estimator of a state read from a file (a run checkpoint, the class-statistics cache), checked as it
        is read: the keys and their types, shapes that agree with each other (and with `num_features`,
        `num_classes` where given), dense real tensors, counts >= 0, and mean and covariance finite in the
        float32 they are used in. Anything else is one `IsdaVizError` naming `where` and what is wrong."""
        fields = Fields(state, where, "an estimator state (a dict)")
        a = fields.integer("num_features", 1, 1 << 17)
        c = fields.integer("num_classes", 1, 1 << 20)
        diagonal = fields.flag("diagonal")
        for key, wanted in (("num_features", num_features), ("num_classes", num_classes)):
            if wanted is not None and fields.data[key] != wanted:
                fields.fail(key, f"is {fields.data[key]}, but the model has {wanted}")
        shape = (c, a) if diagonal else (c, a, a)
        m2 = check_tensor(fields.data.get("m2"), f"{where}: m2", shape=shape, dtype=torch.float64)
        mean = check_tensor(fields.data.get("mean64"), f"{where}: mean64", shape=(c, a), dtype=torch.float64)
        count = check_tensor(fields.data.get("count"), f"{where}: count", shape=(c,), dtype=torch.float64)
        if bool((count < 0).any()):
            fields.fail("count", "holds negative counts")
        check_tensor(mean, f"{where}: mean64", dtype=torch.float32)
        covariance = m2 / count.clamp(min=1).view(-1, *[1] * (m2.dim() - 1))
        check_tensor(covariance, f"{where}: m2 / count (the covariance)", dtype=torch.float32)
        diagonal_entries = covariance if diagonal else covariance.diagonal(dim1=1, dim2=2)
        if bool((diagonal_entries < 0).any()):
            fields.fail("m2", "holds negative variances: it is not a covariance")
        return cls.from_state_dict({"num_features": a, "num_classes": c, "diagonal": diagonal, "m2": m2,
                                    "mean64": mean, "count": count}, device=device)
