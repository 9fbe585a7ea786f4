from jobbroker.broker.core.deadlines import Deadlines, OrderedDeadlines


def test_expire_in_order_and_cancel() -> None:
    deadlines: Deadlines[str] = Deadlines()
    deadlines.add("b", 2.0)
    deadlines.add("a", 1.0)
    deadlines.add("c", 3.0)
    deadlines.cancel("b")
    assert deadlines.next_deadline() == 1.0
    assert deadlines.expire(2.5) == ["a"]
    assert deadlines.next_deadline() == 3.0
    assert deadlines.expire(10) == ["c"]
    assert deadlines.next_deadline() is None and len(deadlines) == 0


def test_adding_again_replaces_the_deadline() -> None:
    deadlines: Deadlines[int] = Deadlines()
    deadlines.add(1, 5.0)
    deadlines.add(1, 9.0)
    assert deadlines.expire(6.0) == []
    assert deadlines.next_deadline() == 9.0
    assert deadlines.expire(9.0) == [1]


def test_cancelled_entries_do_not_pile_up() -> None:
    deadlines: Deadlines[int] = Deadlines()
    for i in range(100_000):
        deadlines.add(i, float(i))
        deadlines.cancel(i)
    assert len(deadlines._heap) <= 2 * 1024 + 2
    assert deadlines.next_deadline() is None


def test_ordered_deadlines_expire_in_order_and_never_early() -> None:
    deadlines: OrderedDeadlines[str] = OrderedDeadlines()
    deadlines.add("a", 1.0)
    deadlines.add("b", 2.0)
    deadlines.add("c", 1.5)  # out of order: moved to 2.0
    deadlines.cancel("a")
    assert deadlines.next_deadline() == 2.0
    assert deadlines.expire(1.9) == []
    assert deadlines.expire(2.0) == ["b", "c"]
    assert deadlines.next_deadline() is None and len(deadlines) == 0
