#!/usr/bin/env python3
"""Build the cellfleet golden Debian 12 image, or reuse the cached one.

The image is built without mounting anything: debootstrap fills a directory tree,
SELinux labels are applied inside the tree, and `mkfs.ext4 -d` turns the tree into
a filesystem that already has the quota feature (the host kernel cannot mount it).

The cache key hashes the whole recipe: this script, the image's recipe file, the
files copied into the image, and the package list. That list is derived from the
roles' own `vars/Debian.yml` (`__<role>_packages`), so image and roles cannot drift.

The Sage layer (passagemath, pinned in the app's requirements-sage.txt) is baked into
its own venv at the prefix the cellserver_app role reads it from: cells compute Sage
without downloading or compiling anything. Its wheels are downloaded once on this
machine and kept in the cache, keyed by the requirements file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE_DIR = Path(os.environ.get("CELLFLEET_CACHE_DIR", "/var/cache/cellfleet"))
PACKAGE_VAR_PATTERN = re.compile(r"^__[a-z0-9_]+_packages$")
# Images older than the newest few are pruned; clones may still back onto the previous one.
IMAGES_KEPT = 2


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str
    variant: str
    components: list[str]
    disk_size: str
    packages: list[str]
    enable_units: list[str]
    disable_units: list[str]
    mask_units: list[str]
    files_dir: Path
    key: str
    sage_requirements: Path | None = None
    sage_prefix: str = ""


def log(message: str) -> None:
    print(f"[image] {message}", flush=True)


def role_packages(roles_dir: Path, family: str = "Debian", skipped_roles: frozenset[str] = frozenset()) -> list[str]:
    """Every package a role installs on an OS family, from `__*_packages` in vars/<family>.yml, except the
    skipped roles' (those that configure the hypervisors, not the cluster's guests)."""
    packages: set[str] = set()
    for vars_file in sorted(roles_dir.glob(f"*/vars/{family}.yml")):
        if vars_file.parent.parent.name in skipped_roles:
            continue
        data = yaml.safe_load(vars_file.read_text()) or {}
        for name, value in data.items():
            if PACKAGE_VAR_PATTERN.match(name):
                if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                    raise ValueError(f"{vars_file}: {name} must be a list of package names")
                packages.update(value)
    return sorted(packages)


def tree_digest(directory: Path) -> str:
    """Hash of every file's relative path, mode and content below directory."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(oct(path.stat().st_mode & 0o7777).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def sage_prefix(roles_dir: Path) -> str:
    """Where the cellserver_app role expects the Sage layer: its default is the one place that says so."""
    defaults = yaml.safe_load((roles_dir / "cellserver_app/defaults/main.yml").read_text()) or {}
    return str(defaults["cellserver_app_sage_prefix"])


def load_recipe(image_dir: Path, roles_dir: Path) -> Recipe:
    spec = yaml.safe_load((image_dir / "image.yml").read_text())
    skipped = frozenset(spec.get("roles_not_in_image", []))
    packages = sorted(set(spec["boot_packages"]) | set(role_packages(roles_dir, skipped_roles=skipped)))
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update((image_dir / "image.yml").read_bytes())
    digest.update(tree_digest(image_dir / "files").encode())
    digest.update("\n".join(packages).encode())
    sage_requirements, prefix = None, ""
    if spec.get("sage_requirements"):
        # Relative to the repository (two levels above images/<name>/).
        sage_requirements = image_dir.parent.parent / spec["sage_requirements"]
        prefix = sage_prefix(roles_dir)
        digest.update(sage_requirements.read_bytes())
        digest.update(prefix.encode())
    return Recipe(
        name=spec["name"],
        suite=spec["suite"],
        variant=spec["variant"],
        components=list(spec["components"]),
        disk_size=str(spec["disk_size"]),
        packages=packages,
        enable_units=list(spec.get("enable_units", [])),
        mask_units=list(spec.get("mask_units", [])),
        disable_units=list(spec.get("disable_units", [])),
        files_dir=image_dir / "files",
        key=digest.hexdigest()[:16],
        sage_requirements=sage_requirements,
        sage_prefix=prefix,
    )


def host_debian_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The mirror this machine's apt already uses for the suite, so no host is hard-coded here."""
    override = os.environ.get("CELLFLEET_DEBIAN_MIRROR")
    if override:
        return override
    sources = apt_dir / "sources.list.d/debian.sources"
    if sources.exists():
        for stanza in sources.read_text().split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            if suite in fields.get("Suites", "").split():
                return fields["URIs"].split()[0].strip()
    legacy = apt_dir / "sources.list"
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                return parts[1]
    raise RuntimeError(f"no apt source for {suite} on this host; set CELLFLEET_DEBIAN_MIRROR")


def run(command: list[str], **kwargs: object) -> None:
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def chroot(root: Path, *command: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    run(["chroot", str(root), *command], env=env)


def debootstrap(recipe: Recipe, root: Path, cache_dir: Path) -> None:
    package_cache = cache_dir / "debs"
    package_cache.mkdir(parents=True, exist_ok=True)
    mirror = host_debian_mirror(recipe.suite)
    log(f"debootstrap {recipe.suite} ({len(recipe.packages)} packages) from the host's apt mirror")
    run(
        [
            "debootstrap",
            f"--variant={recipe.variant}",
            f"--components={','.join(recipe.components)}",
            f"--include={','.join(recipe.packages)}",
            f"--cache-dir={package_cache}",
            recipe.suite,
            str(root),
            mirror,
        ],
        stdout=subprocess.DEVNULL,
    )


def copy_files(source: Path, root: Path) -> None:
    for path in sorted(source.rglob("*")):
        target = root / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def configure(recipe: Recipe, root: Path) -> None:
    log("configuring the tree")
    copy_files(recipe.files_dir, root)
    # An empty machine-id makes each clone generate its own; a shared one gives every clone one DHCP lease.
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "etc/hostname").write_text("localhost\n")
    # Host keys are made per clone at first boot, never shared through the image.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/initramfs-tools/conf.d/cellfleet.conf").write_text("MODULES=list\n")
    chroot(root, "passwd", "--lock", "root")
    for unit in recipe.enable_units:
        chroot(root, "systemctl", "enable", "--quiet", unit)
    for unit in recipe.mask_units:
        chroot(root, "systemctl", "mask", "--quiet", unit)
    for unit in recipe.disable_units:
        chroot(root, "systemctl", "disable", "--quiet", unit)
    chroot(root, "apt-get", "clean")
    log("rebuilding the initrd with the quota modules")
    chroot(root, "update-initramfs", "-u", "-k", "all")


def sage_wheels(requirements: Path, cache_dir: Path) -> Path:
    """Every wheel of the Sage layer, downloaded once per requirements file (binary wheels only: nothing is
    compiled, here or on a cell). The image's Python and this one are both 3.11 on x86_64 Linux."""
    key = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    wheels = cache_dir / "sage-wheels" / key
    if (wheels / "requirements.txt").exists():
        log(f"Sage wheels cached: {wheels}")
        return wheels
    partial = wheels.with_name(f".{key}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"downloading the Sage layer's wheels ({requirements.name})")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps",
         "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64",
         "-r", str(requirements), "-d", str(partial)])  # fmt: skip
    shutil.copy2(requirements, partial / "requirements.txt")
    for stale in wheels.parent.glob("[!.]*"):
        shutil.rmtree(stale, ignore_errors=True)  # one generation: the wheels are large
    partial.rename(wheels)
    return wheels


def install_sage(recipe: Recipe, root: Path, cache_dir: Path) -> None:
    """A venv at the Sage prefix with the pinned passagemath set, installed inside the tree from the cached
    wheels with the image's own Python (bind-mounted in a private mount namespace, nothing stays mounted)."""
    assert recipe.sage_requirements is not None
    wheels = sage_wheels(recipe.sage_requirements, cache_dir)
    log(f"installing the Sage layer into {recipe.sage_prefix}")
    mount_point = root / "mnt/sage-wheels"
    mount_point.mkdir(parents=True, exist_ok=True)
    prefix = recipe.sage_prefix
    install = (f"/usr/bin/python3 -m venv {prefix} && {prefix}/bin/pip install --quiet --no-index "
               "--disable-pip-version-check --find-links /mnt/sage-wheels "
               "-r /mnt/sage-wheels/requirements.txt")  # fmt: skip
    script = 'mount -t proc proc "$1/proc" && mount --bind "$2" "$1/mnt/sage-wheels" && chroot "$1" sh -c "$3"'
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root), str(wheels), install],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})  # fmt: skip
    mount_point.rmdir()


def label_selinux(root: Path) -> None:
    """Label the tree now: relabelling on first boot costs ~3 minutes and a reboot under emulation."""
    log("applying SELinux labels")
    contexts = "/etc/selinux/default/contexts/files/file_contexts"
    # A private mount namespace: /proc for setfiles vanishes with the command, nothing stays mounted.
    script = f'mount -t proc proc "$1/proc" && chroot "$1" /sbin/setfiles -F {contexts} /'
    run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(root)])


def make_disk(recipe: Recipe, root: Path, out_dir: Path) -> None:
    log("making the ext4 filesystem (quota feature) from the tree and converting to qcow2")
    raw = out_dir / "disk.raw"
    run(["truncate", "-s", recipe.disk_size, str(raw)])
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "cellroot",
            "-O",
            "quota",
            "-E",
            "quotatype=usrquota:grpquota",
            "-d",
            str(root),
            str(raw),
        ]
    )
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out_dir / "disk.qcow2")])
    raw.unlink()
    boot = root / "boot"
    shutil.copy2(sorted(boot.glob("vmlinuz-*"))[-1], out_dir / "vmlinuz")
    shutil.copy2(sorted(boot.glob("initrd.img-*"))[-1], out_dir / "initrd.img")


def write_manifest(recipe: Recipe, out_dir: Path, seconds: float) -> None:
    manifest = {
        "name": recipe.name,
        "key": recipe.key,
        "suite": recipe.suite,
        "packages": recipe.packages,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def publish(images_dir: Path, recipe: Recipe, out_dir: Path) -> Path:
    """Atomically point `<name>-current` at the finished image and prune old generations."""
    link = images_dir / f"{recipe.name}-current"
    tmp_link = images_dir / f".{recipe.name}-current.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(out_dir.name)
    tmp_link.replace(link)
    generations = sorted(
        (p for p in images_dir.glob(f"{recipe.name}-*") if p.is_dir() and not p.is_symlink()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in generations[IMAGES_KEPT:]:
        shutil.rmtree(old, ignore_errors=True)
    return link


def build(recipe: Recipe, cache_dir: Path) -> Path:
    images_dir = cache_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    final_dir = images_dir / f"{recipe.name}-{recipe.key}"
    if (final_dir / "manifest.json").exists():
        log(f"cached: {final_dir} (recipe key {recipe.key})")
        publish(images_dir, recipe, final_dir)
        return final_dir
    started = time.monotonic()
    work_dir = cache_dir / "build" / recipe.key
    shutil.rmtree(work_dir, ignore_errors=True)
    root = work_dir / "root"
    out_dir = work_dir / "out"
    out_dir.mkdir(parents=True)
    log(f"building {recipe.name} (recipe key {recipe.key}); this takes a few minutes")
    debootstrap(recipe, root, cache_dir)
    configure(recipe, root)
    if recipe.sage_requirements is not None:
        install_sage(recipe, root, cache_dir)
    label_selinux(root)
    make_disk(recipe, root, out_dir)
    seconds = time.monotonic() - started
    write_manifest(recipe, out_dir, seconds)
    for path in out_dir.iterdir():
        path.chmod(0o644)
    out_dir.rename(final_dir)
    final_dir.chmod(0o755)
    shutil.rmtree(work_dir, ignore_errors=True)
    publish(images_dir, recipe, final_dir)
    log(f"built {final_dir} in {seconds:.0f} s")
    return final_dir


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian12", help="image recipe directory under images/")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--print-key", action="store_true", help="print the recipe key and exit")
    parser.add_argument("--print-packages", action="store_true", help="print the package list and exit")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    recipe = load_recipe(PROJECT_ROOT / "images" / args.image, PROJECT_ROOT / "roles")
    if args.print_key:
        print(recipe.key)
        return 0
    if args.print_packages:
        print("\n".join(recipe.packages))
        return 0
    if os.geteuid() != 0:
        print("build_image: must run as root (debootstrap, chroot)", file=sys.stderr)
        return 2
    build(recipe, args.cache_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
