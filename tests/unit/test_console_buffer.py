"""The machine's console buffer: captures guest output whatever happens to the copy stream."""

import io

from hvvmm.machine import ConsoleBuffer


class BrokenPipe(io.RawIOBase):
    def write(self, data):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_failing_stream_does_not_stop_the_capture(caplog):
    console = ConsoleBuffer(1 << 20, BrokenPipe())
    for byte in b"hello":
        console.write(bytes([byte]))
    console.flush()
    assert console.getvalue() == b"hello"
    assert sum("stream failed" in r.getMessage() for r in caplog.records) == 1


def test_the_capture_is_bounded_and_says_so(caplog):
    sink = io.BytesIO()
    console = ConsoleBuffer(4, sink)
    console.write(b"abcdef")
    console.write(b"gh")
    assert console.getvalue() == b"abcd"
    assert sink.getvalue() == b"abcdefgh"  # the stream still gets everything
    assert console.dropped == 4
    assert sum("capture is full" in r.getMessage() for r in caplog.records) == 1
