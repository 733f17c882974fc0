"""Serve stage: text-to-image retrieval over HTTP (FastAPI, run by uvicorn), with a web page.

:func:`create_app` is a library object (tests and Ray Serve can mount it); ``zsl serve`` only
starts it (:func:`run_serve`); :func:`ray_app` is the Ray Serve application builder a RayService
names (``import_path: pipeline.stages.serve:ray_app``). Each index loads once (memory-mapped,
:class:`pipeline.index.searcher.Searcher`); faiss searches and the text encoder are thread-safe for
reads. Endpoints:

- ``POST /search`` ``{"text" | "image" (base64) | "embedding", "k", "index", "labels", "unseen_only",
  "min_score", "offset"}`` -> hits (with the predicted label and score when a labels dir is served)
- ``GET /images/{faiss_id}?index=&size=`` a JPEG thumbnail of the uri the index holds for that id
  (made on first request, cached on disk atomically); ids are integers, so no path reaches the disk
- ``GET /indices``, ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /`` the page
- clip-retrieval compatibility (bodies read as JSON whatever their Content-Type): ``POST /knn-service``,
  ``GET``/``POST /indices-list``, ``POST /metadata``; CORS for ``cors_origins``

Bad input gets a 4xx with a JSON ``detail``, never a 500: empty or overlong text, ``k`` above the
maximum, images that are not base64 or not an image or too many pixels, wrong-dimension
embeddings, unknown indexes or ids, bodies above the size cap.

Modules: :mod:`.app` (wiring, limits), :mod:`.state` (what handlers read), :mod:`.routes` and
:mod:`.clip_retrieval` (the handlers), :mod:`.feature_meta` (hits' captions and source urls),
:mod:`.queries` (query vectors and filtered hits), :mod:`.batching` (text queries encoded together,
cached), :mod:`.thumbnails`, :mod:`.metrics`, :mod:`.runner` (uvicorn or Ray Serve).
"""

from pipeline.stages.serve.app import create_app
from pipeline.stages.serve.runner import ray_app, run_serve

__all__ = ["create_app", "ray_app", "run_serve"]
