"""One router per resource; :func:`weightlab.registry.server.app.create_app` mounts them under ``/api/v1``."""

from weightlab.registry.server.routes import (blobs, folders, jobs, labels, lineage, maintenance, namespaces, tokens,
                                              versions)

ROUTERS = [versions.router, folders.router, blobs.router, labels.router, lineage.router, jobs.router, tokens.router,
           namespaces.router, maintenance.router]
