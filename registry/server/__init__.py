"""The registry's web API (FastAPI): ``create_app`` builds it; ``weightlab serve`` runs it with uvicorn.

Layout: ``app`` (factory, error mapping, job workers), ``deps`` (every dependency), ``routes/`` (one router per
resource, under ``/api/v1``), ``schemas`` (request bodies), ``transfer`` (streamed uploads, ranged downloads).
"""
