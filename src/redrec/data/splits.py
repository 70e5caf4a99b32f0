"""Cold-start split: hold out items that training never sees, to measure how a model ranks new items.

:func:`cold_start_split` picks a seeded random fraction of the items that have events (the *cold* items) and
writes a training store holding every user's events except

* every event of a cold item (training never sees them, as input or as target), and
* each user's last event (the ``loo`` test target of the full store, never trained on).

The item table (ids, text fields, vectors) is copied unchanged, so item indices, and so models trained on the
split store, are the same as in the full store.  ``cold_items.txt`` (one item id per line) lists the held-out
items.  Evaluate on the *full* store under ``loo`` with ``protocol.target_items: cold_items.txt`` and
``target_items_mode: include`` (the cold cases) or ``exclude`` (the warm cases)::

    redrec data cold-split stores/beauty -o stores/beauty-cold --fraction 0.1
    redrec train -c cfg.yaml --set store=stores/beauty-cold ...
    redrec eval --checkpoint RUN --store stores/beauty --protocol loo --target-items stores/beauty-cold/cold_items.txt

An id tower has only its random initial embedding for a cold item; a text or multimodal tower computes it from
the item's content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from redrec.data.store import EventStore, EventStoreWriter
from redrec.errors import ConfigError

COLD_ITEMS_FILE = "cold_items.txt"


def cold_start_split(
    store: EventStore | str | Path, out: str | Path, fraction: float = 0.1, seed: int = 0, overwrite: bool = False,
) -> EventStore:
    """Write the training store of a cold-start split of ``store`` to ``out`` (see the module docstring).

    Returns the new store; ``out/cold_items.txt`` lists the cold item ids and ``meta.json``'s ``source`` records
    the parent store, fraction and seed.  Users left with no event are dropped from the training store.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(None, "fraction", f"must be in (0, 1), got {fraction}")
    st = store if isinstance(store, EventStore) else EventStore(store)
    item = np.asarray(st.item)
    active = np.flatnonzero(np.bincount(item, minlength=st.n_items) > 0)
    n_cold = max(1, int(round(fraction * active.size)))
    cold = np.sort(np.random.default_rng(seed).choice(active, size=n_cold, replace=False))
    is_cold = np.zeros(st.n_items, bool)
    is_cold[cold] = True

    offs = np.asarray(st.offsets, dtype=np.int64)
    keep = ~is_cold[item]
    keep[offs[1:][np.diff(offs) > 0] - 1] = False  # each user's last event (the loo test target)
    seg = np.repeat(np.arange(st.n_users), np.diff(offs))
    counts = np.bincount(seg[keep], minlength=st.n_users)

    out = Path(out)
    source = {"adapter": "cold_start_split", "parent": str(st.path), "fraction": fraction, "seed": seed,
              "n_cold_items": int(n_cold)}
    with EventStoreWriter(out, scenarios=st.scenarios, actions=st.actions_names, time_unit=st.time_unit,
                          source=source, overwrite=overwrite, skip_empty_users=True,
                          with_target=st.target is not None) as w:
        table = st.items_table()
        fields = {c: table.column(c) for c in table.column_names if c != "item_id"}
        w.add_items(table.column("item_id").combine_chunks(), fields=fields or None,
                    vectors=np.asarray(st.item_vectors) if st.item_vectors is not None else None)
        w.add_users(
            st.user_ids.tolist(), counts=counts, item=item[keep], scenario=np.asarray(st.scenario)[keep],
            timestamp=np.asarray(st.timestamp)[keep], actions=np.asarray(st.actions)[keep],
            duration=np.asarray(st.duration)[keep],
            target=np.asarray(st.target)[keep] if st.target is not None else None,
        )
        # written inside the writer's temporary directory, so it appears atomically with the store
        (w.tmp / COLD_ITEMS_FILE).write_text("".join(f"{st.item_ids[i]}\n" for i in cold))
        return w.commit()


def read_item_list(path: str | Path, store: EventStore) -> np.ndarray:
    """Sorted int64 item indices of the item ids listed in ``path`` (one per line; blank lines ignored).

    Raises a DataError naming the file and line of the first id the store does not have.
    """
    from redrec.errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError(p, None, "no such item list file")
    lines = p.read_text().splitlines()
    ids = [(n + 1, s.strip()) for n, s in enumerate(lines) if s.strip()]
    idx = store.item_index([s for _, s in ids]) if ids else np.zeros(0, np.int64)
    bad = np.flatnonzero(idx < 0)
    if bad.size:
        line, s = ids[int(bad[0])]
        raise DataError(p, f"line {line}", f"item id {s!r} is not in the store {store.path}")
    return np.unique(idx)


__all__ = ["COLD_ITEMS_FILE", "cold_start_split", "read_item_list"]
