"""NVIDIA's perf_analyzer, for the tests and for anyone measuring the service with it: installed
once under `var/tools/perf-analyzer` (`make perf-analyzer`, or `python -m harness.perf_analyzer`).

The `perf-analyzer` wheel on PyPI holds one binary built against glibc 2.38. On an older system
(Debian 12 has 2.36) the C and C++ runtimes of Debian 13 are fetched with `apt-get download` from a
source list of their own and unpacked with `dpkg -x` into the same folder, nothing installed, and
the binary runs through that folder's dynamic loader. `command()` gives the command line either way.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

VERSION = "2.60.0"
NEEDS_GLIBC = (2, 38)
RUNTIMES = ("libc6", "libstdc++6", "libgcc-s1")  # what the binary needs beyond glibc 2.36's
SOURCE = "deb http://deb.debian.org/debian trixie main"
ROOT = Path(__file__).resolve().parents[1] / "var" / "tools" / "perf-analyzer"


class NotInstalled(RuntimeError):
    """perf_analyzer is not under `ROOT`: `make perf-analyzer` installs it."""


def _binary(root: Path) -> Path:
    return root / "wheel" / "perf_analyzer" / "bin" / "perf_analyzer"


def _libraries(root: Path) -> Path:
    return root / "runtimes" / "usr" / "lib" / "x86_64-linux-gnu"


def _system_glibc() -> tuple[int, int]:
    found = os.confstr("CS_GNU_LIBC_VERSION") or "glibc 0.0"  # e.g. "glibc 2.36"
    major, minor = (int(part) for part in found.partition(" ")[2].split(".")[:2])
    return major, minor


def command(root: Path = ROOT) -> list[str]:
    """The command line that runs perf_analyzer (arguments follow), or `NotInstalled`."""
    binary = _binary(root)
    if not binary.exists():
        raise NotInstalled(f"perf_analyzer is not installed under {root}: run `make perf-analyzer`")
    if _system_glibc() >= NEEDS_GLIBC:
        return [str(binary)]
    libraries = _libraries(root)
    loader = libraries / "ld-linux-x86-64.so.2"
    if not loader.exists():
        raise NotInstalled(f"the runtimes perf_analyzer needs are not under {root}: run `make perf-analyzer`")
    return [str(loader), "--library-path", f"{libraries}:/lib/x86_64-linux-gnu", str(binary)]


def install(root: Path = ROOT) -> list[str]:
    """Fetch the wheel (and, on an older glibc, the runtimes) unless they are there; the command."""
    if not _binary(root).exists():
        logger.info("fetching perf-analyzer %s from PyPI", VERSION)
        with tempfile.TemporaryDirectory() as scratch:
            pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            platform = ["--platform", "manylinux_2_38_x86_64", "--dest", scratch]
            subprocess.run([*pip, *platform, f"perf-analyzer=={VERSION}"], check=True)
            (wheel,) = Path(scratch).glob("perf_analyzer-*.whl")
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(root / "wheel")
        _binary(root).chmod(0o755)
    if _system_glibc() < NEEDS_GLIBC and not (_libraries(root) / "ld-linux-x86-64.so.2").exists():
        _fetch_runtimes(root)
    return command(root)


def _fetch_runtimes(root: Path) -> None:
    """Debian 13's C and C++ runtimes unpacked under `root` with apt-get's own state in a scratch
    folder: the system's package lists and installed packages are not touched."""
    logger.info("fetching Debian 13's %s for perf_analyzer (this system has glibc %d.%d)", RUNTIMES, *_system_glibc())
    with tempfile.TemporaryDirectory() as scratch:
        state = Path(scratch)
        (state / "sources.list").write_text(SOURCE + "\n")
        (state / "status").touch()
        for folder in ("lists/partial", "cache/archives/partial", "debs"):
            (state / folder).mkdir(parents=True)
        settings = {
            "Dir::Etc::SourceList": state / "sources.list",
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State::Lists": state / "lists",
            "Dir::Cache": state / "cache",
            "Dir::State::Status": state / "status",
            "Debug::NoLocking": 1,
        }
        if os.geteuid() == 0:  # apt's own user could not write to this scratch folder
            settings["APT::Sandbox::User"] = "root"
        options = [f"-o={key}={value}" for key, value in settings.items()]
        subprocess.run(["apt-get", *options, "-qq", "update"], check=True)
        subprocess.run(["apt-get", *options, "-qq", "download", *RUNTIMES], check=True, cwd=state / "debs")
        for package in sorted((state / "debs").glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(package), str(root / "runtimes")], check=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = install()
    version = subprocess.run([*found, "--version"], capture_output=True, text=True, check=False)
    logger.info("perf_analyzer ready: %s (%s)", " ".join(found), version.stdout.strip() or version.stderr.strip())
