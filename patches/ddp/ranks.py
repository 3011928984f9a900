"""Rank agreement: every rank of a DDP's process group must build it with the same flags, and advice must rest on what
every rank saw. Both go through the default store (not a collective), so a rank without shims cannot mismatch DDP's
own collectives, and every wait is bounded.
"""

from __future__ import annotations

from shims.patches.ddp.policy import AS_WRITTEN

_EXCHANGES = {}  # process-group name -> number of DDP constructions agreed on (the store key's sequence number)
_SHARES = {}  # process-group name -> number of observations shared (their store keys' sequence number)


class RanksDisagree(Exception):
    """The ranks' decisions differ (or a rank never answered); `answers` maps rank -> its decision text."""

    def __init__(self, message, answers, as_written_agree):
        super().__init__(message)
        self.answers, self.as_written_agree = answers, as_written_agree


class RanksDisagreeError(RuntimeError):
    """Raised on every rank when they would build DDP with different flags: training would hang, so it stops here."""


def _group_of(bound):
    import torch.distributed as dist
    group = bound.get("process_group")
    mesh = bound.get("device_mesh")
    if group is None and mesh is not None:
        group = mesh.get_group()
    return group if group is not None else dist.group.WORLD


def agree_across_ranks(decision, bound):
    """Check that every rank of the DDP's process group took the same decision, before any collective runs.

    Goes through the default store (not a collective), so a rank without shims cannot mismatch DDP's own
    collectives; waiting is bounded by the store's timeout (the process group's). Raises RanksDisagree.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = _group_of(bound)
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) < 2:
        return None
    from torch.distributed import distributed_c10d
    store = distributed_c10d._get_default_store()
    name = getattr(group, "group_name", None) or "world"
    sequence = _EXCHANGES[name] = _EXCHANGES.get(name, 0) + 1  # DDP construction is collective: same order per rank
    prefix = f"shims/ddp/{name}/{sequence}/"
    store.set(prefix + str(dist.get_rank()), decision.wire())
    try:
        store.wait([prefix + str(r) for r in ranks])
    except Exception as exc:  # noqa: BLE001 - DistStoreError on timeout
        answered = {r: store.get(prefix + str(r)).decode() for r in ranks if _present(store, prefix + str(r))}
        missing = [r for r in ranks if r not in answered]
        # a rank without shims builds DDP as written: falling back to that is the one choice consistent with it
        raise RanksDisagree(f"rank(s) {missing} gave no find_unused_parameters decision ({type(exc).__name__}: "
                            f"{exc}); is shims running on every rank?", answered, True) from None
    answers = {r: store.get(prefix + str(r)).decode() for r in ranks}
    # no rank may leave before every rank has read: the rank hosting the store would otherwise raise and exit while
    # another still reads, which then sees "Connection reset by peer" instead of the disagreement
    try:
        store.set(prefix + "read/" + str(dist.get_rank()), "1")
        store.wait([prefix + "read/" + str(r) for r in ranks])
    except Exception:  # noqa: BLE001 - every answer is read already; a store going away now changes nothing
        pass
    if len(set(answers.values())) > 1:
        as_written = {a.rsplit(AS_WRITTEN, 1)[-1] for a in answers.values()}
        listing = "; ".join(f"rank {r}: {a}" for r, a in sorted(answers.items()))
        raise RanksDisagree(f"ranks disagree on the DistributedDataParallel find_unused_parameters policy ({listing})",
                            answers, len(as_written) == 1)
    return answers




def _present(store, key):
    """Whether the store holds `key` now (torch 2.0's PrefixStore has no check(): a wait that returns at once)."""
    import datetime
    if hasattr(store, "check"):
        return store.check([key])
    try:
        store.wait([key], datetime.timedelta(milliseconds=10))
        return True
    except Exception:  # noqa: BLE001 - timed out: not there
        return False


class Peers:
    """The ranks of one DDP's process group and where they exchange observations (None when not distributed)."""

    def __init__(self, store, prefix, rank, ranks):
        self.store, self.prefix, self.rank, self.ranks = store, prefix, rank, ranks

    def publish(self, text):
        """This rank's evidence so far (after each observed iteration), for a rank that finishes alone (at exit)."""
        self.store.set(self.prefix + "so-far/" + str(self.rank), text)

    def share(self, text, timeout_s):
        """Publish this rank's final text and read every rank's: {rank: text}. A rank that gave no final text in
        time answers with what it published so far, if anything."""
        import datetime
        store = self.store
        store.set(self.prefix + str(self.rank), text)
        keys = [self.prefix + str(r) for r in self.ranks]
        try:
            store.wait(keys, datetime.timedelta(seconds=timeout_s))
            everyone = True
        except Exception:  # noqa: BLE001 - a rank that stopped early (or no longer answers): what answered is used
            everyone = False
        answers = {}
        for r, key in zip(self.ranks, keys):
            try:
                if everyone or _present(store, key):
                    answers[r] = store.get(key).decode()
                elif _present(store, self.prefix + "so-far/" + str(r)):
                    answers[r] = store.get(self.prefix + "so-far/" + str(r)).decode()
            except Exception:  # noqa: BLE001 - the store went away (the rank hosting it exited)
                break
        return answers


def peers_of(bound):
    """Peers of the DDP being built with arguments `bound`; called once per construction on every rank (DDP
    construction is collective: the same order on every rank, so the sequence number matches)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = _group_of(bound)
    ranks = dist.get_process_group_ranks(group)
    name = getattr(group, "group_name", None) or "world"
    sequence = _SHARES[name] = _SHARES.get(name, 0) + 1
    if len(ranks) < 2:
        return None
    from torch.distributed import distributed_c10d
    return Peers(distributed_c10d._get_default_store(), f"shims/ddp-observed/{name}/{sequence}/", dist.get_rank(),
                 ranks)


def is_first_rank():
    """Whether this process logs what all ranks share (rank 0, or the only process)."""
    try:
        import torch.distributed as dist
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    except Exception:  # noqa: BLE001
        return True
