"""Shards in object storage: an S3 server on loopback (moto in server mode, a real HTTP server speaking the S3
API with IAM authentication on), used through the real fsspec/s3fs and botocore clients. Credentials and the
endpoint reach cxrfm only through the standard AWS_* environment variables.

`cxrfm data build --out s3://...`, `cxrfm data verify s3://...`, the tokenizer and eval's reader go straight
to the bucket; `cxrfm train` streams from it with a shard deleted mid-run and one damaged (both counted, the
run finishes); wrong credentials end in one line before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cxrfm.cli import main

REGION = "us-east-1"
BUCKET = "cxrfm-shards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3+IAM server on 127.0.0.1 with authentication on: the first three (unauthenticated) requests
    create a user with an access key, every later request must be signed with it. Yields the environment
    a client needs (credentials, endpoint, region) and stops the server afterwards."""
    import boto3

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # a TCP connect, not a request: requests count against the unauthenticated allowance
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="cxrfm")
        iam.put_user_policy(UserName="cxrfm", PolicyName="shards", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="cxrfm")["AccessKey"]
        env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
               "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": REGION}
        boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture()
def s3_env(s3, monkeypatch, tmp_path):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("CXRFM_CACHE", str(tmp_path / "cache"))  # remote tokenizers are copied here
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # no client made with other credentials is reused
    return s3


def _bucket(env: dict):
    import boto3

    return boto3.resource("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=REGION,
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).Bucket(BUCKET)


BUILD = ["--set", "data.num_studies=60", "--set", "data.shard_size=10", "--set", "data.vocab_size=600", "--workers", "1"]


@pytest.fixture(scope="module")
def built(s3, tmp_path_factory):
    """Shards built straight into the bucket by `cxrfm data build --out s3://...` (in a subprocess: the
    environment is the only way credentials arrive)."""
    uri = f"s3://{BUCKET}/tiny"
    cache = tmp_path_factory.mktemp("cache")
    out = subprocess.run([sys.executable, "-m", "cxrfm.cli", "data", "build", "--out", uri, *BUILD],
                         env={**os.environ, **s3, "CXRFM_CACHE": str(cache)}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"in {uri}" in out.stdout
    assert not list((cache / "staging").glob("*")), "the local staging copy was not removed after the upload"
    return uri


def test_build_writes_everything_to_the_store_and_verify_reads_it(built, s3_env, capsys):
    keys = {o.key for o in _bucket(s3_env).objects.filter(Prefix="tiny/")}
    manifest = json.loads(_bucket(s3_env).Object("tiny/manifest.json").get()["Body"].read())
    assert {"tiny/manifest.json", "tiny/build_report.json", "tiny/tokenizer/tokenizer.json"} <= keys
    assert {f"tiny/{sh['path']}" for sh in manifest["shards"]} <= keys

    assert main(["data", "verify", built]) == 0
    assert "60 samples ok, 0 problem(s)" in capsys.readouterr().out


def test_tokenizer_and_eval_reader_come_from_the_store(built, s3_env, tmp_path):
    from cxrfm.eval.evaluate import iter_split
    from cxrfm.text.tokenizer import load_tokenizer

    tok = load_tokenizer(f"{built}/tokenizer")
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert list((tmp_path / "cache" / "remote").glob("*/*/tokenizer.json"))  # copied once, reused after
    studies = list(iter_split(built, "test"))
    manifest = json.loads(_bucket(s3_env).Object("tiny/manifest.json").get()["Body"].read())
    assert len(studies) == manifest["splits"]["test"]["studies"] > 0
    assert all(images["frontal"].ndim == 2 for _, images in studies)


def test_verify_reports_a_damaged_and_a_missing_shard(s3_env, tmp_path, capsys):
    uri = f"s3://{BUCKET}/damaged"
    assert main(["data", "build", "--out", uri, *BUILD]) == 0
    manifest = json.loads(_bucket(s3_env).Object("damaged/manifest.json").get()["Body"].read())
    first, second = manifest["shards"][0]["path"], manifest["shards"][1]["path"]
    _bucket(s3_env).put_object(Key=f"damaged/{first}", Body=b"not a tar")
    _bucket(s3_env).Object(f"damaged/{second}").delete()
    capsys.readouterr()
    assert main(["data", "verify", uri]) == 1
    out = capsys.readouterr().out
    assert f"{first}\t*\tsha256 differs from manifest" in out and f"{second}\t*\tshard file missing" in out


@pytest.mark.parametrize("argv", [["data", "verify", "{uri}"], ["data", "build", "--out", "{uri}/new"],
                                  ["train", "--set", "data.shards={uri}", "--set", "train.output_dir={run}"]],
                         ids=["verify", "build", "train"])
def test_wrong_credentials_one_line_before_any_work(built, s3, tmp_path, argv):
    argv = [a.format(uri=built, run=tmp_path / "run") for a in argv]
    env = {**os.environ, **s3, "AWS_SECRET_ACCESS_KEY": "wrong", "CXRFM_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", "cxrfm.cli", *argv], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot access s3://"), out.stderr
    assert "AWS_ACCESS_KEY_ID" in lines[0] and "signature" in lines[0].lower()
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing was started


@pytest.mark.slow
def test_training_streams_from_the_store_and_counts_lost_shards(s3_env, tmp_path):
    """`cxrfm train` on s3:// shards: one shard damaged before the run (excluded, counted as
    checksum_mismatch), one deleted from the bucket while the run trains (counted as missing_shard when the
    next epoch reaches it); the run finishes all its steps."""
    from mlflow.tracking import MlflowClient

    uri = f"s3://{BUCKET}/train"
    assert main(["data", "build", "--out", uri, *BUILD]) == 0
    manifest = json.loads(_bucket(s3_env).Object("train/manifest.json").get()["Body"].read())
    train = [sh for sh in manifest["shards"] if sh["split"] == "train"]
    damaged, deleted = train[0], train[-1]
    _bucket(s3_env).put_object(Key=f"train/{damaged['path']}", Body=b"x" * 1000)

    out = tmp_path / "run"
    env = {**os.environ, "CXRFM_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    # 2 workers x 4 rows per step; the train split's ~46 studies: 3 epochs per pass (trainer: ceil(128 / 46))
    cmd = [sys.executable, "-m", "cxrfm.cli", "train", "--no-progress", "--set", f"data.shards={uri}",
           "--set", f"train.output_dir={out}", "--set", "train.max_steps=16", "--set", "train.log_every=2",
           "--set", "train.checkpoint_every=16", "--set", "train.micro_batch_size=4", "--set", "data.shuffle=false",
           "--set", "model.diffusion.enabled=false", "--set", "data.tasks={report: 0.5, vqa: 0.3, grounding: 0.2}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deleted_at = []

    def delete_when_training() -> None:
        # run.json appears once the driver has checked every shard against the manifest and before the workers
        # stream: the shard vanishes mid-run, after its check, and every epoch's read of it finds it gone
        # (waiting for logged steps instead raced with Ray Data reading all epochs ahead on an idle machine)
        while proc.poll() is None:
            if list(out.glob("*/run.json")):
                _bucket(s3_env).Object(f"train/{deleted['path']}").delete()
                deleted_at.append(0)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=delete_when_training, daemon=True)
    watcher.start()
    output, _ = proc.communicate(timeout=1200)
    watcher.join(timeout=5)
    assert proc.returncode == 0, output[-4000:]
    assert deleted_at and deleted_at[0] < 16, "the shard was not deleted while the run trained"
    state = json.loads(next(out.glob("*/run.json")).read_text())
    run = MlflowClient(state["tracking_uri"]).get_run(state["mlflow_run_id"])
    metrics = run.data.metrics
    # counted, all of a shard's samples, each time an epoch reaches it (placeholder rows, never trained on). A
    # placeholder is one row for a whole shard, so the 3 epochs of the first pass run short of 16 steps and the
    # loop starts a second pass of 3: at most 6 epochs reach it
    assert metrics["skipped/checksum_mismatch"] >= damaged["samples"]
    missing = metrics["skipped/missing_shard"]
    assert 0 < missing <= 6 * deleted["samples"] and missing % deleted["samples"] == 0, missing
    steps = [m.step for m in MlflowClient(state["tracking_uri"]).get_metric_history(state["mlflow_run_id"], "loss")]
    assert steps == list(range(2, 17, 2))
