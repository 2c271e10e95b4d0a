"""Recommendations updated in near real time: MovieLens-100k replayed as a stream, a matrix factorisation.

The data is MovieLens-100k as shipped inside the ``recbole`` package (``pip install --no-deps recbole``
and ``pandas``), read with pandas without importing recbole, in timestamp order. MovieLens terms:
research use; cite F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and Context",
ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError, check_positive_int, expected

ML100K_FIELDS = ("user", "item", "rating")


def movielens_100k_path() -> Path:
    """The ``ml-100k.inter`` file inside the installed ``recbole`` package."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("MovieLens-100k is read from the recbole package: pip install --no-deps recbole pandas")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise InputError(f"the recbole package has no MovieLens-100k file at {path}")
    return path


def load_movielens_100k() -> dict[str, np.ndarray]:
    """The 100,000 ratings in timestamp order (ties in file order): ``user``, ``item`` (0-based int64),
    ``rating`` (float32, 1-5) and ``timestamp`` (int64, seconds)."""
    import pandas as pd

    frame = pd.read_csv(movielens_100k_path(), sep="\t")
    frame.columns = ["user", "item", "rating", "timestamp"]
    frame = frame.sort_values("timestamp", kind="stable")
    return {"user": frame["user"].to_numpy(np.int64) - 1, "item": frame["item"].to_numpy(np.int64) - 1,
            "rating": frame["rating"].to_numpy(np.float32), "timestamp": frame["timestamp"].to_numpy(np.int64)}


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's finaliser (Steele et al. 2014), in wrapping int64 arithmetic: ids that differ by one land far apart.
_MIX = (_signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB))
_GOLDEN = 0x9E3779B97F4A7C15


def hash_ids(ids: torch.Tensor, buckets: int, salt: int = 0) -> torch.Tensor:
    """Each int64 id (any value: negative, past any table) mapped to a bucket in ``[0, buckets)``, the same on
    every run and device."""
    x = ids.to(torch.int64) + _signed(_GOLDEN * (salt + 1) % (1 << 64))
    x = (x ^ (x >> 30)) * _MIX[0]
    x = (x ^ (x >> 27)) * _MIX[1]
    x = x ^ (x >> 31)
    return torch.remainder(x, buckets)


class HashedEmbedding(torch.nn.Module):
    """An embedding for ids from an open set (users and items that keep arriving): each id is hashed into one of
    ``buckets`` rows (:func:`hash_ids`), so that no id is ever out of range and the table never grows: a
    checkpoint has the same shapes all run long, and a resume is exact.

    Two ids that share a bucket share a row. The module counts how often that happens, in buffers saved with
    the weights (while training; not in eval mode): :meth:`stats` gives the buckets used, those shared by two
    ids or more, and ``collision_rate``, the fraction of training lookups that went to a shared bucket. Give
    ``buckets`` a few times the ids expected (with 4x, about 22 % of ids share their bucket: 1 - e^-1/4).

    ``min_count`` (1: off): an id gets its bucket's row only once training has seen it ``min_count`` times
    (this batch's sightings included); before that it reads and trains one shared *cold* row (an extra row,
    index ``buckets``), so that ids seen once or twice neither collide with nor disturb the rows of frequent
    ids. Sightings are counted in a count-min sketch (``sketch_depth`` rows of ``sketch_width`` saturating
    uint8 counters, hashed with salts of their own): it never undercounts, so an id seen ``min_count`` times
    always gets its row; it may overcount, so a rare id may get its row early, about as often as
    ``sketch_fill ** sketch_depth`` (:meth:`stats`).

    ``expire_after`` (``None``: off): a bucket that no training lookup touched for ``expire_after`` training
    forward calls is reset when it is next touched: its row re-drawn from the table's init (``N(0, init_std²)``,
    zeros for 0; from a generator seeded by the module's clock, so a resumed run draws the same values) and
    its collision bookkeeping cleared, so that a new id does not inherit a stale id's row. The optimizer's
    state for that row (momentum, Adam moments) is not reset: plain SGD sees the reset exactly.
    """

    owner: torch.Tensor
    used: torch.Tensor
    shared: torch.Tensor
    lookups: torch.Tensor
    events: torch.Tensor
    sketch: torch.Tensor
    last_seen: torch.Tensor
    clock: torch.Tensor

    def __init__(self, buckets: int, dim: int, sparse: bool = False, salt: int = 0, min_count: int = 1,
                 expire_after: int | None = None, init_std: float = 1.0, sketch_width: int | None = None,
                 sketch_depth: int = 4) -> None:
        super().__init__()
        check_positive_int("buckets", buckets)
        check_positive_int("min_count", min_count)
        if min_count > 255:
            raise expected("min_count", "at most 255 (the sketch's counters are 8 bits)", min_count)
        if expire_after is not None:
            check_positive_int("expire_after", expire_after)
        if not (isinstance(init_std, (int, float)) and init_std >= 0):
            raise expected("init_std", "a number >= 0", init_std)
        check_positive_int("sketch_depth", sketch_depth)
        self.buckets, self.salt = buckets, int(salt)
        self.min_count, self.expire_after, self.init_std = min_count, expire_after, float(init_std)
        self.cold_row = buckets if min_count > 1 else None  # the shared row of ids not yet seen min_count times
        self.table = torch.nn.Embedding(buckets + (self.cold_row is not None), dim, sparse=sparse)
        self.register_buffer("owner", torch.zeros(buckets, dtype=torch.int64))  # the smallest id seen in a bucket
        self.register_buffer("used", torch.zeros(buckets, dtype=torch.bool))
        self.register_buffer("shared", torch.zeros(buckets, dtype=torch.bool))  # two ids or more seen in it
        self.register_buffer("lookups", torch.zeros(2, dtype=torch.int64))  # training lookups; of them in shared
        if min_count > 1 or expire_after is not None:
            self.register_buffer("events", torch.zeros(2, dtype=torch.int64))  # cold lookups; rows expired
        if min_count > 1:
            width = 4 * buckets if sketch_width is None else check_positive_int("sketch_width", sketch_width)
            self.register_buffer("sketch", torch.zeros(sketch_depth, width, dtype=torch.uint8))
        if expire_after is not None:
            self.register_buffer("last_seen", torch.zeros(buckets, dtype=torch.int64))  # the clock at its last lookup
            self.register_buffer("clock", torch.zeros((), dtype=torch.int64))  # training forward calls

    @property
    def weight(self) -> torch.Tensor:
        """The table's rows (one per bucket, then the cold row when ``min_count > 1``)."""
        return self.table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the ids' buckets (``ids``: any int64 values); the cold row for ids not yet seen
        ``min_count`` times."""
        flat = ids.reshape(-1).to(torch.int64)
        rows = hash_ids(flat, self.buckets, self.salt)
        if self.training:
            with torch.no_grad():
                warm = self._count(flat) if self.cold_row is not None else None
                self._observe(flat, rows, warm)
        else:
            warm = self.seen_count(flat) >= self.min_count if self.cold_row is not None else None
        if warm is not None:
            rows = torch.where(warm, rows, torch.full_like(rows, self.buckets))
        self.last_rows = rows.reshape(ids.shape)  # which rows the ids read (SequentialMSE: same row, same user)
        return self.table(self.last_rows)

    def _sketch_cells(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's cell in every row of the sketch, as indices into the flattened sketch: ``(depth, len(ids))``."""
        depth, width = self.sketch.shape
        # Salts apart from the bucket hashes' (small integers): row r of the sketch of the table of salt s.
        cells = [hash_ids(ids, width, 7919 * (self.salt + 1) + 104729 * (r + 1)) + r * width for r in range(depth)]
        return torch.stack(cells)

    def seen_count(self, ids: torch.Tensor) -> torch.Tensor:
        """The sketch's count of training sightings of each id (capped at ``min_count``): never below the true
        count (or ``min_count``), sometimes above it. Only with ``min_count > 1``."""
        if self.cold_row is None:
            raise InputError("seen_count() needs a HashedEmbedding with min_count > 1 (ids are not counted)")
        cells = self._sketch_cells(ids.reshape(-1).to(torch.int64))
        return self.sketch.view(-1)[cells].amin(0).to(torch.int64).reshape(ids.shape)

    def _count(self, ids: torch.Tensor) -> torch.Tensor:
        """Add a training batch's sightings to the sketch; whether each id has now been seen ``min_count`` times."""
        if not len(ids):
            return torch.zeros(0, dtype=torch.bool, device=ids.device)
        cells = self._sketch_cells(ids)
        flat = self.sketch.view(-1)
        touched, times = torch.unique(cells.reshape(-1), return_counts=True)  # exact, whatever the repeats
        flat[touched] = torch.clamp(flat[touched].to(torch.int64) + times, max=self.min_count).to(torch.uint8)
        return flat[cells].amin(0) >= self.min_count

    def _observe(self, ids: torch.Tensor, rows: torch.Tensor, warm: torch.Tensor | None) -> None:
        """Count the lookups of a batch (those of ``warm`` ids go to their buckets); reset expired buckets before
        they are read. Touches only the batch's buckets."""
        if self.expire_after is not None:
            self.clock += 1
        if not len(ids):
            return
        self.lookups[0] += len(ids)
        if warm is not None:
            self.events[0] += (~warm).sum()
            ids, rows = ids[warm], rows[warm]
            if not len(ids):
                return
        touched, where = torch.unique(rows, return_inverse=True)
        if self.expire_after is not None:
            self._expire(touched)
            self.last_seen[touched] = self.clock
        smallest = torch.full(touched.shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=ids.device)
        smallest.scatter_reduce_(0, where, ids, reduce="amin")
        owner = torch.where(self.used[touched], self.owner[touched], smallest)  # a new bucket: its smallest id
        self.owner[touched] = owner
        self.used[touched] = True
        self.shared[touched[where[ids != owner[where]]]] = True
        self.lookups[1] += self.shared[rows].sum()

    def _expire(self, touched: torch.Tensor) -> None:
        """Reset the buckets of ``touched`` that no training lookup touched for ``expire_after`` forward calls."""
        assert self.expire_after is not None
        stale = self.used[touched] & (self.clock - self.last_seen[touched] > self.expire_after)
        if not bool(stale.any()):
            return
        gone = touched[stale]
        weight = self.table.weight
        generator = torch.Generator().manual_seed((int(self.clock) * 1_000_003 + self.salt) % (1 << 62))
        fresh = torch.randn(len(gone), weight.shape[1], generator=generator, dtype=torch.float32) * self.init_std
        weight[gone] = fresh.to(weight.device, weight.dtype)
        self.owner[gone] = 0
        self.used[gone] = False
        self.shared[gone] = False
        self.events[1] += len(gone)

    def collision_rate(self) -> float:
        """The fraction of training lookups so far that went to a bucket shared by two ids or more."""
        lookups, shared = (int(v) for v in self.lookups.tolist())
        return shared / lookups if lookups else 0.0

    def stats(self) -> dict[str, float]:
        """``buckets``, ``used`` (buckets an id went to), ``shared`` (buckets two ids or more went to) and
        ``collision_rate``; with ``min_count > 1`` also ``cold_lookups``, ``cold_rate`` (their fraction of
        training lookups) and ``sketch_fill`` (the fraction of the sketch's counters at ``min_count``); with
        ``expire_after`` also ``expired`` (rows reset so far) and ``stale`` (used buckets that the next training
        lookup would reset)."""
        found: dict[str, float] = {"buckets": self.buckets, "used": int(self.used.sum()),
                                   "shared": int(self.shared.sum()), "collision_rate": self.collision_rate()}
        if self.cold_row is not None:
            lookups = int(self.lookups[0])
            found.update(cold_lookups=int(self.events[0]), cold_rate=int(self.events[0]) / lookups if lookups else 0.0,
                         sketch_fill=float((self.sketch >= self.min_count).float().mean()))
        if self.expire_after is not None:
            found.update(expired=int(self.events[1]),
                         stale=int((self.used & (self.clock + 1 - self.last_seen > self.expire_after)).sum()))
        return found


class MatrixFactorization(torch.nn.Module):
    """rating ≈ mean + user bias + item bias + <user vector, item vector> (Koren et al. 2009, biased MF).

    The vectors start as normal noise of standard deviation ``init``, the biases at zero.
    ``sparse=True`` makes the embedding gradients sparse (only the rows of a batch's users and items),
    for ``torch.optim.SparseAdam`` or plain SGD. ``hashed=True`` takes ids from an open set: ``users``
    and ``items`` are then numbers of buckets of :class:`HashedEmbedding` tables, and an id never seen,
    past any size or negative trains a (shared) row instead of failing. With ``hashed=True``, ``min_count``
    and ``expire_after`` go to every table (see :class:`HashedEmbedding`): an id trains its own rows once seen
    ``min_count`` times (a shared cold row before), and a bucket unseen for ``expire_after`` training steps
    starts again from the init.
    """

    def __init__(self, users: int, items: int, dim: int = 16, mean: float = 3.5, sparse: bool = False,
                 seed: int = 0, hashed: bool = False, init: float = 0.01, min_count: int = 1,
                 expire_after: int | None = None) -> None:
        super().__init__()
        check_positive_int("users", users)
        check_positive_int("items", items)
        check_positive_int("dim", dim)
        if not hashed and (min_count != 1 or expire_after is not None):
            raise InputError("min_count and expire_after apply to hashed tables: pass hashed=True")
        generator = torch.Generator().manual_seed(seed)
        def table(rows: int, width: int, salt: int, std: float) -> torch.nn.Module:
            if hashed:  # a user's vector and bias share their bucket (salt 0); an item's too (salt 1)
                return HashedEmbedding(rows, width, sparse=sparse, salt=salt, min_count=min_count,
                                       expire_after=expire_after, init_std=std)
            return torch.nn.Embedding(rows, width, sparse=sparse)

        self.user_vectors = table(users, dim, 0, init)
        self.item_vectors = table(items, dim, 1, init)
        self.user_bias = table(users, 1, 0, 0.0)
        self.item_bias = table(items, 1, 1, 0.0)
        with torch.no_grad():
            for vectors in (self.user_vectors, self.item_vectors):
                weight = vectors.weight
                assert isinstance(weight, torch.Tensor)
                weight.copy_(init * torch.randn(weight.shape, generator=generator))
            for bias in (self.user_bias, self.item_bias):
                weight = bias.weight
                assert isinstance(weight, torch.Tensor)
                weight.zero_()
        self.mean = float(mean)
        # What SequentialMSE needs of the last training forward: its ids and vectors; set only then.
        self.keep_rows = False
        self.kept: tuple[torch.Tensor, ...] | None = None

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of ``(user, item)`` pairs."""
        users, items = self.user_vectors(user), self.item_vectors(item)
        if self.keep_rows and self.training:
            # The rows the events read: hashed ids that share a bucket (or the cold row) share their rows.
            self.kept = (getattr(self.user_vectors, "last_rows", user), getattr(self.item_vectors, "last_rows", item),
                         users, items)
        else:
            self.kept = None
        dot = (users * items).sum(-1)
        return self.mean + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1) + dot


def replay(client: Any, stream: str, columns: Mapping[str, np.ndarray], fields: Sequence[str] = ML100K_FIELDS,
           rate: float | None = None, chunk: int = 100, limit: int | None = None) -> list[str]:
    """``XADD`` the rows of ``columns`` to ``stream`` in order, ``chunk`` per pipeline, at about ``rate`` events/s
    (``None``: as fast as Redis takes them); returns the stream ids."""
    if rate is not None and not (isinstance(rate, (int, float)) and rate > 0):
        raise expected("rate", "a positive number of events per second or None", rate)
    check_positive_int("chunk", chunk)
    count = len(columns[fields[0]]) if limit is None else min(limit, len(columns[fields[0]]))
    text = {f: [repr(v) for v in np.asarray(columns[f][:count]).tolist()] for f in fields}
    ids: list[str] = []
    start = time.perf_counter()
    for first in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for row in range(first, min(first + chunk, count)):
            pipe.xadd(stream, {f: text[f][row] for f in fields})
        ids += [i.decode() if isinstance(i, bytes) else str(i) for i in pipe.execute()]
        if rate is not None:
            ahead = start + len(ids) / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
    return ids


def rmse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of predicted ratings (its prequential mean's square root is the prequential RMSE)."""
    return torch.nn.functional.mse_loss(output, target.to(output.dtype))


def per_event(mean: torch.Tensor, size: int, batch_size: int) -> torch.Tensor:
    """``mean``, the loss of a batch of ``size`` events, with the gradient of its sum over ``batch_size`` instead
    (the same when ``size`` is ``batch_size``): SGD at lr = step x ``batch_size`` then moves each event's rows by
    the same per-event step whatever the batch's size, as when ``max_latency`` cuts a batch short or a trainer
    catching up doubles it. The value stays the batch's mean: the prequential score."""
    if size == batch_size:
        return mean
    factor = size / batch_size
    return mean * factor + mean.detach() * (1.0 - factor)


class EventMSE:
    """Mean squared error whose gradient is that of the events' sum over ``batch_size`` (see :func:`per_event`):
    the recipe's loss without :class:`SequentialMSE`, each event one per-event SGD step whatever the batch's
    size."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return per_event(rmse_loss(output, target), len(output), self.batch_size)


class SequentialMSE:
    """Mean squared error of a :class:`MatrixFactorization`'s ratings, each event of a batch scored and trained as
    if the events before it in the batch had already been trained on, one at a time, with plain SGD.

    A batch's predictions all come from the weights before the batch, so an event cannot profit from the events
    just before it: in time order a user rates many films in a row, and a batch of 32 or more scores most of them
    stale (prequential RMSE 1.00 at batch 32 on MovieLens-100k, against 0.95 one event at a time). This loss
    follows the batch's events in order, to first order in the step size:

    - **the score**: an earlier event ``j`` of the same user moves event ``k``'s prediction by
      ``-c_b e_j - c_v e_j <q_j, q_k>`` (an earlier event of the same item alike, with the user vectors), where
      ``e_j`` is ``j``'s own sequential error; the errors solve a unit lower-triangular system of the batch's
      size. Only earlier events' ratings enter: it is a prequential score.
    - **the update**: each event's SGD step at its sequential error, taken with its user's vector as the earlier
      events of that user left it (and its item's alike), instead of the batch's stale vectors.

    Neither correction takes part in the gradient otherwise: the step is the sum of the events' own SGD steps.
    ``vector_step`` and ``bias_step`` are the optimizer's per-event steps (the recipe's ``lr_vectors`` and
    ``lr_biases``: the optimizer's lr over ``batch_size``), so that the corrections follow the update SGD makes;
    with momentum or Adam they are only an approximation. The system is solved ``block`` events at a time (the
    blocks before enter through running sums per user and per item), so a step costs a few passes over
    ``batch x block`` numbers: linear in the batch size. It scores a batch as a whole (``whole_batch``): a
    Trainer refuses it with micro-batches, several processes or a noise scale measured from half batches. Give
    it the model it scores::

        loss = SequentialMSE(model, vector_step=0.05, bias_step=0.025, batch_size=1024)
    """

    whole_batch = True  # a Trainer refuses to split its batches (micro-batches, ranks, halves)

    def __init__(self, model: MatrixFactorization, vector_step: float, bias_step: float, batch_size: int,
                 block: int = 128) -> None:
        if not isinstance(model, MatrixFactorization):
            raise expected("model", "a MatrixFactorization", type(model).__name__)
        check_positive_int("batch_size", batch_size)
        for name, value in (("vector_step", vector_step), ("bias_step", bias_step)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise expected(name, "a finite number >= 0", value)
        check_positive_int("block", block)
        self.model, self.vector_step, self.bias_step, self.batch_size = model, vector_step, bias_step, batch_size
        self.block = block
        self._masks: dict[tuple[Any, ...], torch.Tensor] = {}
        model.keep_rows = True

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(output.dtype)
        kept, self.model.kept = self.model.kept, None
        if kept is None or len(kept[0]) != len(output) or len(output) < 2:
            return per_event(rmse_loss(output, target), len(output), self.batch_size)
        user, item, users, items = kept
        with torch.no_grad():
            errors, moved_users, moved_items = self.sequential(output.detach(), target, user, item, users.detach(),
                                                               items.detach())
        # Zero-valued terms whose gradients are those of the moved vectors: event k's item vector learns from
        # its user's vector as the batch's earlier events of that user left it, and the other way round.
        moved = (items * moved_users).sum(-1) + (users * moved_items).sum(-1)
        scored = output + (errors - (output.detach() - target)) + (moved - moved.detach())
        return per_event(rmse_loss(scored, target), len(output), self.batch_size)

    def sequential(self, predicted: torch.Tensor, target: torch.Tensor, user: torch.Tensor, item: torch.Tensor,
                   users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's sequential errors, and how much the earlier events of each event's user (item) moved that
        user's (item's) vector before the event (see the class).

        The system is solved a block of :attr:`block` events at a time: inside a block densely (a
        ``block x block`` triangular solve), and from the blocks before through running sums per user and per
        item (their errors, and their errors times their vectors): the same system, solved in pieces, so that
        the cost grows with ``size x block`` instead of ``size²``.
        """
        size, dtype = len(predicted), predicted.dtype
        # The optimizer's lr is the per-event step times batch_size, and the gradient that of the squared errors'
        # sum over batch_size (per_event): one event moves its rows by 2 * step times its error, whatever the size.
        bias, vector = 2.0 * self.bias_step, 2.0 * self.vector_step
        # The ids renumbered 0.. in the batch: users first, then items, the rows of the running sums.
        user_index = torch.unique(user, return_inverse=True)[1]
        item_index = torch.unique(item, return_inverse=True)[1]
        rows = torch.stack([user_index, item_index + (int(user_index.max()) + 1)])  # [2, size]
        # Per event and side (0: its user's later events, 1: its item's): steps[side, k] = [bias, vector * its
        # partner's vector] is what one unit of its error moves such an event's score by, dotted with that
        # event's partner[side] = [1, vector]. The running sums are those of error x steps, per row.
        ones = torch.ones(size, 1, dtype=dtype, device=predicted.device)
        partner = torch.stack([torch.cat([ones, items], 1), torch.cat([ones, users], 1)])  # [2, size, dim + 1]
        steps = partner * torch.tensor([bias] + [vector] * users.shape[1], dtype=dtype, device=predicted.device)
        # Comparing floats is the fast path (float32 holds the indices exactly).
        compare = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        blocks = zip(rows.split(self.block, 1), rows.to(compare).split(self.block, 1),
                     (predicted - target).split(self.block), steps.split(self.block, 1), partner.split(self.block, 1))
        sums = None
        if size > self.block:
            sums = torch.zeros(int(rows[1].max()) + 1, steps.shape[2], dtype=dtype, device=predicted.device)
        errors, moved = [], []
        for part_rows, part_keys, stale, part_steps, part_partner in blocks:
            earlier = self._earlier(part_keys, dtype)
            # effect[k, j] = [same user] (bias + vector <q_j, q_k>) + [same item] (bias + vector <p_j, p_k>), j < k
            effect = torch.bmm(part_partner, part_steps.transpose(1, 2)).mul_(earlier).sum(0)
            if sums is not None:
                before = sums[part_rows]  # [2, block, dim + 1]: the sums over the earlier blocks' events
                stale = stale - (before * part_partner).sum((0, 2))
            solved = torch.linalg.solve_triangular(effect, stale[:, None], upper=False, unitriangular=True)
            weighted = part_steps * solved
            own = torch.bmm(earlier, weighted)
            if sums is not None:
                own += before
                sums.index_add_(0, part_rows.reshape(-1), weighted.reshape(-1, weighted.shape[2]))
            errors.append(solved)
            moved.append(own)
        total = torch.cat(moved, 1)[:, :, 1:].neg_()
        return torch.cat(errors)[:, 0], total[0], total[1]

    def _earlier(self, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[side, k, j]``: 1 when ``j < k`` and events ``j`` and ``k`` share their user (side 0) or their item
        (side 1), else 0; ``keys`` are the events' user and item rows. In a buffer kept per size."""
        size = keys.shape[1]
        key = (size, dtype, keys.device)
        if key not in self._masks:
            if len(self._masks) > 4:  # a full block and the last one of a few batch sizes
                self._masks.clear()
            self._masks[key] = torch.empty(2, size, size, dtype=dtype, device=keys.device)
        same = self._masks[key]
        torch.eq(keys[0, :, None], keys[0, None, :], out=same[0])
        torch.eq(keys[1, :, None], keys[1, None, :], out=same[1])
        return same.tril_(-1)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The MovieLens recipe's settings: plain SGD, the step sizes given per event, each event of a batch scored
    after the batch's earlier ones (:class:`SequentialMSE`).

    The loss's gradient is that of the events' sum over ``batch_size`` (its value the batch's mean), so the
    optimizer's lr is the per-event step times ``batch_size``: each event moves its user's and item's rows as one
    SGD step of its own would (river's ``BiasedMF`` recipe, batched), whatever the size of its batch.
    Measured on MovieLens-100k in time order (docs/streams.md, mean of 5 init seeds): prequential RMSE 0.9482
    at batch 1024 with ``sequential``, at 3.75x the events/s of river's ``BiasedMF`` (one event at a time with
    the same steps: 0.9490); without it, 1.00 at batch 32 and 0.962 at batch 8; Adam (dim 16, init 0.01) gave
    1.02-1.05. Use
    :meth:`loss` as the Trainer's loss; with ``sequential`` a Trainer refuses micro-batches and several
    processes (each piece would be corrected as if it were the whole batch).
    """

    batch_size: int = 1024
    dim: int = 10
    init: float = 0.1
    lr_vectors: float = 0.05  # per event
    lr_biases: float = 0.025  # per event
    sequential: bool = True  # score with SequentialMSE (each event after its batch's earlier ones)

    def model(self, users: int = 943, items: int = 1682, **options: Any) -> MatrixFactorization:
        """A :class:`MatrixFactorization` of the recipe's ``dim`` and ``init``."""
        return MatrixFactorization(users, items, dim=self.dim, init=self.init, **options)

    def optimizer(self, model: MatrixFactorization) -> torch.optim.SGD:
        """SGD with the vectors and the biases in two groups, each lr the per-event step times ``batch_size``."""
        return recipe_optimizer(model, lr=self.lr_vectors * self.batch_size, bias_lr=self.lr_biases * self.batch_size)

    def loss(self, model: MatrixFactorization) -> Any:
        """The loss to train ``model`` with: :class:`SequentialMSE` with the recipe's steps when ``sequential``,
        else :class:`EventMSE`; either way each event moves its rows by the per-event steps whatever the size of
        its batch (one cut short by ``max_latency``, or grown to catch up)."""
        if not self.sequential:
            return EventMSE(self.batch_size)
        return SequentialMSE(model, self.lr_vectors, self.lr_biases, self.batch_size)

    def describe(self) -> str:
        return (f"SGD, {self.lr_vectors:g}/{self.lr_biases:g} per event (vectors/biases), dim {self.dim}, "
                f"init {self.init:g}" + (", sequential scoring" if self.sequential else ""))


def recipe_optimizer(model: MatrixFactorization, lr: float, bias_lr: float | None = None) -> torch.optim.SGD:
    """Plain SGD over a :class:`MatrixFactorization` with two parameter groups: the user and item vectors at
    ``lr``, the biases at ``bias_lr`` (half of ``lr`` when not given, as in :class:`Recipe`).

    The loss is the batch's mean, so for a per-event step ``s`` at batch ``b`` give ``lr = s * b``. This is the
    form a configuration file names: ``[optimizer] name = "batchfit.workloads.stream:recipe_optimizer"``,
    ``lr = 0.4``, ``args = { bias_lr = 0.2 }`` is the recipe at batch 8.
    """
    vectors = [model.user_vectors.weight, model.item_vectors.weight]
    biases = [model.user_bias.weight, model.item_bias.weight]
    return torch.optim.SGD([{"params": vectors, "lr": lr},
                            {"params": biases, "lr": lr / 2 if bias_lr is None else bias_lr}])
