"""Credentials in URIs are never stored with a run or a checkpoint, and the
tracking server the tool starts (`deeplab ui`) listens on 127.0.0.1 only. (Checkpoints load
with weights_only=True: tests/test_import.py; archive extraction cannot escape its folder:
tests/test_datasets.py. Ray's token auth is left as Ray sets it: nothing here turns it off.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import torch

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.search.tracking import config_params
from deeplab_sweep.trainable.engine import LocalWorker, fit
from tests.conftest import CONF, free_port

SECRET = "s3cr3t-t0ken"


def test_credentials_in_uris_are_not_stored(synth_voc_root, tmp_path):
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "train.epochs=1",
            "data.max_train_images=8",
            "data.max_val_images=2",
            f"mlflow.tracking_uri=https://alice:{SECRET}@mlflow.example.com",
            f"storage.path=s3://AKIA:{SECRET}@bucket/ray",
            "train.visuals=0",
        ],
    ).run
    params = {p.key: p.value for p in config_params(cfg.to_dict())}
    assert params["mlflow.tracking_uri"] == "https://***@mlflow.example.com"
    assert params["storage.path"] == "s3://***@bucket/ray"
    assert not any(SECRET in v for v in params.values())
    fit(cfg, LocalWorker(checkpoint_root=tmp_path))
    stored = torch.load(tmp_path / "epoch_0001" / "checkpoint.pt", weights_only=True)["config"]
    assert SECRET not in repr(stored) and stored["mlflow"]["tracking_uri"] == "https://***@mlflow.example.com"


def _listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) of the sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def test_ui_listens_on_loopback_only_and_links_each_experiments_runs(tmp_path):
    """And it prints, for each experiment, the page of its training runs: MLflow's UI opens an
    experiment on its (empty) GenAI overview."""
    from mlflow.tracking import MlflowClient

    exp_id = MlflowClient(f"sqlite:///{tmp_path}/ui.db").create_experiment("deeplab")
    port = free_port()
    out = (tmp_path / "out.txt").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deeplab_sweep.cli",
            "ui",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{tmp_path}/ui.db",
            "--artifacts",
            str(tmp_path / "art"),
        ],
        stdout=out,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(CONF.parent)},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "deeplab ui did not start"
                time.sleep(0.5)
        assert _listening(port) == {"0100007F"}, _listening(port)  # 127.0.0.1, nothing else
        # MLflow's GenAI job runner (started beside the web server) is left out: 8 processes
        # a page of training runs does not use.
        tree = [" ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True)]
        assert tree and not [c for c in tree if "mlflow.server.jobs" in c or "huey" in c], tree
        printed = (tmp_path / "out.txt").read_text()
        assert f"training runs of 'deeplab': http://127.0.0.1:{port}/#/experiments/{exp_id}/runs" in printed
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        out.close()


def test_redaction_covers_secrets_with_slashes():
    from deeplab_sweep.trainable.credentials import redacted

    assert redacted("s3://AKIA:ab/cd+ef@bucket/ray") == "s3://***@bucket/ray"
    assert redacted("https://token@host:5000/x") == "https://***@host:5000/x"
    assert redacted("s3://bucket/prefix@v2/x") == "s3://bucket/prefix@v2/x"  # not credentials: left alone


def _files_with(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_credentialed_tracking_uri_works_and_leaves_no_trace(
    ray_cluster, mlflow_server, synth_voc_root, workdir, tmp_path, monkeypatch, capfd
):
    """http://user:TOKEN@host: the credentials go where MLflow's client reads them (the
    environment of this process), and nowhere else: not in the MLflow store, its artifacts,
    the sweep's storage (Tune's pickles included), Optuna's study, or what is printed."""
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.cli import main

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # restored (unset) after the test
    host = mlflow_server.url.removeprefix("http://")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "defaults: [train/demo]\ndata: {max_train_images: 8, max_val_images: 2, crop_size: 48}\n"
        "train: {epochs: 1, cpus_per_worker: 1}\n"
        "sweep: {num_samples: 1, asha: {enabled: false}, name: creds}\n"
        "space:\n  train.lr: {type: loguniform, low: 0.001, high: 0.1}\n"
    )
    rc = main(
        [
            "sweep",
            str(cfg),
            "--conf-dir",
            str(CONF),
            f"data.root={synth_voc_root}",
            "--tracking-uri",
            f"http://alice:{SECRET}@{host}",
        ]
    )
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET
    c = MlflowClient(mlflow_server.url)
    runs = c.search_runs([c.get_experiment_by_name("deeplab").experiment_id])
    assert {r.data.tags["deeplab.kind"] for r in runs} == {"sweep", "trial"}
    assert runs[0].data.params["mlflow.tracking_uri"] == mlflow_server.url
    assert SECRET not in out + err
    assert _files_with(mlflow_server.folder, SECRET.encode()) == []
    assert _files_with(workdir / "runs", SECRET.encode()) == []


EVIL = """\
import os
from pathlib import Path

Path(os.environ["DEEPLAB_TEST_MARK"]).write_text("imported")  # what a hostile checkpoint's code could do

from tests.toy_model import build  # noqa: E402,F401
"""


def test_a_checkpoint_cannot_make_us_import_its_model_code(synth_voc_root, tmp_path, monkeypatch, capsys):
    """A real checkpoint whose stored config names `evilpkg.evil:build`, a module that writes a
    file when imported (as one from a shared MLflow server could): `deeplab eval` refuses it in
    one line, exit 2, without importing it; naming the factory on the command line opts in."""
    from deeplab_sweep.cli import main

    (tmp_path / "evilpkg").mkdir()
    (tmp_path / "evilpkg" / "__init__.py").write_text("")
    (tmp_path / "evilpkg" / "evil.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path))
    mark = tmp_path / "imported.txt"
    monkeypatch.setenv("DEEPLAB_TEST_MARK", str(mark))
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        [
            f"data.root={synth_voc_root}",
            "model.factory=tests.toy_model:build",
            "train.epochs=1",
            "train.visuals=0",
            "data.max_train_images=8",
            "data.max_val_images=2",
        ],
    ).run
    fit(cfg, LocalWorker(checkpoint_root=tmp_path / "ckpt"))
    path = tmp_path / "ckpt" / "epoch_0001" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["model"]["factory"] = "evilpkg.evil:build"
    torch.save(ckpt, path)

    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}: its config names model.factory = 'evilpkg.evil:build', not a registered model" in err
    assert "--model-factory evilpkg.evil:build" in err and err.count("\n") == 1
    assert not mark.exists(), "the checkpoint's module was imported"
    assert main(["eval", "--checkpoint", str(path), "--model-factory", "evilpkg.evil:build"]) == 0
    assert mark.exists()


def test_an_optuna_storage_password_is_never_printed_nor_pickled(workdir, capsys):
    """Optuna's way to authenticate is the database URL itself: the searcher keeps it in memory
    and pickles (into Tune's searcher state) and prints only its redacted form; a database
    that cannot be opened (here: no driver installed) is one line."""
    import pickle

    from deeplab_sweep.cli import main
    from deeplab_sweep.search.searcher import build_searcher

    url = f"postgresql://alice:{SECRET}@127.0.0.1:1/optuna"
    job = load_job(CONF / "sweep" / "demo.yaml", [f"sweep.optuna_storage={url}"])
    searcher, _ = build_searcher(job, "s")
    assert searcher.storage_url == "postgresql://***@127.0.0.1:1/optuna"
    assert SECRET.encode() not in pickle.dumps(searcher.__getstate__())
    from deeplab_sweep.trainable.credentials import recall

    assert recall(searcher.storage_url) == url  # what this process connects with

    assert main(["sweep", str(CONF / "sweep" / "demo.yaml"), f"sweep.optuna_storage={url}", "sweep.name=pg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: sweep.optuna_storage = 'postgresql://***@127.0.0.1:1/optuna': cannot be opened (ImportError: "
    ), err
    assert SECRET not in err and err.count("\n") == 1


def test_s3_credentials_in_an_artifact_location_or_a_sync_uri_are_never_printed_nor_stored(
    s3_server, synth_voc_root, workdir, monkeypatch, capsys
):
    from deeplab_sweep.cli import main
    from deeplab_sweep.search import tracking
    from deeplab_sweep.trainable.run_config import MlflowConfig

    for var, value in s3_server.env.items():
        monkeypatch.setenv(var, value)
    demo = str(CONF / "train" / "demo.yaml")
    rc = main(["train", demo, f"data.root={synth_voc_root}", f"mlflow.artifact_location=s3://AKIA:{SECRET}@nope/art"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: mlflow.artifact_location = 's3://nope/art': not writable" in err, err
    assert SECRET not in err
    # Reachable: the experiment MLflow stores (which every user of the server reads) has no secret.
    cfg = tracking.resolved(
        MlflowConfig(
            tracking_uri=f"sqlite:///{workdir}/m.db",
            artifact_location=f"s3://testing:{SECRET}@{s3_server.bucket}/art",
            experiment="e",
        )
    )
    exp = tracking.client(cfg).get_experiment(tracking.ensure_experiment(cfg))
    assert exp.artifact_location == f"s3://{s3_server.bucket}/art"
    assert _files_with(workdir, SECRET.encode()) == []
    capsys.readouterr()  # MLflow's own log of creating that store

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens there
    assert main(["sync", f"s3://AKIA:{SECRET}@{s3_server.bucket}/ray/sw"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: s3://{s3_server.bucket}/ray/sw: cannot be read (") and err.count("\n") == 1, err
    assert SECRET not in err


def test_credentials_in_a_query_string_are_redacted_like_those_in_the_netloc():
    from deeplab_sweep.trainable.credentials import redacted, remember

    cases = {
        "postgresql://db/optuna?user=bob&password=PW": "postgresql://db/optuna?user=***&password=***",
        "mysql://db/optuna?password=PW&charset=utf8": "mysql://db/optuna?password=***&charset=utf8",
        "https://host/x?token=T0K#top": "https://host/x?token=***#top",
        "https://acct.blob.core.windows.net/c?sv=2024&sig=S1G": "https://acct.blob.core.windows.net/c?sv=2024&sig=***",
        "s3://b/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc": "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***",
        "sqlite:///x.db?timeout=30": "sqlite:///x.db?timeout=30",  # no credential: left alone
    }
    for given, shown in cases.items():
        assert redacted(given) == shown
    # As an MLflow parameter, and as what the searcher pickles and prints.
    job = load_job(CONF / "sweep" / "demo.yaml", ["sweep.optuna_storage=postgresql://db/optuna?password=" + SECRET])
    params = {p.key: p.value for p in config_params(job.to_dict())}
    assert params["sweep.optuna_storage"] == "postgresql://db/optuna?password=***"
    assert remember(f"postgresql://db/o?password={SECRET}") == "postgresql://db/o?password=***"


def test_an_optuna_storage_password_can_come_from_the_environment(monkeypatch):
    """The way to keep it off a command line (a Ray job's entrypoint is kept in clear)."""
    from deeplab_sweep.trainable.credentials import DATABASE_PASSWORD_VAR, database_url

    monkeypatch.setenv(DATABASE_PASSWORD_VAR, "p@ss/w:rd")
    assert database_url("postgresql://bob@db:5432/optuna") == "postgresql://bob:p%40ss%2Fw%3Ard@db:5432/optuna"
    assert database_url("postgresql://bob:given@db/optuna") == "postgresql://bob:given@db/optuna"
    assert database_url("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"


def test_the_resume_hint_leaves_credentials_out():
    """What an interrupted sweep prints (under `ray job stop`, into `ray job logs`)."""
    from deeplab_sweep.cli import parser
    from deeplab_sweep.cli.sweep import options_as_overrides, resume_hint

    args = parser().parse_args(
        [
            "sweep",
            "conf/sweep/demo.yaml",
            f"sweep.optuna_storage=postgresql://bob:{SECRET}@db/optuna",
            "--tracking-uri",
            f"http://alice:{SECRET}@mlflow:5000",
        ]
    )
    options_as_overrides(args)
    hint = resume_hint(args, "s1")
    assert SECRET not in hint
    assert hint.splitlines()[0] == (
        "interrupted; continue it with: deeplab sweep conf/sweep/demo.yaml "
        "'sweep.optuna_storage=postgresql://***@db/optuna' 'mlflow.tracking_uri=http://***@mlflow:5000' "
        "mlflow.artifact_location= sweep.name=s1 --resume"
    )
    assert "*** marks a credential left out" in hint


PICKLE_BOMB = b"cos\nsystem\n(S'touch %s'\ntR."  # what unpickling a hostile tuner.pkl runs


def test_resume_refuses_a_sweep_folder_other_users_can_write(synth_voc_root, workdir, capsys):
    """--resume unpickles the folder's tuner.pkl: a folder, or a file in it, that anyone may
    write is refused in one line before anything is unpickled."""
    from deeplab_sweep.cli import main

    mark = workdir / "unpickled"
    folder = workdir / "runs" / "ray" / "s1"
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(PICKLE_BOMB % str(mark).encode())
    argv = ["sweep", str(CONF / "sweep" / "demo.yaml"), f"data.root={synth_voc_root}", "sweep.name=s1", "--resume"]
    for path, mode in ((folder, 0o777), (folder / "tuner.pkl", 0o666)):
        path.chmod(mode)
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: storage.path: {path}: any user can write it (mode {oct(mode)}); ")
        assert err.count("\n") == 1 and not mark.exists()
        path.chmod(mode & 0o755)


def test_a_command_writes_what_mlflow_queued_before_it_exits(tmp_path):
    """With MLflow's asynchronous logging on, writes after a run's set_terminated are only
    queued: the `deeplab` command's fast exit writes them first (200 of 200, not 1)."""
    script = (
        "import sys\n"
        "from mlflow.tracking import MlflowClient\n"
        "c = MlflowClient(sys.argv[1])\n"
        "run = c.create_run(c.create_experiment('e')).info.run_id\n"
        "c.set_terminated(run)\n"
        "for i in range(200):\n"
        "    c.log_metric(run, 'm', float(i), step=i)\n"
        "from deeplab_sweep.cli import exit_now\n"
        "exit_now(0)\n"
    )
    store = f"sqlite:///{tmp_path}/m.db"
    env = {**os.environ, "MLFLOW_ENABLE_ASYNC_LOGGING": "true"}
    subprocess.run([sys.executable, "-c", script, store], check=True, env=env, capture_output=True, timeout=120)
    from mlflow.tracking import MlflowClient

    c = MlflowClient(store)
    (run,) = c.search_runs([c.get_experiment_by_name("e").experiment_id])
    assert len(c.get_metric_history(run.info.run_id, "m")) == 200


def test_a_new_store_is_what_mlflow_would_have_created_here(tmp_path, monkeypatch):
    """Stores are copied from a cached template: the copy's Default experiment points at this
    folder's mlruns/0 as one MLflow makes here does, not at the folder the template was made in;
    and a sqlite URI's options are not part of its file name."""
    from mlflow.tracking import MlflowClient

    from deeplab_sweep.search.tracking import resolve_tracking_uri

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for project in ("a", "b"):
        (tmp_path / project).mkdir()
        monkeypatch.chdir(tmp_path / project)
        copied = MlflowClient(resolve_tracking_uri("sqlite:///runs/mlflow.db?timeout=30")).get_experiment("0")
        made = MlflowClient(f"sqlite:///{tmp_path / project / 'own.db'}").get_experiment("0")
        assert copied.artifact_location == made.artifact_location
        assert sorted(os.listdir("runs")) == ["mlflow.db"]
    assert len(os.listdir(tmp_path / "cache" / "deeplab-sweep")) == 1  # b's store was a copy


def test_a_job_driver_works_from_a_folder_of_its_own(tmp_path, monkeypatch):
    """Out of the job's working dir (which Ray may unpack again), but not into the shared temp
    folder, where a relative sys.path entry would find other users' modules."""
    import stat
    import tempfile

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from deeplab_sweep.search.cluster import _out_of_the_job_folder

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    monkeypatch.chdir(tmp_path)
    with _out_of_the_job_folder():
        inside = Path.cwd()
        assert inside != Path(tempfile.gettempdir()) and inside.parent == Path(tempfile.gettempdir())
        st = inside.stat()
        assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert Path.cwd() == tmp_path and not inside.exists()
