"""The Fashion-MNIST benchmarks' shared steps: wall times kept across invocations."""
from __future__ import annotations

import json

from benchmark_helpers import load_benchmark

StepSeconds = load_benchmark("fmnist_steps").StepSeconds


def test_step_seconds_survive_a_new_invocation_and_add_up_a_resumed_run(tmp_path):
    path = tmp_path / "seconds" / "bench.json"
    first = StepSeconds(path)
    first.record("pretraining", 100.0)
    first.record("probe", 5.0)
    assert json.loads(path.read_text()) == {"pretraining": 100.0, "probe": 5.0}

    # a later invocation: the pretraining resumed after a stop adds its part, the probe run again replaces its time
    second = StepSeconds(path)
    assert second == {"pretraining": 100.0, "probe": 5.0}
    second.record("pretraining", 40.0, resumed=True)
    second.record("probe", 7.0)
    assert StepSeconds(path) == {"pretraining": 140.0, "probe": 7.0}
    assert not list(path.parent.glob("*.partial"))
