"""The one resume protocol of every job that writes an output directory.

``zsl extract``, ``classes``, ``train``, ``label``, ``index`` and ``add-classes`` all write their
output through :class:`OutputDir`, so they share one set of rules:

1. **One writer.** An exclusive lock on the directory (``flock`` on ``.zsl.lock``; the kernel drops
   it when the process dies, SIGKILL included). A second writer stops with :class:`OutputLocked`.
2. **Temp-file sweep.** Files are written under ``._tmp-*`` names and renamed into place
   (:mod:`pipeline.core.fs`); the temp files a killed run left are deleted before any work.
3. **Identity check.** ``run.json`` (:class:`~pipeline.core.manifests.RunRecord`) records the job and the
   *identity* of what the directory is made from: fingerprints of the inputs (features, model,
   class set) and the settings that change the result. A rerun with the same identity resumes;
   one with another identity (or another job's directory) is refused with what differs, and
   nothing is changed, unless ``overwrite``: then the old manifest and the job's own files are
   removed first, and the run starts afresh. Settings that do not change the result (batch size,
   actors, cluster address) are not part of the identity and may change between runs.
   A job may instead replace a finished output *in place* (``replace_in_place``: ``zsl label``
   relabelling from stored features writes a diff of old and new labels shard by shard), recording in
   ``run.json``, atomically with the new identity, which identity it is replacing.
4. **Manifest last.** :meth:`OutputDir.begin` removes ``manifest.json`` before any file changes,
   and :meth:`OutputDir.finish` writes it after the last one: an output without a manifest is
   unfinished, and every reader refuses it. A finished output rerun with the same identity does
   no work beyond what its job finds missing (a job decides that: e.g. shards a feature directory
   gained since).

Known limit: the lock is local-filesystem only; on object stores keep one job per output.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence, TypeVar

from pipeline.core import fs as zio
from pipeline.core.config import ConfigError
from pipeline.core.manifests import Manifest, RunRecord, parse_manifest, write_manifest

LOG = logging.getLogger(__name__)

__all__ = ["OutputDir", "OutputExists", "OutputLocked", "describe_diff"]

OutputLocked = zio.OutputLocked
M = TypeVar("M", bound=Manifest)

RUN_FILE = "run.json"
MANIFEST_FILE = "manifest.json"


class OutputExists(ConfigError):
    """The output directory holds another job's output or one made from other inputs or settings."""


def describe_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``key: was A, now B`` for each key whose value differs (missing keys count as None).

    >>> describe_diff({"model": "ab", "top_k": 5}, {"model": "cd", "top_k": 5})
    "model: was 'ab', now 'cd'"
    """
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


class OutputDir:
    """An output directory written under the resume protocol (see the module docstring).

    Use it as a context manager around everything a job writes::

        with OutputDir(cfg.output, job="label", identity=ident, overwrite=cfg.overwrite,
                       owned=("labels",)) as out:
            done = out.finished(LabelsManifest)      # the manifest of a finished run, or None
            ...
            out.begin()                              # from here on the output is unfinished
            zpq.write_parquet_atomic(out.join("labels", name), table)
            out.finish(manifest)                     # last

    Args:
        uri: the output directory (local path or fsspec URI).
        job: the command that owns it (``"extract"``, ``"label"``, ...).
        identity: JSON-able facts that define the result (fingerprints and result-changing settings).
        overwrite: replace an output of another identity instead of refusing.
        owned: paths under ``uri`` that the job writes besides ``manifest.json`` (removed on overwrite).
        replace_in_place: on overwrite of a *finished* output of another identity, keep the old files (the job
            replaces them one by one, e.g. to diff old and new labels): the manifest goes, and ``run.json``
            takes the new identity with ``state["replacing"] = {"identity": <the old one>}`` in one atomic
            write, so a kill part-way and a rerun (same identity now) find what is left to replace there.
    """

    def __init__(self, uri: str, *, job: str, identity: dict[str, Any], overwrite: bool = False,
                 owned: Sequence[str] = (), replace_in_place: bool = False) -> None:
        self.uri = str(uri)
        self.job = job
        self.identity = zio.to_jsonable(identity)
        self.overwrite = overwrite
        self.owned = tuple(owned)
        self.replace_in_place = replace_in_place
        self.previous_state: dict[str, Any] = {}
        self._in_place = False
        self._stack: contextlib.ExitStack | None = None

    @classmethod
    def update(cls, uri: str, *, job: str) -> "OutputDir":
        """A finished output of ``job``, opened to be changed in place (``zsl add-classes``).

        Same lock and temp-file sweep; the recorded identity is kept, since what the output holds
        now is in its manifest (written again by :meth:`finish` after the change).
        """
        out = cls(uri, job=job, identity={})
        out._in_place = True
        return out

    @classmethod
    def recorded_identity(cls, uri: str, *, job: str) -> dict[str, Any] | None:
        """The identity a ``job`` output at ``uri`` was made with (None: no such output yet). Read
        without the lock: for choosing defaults before opening it, which checks the identity again."""
        prev = cls(uri, job=job, identity={})._previous()
        return dict(prev.identity) if isinstance(prev, RunRecord) and prev.job == job else None

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "OutputDir":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(zio.output_lock(self.uri))
        try:
            zio.remove_temp_files(self.uri)
            self._adopt_identity() if self._in_place else self._check_identity()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        assert self._stack is not None
        self._stack.close()

    # -- protocol ------------------------------------------------------------------------------
    def join(self, *parts: str) -> str:
        return zio.join(self.uri, *parts)

    def _previous(self) -> RunRecord | None | str:
        """The recorded run (None: a new directory; str: why the directory is not ours)."""
        run_uri = self.join(RUN_FILE)
        if zio.exists(run_uri):
            try:
                return RunRecord.model_validate(zio.read_json(run_uri))
            except Exception as exc:  # noqa: BLE001 - an unreadable record is another output, named
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return f"{run_uri} is not a run record of this version ({first})"
        if zio.exists(self.join(MANIFEST_FILE)):
            return "it holds a manifest.json but no run.json (an output of another tool or version)"
        return None

    def _check_identity(self) -> None:
        prev = self._previous()
        if isinstance(prev, RunRecord) and prev.job == self.job and prev.identity == self.identity:
            self.previous_state = dict(prev.state)
            return
        if prev is not None:
            if isinstance(prev, RunRecord) and prev.job != self.job:
                raise OutputExists(f"{self.uri} holds a `zsl {prev.job}` output, not a `zsl {self.job}` one; "
                                   "use another --output (nothing was changed)")
            what = describe_diff(prev.identity, self.identity) if isinstance(prev, RunRecord) else prev
            if not self.overwrite:
                raise OutputExists(f"{self.uri} holds a `zsl {self.job}` output made from other inputs or settings "
                                   f"({what}); use a new --output, or --overwrite to replace it "
                                   "(nothing was changed)")
            LOG.warning("%s: replacing an output made from other inputs or settings (%s)", self.uri, what)
            if self.replace_in_place and isinstance(prev, RunRecord) and zio.exists(self.join(MANIFEST_FILE)):
                # the job replaces its files one by one (comparing old and new first): the old files stay,
                # the output is unfinished until the job's manifest, and run.json says what is being replaced
                zio.remove(self.join(MANIFEST_FILE))
                self.previous_state = {"replacing": {"identity": dict(prev.identity)}}
                zio.write_json_atomic(self.join(RUN_FILE), RunRecord(
                    job=self.job, identity=self.identity, state=self.previous_state).model_dump(mode="json"))
                return
            self._clear()
        zio.write_json_atomic(self.join(RUN_FILE),
                              RunRecord(job=self.job, identity=self.identity).model_dump(mode="json"))

    def _adopt_identity(self) -> None:
        if not zio.exists(self.join(MANIFEST_FILE)):
            raise FileNotFoundError(f"{self.uri}: no manifest.json; is this a finished `zsl {self.job}` output?")
        prev = self._previous()
        if isinstance(prev, RunRecord):
            if prev.job != self.job:
                raise OutputExists(f"{self.uri} holds a `zsl {prev.job}` output, not a `zsl {self.job}` one")
            self.identity, self.previous_state = prev.identity, dict(prev.state)

    def _clear(self) -> None:
        # manifest first: a kill part-way leaves an unfinished output under the old run.json
        zio.remove(self.join(MANIFEST_FILE))
        for part in self.owned:
            zio.remove(self.join(part))

    def set_state(self, state: dict[str, Any]) -> None:
        """Record job-specific progress facts in ``run.json`` (read back as ``previous_state``)."""
        state = zio.to_jsonable(state)
        if state != self.previous_state:
            record = RunRecord(job=self.job, identity=self.identity, state=state)
            zio.write_json_atomic(self.join(RUN_FILE), record.model_dump(mode="json"))
            self.previous_state = state

    def finished(self, cls: type[M]) -> M | None:
        """The manifest of a finished run of this identity, or None (unfinished or new)."""
        uri = self.join(MANIFEST_FILE)
        if not zio.exists(uri):
            return None
        return parse_manifest(zio.read_json(uri), cls, uri)

    def already_done(self, cls: type[M], what: str) -> M | None:
        """The manifest of a finished run of this identity (logged as ``<output>: <what> is complete;
        nothing to do``), or None: the opening of every job that may find its work done."""
        done = self.finished(cls)
        if done is not None:
            LOG.info("%s: %s is complete; nothing to do", self.uri, what)
        return done

    def begin(self) -> None:
        """Mark the output unfinished (before the first file changes)."""
        zio.remove(self.join(MANIFEST_FILE))

    def finish(self, manifest: Manifest) -> None:
        """Write the manifest: the output is complete (call after the last file is written)."""
        write_manifest(self.uri, manifest)
