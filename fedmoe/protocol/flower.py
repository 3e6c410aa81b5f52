"""Where fedmoe tunes Flower (flwr 1.42.x, pinned in pyproject.toml) for short exchanges.

A Flower message's content travels as separate objects. A receiver that is told of a message
before all of its objects arrived (a SuperNode stores the message, then pulls its objects; the
executor, or the ServerApp for a reply, may ask in between) waits `initial_backoff` before asking
again: 1 s in flwr 1.42, doubling up to 10 s. A secure-aggregation round is several exchanges, so
that second was most of what each light exchange cost once ClientApps ran warm
(docs/performance.md). Here the first retry comes after 0.02 s, doubling up to 0.25 s: the
missing objects are in flight on the same host or the next hop, not minutes away. Flower's limit
on the total wait (PULL_MAX_TIME, 2 h) still holds; its limit of 500 tries, sized for 10 s pauses,
is raised so that the total wait, not the count, ends a hopeless pull.
"""

from __future__ import annotations

FIRST_RETRY_SECONDS = 0.02
LONGEST_RETRY_SECONDS = 0.25
MAX_TRIES_PER_OBJECT = 100_000  # 2 h of 0.25 s pauses is 28,800 tries: PULL_MAX_TIME ends it first


def quick_object_pulls(max_seconds: float | None = None) -> None:
    """Every object pull in this process retries after 0.02 s, doubling to 0.25 s (idempotent);
    `max_seconds`: the longest total wait instead of Flower's 2 h (a bank's executor, whose objects
    come from its own SuperNode: a longer wait means they will never come)."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        function.__kwdefaults__.update(
            initial_backoff=FIRST_RETRY_SECONDS,
            backoff_cap=LONGEST_RETRY_SECONDS,
            max_tries_per_object=MAX_TRIES_PER_OBJECT,
        )
        if max_seconds is not None and "max_time" in function.__kwdefaults__:
            function.__kwdefaults__["max_time"] = max_seconds
