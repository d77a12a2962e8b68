"""The named fault points of a backup's begin, for the unit tests (fakes) and the crash walk
(real VMs): written out here rather than read from `plan.steps`, so that a step added or lost
there shows as a test to add or a test that fails."""

from __future__ import annotations

BEGIN_POINTS = ["backup.create-store", "backup.add-store-node", "backup.create-fleece",
                "backup.add-fleece-node", "backup.add-cbw-node", "backup.nbd-server-start",
                "backup.transaction", "backup.switch-device", "backup.add-access-node",
                "backup.export-add", "backup.status-export-add", "backup.start-jobs",
                "backup.commit"]
PULL_ONLY_POINTS = ("backup.nbd-server-start", "backup.export-add", "backup.status-export-add")
PUSH_ONLY_POINTS = ("backup.create-fleece", "backup.add-fleece-node", "backup.start-jobs")
PULL_POINTS = [p for p in BEGIN_POINTS if p not in PUSH_ONLY_POINTS]
PUSH_POINTS = [p for p in BEGIN_POINTS if p not in PULL_ONLY_POINTS]
