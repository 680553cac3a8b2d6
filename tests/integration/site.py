"""Session fixture `site_applied`: a `--check --diff` run on a fresh lab, then the first real site.yml run.

Registered by importing it in conftest.py. Every integration test that needs the roles applied asks for
`site_applied`; the lab is reset first when an earlier session already applied site.yml, so the dry run always
sees a fresh lab.
"""

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
APPLIED_MARKER = REPO / ".lab" / "site-applied"


@dataclass
class SiteApplied:
    lab: Any
    check_run: Any
    before_check: dict
    after_check: dict
    first_run: Any


def fingerprint(lab) -> dict[str, str]:
    """What a dry run must not touch: the compose file, containers, crontabs, edge DB headers and configs."""
    cloud = lab.ssh(
        "cloud1",
        "cat /opt/crab/docker-compose.yml; crontab -l 2>/dev/null; ls -la /var/backups /etc/crab-ops /etc/cron.d 2>&1;"
        " docker ps -q --no-trunc | sort",
    )
    prints = {"cloud1": hashlib.sha256(cloud.stdout.encode()).hexdigest()}
    for edge in ("edge1", "edge2"):
        out = lab.ssh(
            edge,
            # The stand-in writes all the time: compare owners, modes and the header's journal-mode bytes, not sizes.
            "od -An -tx1 -j18 -N2 /var/lib/crab/edge.db; stat -c '%n %U %G %a' /var/lib/crab/edge.db*;"
            " cat /etc/crab/edge-server.conf; crontab -l 2>/dev/null",
        )
        prints[edge] = hashlib.sha256(out.stdout.encode()).hexdigest()
    return prints


@pytest.fixture(scope="session")
def site_applied(lab) -> SiteApplied:
    if APPLIED_MARKER.exists():
        # An earlier session applied the roles: rebuild the lab so the dry run sees what production has today.
        subprocess.run(["bash", str(REPO / "lab" / "lab.sh"), "down"], check=True)
        subprocess.run(["bash", str(REPO / "lab" / "lab.sh"), "up"], check=True)
    before = fingerprint(lab)
    check_run = lab.playbook("site.yml", "--check", "--diff")
    after = fingerprint(lab)
    first_run = lab.playbook("site.yml")
    APPLIED_MARKER.touch()
    return SiteApplied(lab=lab, check_run=check_run, before_check=before, after_check=after, first_run=first_run)
