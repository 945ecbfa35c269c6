"""Reading back what ``--report-to tensorboard`` wrote: the scalars of a run's TensorBoard event files."""

from __future__ import annotations

import struct
from pathlib import Path


def tensorboard_scalars(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in ``RUN/logs/*/events.out.tfevents.*``: tag -> [(step, value)] in file order.

    The files are TFRecords (length, CRC, an ``Event`` protobuf, CRC), read with tensorboardX's protobuf classes
    (the ``tensorboard`` extra), so no TensorFlow is needed."""
    from tensorboardX.proto import event_pb2

    values: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(run).glob("logs/*/events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                values.setdefault(value.tag, []).append((event.step, value.simple_value))
    return values
