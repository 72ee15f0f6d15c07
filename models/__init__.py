"""Pure compute, one subpackage per job kind: ``cases`` (scoring), ``fhir`` (FHIR to features),
``genome`` and ``compounds`` (tiled similarity jobs), ``reference`` (training recipes, used only by
``medbatch models train|evaluate``), ``terminology`` (codes and units); ``device`` chooses the device
for all of them. Nothing here imports Celery, SQLAlchemy or HTTP (checked by ``make lint``)."""
