"""Allowances kept per source address (streaming/rate.py KeyedBuckets): the
server's call rate and Realtime's unspoken replies live in them, and an
address must not get a fresh one by crowding the table."""

from __future__ import annotations

from streaming.rate import KeyedBuckets


def test_one_bucket_per_key_none_shared_without_one() -> None:
    buckets = KeyedBuckets(burst=2, per_s=0.0)
    a = buckets.bucket("10.0.0.1")
    assert buckets.bucket("10.0.0.1") is a and buckets.bucket("10.0.0.2") is not a
    assert a.take() and a.take() and not a.take()
    assert not buckets.bucket("10.0.0.1").take()  # spent stays spent for that key
    assert buckets.bucket(None) is not buckets.bucket(None)  # no key: one of its own each time
    assert len(buckets) == 2


def test_a_full_table_forgets_refilled_buckets_before_a_spent_one() -> None:
    """Past max_keys a new key makes room: a bucket that has refilled is
    forgotten first (it gives nothing away), a spent one only when every
    other is spent too, the least recently used first."""
    buckets = KeyedBuckets(burst=1, per_s=0.0, max_keys=3)
    spent = buckets.bucket("spent")
    assert spent.take()
    buckets.bucket("full-1")
    buckets.bucket("full-2")
    buckets.bucket("new")  # the table is full: the full ones go
    assert len(buckets) == 2 and buckets.bucket("spent") is spent and not spent.take()
    for key in ("b", "c"):  # "new", still full, made room for "c"
        assert buckets.bucket(key).take()
    # Every bucket is spent now: the least recently asked for goes ("b":
    # "spent" is asked for after it).
    assert buckets.bucket("spent") is spent
    buckets.bucket("d")
    assert len(buckets) == 3 and buckets.bucket("spent") is spent and not buckets.bucket("c").available()
    assert len(buckets) == 3  # "b" went: asking for "c" found it, made nothing
