"""The worker pool's default size follows the host's memory: the workers' share of RAM, less the kernel provider's
warm tree, over the memory planned per kernel, between 1 and 99 (docs/operator-guide.md, "Sizing a cell").

Ansible templates the role's own defaults and vars, as a play that applies the role would, for hosts of several
sizes; only the inputs differ from case to case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from local_ansible import ANSIBLE_PLAYBOOK, ROOT, ansible_environment

ROLE = ROOT / "roles" / "worker_pool"

PLAY = f"""
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files:
    - {ROLE / "defaults" / "main.yml"}
    - {ROLE / "vars" / "main.yml"}
  tasks:
    - name: Write the pool's size, workers and task limit
      ansible.builtin.copy:
        content: "{{{{ {{'size': worker_pool_size | int, 'workers': __worker_pool_workers,
                   'tasks': worker_pool_total_tasks_max | int}} | to_json }}}}"
        dest: "{{{{ sizing_out }}}}"
        mode: "0644"
"""


def sizing(tmp_path: Path, variables: dict[str, object]) -> dict[str, object]:
    playbook = tmp_path / "sizing.yml"
    playbook.write_text(PLAY)
    env = ansible_environment(ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default")
    out = tmp_path / "sizing.json"
    extra = json.dumps({"ansible_python_interpreter": sys.executable, "sizing_out": str(out), **variables})
    result = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", str(playbook), "-e", extra],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("variables", "size"),
    [
        # A lab cell: 2 GiB of which the kernel reports 1,960 MiB, 60 % for the workers.
        ({"worker_pool_memory_mib": 1960, "worker_pool_total_memory_max": "60%"}, 7),
        ({"worker_pool_memory_mib": 8000, "worker_pool_total_memory_max": "75%"}, 55),
        # A 16 GiB server would hold 115; account names have two digits.
        ({"worker_pool_memory_mib": 16000, "worker_pool_total_memory_max": "75%"}, 99),
        # Too small for even one planned kernel: still one worker, never none.
        ({"worker_pool_memory_mib": 512, "worker_pool_total_memory_max": "60%"}, 1),
        # The workers' share as a size rather than a percentage, or no limit at all.
        ({"worker_pool_memory_mib": 8000, "worker_pool_total_memory_max": "4G"}, 36),
        ({"worker_pool_memory_mib": 2048, "worker_pool_total_memory_max": "infinity"}, 15),
        # The planning figures are inputs too.
        ({"worker_pool_memory_mib": 1960, "worker_pool_total_memory_max": "60%", "worker_pool_kernel_mib": 50}, 14),
        # An explicit size wins over the memory.
        ({"worker_pool_memory_mib": 1960, "worker_pool_size": 8}, 8),
    ],
)
def test_the_default_pool_size_follows_the_hosts_memory(tmp_path: Path, variables: dict, size: int) -> None:
    found = sizing(tmp_path, variables)
    assert found["size"] == size, found
    assert len(found["workers"]) == size and found["workers"][-1] == f"cellw{size:02d}", found


def test_the_total_task_limit_grows_with_the_pool(tmp_path: Path) -> None:
    assert sizing(tmp_path, {"worker_pool_memory_mib": 1960, "worker_pool_total_memory_max": "60%"})["tasks"] == 1024
    assert sizing(tmp_path, {"worker_pool_memory_mib": 16000, "worker_pool_total_memory_max": "75%"})["tasks"] == 1584
