"""The golden image recipe: package list derived from the roles, cache key, mirror discovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import build_image

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def write_role_vars(roles: Path, role: str, family: str, text: str) -> None:
    path = roles / role / "vars" / f"{family}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_packages_come_from_every_role_of_the_family(tmp_path: Path) -> None:
    write_role_vars(tmp_path, "base", "Debian", "__base_packages: [nftables, sudo]\n__base_ssh_service: ssh\n")
    write_role_vars(tmp_path, "web", "Debian", "__web_packages: [nginx, sudo]\n")
    write_role_vars(tmp_path, "web", "RedHat", "__web_packages: [nginx-core]\n")
    assert build_image.role_packages(tmp_path) == ["nftables", "nginx", "sudo"]
    assert build_image.role_packages(tmp_path, family="RedHat") == ["nginx-core"]


def test_the_hypervisors_roles_stay_out_of_the_guest_image(tmp_path: Path) -> None:
    write_role_vars(tmp_path, "base", "Debian", "__base_packages: [nftables]\n")
    write_role_vars(tmp_path, "hypervisor", "Debian", "__hypervisor_packages: [qemu-system-x86]\n")
    assert build_image.role_packages(tmp_path, skipped_roles=frozenset({"hypervisor"})) == ["nftables"]
    root = build_image.PROJECT_ROOT
    recipe = build_image.load_recipe(root / "images" / "debian12", root / "roles")
    assert "qemu-system-x86" not in recipe.packages and "libvirt-daemon-system" not in recipe.packages


def test_a_package_variable_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    write_role_vars(tmp_path, "base", "Debian", "__base_packages: nftables\n")
    with pytest.raises(ValueError, match="must be a list of package names"):
        build_image.role_packages(tmp_path)


def test_the_real_recipe_bakes_the_sage_layer_where_the_role_looks() -> None:
    recipe = build_image.load_recipe(PROJECT_ROOT / "images/debian12", PROJECT_ROOT / "roles")
    assert recipe.sage_requirements == PROJECT_ROOT / "app/requirements-sage.txt"
    assert recipe.sage_prefix == "/opt/cellfleet-sage"


def test_the_real_recipe_holds_every_base_role_package() -> None:
    recipe = build_image.load_recipe(PROJECT_ROOT / "images/debian12", PROJECT_ROOT / "roles")
    for package in ("openssh-server", "nftables", "systemd-timesyncd", "netbase"):
        assert package in recipe.packages
    assert "selinux-policy-default" in recipe.packages and "quota" in recipe.packages


@pytest.fixture
def recipe_copy(tmp_path: Path) -> tuple[Path, Path]:
    image_dir = tmp_path / "images/debian12"
    shutil.copytree(PROJECT_ROOT / "images/debian12", image_dir)
    roles_dir = tmp_path / "roles"
    write_role_vars(roles_dir, "base", "Debian", "__base_packages: [nftables]\n")
    (tmp_path / "app").mkdir()
    shutil.copy2(PROJECT_ROOT / "app/requirements-sage.txt", tmp_path / "app")
    (roles_dir / "cellserver_app/defaults").mkdir(parents=True)
    shutil.copy2(PROJECT_ROOT / "roles/cellserver_app/defaults/main.yml", roles_dir / "cellserver_app/defaults")
    return image_dir, roles_dir


def test_cache_key_is_stable_for_an_unchanged_recipe(recipe_copy: tuple[Path, Path]) -> None:
    image_dir, roles_dir = recipe_copy
    assert build_image.load_recipe(image_dir, roles_dir).key == build_image.load_recipe(image_dir, roles_dir).key


@pytest.mark.parametrize("change", ["role package", "image file", "file mode", "recipe", "sage", "sage prefix"])
def test_cache_key_changes_with_any_part_of_the_recipe(recipe_copy: tuple[Path, Path], change: str) -> None:
    image_dir, roles_dir = recipe_copy
    before = build_image.load_recipe(image_dir, roles_dir).key
    if change == "role package":
        write_role_vars(roles_dir, "base", "Debian", "__base_packages: [nftables, chrony]\n")
    elif change == "image file":
        (image_dir / "files/etc/fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
    elif change == "file mode":
        (image_dir / "files/etc/fstab").chmod(0o600)
    elif change == "sage":
        requirements = image_dir.parent.parent / "app/requirements-sage.txt"
        requirements.write_text(requirements.read_text() + "passagemath-graphs==10.8.13\n")
    elif change == "sage prefix":
        defaults = roles_dir / "cellserver_app/defaults/main.yml"
        defaults.write_text(defaults.read_text().replace("/opt/cellfleet-sage", "/opt/sage"))
    else:
        (image_dir / "image.yml").write_text((image_dir / "image.yml").read_text().replace("8G", "9G"))
    assert build_image.load_recipe(image_dir, roles_dir).key != before


def test_mirror_is_read_from_deb822_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELLFLEET_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.test/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.test/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    assert build_image.host_debian_mirror("bookworm", tmp_path) == "http://mirror.test/debian"


def test_mirror_is_read_from_a_legacy_sources_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELLFLEET_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text("# comment\ndeb http://legacy.test/debian bookworm main\n")
    assert build_image.host_debian_mirror("bookworm", tmp_path) == "http://legacy.test/debian"


def test_no_mirror_for_the_suite_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CELLFLEET_DEBIAN_MIRROR", raising=False)
    with pytest.raises(RuntimeError, match="no apt source for bookworm"):
        build_image.host_debian_mirror("bookworm", tmp_path)


def test_publish_points_current_at_the_new_image_and_prunes_old_ones(tmp_path: Path) -> None:
    recipe = build_image.load_recipe(PROJECT_ROOT / "images/debian12", PROJECT_ROOT / "roles")
    generations = []
    for index in range(4):
        generation = tmp_path / f"debian12-{index:016x}"
        generation.mkdir()
        generations.append(generation)
        link = build_image.publish(tmp_path, recipe, generation)
        assert link.resolve() == generation.resolve()
    remaining = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.is_symlink())
    assert generations[-1].name in remaining
    assert len(remaining) == build_image.IMAGES_KEPT
