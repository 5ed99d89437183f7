"""Bad role input is refused, with a message naming the problem, before any task that could change a host.

Each case runs the role against this machine with `--tags validate`: only the argument_specs check (always
tagged) and the role's read-only validation tasks run, so even a check that wrongly passed changes nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from local_ansible import ANSIBLE_PLAYBOOK, ROOT, ansible_environment


def run_role(tmp_path: Path, role: str, variables: dict) -> subprocess.CompletedProcess[str]:
    """role, or role:entry_point for an entry point other than main (include_role with tasks_from)."""
    name, _, entry_point = role.partition(":")
    playbook = tmp_path / "play.yml"
    play = "- hosts: localhost\n  connection: local\n  gather_facts: true\n  gather_subset: [min]\n"
    if entry_point:
        play += (
            f"  tasks:\n    - ansible.builtin.include_role:\n        name: {name}\n"
            f"        tasks_from: {entry_point}\n      tags: [validate]\n"
        )
    else:
        play += f"  roles:\n    - role: {name}\n"
    playbook.write_text(play)
    env = ansible_environment(ANSIBLE_ROLES_PATH=str(ROOT / "roles"), ANSIBLE_LIBRARY=str(ROOT / "library"))
    command = [str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "--tags", "validate", str(playbook)]
    command += ["-e", json.dumps({"ansible_python_interpreter": sys.executable, **variables})]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)


BAD_INPUT = [
    ("worker_pool", {"worker_pool_size": 0}, "pool size must be 1-99 (got 0)"),
    ("worker_pool", {"worker_pool_size": "eight"}, "worker_pool_size"),
    ("worker_pool", {"worker_pool_kernel_mib": 0}, "worker_pool_kernel_mib must be at least 1"),
    ("worker_pool", {"worker_pool_selinux_user": "staff_u"}, "worker_pool_selinux_user must be one of"),
    ("worker_pool", {"worker_pool_selinux_user": "unconfined_u"}, "worker_pool_selinux_user must be one of"),
    (
        "worker_pool",
        {"worker_pool_quota_block_soft_kib": 0, "worker_pool_quota_block_hard_kib": 8},
        "is below the dotfiles' size",
    ),
    ("worker_pool", {"worker_pool_quota_inode_soft": 20, "worker_pool_quota_inode_hard": 10}, "at least the soft"),
    ("worker_pool", {"worker_pool_first_uid": 0}, "uids and gid at least 1000"),
    ("worker_pool", {"worker_pool_immutable_files": [".zshrc"]}, "has no template for it"),
    ("worker_pool", {"worker_pool_egress_allowlist": [{"port": 80}]}, "address"),
    ("tmp_cleanup", {"tmp_cleanup_max_age_hours": 0}, "the age must be at least 1 hour"),
    ("tmp_cleanup", {"tmp_cleanup_directories": ["tmp"]}, "absolute paths other than /"),
    ("tmp_cleanup", {"tmp_cleanup_extra_directories": ["/"]}, "absolute paths other than /"),
    ("selinux", {"selinux_state": "disabled"}, "selinux_state must be one of: enforcing, permissive"),
    ("base", {"base_ssh_port": 70000}, "SSH"),
    ("base", {"base_clone_reset_extra_paths": ["/"]}, "never / itself"),
    ("base", {"base_clone_reset_extra_paths": ["var/lib/app"]}, "must be absolute paths"),
    ("cell_server", {"cell_server_preforked": 9, "cell_server_max_kernels": 8}, "must not exceed max_kernels (8)"),
    ("cell_server", {"cell_server_port": 0}, "cell_server_port must be from 1 to 65535, got 0"),
    ("cell_server", {"cell_server_timeout": 0.05}, "cell_server_timeout must be from 0.1 to 3600, got 0.05"),
    ("cell_server", {"cell_server_kernel": "julia"}, "cell_server_kernel must be one of: python3, sage"),
    ("cell_server", {"cell_server_kernel_runtime_dir": "/var/kernels"}, "must be under /run"),
    ("cell_server", {"cell_server_memory_mb": "lots"}, "cell_server_memory_mb"),
    ("cell_server", {"cell_server_memory_mb": 32}, "memory 0 (the kernel's own need) or at least 64 MiB"),
    ("cell_server", {"cell_server_allowed_origins": ["course.example"]}, "each allowed origin scheme://host"),
    ("cell_server", {"cell_server_sessions_per_client": 0}, "sessions_per_client must be from 1 to 1000, got 0"),
    ("cell_server", {"cell_server_session_drain_seconds": -1}, "drain_seconds must be from 0 to 3600, got -1"),
    ("cell_server", {"cell_server_session_lifetime_seconds": "forever"}, "cell_server_session_lifetime_seconds"),
    ("haproxy", {"haproxy_rate_limit_per_ip": 50, "haproxy_rate_limit_total": 10}, "the total at least the per-IP"),
    ("haproxy", {"haproxy_check_fall": 0}, "fall and rise at"),
    ("haproxy", {"haproxy_server_timeout": 90}, "the server timeout (90 s) longer than a cell may take"),
    ("nginx", {"cellfleet_answer_seconds": 50}, "the answer seconds at least their sum (got 50)"),
    ("nginx", {"cellfleet_computation_seconds": 0}, "the computation and kernel start seconds above 0"),
    ("haproxy", {"haproxy_rate_limit_exempt": ["monitoring.example"]}, "(not: monitoring.example)"),
    ("nginx", {"nginx_upstream": "localhost"}, "the upstream must be host:port (got localhost)"),
    ("nginx", {"nginx_static_root": "static"}, "the static root an absolute path"),
    ("permalink_db", {"permalink_db_backend": "mysql"}, "permalink_db_backend must be one of: postgresql, sqlite"),
    ("permalink_db", {"permalink_db_name": "Perma-Links"}, "plain lowercase identifier (got Perma-Links)"),
    ("permalink_db", {"permalink_db_backup_keep": 0}, "keep at least 1 backup"),
    ("permalink_db", {"permalink_db_allowed_origins": ["https://a.example/page"]}, "each allowed origin scheme://host"),
    ("private_network", {"private_network_address": ""}, "IPv4 address in the mesh (got '')"),
    (
        "private_network",
        {"private_network_address": "10.78.0.1", "private_network_interface": "wireguard-mesh-0"},
        "(got 'wireguard-mesh-0')",
    ),
    (
        "private_network",
        {"private_network_address": "10.78.0.1", "private_network_port": "udp"},
        "private_network_port",
    ),
    ("private_network", {"private_network_address": "10.78.0.1", "private_network_group": "nobody"}, "found 0"),
    ("hypervisor", {"hypervisor_bridge": "bridge-of-the-lab"}, "the bridge a device name of 1-15 characters"),
    ("hypervisor", {"hypervisor_dhcp_range": [200, 100]}, "2-254 in order (got [200, 100])"),
    ("hypervisor", {"hypervisor_dhcp_hosts": [{"mac": "52:54:00:AA:00:01", "ip": "10.77.0.5"}]}, "a lowercase mac"),
    ("hypervisor", {"hypervisor_network_mode": "nat"}, "hypervisor_network_mode"),
    ("hypervisor", {"hypervisor_pool_path": "disks"}, "must be absolute"),
    ("rsyslog", {"rsyslog_servers_group": "nobody"}, "must name at least one log host (it has 0)"),
    ("rsyslog", {"rsyslog_servers_group": "all", "rsyslog_queue_max_disk": "lots"}, "(got 'lots')"),
    ("rsyslog", {"rsyslog_servers_group": "all", "rsyslog_tls_ca": "PEM"}, "rsyslog_tls_key (got 1)"),
    ("rsyslog", {"rsyslog_servers_group": "all", "rsyslog_relp_port": 0}, "1-65535 (got 0)"),
    (
        "haproxy:rotation",
        {"haproxy_rotation_server": "cell1", "haproxy_rotation_state": "sideways"},
        "haproxy_rotation_state must be one of: in, out",
    ),
    ("haproxy:rotation", {"haproxy_rotation_state": "in"}, "missing required arguments: haproxy_rotation_server"),
]


@pytest.mark.parametrize(
    ("role", "variables", "message"), BAD_INPUT, ids=[f"{r}-{next(iter(v))}" for r, v, _ in BAD_INPUT]
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path: Path, role: str, variables: dict, message: str) -> None:
    result = run_role(tmp_path, role, variables)
    assert result.returncode != 0, result.stdout[-2000:]
    assert message in result.stdout, result.stdout[-3000:]
    assert "changed=0" in result.stdout


@pytest.mark.parametrize(
    "role", ["worker_pool", "tmp_cleanup", "selinux", "base", "cell_server", "nginx", "permalink_db", "hypervisor"]
)
def test_default_input_passes_validation(tmp_path: Path, role: str) -> None:
    result = run_role(tmp_path, role, {})
    assert result.returncode == 0, result.stdout[-3000:]
