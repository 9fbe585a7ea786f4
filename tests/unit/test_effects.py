from jobbroker.broker.core.effects import Deliver, JobBuried, Outbox, ProgressReady, ResultsReady, Revoke


def test_an_empty_outbox_is_false_and_has_no_effects() -> None:
    outbox = Outbox()
    assert not outbox
    assert outbox.effects() == []


def test_effects_come_notices_first_then_revocations_before_deliveries() -> None:
    outbox = Outbox()
    outbox.results[1] = [[7, "done", 1]]
    outbox.deliveries[2] = [[8, 1, "q", b"", 1, 30.0, None, None]]
    outbox.revoked[2] = [[6, 1, "cancelled"]]
    outbox.progress[1] = [[8, 0.5, "half"]]
    outbox.notices.append(JobBuried(5, "q", {"type": "E", "message": "m"}))
    assert outbox
    assert [type(e) for e in outbox.effects()] == [JobBuried, Revoke, Deliver, ProgressReady, ResultsReady]
    assert outbox.effects()[2] == Deliver(2, [[8, 1, "q", b"", 1, 30.0, None, None]])
