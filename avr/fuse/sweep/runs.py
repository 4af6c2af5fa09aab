"""Where a sweep's trials live: ``<runs dir>/<name>/trial-NNNN/``, beside its ``trials.csv`` and
plots, the runs dir a local folder (default ``runs/sweeps``) or a URL (``s3://bucket/sweeps``,
any fsspec filesystem) that every machine of the sweep reaches.

- The study records each trial's folder as an absolute path or a URL, so that ``avr eval`` and
  the sweep's table find it whichever machine trained it.
- With a URL, a trial trains in this worker's own folder (``runs/sweeps/<name>/`` under its
  working directory) and is copied there once it has ended, then removed here; results are
  written here and copied there too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from avr.fuse import checkpoint
from avr.store import transfer
from avr.store.location import location_text

SWEEPS_DIR = checkpoint.DEFAULT_RUNS_DIR / "sweeps"


@dataclass
class SweepRuns:
    """The folder of sweep ``name`` (``location``) and this worker's folder for it (``work``:
    the same folder when it is local)."""

    location: str | Path
    work: Path

    @classmethod
    def of(cls, runs_dir: str | Path, name: str) -> SweepRuns:
        location = transfer.join(runs_dir, name)
        if transfer.is_url(location):
            transfer.files(runs_dir, "*")  # an unreachable runs dir fails before any training
            return cls(location, (SWEEPS_DIR / name).resolve())
        return cls(Path(location).resolve(), Path(location).resolve())

    @property
    def remote(self) -> bool:
        return self.work != self.location

    def trial_dir(self, number: int) -> Path:
        """Where this worker trains trial ``number``."""
        return self.work / trial_name(number)

    def trial_location(self, number: int) -> str:
        """Where trial ``number`` lives once it has ended, as the study records it."""
        return location_text(transfer.join(self.location, trial_name(number)))

    def publish_trial(self, number: int) -> None:
        """A trial that ended: copied to the runs dir (a URL) and removed here."""
        folder = self.trial_dir(number)
        if self.remote and folder.exists():
            transfer.upload(folder, transfer.join(self.location, trial_name(number)))
            shutil.rmtree(folder)

    def publish(self, paths: list[Path]) -> list[str]:
        """Results written in ``work``, copied to the runs dir; where each now is."""
        if not self.remote:
            return [str(path) for path in paths]
        placed = [transfer.join(self.location, path.name) for path in paths]
        for path, location in zip(paths, placed):
            transfer.upload_file(path, location)
        return [location_text(location) for location in placed]


def trial_name(number: int) -> str:
    return f"trial-{number:04d}"
