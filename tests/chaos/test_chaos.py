"""The fault scenarios of scenarios.py on the running lab, one test each: the test fails when a scenario loses
more than it says it may, or leaves the lab other than it found it. Each outcome, passed or not, goes into
bench/results/chaos.json and chaos.md with its numbers.

`make chaos` after `make up` (root, on the lab's machine; the machine to itself); about 30 minutes under
emulation, so not part of `make test`. `make chaos CHAOS_ARGS='-k reload'` runs some.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

import scenarios
from labkit.load import in_lab_namespace_possible
from scenarios import Outcome

pytestmark = pytest.mark.skipif(not in_lab_namespace_possible(), reason="needs root and the lab (make up)")

SCENARIOS: dict[str, Callable[[], Outcome]] = {
    **{fault.name: (lambda fault=fault: scenarios.run_process_fault(fault)) for fault in scenarios.process_faults()},
    "abrupt loss of a cell VM": scenarios.vm_loss,
    "log host down under a burst": scenarios.log_host_outage,
    "PostgreSQL restart during permalink writes": scenarios.postgresql_restart,
    "steady load, no fault (control)": scenarios.steady_load_control,
    "HAProxy reloads under load": scenarios.haproxy_reloads,
    "flood against the rate limits": lambda: scenarios.flood(scenarios.lab_rate_limit_per_ip()),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_loses_no_more_than_it_may(name: str) -> None:
    scenarios.wait_until(scenarios.every_cell_up, 300, "every cell UP before the scenario", interval=2)
    try:
        outcome = SCENARIOS[name]()
    except Exception as error:
        scenarios.record(Outcome(name, "did not finish", "", -1, False, {"error": f"{type(error).__name__}: {error}"}))
        raise
    scenarios.record(outcome)
    print(f"{name}: lost {outcome.lost}, {json.dumps(outcome.numbers)}")
    assert outcome.passed, f"{outcome.did}: may lose {outcome.may_lose}; lost {outcome.lost}; {outcome.numbers}"
