"""Pictures of results, with links from the JSON that describes them: score evaluations (ROC and
calibration of a tenant's stored scores against labels the client sends), the kinship plot of a
KING job, the similarity histogram of a compound search. Drawn by models/plots.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, WrapValidator

from api_shim.deps import ReaderDep, RegistryDep, SessionDep, SettingsDep
from api_shim.errors import keys_hidden, model_problem, problem
from api_shim.routes import tiled
from db import repo
from db.tables import CompoundJob, GenomeJob
from models.cases.registry import RegistryError

if TYPE_CHECKING:
    from medbatch.settings import Settings

router = APIRouter(prefix="/v1", tags=["plots"])

MAX_LABELS = 100_000
EvaluationId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$", description="an evaluation id")]
PICTURES = ("roc.png", "calibration.png")


class ScoreEvaluationCreate(BaseModel):
    model: str = Field(min_length=1, max_length=100, description="model name, e.g. breast-cancer")
    labels: Annotated[
        dict[
            Annotated[str, Field(min_length=1, max_length=200)], Annotated[int, Field(ge=0, le=1)]
        ],
        WrapValidator(keys_hidden),
    ] = Field(
        min_length=2,
        max_length=MAX_LABELS,
        description="the true outcome (0 or 1) of each scored case, by its external_id",
    )
    threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="for the accuracy (default: the model's registered threshold, as its labels)",
    )


class ScoreEvaluationPublic(BaseModel):
    id: str
    model: str
    n: int = Field(description="labelled cases that have a stored score")
    unscored: int = Field(description="labelled cases without a stored score (left out)")
    positives: int
    roc_auc: float
    brier: float
    accuracy: float
    threshold: float | None = Field(
        default=None, description="the accuracy's threshold (absent from older evaluations)"
    )
    plots: dict[str, str] = Field(description="links to the PNG pictures")


def _evaluation_dir(settings: Any, tenant_id: int, evaluation_id: str) -> Path:
    return Path(settings.artifact_dir) / "evaluations" / str(tenant_id) / evaluation_id


@router.post(
    "/score-evaluations",
    response_model=ScoreEvaluationPublic,
    status_code=status.HTTP_201_CREATED,
    responses={422: {}},
)
def create_score_evaluation(
    body: ScoreEvaluationCreate,
    tenant: ReaderDep,
    session: SessionDep,
    settings: SettingsDep,
    registry: RegistryDep,
) -> dict[str, Any]:
    """ROC and calibration of this tenant's stored scores of a model against the given labels."""
    from models.plots import score_evaluation

    if body.model not in registry.names():
        # Named by the registry's names, never the caller's text (an id pasted in the field).
        raise RequestValidationError(
            [problem(("body", "model"), model_problem(registry, body.model))]
        )
    scores = repo.scores_for_external_ids(
        session, tenant_id=tenant.id, model=body.model, external_ids=list(body.labels)
    )
    ids = [i for i in body.labels if i in scores]
    y = [body.labels[i] for i in ids]
    if len(set(y)) < 2:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"labels: {len(ids)} of the {len(body.labels)} labelled cases have a stored "
            f"{body.model!r} score; an evaluation needs scored cases of both outcomes",
        )
    threshold = body.threshold
    if threshold is None:
        # 0.5 would be another cut than the one its scores' labels were given at (0.29 for
        # whas500-mortality); a model whose every version is retired has none to offer.
        try:
            threshold = registry.resolve(body.model).threshold
        except RegistryError:
            threshold = 0.5
    evaluation_id = uuid.uuid4().hex
    folder = _evaluation_dir(settings, tenant.id, evaluation_id)
    found = score_evaluation(
        y, [scores[i] for i in ids], folder, title=body.model, threshold=threshold
    )
    links = {
        name.removesuffix(".png"): f"/v1/score-evaluations/{evaluation_id}/{name}"
        for name in PICTURES
    }
    summary = {
        "id": evaluation_id,
        "model": body.model,
        "n": found["n"],
        "unscored": len(body.labels) - len(ids),
        "positives": found["positives"],
        "roc_auc": found["roc_auc"],
        "brier": found["brier"],
        "accuracy": found["accuracy"],
        "threshold": threshold,
        "plots": links,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


@router.get(
    "/score-evaluations/{evaluation_id}",
    response_model=ScoreEvaluationPublic,
    responses={404: {}},
)
def read_score_evaluation(
    evaluation_id: EvaluationId, tenant: ReaderDep, settings: SettingsDep
) -> dict[str, Any]:
    """An evaluation's numbers and the links to its pictures."""
    path = _evaluation_dir(settings, tenant.id, evaluation_id) / "summary.json"
    if not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no evaluation with this id for this tenant")
    return dict(json.loads(path.read_text()))


def _picture_route(path: str) -> Any:
    """The GET of a PNG picture (404 while there is none)."""
    return router.get(
        path,
        response_class=FileResponse,
        responses={404: {}, 200: {"content": {"image/png": {}}}},
    )


@_picture_route("/score-evaluations/{evaluation_id}/{name}")
def read_score_evaluation_picture(
    evaluation_id: EvaluationId, name: str, tenant: ReaderDep, settings: SettingsDep
) -> FileResponse:
    """One picture of an evaluation: roc.png or calibration.png."""
    path = _evaluation_dir(settings, tenant.id, evaluation_id) / name
    if name not in PICTURES or not path.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no such picture (pictures: {', '.join(PICTURES)})"
        )
    return FileResponse(path, media_type="image/png")


def _not_ready(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, what)


def _drawn(settings: Settings, name: str, draw: Callable[[Path], None]) -> FileResponse:
    """The picture ``name`` of a finished job, drawn by ``draw`` the first time it is asked for."""
    path = Path(settings.artifact_dir) / "plots" / name
    if not path.is_file():
        draw(path)
    return FileResponse(path, media_type="image/png")


GenomeJobDep = Annotated[GenomeJob, Depends(tiled.owned(GenomeJob, "genome comparison"))]
CompoundJobDep = Annotated[CompoundJob, Depends(tiled.owned(CompoundJob, "compound search"))]


@_picture_route("/genome-comparisons/{job_id}/plots/kinship.png")
def genome_kinship_plot(job: GenomeJobDep, settings: SettingsDep) -> FileResponse:
    """IBS0 against kinship of a finished KING job's recorded pairs, coloured by degree."""
    from models.genome.io.output import kinship_degree
    from models.plots import kinship_plot, read_kin0
    from worker.jobs.genome import describe

    kin0 = [p for p in describe(job)["outputs"] if p.endswith(".kin0")]
    if not kin0:
        raise _not_ready("the kinship plot needs a finished KING job (it has no .kin0 yet)")

    def draw(path: Path) -> None:
        table = read_kin0(Path(kin0[0]))
        degrees = [d or "unrelated" for d in kinship_degree(table["kinship"]).tolist()]
        kinship_plot(
            table["kinship"], table["ibs0"], degrees, path, title=f"genome comparison {job.id}"
        )

    return _drawn(settings, f"genome-{job.id}-kinship.png", draw)


@_picture_route("/compound-similarity/{job_id}/plots/similarity.png")
def compound_similarity_histogram(job: CompoundJobDep, settings: SettingsDep) -> FileResponse:
    """A histogram of the similarities a finished compound search found."""
    import csv

    from models.plots import similarity_histogram
    from worker.jobs.compounds import describe

    found = describe(job)
    if not found["output"]:
        raise _not_ready("the histogram needs a finished search")

    def draw(path: Path) -> None:
        with open(found["output"], newline="") as fh:
            values = [float(row["similarity"]) for row in csv.DictReader(fh)]
        import numpy as np

        similarity_histogram(
            np.asarray(values), path, title=f"compound search {job.id}", metric=str(found["metric"])
        )

    return _drawn(settings, f"compounds-{job.id}-similarity.png", draw)
