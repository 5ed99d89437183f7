"""Every role's templates rendered by Ansible itself for the lab inventory's hosts, as a given OS family, without
touching a host: each role's own validation runs first (it sets the facts its templates use), then its
templates land in a directory per host and role. Facts a host would report come from FACTS; what tasks would
have found on the hosts comes from FOUND_BY_TASKS."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from local_ansible import ANSIBLE_PLAYBOOK, ROOT, ansible_environment

INVENTORY = ROOT / "inventory" / "lab" / "hosts.yml"
# The base role's template of a service's firewall openings, which every role that opens a port renders.
OPENINGS_TEMPLATE = "etc/nftables.d/cellfleet-open.nft.j2"

# Which lab host renders each role's templates (a host of the group the role runs on).
ROLE_HOSTS = {
    "base": ["lb1", "cell1", "data1"],
    "selinux": ["cell1"],
    "tmp_cleanup": ["cell1"],
    "worker_pool": ["cell1"],
    "private_network": ["cell1"],
    "rsyslog": ["cell1", "data1"],
    "cellserver_app": ["cell1"],
    "cell_server": ["cell1"],
    "nginx": ["cell1"],
    "permalink_db": ["data1"],
    "haproxy": ["lb1"],
    "hypervisor": ["data1"],
}
FACTS = {
    "RedHat": {
        "os_family": "RedHat", "distribution": "Rocky", "distribution_major_version": "9",
        "python": {"version": {"major": 3, "minor": 9, "micro": 18}}, "python_version": "3.9.18",
    },
    "Debian": {
        "os_family": "Debian", "distribution": "Debian", "distribution_major_version": "12",
        "python": {"version": {"major": 3, "minor": 11, "micro": 2}}, "python_version": "3.11.2",
    },
}  # fmt: skip
# What tasks would have found on the hosts before templating: the mesh peers' public keys.
FOUND_BY_TASKS = {
    "private_network": {
        "__private_network_public_keys": {
            "results": [
                {"item": host, "content": base64.b64encode(f"key-of-{host}=\n".encode()).decode()}
                for host in ("cell1", "cell2", "lb1")
            ]
        }
    }
}


def templates_of(role: str) -> list[str]:
    base = ROOT / "roles" / role / "templates"
    return sorted(str(path.relative_to(base)) for path in base.rglob("*.j2")) if base.is_dir() else []


def opens_ports(role: str) -> bool:
    """Whether the role opens ports through the base role's `open` entry point (its rules in vars/main.yml)."""
    role_vars = ROOT / "roles" / role / "vars" / "main.yml"
    return role != "base" and role_vars.is_file() and f"__{role}_firewall_openings" in role_vars.read_text()


def rendered_names(role: str) -> list[str]:
    """The files render() writes for role on each of its hosts."""
    names = [name.replace("/", "__") for name in templates_of(role)]
    return sorted([*names, OPENINGS_TEMPLATE.replace("/", "__")] if opens_ports(role) else names)


def render_tasks(role: str) -> str:
    loads_os_vars = (ROOT / "roles" / role / "vars" / "RedHat.yml").is_file()
    tasks: list[dict] = []
    if loads_os_vars:
        load = "{{ ansible_facts['os_family'] }}.yml"
        tasks.append({"name": "Load the family's variables", "ansible.builtin.include_vars": load, "tags": ["always"]})
    tasks.append({
        "name": "Render every template",
        "ansible.builtin.template": {
            "src": "{{ item }}",
            "dest": "{{ render_dir }}/{{ inventory_hostname }}/" + role + "/{{ item | replace('/', '__') }}",
            "mode": "0600",
        },
        "loop": templates_of(role),
        "delegate_to": "localhost",
        "tags": ["always"],
    })  # fmt: skip
    if role == "base":
        tasks[-1]["vars"] = {"base_open_name": "inventory", "base_open_rules": "{{ __base_firewall_rules }}"}
    openings = f"__{role}_firewall_openings"
    if opens_ports(role):
        # The ports the role opens, through the base role's template as its `open` entry point writes them.
        rendered_as = OPENINGS_TEMPLATE.replace("/", "__")
        tasks.append({
            "name": "Render the role's firewall openings",
            "ansible.builtin.template": {
                "src": "{{ role_path }}/../base/templates/" + OPENINGS_TEMPLATE,
                "dest": "{{ render_dir }}/{{ inventory_hostname }}/" + role + "/" + rendered_as,
                "mode": "0600",
            },
            "vars": {"base_open_name": role, "base_open_rules": "{{ " + openings + " }}"},
            "delegate_to": "localhost",
            "tags": ["always"],
        })  # fmt: skip
    return yaml.safe_dump(tasks, sort_keys=False)


def render_playbook(family: str) -> list[dict]:
    plays: list[dict] = [{
        "hosts": "all", "gather_facts": False,
        "tasks": [{"ansible.builtin.set_fact": {**FACTS[family], "cacheable": True}, "tags": ["always"]}],
    }]  # fmt: skip
    for role, hosts in ROLE_HOSTS.items():
        if not templates_of(role):
            continue
        found = FOUND_BY_TASKS.get(role, {})
        # The role's own validation first (read-only, tagged validate): it also sets the facts its templates use.
        validate = {"ansible.builtin.include_role": {"name": role}, "vars": found, "tags": ["validate"]}
        render = {"ansible.builtin.include_role": {"name": role, "tasks_from": "render_el9"}, "vars": found,
                  "tags": ["validate"]}  # fmt: skip
        plays.append({"hosts": ",".join(hosts), "gather_facts": False, "tasks": [validate, render]})
    return plays


def render(work: Path, family: str, overrides: dict[str, Any] | None = None) -> Path:
    """Every role's templates for the lab's hosts as if they ran family, with overrides as extra variables;
    the directory of the results."""
    roles = work / "roles"
    shutil.copytree(ROOT / "roles", roles)
    for role in ROLE_HOSTS:
        (roles / role / "tasks" / "render_el9.yml").write_text(render_tasks(role))
    playbook = work / "render.yml"
    playbook.write_text(yaml.safe_dump(render_playbook(family), sort_keys=False))
    output = work / "out"
    for role, hosts in ROLE_HOSTS.items():
        for host in hosts:
            (output / host / role).mkdir(parents=True)
    env = ansible_environment(ANSIBLE_ROLES_PATH=str(roles), ANSIBLE_CACHE_PLUGIN="memory")
    extra = {
        **(overrides or {}),
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "render_dir": str(output),
    }
    command = [
        str(ANSIBLE_PLAYBOOK),
        "-i",
        str(INVENTORY),
        "--tags",
        "validate",
        str(playbook),
        "-e",
        json.dumps(extra),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return output


def rendered_files(output: Path, suffix: str = "") -> list[Path]:
    return sorted(path for path in output.rglob("*") if path.is_file() and path.name.endswith(suffix))
