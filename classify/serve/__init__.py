"""`classify serve`: a trained run (or the backbone's ImageNet classes) behind an HTTP API, with a web page.

- `engine.py`: the model side, no HTTP: loads the model exactly as `classify dir --run RUN` does
  (`classify.predict.Predictor`), turns uploaded bytes into the model's input through the same safe loader and
  preprocessing (`classify.predict.image_pixels`), and ranks with the same code (`classify.predict.predict_pixels`),
  so a served prediction equals the batch one for the same file.
- `folding.py`: batch norms folded into their convolutions at load (checked against the unfolded outputs), for speed.
- `batcher.py`: micro-batching: concurrent requests are gathered into one forward pass.
- `similar.py`: the run's training images nearest to an upload, from the workspace's cached embeddings.
- `uploads.py`: multipart uploads read into memory under a size bound; nothing is written to disk.
- `app.py`: the FastAPI application and the server; `static/`: the page, served locally (no CDN, no build step).

FastAPI, uvicorn and python-multipart are the optional `serve` extra: only this package's `app`/`uploads` modules
import them, and `require_extra` turns their absence into one line.
"""

from __future__ import annotations

from curator.core.errors import UsageError

EXTRA_HINT = "classify serve needs the serve extra: pip install 'atelier[serve]'"
#: Defaults of the command line (kept here, where `classify --help` reads them without importing anything heavy).
DEFAULT_PORT = 8000
DEFAULT_MAX_BYTES = 32 << 20  # an upload larger than this is refused (413); a phone photo is 3-15 MB
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 10.0  # waited only while other requests are on their way


def require_extra() -> None:
    """Raise the one-line `UsageError` EXTRA_HINT unless FastAPI, uvicorn and python-multipart can be imported."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401

        try:
            import python_multipart  # noqa: F401
        except ImportError:  # python-multipart before 0.0.13 names its module `multipart`
            import multipart  # noqa: F401
    except ImportError:
        raise UsageError(EXTRA_HINT) from None
