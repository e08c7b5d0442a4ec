"""--trace: events from every vCPU thread come out as whole JSON lines (hvvmm/cli.py TraceWriter).
Without the lock, two threads writing to one buffered text file interleaved lines and cut them
mid-character (seen with Linux on two vCPUs)."""

import json
import threading

from hvvmm.cli import TraceWriter


class Event:
    def __init__(self, vp, n):
        self.vp, self.n = vp, n

    def to_json(self):
        return json.dumps({"vp": self.vp, "n": self.n, "name": "HV_X64_MSR_STIMER0_COUNT" * 4})


def test_concurrent_events_stay_whole_lines(tmp_path):
    path = tmp_path / "trace.jsonl"
    threads, per_thread = 4, 5000
    with open(path, "w", buffering=1 << 16) as stream:  # as cmd_run opens it
        writer = TraceWriter(stream)
        workers = [threading.Thread(target=lambda vp=vp: [writer(Event(vp, n))
                                                          for n in range(per_thread)])
                   for vp in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    lines = path.read_bytes().decode().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == threads * per_thread
    for vp in range(threads):
        assert [e["n"] for e in events if e["vp"] == vp] == list(range(per_thread))
