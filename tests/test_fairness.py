"""Fair share in the admission queue: priority first, then tenants (keys, else client addresses) in turn, then
arrival; and a key's priority capping X-Priority."""

from __future__ import annotations

from llmbalancer.errors import ProxyError
from llmbalancer.scheduling.admission import AdmissionQueue, _Place
from llmbalancer.scheduling.fairness import FairShare, fair_sort_key, keyed, priority_for, tenant_of
from llmbalancer.scheduling.selectors import RequestFacts


def _order(queue: AdmissionQueue, model: str = "m") -> list[str]:
    return [w.tenant for w in queue._queues.get(model, [])]


def _place(queue: AdmissionQueue, tenant: str, priority: int = 0, model: str = "m") -> _Place:
    return queue.waiting(model, priority, tenant=tenant)


def test_a_flooding_tenant_does_not_push_a_light_one_to_the_back() -> None:
    queue = AdmissionQueue(max_size=1000, timeout=30)
    places = [_place(queue, "heavy") for _ in range(50)]
    light = _place(queue, "light")
    assert _order(queue).index("light") == 1  # behind the one heavy request already first, not behind 50
    places.append(light)
    # Served in order: the light tenant's next request again waits behind one heavy request only.
    for _ in range(2):
        first = queue._queues["m"][0]
        queue.take(first)
    _place(queue, "light")
    assert _order(queue)[:2] == ["heavy", "light"]


def test_tenants_with_a_backlog_take_turns_and_priority_still_comes_first() -> None:
    queue = AdmissionQueue(max_size=1000, timeout=30)
    for _ in range(3):
        _place(queue, "a")
    for _ in range(3):
        _place(queue, "b")
    _place(queue, "c")
    _place(queue, "urgent", priority=5)
    assert _order(queue) == ["urgent", "a", "b", "c", "a", "b", "a", "b"]


def test_without_a_backlog_it_is_first_come_first_served() -> None:
    queue = AdmissionQueue(max_size=1000, timeout=30)
    for tenant in ("x", "y", "z", "x"):
        _place(queue, tenant)
    assert _order(queue) == ["x", "y", "z", "x"]


def test_an_emptied_queue_forgets_its_tags_and_many_tenants_stay_bounded() -> None:
    queue = AdmissionQueue(max_size=100_000, timeout=30)
    places = [_place(queue, "t") for _ in range(3)]
    assert queue.fair.tenants("m") == 1
    for place in places:
        queue.take(place.waiter)
    assert queue.fair.tenants("m") == 0
    share = FairShare()
    for n in range(25_000):
        share.joined("m", f"client-{n}", share.start_tag("m", f"client-{n}", 0, []))
    assert share.tenants("m") <= 10_001


def test_fair_sort_key_orders_priority_then_start_then_arrival() -> None:
    keys = [fair_sort_key(0, 2.0, 1), fair_sort_key(1, 9.0, 5), fair_sort_key(0, 1.0, 7), fair_sort_key(0, 1.0, 3)]
    assert sorted(keys) == [(-1, 9.0, 5), (0, 1.0, 3), (0, 1.0, 7), (0, 2.0, 1)]


def test_a_keys_priority_caps_x_priority_and_is_the_default() -> None:
    def facts(priority: str | None) -> RequestFacts:
        return RequestFacts("POST", "/v1/chat/completions", "10.0.0.1", {"X-Priority": priority} if priority else {})

    assert priority_for(facts("7")) == 7  # no key: the client's word
    assert priority_for(facts(None)) == 0
    assert priority_for(keyed(facts(None), "team", 3)) == 3  # a key's request queues at the key's priority
    assert priority_for(keyed(facts("9"), "team", 3)) == 3  # never above it
    assert priority_for(keyed(facts("-2"), "team", 3)) == -2  # the client may lower it
    assert priority_for(keyed(facts("nonsense"), "team", 3)) == 3
    assert tenant_of(facts(None)) == "10.0.0.1" and tenant_of(keyed(facts(None), "team", 0)) == "team"


def test_the_expected_wait_counts_the_waiters_ahead_of_a_requests_fair_place() -> None:
    # Two seconds per waiter ahead, plus its own turn: 15 ahead is 32 s, past the 30 s timeout. A heavy
    # tenant's backlog is refused beyond it, while a light tenant, placed after one heavy request, is admitted.
    queue = AdmissionQueue(max_size=1000, timeout=30)

    def expected(ahead: int) -> float:
        return 2.0 * (ahead + 1)

    heavy = [queue.waiting("m", 0, tenant="heavy", expected_wait=expected) for _ in range(15)]
    try:
        queue.waiting("m", 0, tenant="heavy", expected_wait=expected)
    except ProxyError as refused:
        assert refused.code == "queue_full" and refused.retry_after == 32
    else:
        raise AssertionError("the heavy tenant's 16th request should be refused")
    light = queue.waiting("m", 0, tenant="light", expected_wait=expected)
    assert _order(queue).index("light") == 1 and light.waiter.expected == 4.0
    assert queue.fair.tenants("m") == 2
    for place in [*heavy, light]:
        queue.take(place.waiter)
    assert queue.depth() == 0
