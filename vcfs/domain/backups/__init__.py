"""The backup engine of one domain (pull and push backups over QMP), one job per module:

- `plan`: request + domain facts → the job, the steps that begin it and their undos (pure);
- `job`: the job, the pieces it has made, and its intent record (`to_record`/`from_record`);
- `release`: the one routine that releases a job's pieces, and the one cancel-and-wait;
- `watcher`: the task following a push job (`PushWatcher.run`/`stop`);
- `service`: `BackupService`, the thin service the tree calls.
"""

from vcfs.domain.backups.job import BackupJob, DiskJob
from vcfs.domain.backups.service import BackupService, ExportOpener
from vcfs.domain.status import CANCELLED, COMPLETED, FAILED, RUNNING

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "RUNNING",
    "BackupJob",
    "BackupService",
    "DiskJob",
    "ExportOpener",
]
