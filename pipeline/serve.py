"""`mmcl serve NAME@ALIAS`: MLflow's scoring server (`/invocations`, as `mlflow models serve`
answers it) over a registered version, following the alias: a thread asks the registry every
`poll_s` seconds which version the alias names and, when it moves (a promotion, a rollback),
loads that version beside the one serving and swaps them between requests. NAME/VERSION serves
that version and follows nothing."""
import threading
import time

from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import BAD_REQUEST
from mlflow.pyfunc import scoring_server

from pipeline.config import ConfigError
from pipeline.pyfunc import load_task_model
from pipeline.tracking import open_client, parse_ref


class FollowedModel:
    """What the scoring server calls: `predict` on the version the alias named last, its version
    in every answer's `model_version` column."""

    def __init__(self, uri: str, ref: str, log=print):
        self.uri, self.log = uri, log
        self.name, self.alias, version = parse_ref(ref)
        self.client = open_client(uri)
        self.metadata = Model()  # no signature: the columns are checked by TaskModel.predict
        self.lock = threading.Lock()
        self.version, self.model = None, None
        self.load(self.first(version))

    def aliased(self) -> str:
        return str(self.client.get_model_version_by_alias(self.name, self.alias).version)

    def first(self, version: str | None) -> str:
        if version is not None:
            return version
        try:
            return self.aliased()
        except MlflowException:
            raise ConfigError(f"{self.name}@{self.alias}: no such model or alias in {self.uri} (`mmcl update` moves "
                              f"@champion; `mmcl serve {self.name}/VERSION` serves a version)") from None

    def load(self, version: str) -> None:
        model = load_task_model(f"models:/{self.name}/{version}", self.uri)
        if self.model is not None and model.spec.get("encoders") == self.model.spec.get("encoders"):
            model.encoders = self.model.encoders  # the same frozen encoders: no second copy
        with self.lock:
            before, self.version, self.model = self.version, version, model
        self.log(f"serving {self.name} version {version}" + (f" (was version {before})" if before else ""), flush=True)

    def predict(self, frame, params=None):
        with self.lock:
            version, model = self.version, self.model
        try:
            out = model.predict(frame)
        except ValueError as e:  # the rows' fault, said as it is (not as "an unexpected error")
            raise MlflowException(str(e), error_code=BAD_REQUEST) from None
        out["model_version"] = int(version)
        return out

    def follow(self, poll_s: float, stop: threading.Event) -> None:
        """Until `stop`: loads the version the alias names whenever it changes. A registry that
        cannot be read, or a version that cannot be loaded, leaves the version serving as it is
        (said once, until the next change works)."""
        failing = None
        while not stop.wait(poll_s):
            try:
                version = self.aliased()
                if version != self.version:
                    self.load(version)
                failing = None
            except Exception as e:  # noqa: BLE001 (whatever it is, the server goes on with what it has)
                line = str(e).splitlines()[0] if str(e) else type(e).__name__
                if line != failing:
                    self.log(f"mmcl serve: cannot follow {self.name}@{self.alias} ({line}); still serving "
                             f"version {self.version}", flush=True)
                failing = line


def serve(uri: str, ref: str, host: str = "127.0.0.1", port: int = 5001, poll_s: float = 5.0, log=print) -> None:
    import uvicorn

    followed = FollowedModel(uri, ref, log)
    app = scoring_server.init(followed)

    @app.get("/model")
    async def model():
        """The version answering now."""
        return {"name": followed.name, "alias": followed.alias, "version": int(followed.version)}

    stop = threading.Event()
    if followed.alias:
        threading.Thread(target=followed.follow, args=(poll_s, stop), daemon=True).start()
    what = f"@{followed.alias}, checked every {poll_s:g} s" if followed.alias else "this version only"
    log(f"POST rows to http://{host}:{port}/invocations ({what}; GET /model says which version answers; "
        "Ctrl-C stops it)", flush=True)
    started = time.time()
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stop.set()
        log(f"mmcl serve: stopped after {time.time() - started:.0f} s", flush=True)
