"""Where a run is tracked: the tracking URI (the recipe's `track.uri`, else $MLFLOW_TRACKING_URI, else a local
SQLite file beside the runs), the experiment (the recipe's name unless set) and the MLflow client settings
that keep a tracking server that is down or slow out of training's way."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from urllib.parse import urlparse

from dlkit.config import TrackCfg
from dlkit.errors import ConfigError

DB_NAME = "mlflow.db"  # the default store: <runs folder>/mlflow.db (SQLite: MLflow 3's own default backend)
ARTIFACTS = "mlartifacts"  # a SQLite store's artifacts, beside the database file
# the stores MLflow's client reads (a SQLAlchemy driver may follow a `+`: postgresql+psycopg2)
SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
# a tracking server that is down fails in seconds, not minutes: MLflow's defaults retry 7 times with
# backoff up to 2 minutes and wait 120 s for an answer. A user's own settings of these win.
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
              # its per-file progress bars would interleave with dlkit's progress lines, and its "View run"
              # links would land on stdout, whose last line is the run directory
              "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def require_mlflow() -> None:
    """Refuse tracking in one line when MLflow is not installed (checked without importing it)."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("tracking needs MLflow, which is not installed: pip install 'dlkit[track]' "
                          "(or run without --track / the recipe's track section)")


def tracking_uri(cfg: TrackCfg | None = None, runs_root: str | Path = "runs") -> str:
    """The tracking URI: `track.uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<runs_root>/mlflow.db; a
    SQLite path is made absolute, so the run directory's record works from any folder."""
    uri = (cfg.uri if cfg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        return "sqlite:///" + str((Path(runs_root) / DB_NAME).resolve())
    return checked_uri(uri.strip())


def checked_uri(uri: str) -> str:
    """`uri` if MLflow reads its scheme (a relative SQLite path made absolute), else one ConfigError line."""
    scheme = urlparse(uri).scheme.split("+")[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"tracking URI '{uri}' is not one MLflow reads; give http://HOST:PORT, sqlite:///FILE.db "
                          f"or another of {', '.join(SCHEMES)} (MLFLOW_TRACKING_URI or track.uri)")
    path = sqlite_path(uri)
    if path is not None and not path.is_absolute():
        return "sqlite:///" + str(path.resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, or None for another store (or SQLite in memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri.removeprefix("sqlite:///").split("?")[0]
    return Path(rest) if rest and rest != ":memory:" else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: for a SQLite store, mlartifacts/<experiment>/ beside the
    database file (MLflow's own default would be ./mlruns in whatever folder the run started); None
    (the server's choice) for any other store."""
    path = sqlite_path(uri)
    if path is None:
        return None
    return (path.parent / ARTIFACTS / safe_name(experiment)).resolve().as_uri()


def safe_name(text: str) -> str:
    """`text` as one folder name: letters, digits, `.`, `_` and `-`."""
    return re.sub(r"[^\w.\-]", "_", text).strip(".") or "experiment"


def client_env() -> None:
    """MLflow's client settings dlkit asks for (retries, backoff, timeout, quiet), unless the user set them."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
