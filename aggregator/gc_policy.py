"""The aggregator process's garbage-collector policy: few, cheap collections under ingest load.

CPython's cyclic collector runs a young-generation pass whenever tracked objects allocated minus
freed reach 700, and every pass walks every young container. Under ingest load that count climbs
in bursts: a batch of a thousand messages waits for its write while paho reads the next, each
message a struct, its lists and a tuple per reading. Measured on the 2-core bench machine
(``bench/cases.py``, 50 readings per message): with the default thresholds the collector ran
about 1,900 times per 1.5 million readings and took about a second of the aggregator's ~6 CPU
seconds; with :func:`settle` it ran 5 times and took 0.1 s. (Reference cycles made per message
are avoided at their source instead: see ``edgeloop.mqtt._EmptyFastMatcher`` and the
``gc=False`` readings in ``edgeloop.wire``. Nothing the ingest keeps relies on the collector.)

:func:`settle` is called once, by the process that runs an aggregator, after it has started:

* ``gc.freeze()`` moves every object alive then (modules, classes, configuration: long-lived by
  nature) out of the collector's sight, so full collections only walk what was made since.
* a young-generation threshold of 50,000: cyclic garbage (rare here) waits a little longer, in
  exchange for passes that no longer run every few messages.

It changes process-wide state, so libraries and tests that construct an ``Ingest`` do not call it;
``edgeloop aggregator`` and the benchmarks' aggregator processes do.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

#: Net allocations of tracked objects between young-generation collections (CPython's default: 700).
YOUNG_THRESHOLD = 50_000


def settle() -> None:
    """Freeze what exists now and raise the young-generation threshold (see the module docstring)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
