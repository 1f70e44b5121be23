"""Leader lock keys: stable across processes and releases, distinct per service and schema."""

from __future__ import annotations

import pytest

from driftloop.leader import lock_key

pytestmark = pytest.mark.unit


def test_key_is_stable_and_a_postgres_bigint() -> None:
    # Every replica, of any version, must compute the same key: it is the SHA-256 prefix.
    assert lock_key("consumers.drift_monitor/public") == lock_key("consumers.drift_monitor/public")
    assert lock_key("consumers.drift_monitor/public") == 7_702_546_109_533_081_831
    for name in ("a", "consumers.retrain_trigger/public", "x" * 500):
        assert -(2**63) <= lock_key(name) < 2**63


def test_services_and_schemas_get_their_own_lock() -> None:
    names = [
        f"{service}/{schema}"
        for service in ("consumers.drift_monitor", "consumers.retrain_trigger")
        for schema in ("public", "t0123456789ab")
    ]
    assert len({lock_key(name) for name in names}) == len(names)
