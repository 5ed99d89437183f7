"""The systemd units the roles install, by the name their templates give them: what tests and benchmarks
start, stop, read the journal of and find the main process of. tests/unit/test_units.py checks each against
the role that writes it."""

from __future__ import annotations

CELL_SERVER = "cellserver.service"
KERNEL_PROVIDER = "cellfleet-kernel-provider.service"
CELL_HEALTH = "cellfleet-cell-health.service"
CELL_HEALTH_TIMER = "cellfleet-cell-health.timer"
PERMALINKS = "cellfleet-permalinks.service"
PERMALINK_BACKUP = "cellfleet-permalink-backup.service"

# The role whose templates/etc/systemd/system/ holds each unit above.
WRITTEN_BY = {
    CELL_SERVER: "cell_server",
    KERNEL_PROVIDER: "cell_server",
    CELL_HEALTH: "cell_server",
    CELL_HEALTH_TIMER: "cell_server",
    PERMALINKS: "permalink_db",
    PERMALINK_BACKUP: "permalink_db",
}
