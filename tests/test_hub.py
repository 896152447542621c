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
    monkeypatch.setattr(hub_module, "PUT_WAIT", 0.3)
    hub = Hub(0, {}, capacity=1)
    hub.publish(3, "w3")
    assert hub.put(_item(), 2) == ("ok", (3, "w3"))  # newer weights come with the answer
    start = time.monotonic()
    assert hub.put(_item(), 3) == ("full", None)
    assert time.monotonic() - start >= 0.25  # it waited in the hub, not in a busy loop
    threading.Timer(0.1, lambda: hub.drain(1, 0)).start()
    assert hub.put(_item(), 3)[0] == "ok"  # room made while it waited
    hub.finish()
    assert hub.put(_item())[0] == "done"


def test_status_tracks_silence_and_leaving():
    hub = Hub(0, {}, capacity=4)
    hub.join(1)
    hub.put(_item(1))
    hub.explorer_left(1, "stopped by SIGTERM")
    status = hub.status()
    assert status["joined"] == [1] and status["left"] == {1: "stopped by SIGTERM"}
    assert 0 <= status["silent_for"][1] < 1
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
