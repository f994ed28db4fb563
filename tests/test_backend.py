"""The backend contract's shared part and the TensorRT backend's buffer filling, without TensorRT or a GPU."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np

from daemon.backend import write_decode_inputs
from daemon.backend_trt import TrtBackend, _Step
from bundle_format.trt_plan import packed_input_elements, packed_views


def test_decode_inputs_mark_idle_rows_and_leave_their_ids():
    input_ids, positions = np.array([[3], [4], [5], [6]], np.int64), np.array([7, 8, 9, 10], np.int64)
    write_decode_inputs(input_ids, positions, [1, 3], [11, 12], [20, 30])
    assert positions.tolist() == [-1, 20, -1, 30]
    assert input_ids[:, 0].tolist() == [3, 11, 5, 12]  # an idle row keeps a valid id: a graph gathers it all the same


def test_trt_decode_fills_the_batch_size_that_covers_the_highest_slot():
    backend = object.__new__(TrtBackend)  # no TensorRT here: only the buffers a step fills
    backend.slots, backend.layout, backend._ctx_threads = 4, SimpleNamespace(max_seq=65), {threading.get_ident()}
    backend._decode = {}
    for rows in (1, 2, 4):
        host_in = np.zeros(packed_input_elements(rows, 1), np.int64)
        backend._decode[rows] = _Step(None, rows, host_in, None, None, None, **packed_views(host_in, rows, 1),
                                      positions=np.zeros(rows, np.int64))
    step = backend._decode_step([0, 2], [7, 8], [5, 6])
    assert step is backend._decode[4]
    assert step.input_ids[:, 0].tolist() == [7, 0, 8, 0] and step.positions.tolist() == [5, -1, 6, -1]
    # Idle rows sit at position 0 and write to the scratch position, the cache's last.
    assert step.position_ids[:, 0].tolist() == [5, 0, 6, 0] and step.write_indices.tolist() == [5, 64, 6, 64]
    assert backend._decode_step([1], [9], [3]) is backend._decode[2]
