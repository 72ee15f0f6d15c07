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
from models.cases.registry import ArtifactIntegrityError, Registry, RegistryError, load_registry
from worker.leases import LeaseKeeper

if TYPE_CHECKING:
    from pathlib import Path

    from models.cases.inference import LoadedModel

log = logging.getLogger(__name__)

#: A model whose artifact failed its check is tried again after this long, or at once when the
#: artifact's size or mtime changes (an operator copied the right file back).
BROKEN_ARTIFACT_RETRY_S = 60.0


def _file_state(path: Path) -> tuple[int, int] | None:
    """The artifact's size and mtime (ns), or None if it is gone: what changes when it is fixed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class WorkerContext:
    """Per-process resources of a worker: one engine, one registry, each model loaded once."""

    settings: Settings
    _models: dict[tuple[str, str], LoadedModel] = field(default_factory=dict)
    #: Shadows that failed to load: not tried again (each try hashes the whole artifact again,
    #: on the released model's path, and logs again) until the worker restarts.
    _broken_shadows: set[str] = field(default_factory=set)
    #: Models whose artifact failed its check (missing, or a sha256 that does not match): the
    #: error, the artifact's size and mtime then, and when. Their cases fail with that error
    #: without hashing the whole artifact again at every batch, until the file changes or
    #: ``BROKEN_ARTIFACT_RETRY_S`` has passed; no restart is needed once it is fixed.
    _broken_artifacts: dict[
        tuple[str, str], tuple[ArtifactIntegrityError, tuple[int, int] | None, float]
    ] = field(default_factory=dict)

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
        return load_registry(self.settings.artifact_dir)

    def model(self, name: str, version: str) -> LoadedModel:
        """The model that scores ``name@version``'s cases: a retired version scores none."""
        self.registry.resolve_scorable(f"{name}@{version}")
        return self.loaded(name, version)

    def loaded(self, name: str, version: str) -> LoadedModel:
        """``name@version`` loaded (once), retired or not: the explain stage's attributions are
        of scores that stand, whatever became of their version since."""
        key = (name, version)
        if key not in self._models:
            spec = self.registry.resolve(f"{name}@{version}")
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
                model = LoadedModel(
                    spec, device=self.settings.device, autocast=self.settings.autocast
                )
            except ArtifactIntegrityError as exc:
                self._broken_artifacts[key] = (exc, state, time.monotonic())
                raise
            model.warm_up()
            self._models[key] = model
            log.info("loaded model %s on %s", spec.ref, model.device)
        return self._models[key]

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
