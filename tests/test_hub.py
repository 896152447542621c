"""The hub (a learner's inbox and weights board) and the explorer's send loop, in one process."""

import threading
import time

from impala.agent import UnrollInfo
from impala.runtime import hub as hub_module
from impala.runtime.hub import Hub
from impala.runtime.job_explorer import send
from impala.shutdown import StopSignals


def _item(explorer=0):
    return ({"unroll": None}, UnrollInfo(explorer, 10, [], [], 0))


def test_weights_are_served_only_when_newer():
    hub = Hub(0, {}, capacity=4)
    assert hub.weights(-1) is None
    hub.publish(5, "w5")
    assert hub.weights(-1) == (5, "w5")
    assert hub.weights(5) is None
    assert hub.weights(7) is None  # an explorer that has newer weights (from another hub)
    hub.publish(4, "w4")  # a late, older publication never replaces a newer one
    assert hub.weights(3) == (5, "w5")


def test_put_waits_for_room_then_answers_full(monkeypatch):
    class Condition(threading.Condition):
        """The hub's condition, telling when a put waits on it."""

        def __init__(self):
            super().__init__()
            self.waiting = threading.Event()

        def wait(self, timeout=None):
            self.waiting.set()
            return super().wait(timeout)

    monkeypatch.setattr(hub_module, "PUT_WAIT", 0.3)
    hub = Hub(0, {}, capacity=1)
    hub._cond = cond = Condition()
    hub.publish(3, "w3")
    assert hub.put(_item(), 2) == ("ok", (3, "w3"))  # newer weights come with the answer
    start = time.monotonic()
    assert hub.put(_item(), 3) == ("full", None)
    assert time.monotonic() - start >= 0.25  # it waited in the hub, not in a busy loop
    # Room made while the put waits: drained once the put is waiting, not after a fixed delay
    # (a stalled machine could let that pass the put's deadline); a long deadline, as a put
    # answers as soon as there is room.
    monkeypatch.setattr(hub_module, "PUT_WAIT", 30.0)
    cond.waiting.clear()
    drainer = threading.Thread(target=lambda: cond.waiting.wait(30) and hub.drain(1, 0))
    drainer.start()
    assert hub.put(_item(), 3)[0] == "ok"  # room made while it waited
    drainer.join()
    assert cond.waiting.is_set()  # it did wait
    hub.finish()
    assert hub.put(_item())[0] == "done"


def test_status_tracks_silence_and_leaving():
    hub = Hub(0, {}, capacity=4)
    hub.join(1)
    hub.put(_item(1))
    hub.explorer_left(1, "stopped by SIGTERM")
    status = hub.status()
    assert status["joined"] == [1] and status["left"] == {1: "stopped by SIGTERM"}
    # Seconds since the explorer was last heard from (not a timestamp); generous for a machine
    # that stalls this thread.
    assert 0 <= status["silent_for"][1] < 30
    items, events = hub.drain(10, 0)
    assert len(items) == 1 and events == ["explorer 1 left: stopped by SIGTERM"]


def test_explorer_sends_the_same_serialised_unroll_until_taken():
    seen = []
    answers = iter(["full", "full", "ok"])

    def put(item):
        seen.append(item)
        return next(answers)

    item = object()  # stands for the reference returned by one ray.put
    assert send(put, item, StopSignals()) == "ok"
    assert len(seen) == 3 and all(s is item for s in seen)


def test_explorer_stops_sending_when_asked():
    signals = StopSignals()
    signals.request()
    assert send(lambda item: "full", object(), signals) == "full"


# --- edges found by the expert review -----------------------------------------------------------
def test_the_hub_counts_what_each_explorer_put():
    """What an explorer started again after dying asks, to make only what is left of its
    share."""
    hub = Hub(0, {}, capacity=8)
    for explorer in (0, 1, 0):
        assert hub.put(_item(explorer))[0] == "ok"
    assert (hub.made_by(0), hub.made_by(1), hub.made_by(2)) == (20, 10, 0)
    hub.finish()
    assert hub.put(_item(0))[0] == "done" and hub.made_by(0) == 20  # refused: not counted


def test_the_explorer_watchdog_fires_only_without_progress():
    from impala.runtime.job_explorer import Watchdog

    fired = []
    # A timeout 30 times the beats' interval: a busy machine's scheduling delays stay far below.
    with Watchdog(3.0, fired.append) as watchdog:
        for _ in range(10):  # progress every 0.1 s: never taken as hung
            time.sleep(0.1)
            watchdog.beat()
        assert fired == []
        deadline = time.monotonic() + 60
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(fired) == 1 and fired[0] > 3.0
    with Watchdog(None, fired.append) as watchdog:  # --explorer-timeout none: no check
        assert watchdog._thread is None


def test_replaced_and_resumed_explorers_get_seeds_of_their_own():
    """A run's first explorers keep the run's own seeds (the serial runtime rebuilds its
    explorers exactly from them); a replacement, or an explorer of a resumed run, does not replay
    the episodes of the start it replaces."""
    from impala.agent.factory import explorer_seed
    from impala.config import resolve

    cfg = resolve({"env": "CartPole-v1", "seed": 3})
    first = [explorer_seed(cfg, i) for i in range(4)]
    assert first == [3 * 10_007 + 1_000 * (i + 1) for i in range(4)]
    later = {
        explorer_seed(cfg, i, (steps, again))
        for i in range(4)
        for steps, again in ((0, 1), (0, 2), (50_000, 0), (50_000, 1))
    }
    assert len(later) == 16 and not later & set(first)
