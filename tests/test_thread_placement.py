"""Thread placement for the CPU backend: which CPU the engine thread, ONNX Runtime's pool and the rest get."""

from __future__ import annotations

from daemon.thread_placement import CONTENDED_STREAM_INTERVAL_MS, ThreadPlacement, auto_stream_interval_ms, plan_placement


def test_two_cores_engine_alone_on_the_first():
    p = plan_placement(2, [1, 0])
    assert p == ThreadPlacement(engine_cpu=0, worker_cpus=(1,), service_cpu=1)
    assert p.onnxruntime_affinities() == "2"  # ONNX Runtime counts processors from 1


def test_a_cpu_set_is_followed_not_the_machine():
    p = plan_placement(4, [7, 2, 3, 6])
    assert (p.engine_cpu, p.worker_cpus, p.service_cpu) == (2, (3, 6, 7), 7)
    assert p.onnxruntime_affinities() == "4;7;8"


def test_no_pinning_where_it_does_not_fit():
    assert plan_placement(1, [0]) is None  # one thread: nothing to keep apart
    assert plan_placement(2, [0, 1, 2, 3]) is None  # spare CPUs take the gRPC side without pinning
    assert plan_placement(4, [0, 1]) is None  # more threads than CPUs


def test_auto_stream_interval_batches_only_where_the_step_fills_every_cpu():
    assert auto_stream_interval_ms(2, 2) == CONTENDED_STREAM_INTERVAL_MS == 25
    assert auto_stream_interval_ms(1, 1) == 25  # one core: the gRPC side always competes with the step
    assert auto_stream_interval_ms(2, 4) == 0  # a core to spare for the gRPC side
    assert auto_stream_interval_ms(0, 2) == 0  # a GPU backend: the CPU waits on the device
