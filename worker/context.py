"""The per-process context of a worker: one engine, one registry, each model loaded once.

A leaf module: the Celery app (worker/app.py) makes one, the tasks read it through
:func:`context`, and neither side imports the other. Nothing here loads torch until a model is
asked for, so the API process (which builds the app to send tasks) never does.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, make_sessionmaker
from medbatch.settings import Settings
from models.cases.registry import (
    REGISTRY_PATH,
    ArtifactIntegrityError,
    ModelSpec,
    Registry,
    RegistryError,
    load_registry,
    shadows_path,
    user_registry_path,
)
from worker.leases import LeaseKeeper

if TYPE_CHECKING:
    from pathlib import Path

    from models.cases.inference import LoadedModel

log = logging.getLogger(__name__)

#: A model whose artifact failed its check is tried again after this long, or at once when the
#: artifact's size, mtime or inode changes (an operator copied the right file back).
BROKEN_ARTIFACT_RETRY_S = 60.0

#: A file's size, mtime (ns) and inode: what changes when it is rewritten in place or replaced.
FileState = tuple[int, int, int]


def _file_state(path: Path) -> FileState | None:
    """The file's size, mtime (ns) and inode, or None if it is gone: what changes when it is
    fixed, replaced or re-published."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class ModelFilesChanging(ArtifactIntegrityError):
    """A model's files were changing while this worker read them: its artifact was written to
    while it was hashed (a deploy copying it), or the store's registry file was missing (a
    deploy replacing it). Another try, a little later, may find them whole.

    An :class:`ArtifactIntegrityError` for the scoring path, which fails the cases with the
    reason as before; the explain stage gives its explanations back to be tried again."""


@dataclass
class WorkerContext:
    """Per-process resources of a worker: one engine, one registry, each model loaded once."""

    settings: Settings
    _models: dict[tuple[str, str], LoadedModel] = field(default_factory=dict)
    #: Shadows that failed to load: not tried again (each try hashes the whole artifact again,
    #: on the released model's path, and logs again) until the worker restarts.
    _broken_shadows: set[str] = field(default_factory=set)
    #: Models whose artifact failed its check (missing, or a sha256 that does not match): the
    #: error, the artifact's file state then, and when. Their cases fail with that error without
    #: hashing the whole artifact again at every batch, until the file changes (or the registry
    #: is read again: :meth:`reloaded`) or ``BROKEN_ARTIFACT_RETRY_S`` has passed; no restart
    #: is needed once it is fixed.
    _broken_artifacts: dict[
        tuple[str, str], tuple[ArtifactIntegrityError, FileState | None, float]
    ] = field(default_factory=dict)
    #: Each loaded model's artifact as it was when it loaded: :meth:`reloaded` loads it again
    #: only when that changed (a stat, no hashing).
    _loaded_states: dict[tuple[str, str], FileState | None] = field(default_factory=dict)
    #: The registry files as they were when :attr:`registry` read them.
    _registry_state: tuple[FileState | None, ...] = ()

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine)

    @cached_property
    def leases(self) -> LeaseKeeper:
        """This process's leases (one identity per worker process), renewed in a thread."""
        return LeaseKeeper(self.sessions, ttl_s=self.settings.lease_ttl_s)

    @cached_property
    def registry(self) -> Registry:
        state = self._registry_files_state()
        registry = load_registry(self.settings.artifact_dir)
        self._registry_state = state
        return registry

    def _registry_files(self) -> tuple[Path, ...]:
        store = self.settings.artifact_dir
        if store is None:
            return (REGISTRY_PATH,)
        return REGISTRY_PATH, user_registry_path(store), shadows_path(store)

    def _registry_files_state(self) -> tuple[FileState | None, ...]:
        return tuple(_file_state(p) for p in self._registry_files())

    def model(self, name: str, version: str) -> LoadedModel:
        """The model that scores ``name@version``'s cases: a retired version scores none."""
        self.registry.resolve_scorable(f"{name}@{version}")
        return self.loaded(name, version)

    def loaded(self, name: str, version: str) -> LoadedModel:
        """``name@version`` loaded (once), retired or not: the explain stage's attributions are
        of scores that stand, whatever became of their version since."""
        key = (name, version)
        if key not in self._models:
            self._models[key] = self._load(key, self.registry.resolve(f"{name}@{version}"))
        return self._models[key]

    def reloaded(self, name: str, version: str) -> LoadedModel:
        """``name@version`` as its files are now, for a caller whose loaded copy may be stale:
        the explain stage, given a score whose sha256 is not the loaded model's (another worker
        scored it after the artifact was re-published in place), or a version this worker's
        registry does not know or whose artifact failed its check.

        The registry is read again if one of its files changed since it was read, and the model
        loaded again (its sha256 checked) if its registry entry or its artifact's file changed
        since it loaded; when nothing changed this costs a stat of each file, no hashing. The
        copy loaded before stays in use until the new one has passed its check. While the
        store's registry file is missing (a deploy replacing it), the registry read before stays
        in use, and a version it does not know raises :class:`ModelFilesChanging` rather than
        :class:`RegistryError`: the file may be back in a moment."""
        ref = f"{name}@{version}"
        state = self._registry_files_state()
        store_registry_missing = self.settings.artifact_dir is not None and state[1] is None
        if state != self._registry_state and not store_registry_missing:
            registry = load_registry(self.settings.artifact_dir)
            self.__dict__["registry"] = registry  # what the cached property returns from now on
            self._registry_state = state
            # Checked against the sha256s the registry read before: the new one may expect others.
            self._broken_artifacts.clear()
            log.info("registry read again: its files changed")
        try:
            spec = self.registry.resolve(ref)
        except RegistryError as exc:
            if store_registry_missing:
                why = f"{exc}, and the artifact store's registry file is missing"
                raise ModelFilesChanging(why, reason=why) from None
            raise
        key = (name, version)
        cached = self._models.get(key)
        if cached is None:
            return self.loaded(name, version)
        if cached.spec == spec and _file_state(spec.artifact) == self._loaded_states.get(key):
            return cached
        self._models[key] = self._load(key, spec)
        return self._models[key]

    def _load(self, key: tuple[str, str], spec: ModelSpec) -> LoadedModel:
        """``spec``'s model loaded and warmed up, its artifact's file state kept; an artifact
        that failed its check is not hashed again until its file changes (or a while later)."""
        broken = self._broken_artifacts.get(key)
        if broken is not None:
            error, state, since = broken
            fresh = time.monotonic() - since < BROKEN_ARTIFACT_RETRY_S
            if fresh and _file_state(spec.artifact) == state:
                raise error.with_traceback(None)
            del self._broken_artifacts[key]
        from models.cases.inference import LoadedModel  # torch: loaded by workers only

        state = _file_state(spec.artifact)
        try:
            model = LoadedModel(spec, device=self.settings.device, autocast=self.settings.autocast)
        except ArtifactIntegrityError as exc:
            if _file_state(spec.artifact) != state:
                # Written to while it was hashed: a copy under way, not a wrong file.
                raise ModelFilesChanging(
                    f"{exc} (the file changed while it was checked)",
                    reason=f"{spec.ref}: its artifact changed while it was checked",
                ) from exc
            self._broken_artifacts[key] = (exc, state, time.monotonic())
            raise
        model.warm_up()
        self._loaded_states[key] = state
        log.info("loaded model %s on %s", spec.ref, model.device)
        return model

    def shadow(self, name: str, version: str) -> LoadedModel | None:
        """The candidate shadowing ``name@version``, loaded; None if none, or if it cannot load
        (a shadow must never cost the released model its cases)."""
        spec = self.registry.shadow_for(name, version)
        if spec is None or spec.ref in self._broken_shadows:
            return None
        try:
            return self.model(spec.name, spec.version)
        except Exception as exc:
            self._broken_shadows.add(spec.ref)
            log.warning("shadow %s not loaded (until the worker restarts): %s", spec.ref, exc)
            return None

    def warm_up(self) -> None:
        """Load the default version of every released model before the first message, and,
        where its scores ask for attributions, explain a dummy batch with it: the explain
        stage's first batch would otherwise import Captum (and what it imports) for about a
        second while the cases behind it, STAT ones among them, wait."""
        settings = self.settings
        # The version a case naming only the model gets (a registered model may mark none).
        defaults = []
        for name in self.registry.names():
            with contextlib.suppress(RegistryError):  # every version retired
                defaults.append(self.registry.resolve(name))
        for spec in defaults:
            if spec.status == "released":
                try:
                    model = self.model(spec.name, spec.version)
                except Exception as exc:
                    # Its cases fail with the reason when they come; the other models, and the
                    # sweep after this warm-up (worker/signals.py), must not wait on it.
                    log.error("model %s not warmed up: %s", spec.ref, exc)
                    if isinstance(exc, ArtifactIntegrityError):
                        exc.logged = True  # its first batch raises it again: logged here once
                    continue
                if settings.explain_top_k > 0:
                    from models.cases.explain import explain, explainable

                    wanted = spec.input_kind == "tabular" or settings.explain_sequences
                    if not (wanted and explainable(model)):
                        continue
                    try:
                        explain(model, model.dummy_batch(2), top_k=1, n_steps=2)
                    except Exception as exc:  # the explain stage reports its own failures
                        log.warning("explaining with %s not warmed up: %s", spec.ref, exc)


def context(app: Celery) -> WorkerContext:
    """The app's per-process context, made on first use from the settings the app was made with."""
    ctx = getattr(app, "medbatch", None)
    if ctx is None:
        ctx = app.medbatch = WorkerContext(app.medbatch_settings)
    return ctx
