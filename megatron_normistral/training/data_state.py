"""What a checkpoint records about the data a run has read, and what a resume says about it.

The mixture index is a function of the corpora, weights, seed, sequence length, run length
and mixture changes; its fingerprint, and the fingerprint of the part already consumed, are
saved with every checkpoint so a resumed run can tell a deliberate change after the samples
consumed (a ``data.mixture_changes`` entry at a later step: a note) from one that would read
some data again and skip some (a warning)."""
from __future__ import annotations


def checkpoint_extras(data, state) -> dict:
    if data.train is None:
        return {}
    return {
        "mixture_fingerprint": data.mixture_fingerprint,
        "mixture_consumed_fingerprint": data.train.dataset.consumed_fingerprint(state.consumed_samples),
    }


def resume_note(data, state) -> str | None:
    if data.train is None:
        return None
    return data.train.dataset.resume_note(state.consumed_samples, state.step, state.extra.get("mixture_fingerprint"),
                                          state.extra.get("mixture_consumed_fingerprint"))
