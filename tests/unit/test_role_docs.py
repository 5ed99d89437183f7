"""Each role's README documents exactly the inputs its argument_specs validate (scripts/role_docs.py)."""

from __future__ import annotations

from pathlib import Path

import role_docs  # scripts/ is on pytest's pythonpath (pyproject.toml)

ROOT = Path(__file__).resolve().parents[2]


def test_every_role_readme_is_generated_from_its_argument_specs() -> None:
    stale = [str(path.relative_to(ROOT)) for path in role_docs.stale_readmes()]
    assert stale == [], f"stale role READMEs (run `make docs`): {stale}"


def test_a_role_readme_lists_every_option_of_every_entry_point() -> None:
    text = role_docs.readme_for(ROOT / "roles" / "haproxy")
    assert '| `haproxy_check_fastinter` | str | `"250ms"` |' in text
    assert "## Entry point `rotation` (`tasks_from: rotation`)" in text
    assert "| `haproxy_rotation_state` | str: `in`, `out`, `drain` | required |" in text
