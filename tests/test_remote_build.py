"""buildArch.sh --remote-build: the image built by the stack's CodeBuild project, and its buildspec.

Same harness as tests/test_buildarch.py (fake ``aws``/``docker`` on PATH that record their argv),
plus a fake ``aws codebuild`` whose ``batch-get-builds`` answers come one by one from JSON files:
a build that goes PROVISIONING -> BUILD -> SUCCEEDED is followed and then deployed, and one that
FAILS in its BUILD phase stops the script with that phase's own message and a non-zero exit.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml
from test_buildarch import (
    FAKE_AWS,
    REPO,
    SCRIPT,
    SYSTEM_TOOLS,
    _write_exe,
    calls,
    index_of,
    one,
    printed,
    run_script,
)
from test_buildarch import fakes as fakes  # noqa: F401 - the fixture, re-exported for these tests
from test_buildarch import project_copy as project_copy  # noqa: F401

BUILDSPEC = REPO / "cloudformation" / "buildspec.yml"

# codebuild and the CodeBuild project's stack output; everything else goes to test_buildarch's fake.
FAKE_AWS_CODEBUILD = r"""#!/usr/bin/env bash
log() { line=aws; for a in "$@"; do line+=$'\t'"$a"; done; printf '%s\n' "$line" >> "$FAKE_LOG"; }
args="$*"
case "$1 $2" in
  "codebuild start-build") log "$@"; echo "wb-image:build-1"; exit 0 ;;
  "codebuild batch-get-builds")
    log "$@"
    n=$(cat "$FAKE_BUILD_STATES/next" 2>/dev/null || echo 0)
    state="$FAKE_BUILD_STATES/$n.json"
    [[ -f "$state" ]] || state=$(ls "$FAKE_BUILD_STATES"/*.json | sort -V | tail -n1)  # the last state stays
    echo $((n + 1)) > "$FAKE_BUILD_STATES/next"
    cat "$state"; exit 0 ;;
  "s3 cp")
    if [[ -n "${FAKE_UPLOADS:-}" && -f "$3" ]]; then cp "$3" "$FAKE_UPLOADS/$(basename "$4")"; fi ;;
  "cloudformation describe-stacks")
    # The project output: after any deploy, or on an existing stack unless it predates the project.
    if [[ "$args" == *ImageBuildProjectName* ]] \
        && { [[ "${FAKE_STACK_EXISTS:-0}" == 1 && "${FAKE_NO_PROJECT:-0}" != 1 ]] \
             || grep -q $'^aws\tcloudformation\tdeploy' "$FAKE_LOG" 2>/dev/null; }; then
      log "$@"; echo wb-image; exit 0
    fi ;;
esac
exec "$(dirname "$0")/aws-base" "$@"
"""

# `docker info` fails: a docker CLI without a reachable engine.
FAKE_DOCKER_NO_ENGINE = r"""#!/usr/bin/env bash
line=docker; for a in "$@"; do line+=$'\t'"$a"; done
printf '%s\n' "$line" >> "$FAKE_LOG"
if [[ "$1" == info ]]; then echo "Cannot connect to the Docker daemon" >&2; exit 1; fi
exit 0
"""


def build(status: str, phase: str, phases: list[dict] | None = None) -> dict:
    """One batch-get-builds answer."""
    return {"builds": [{"id": "wb-image:build-1", "buildStatus": status, "currentPhase": phase,
                        "phases": phases or [], "logs": {"deepLink": "https://console.example/codebuild/log"}}]}


SUCCEEDING = [
    build("IN_PROGRESS", "PROVISIONING", [{"phaseType": "SUBMITTED", "phaseStatus": "SUCCEEDED"}]),
    build("IN_PROGRESS", "BUILD", [{"phaseType": "PRE_BUILD", "phaseStatus": "SUCCEEDED"}, {"phaseType": "BUILD"}]),
    build("SUCCEEDED", "COMPLETED", [{"phaseType": "BUILD", "phaseStatus": "SUCCEEDED"},
                                     {"phaseType": "COMPLETED"}]),
]
FAILING = [
    build("IN_PROGRESS", "BUILD", [{"phaseType": "PRE_BUILD", "phaseStatus": "SUCCEEDED"}, {"phaseType": "BUILD"}]),
    build("FAILED", "COMPLETED", [
        {"phaseType": "PRE_BUILD", "phaseStatus": "SUCCEEDED", "contexts": [{"statusCode": "", "message": ""}]},
        {"phaseType": "BUILD", "phaseStatus": "FAILED", "contexts": [{
            "statusCode": "COMMAND_EXECUTION_ERROR",
            "message": "Error while executing command: docker build --platform linux/amd64 -f batch_job/Dockerfile"
                       " ... Reason: exit status 137"}]},
        {"phaseType": "POST_BUILD", "phaseStatus": "SUCCEEDED"},
        {"phaseType": "COMPLETED"}]),
]


@pytest.fixture
def cloud(fakes, tmp_path):  # noqa: F811 - fakes is the imported fixture
    """test_buildarch's fakes with codebuild added; returns (bindir, log, env, states dir, uploads dir)."""
    bindir, log, env = fakes
    (bindir / "aws").rename(bindir / "aws-base")
    _write_exe(bindir / "aws", FAKE_AWS_CODEBUILD)
    assert (bindir / "aws-base").read_text(encoding="utf-8") == FAKE_AWS
    states, uploads = tmp_path / "states", tmp_path / "uploads"
    states.mkdir()
    uploads.mkdir()
    env = dict(env, FAKE_BUILD_STATES=str(states), FAKE_UPLOADS=str(uploads), WHISPER_BATCH_BUILD_POLL_SECONDS="0")
    return bindir, log, env, states, uploads


def set_states(states: Path, answers: list[dict]) -> None:
    for i, answer in enumerate(answers):
        (states / f"{i}.json").write_text(json.dumps(answer), encoding="utf-8")


@pytest.fixture
def project(project_copy):  # noqa: F811
    """test_buildarch's project copy plus the buildspec (what the uploaded source must carry)."""
    (project_copy / "cloudformation" / "buildspec.yml").write_bytes(BUILDSPEC.read_bytes())
    return project_copy


def overrides_of(cmd: list[str]) -> list[str]:
    return cmd[cmd.index("--parameter-overrides") + 1:]


def env_overrides(words: list[str]) -> dict[str, str]:
    """`--environment-variables-override name=K,value=V,type=PLAINTEXT ...` -> {K: V}."""
    start = words.index("--environment-variables-override") + 1
    out = {}
    for word in words[start:]:
        if word.startswith("--"):
            break
        fields = dict(part.split("=", 1) for part in word.split(","))
        assert fields["type"] == "PLAINTEXT", word
        out[fields["name"]] = fields["value"]
    return out


def docker_build_args(line: str) -> dict[str, str]:
    words = shlex.split(line)
    return dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")


# ---------------------------------------------------------------------------- dry run
def test_remote_dry_run_prints_upload_start_build_wait_and_deploy(cloud):
    _, log, env, _, _ = cloud
    args = ["--dry-run", "--region", "eu-west-1", "--stack-name", "wb-test", "--model", "base", "--batch-size", "4",
            "--image-tag", "v1", "--vpc-id", "vpc-1", "--subnets", "subnet-1"]
    proc = run_script([*args, "--remote-build"], env)
    assert proc.returncode == 0, proc.stderr
    assert calls(log) == [], "dry run must not invoke aws or docker"
    lines = printed(proc.stdout)
    assert not any(line.startswith("docker") or "| docker" in line for line in lines), "no local docker on this path"

    # the source: git archive of this checkout's HEAD
    assert one(lines, "archive").startswith(f"git -C {REPO} archive --format=zip -o ")
    upload = shlex.split(one(lines, "/build-source/"))
    assert upload[:3] == ["aws", "s3", "cp"] and "--sse" in upload and upload[upload.index("--sse") + 1] == "AES256"
    bucket_key = upload[4].removeprefix("s3://")
    assert re.fullmatch(r"whisper-batch-artifacts-123456789012-eu-west-1/build-source/wb-test/v1\.zip", bucket_key)

    start = shlex.split(one(lines, "aws codebuild start-build"))
    assert start[start.index("--project-name") + 1] == "wb-test-image"  # the stack's project (placeholder)
    assert start[start.index("--source-type-override") + 1] == "S3"
    assert start[start.index("--source-location-override") + 1] == bucket_key  # builds what was uploaded
    assert env_overrides(start) == {"MODEL": "base", "BATCH_SIZE": "4", "MAX_TOKENS": "224", "WORD_TIMESTAMPS": "1",
                                    "IMAGE_TAG": "v1"}
    wait = one(lines, "aws codebuild batch-get-builds")
    assert "--ids wb-test-image:DRYRUN-build-id" in wait

    deploys = [i for i, line in enumerate(lines) if line.startswith("aws cloudformation deploy")]
    assert "ImageTag=v1" in lines[deploys[-1]].split("--parameter-overrides", 1)[1].split()
    order = [lines.index(x) for x in (one(lines, "archive"), one(lines, "/build-source/"),
                                      one(lines, "aws codebuild start-build"), wait)] + [deploys[-1]]
    assert order == sorted(order), lines
    assert "Dashboard:" in proc.stdout and "(dry run: nothing was built, uploaded or deployed)" in proc.stdout


def test_remote_build_passes_the_same_build_args_as_the_local_build(cloud):
    _, _, env, _, _ = cloud
    args = ["--dry-run", "--region", "eu-west-1", "--model", "openai/whisper-large-v3", "--max-tokens", "200",
            "--image-tag", "t", "--vpc-id", "vpc-1", "--subnets", "subnet-1"]
    local = run_script([*args, "--local-build"], env)
    remote = run_script([*args, "--remote-build"], env)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    local_args = docker_build_args(one(printed(local.stdout), "docker build"))
    remote_env = env_overrides(shlex.split(one(printed(remote.stdout), "aws codebuild start-build")))
    assert remote_env.pop("IMAGE_TAG") == "t"
    assert remote_env == local_args
    assert local_args == {"MODEL": "openai/whisper-large-v3", "BATCH_SIZE": "8", "MAX_TOKENS": "200", "WORD_TIMESTAMPS": "1"}


def test_no_docker_on_path_defaults_to_the_remote_build_and_says_so(cloud, tmp_path):
    bindir, log, env, _, _ = cloud
    limited = tmp_path / "no-docker-bin"
    limited.mkdir()
    for tool in SYSTEM_TOOLS:
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True).stdout.strip()
        if found:
            (limited / tool).symlink_to(found)
    for tool in ("aws", "aws-base", "python3"):
        (limited / tool).symlink_to(bindir / tool)
    env = dict(env, PATH=str(limited))
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--vpc-id", "vpc-1", "--subnets", "subnet-1"], env)
    assert proc.returncode == 0, proc.stderr
    assert "no local Docker engine (docker is not on PATH)" in proc.stderr
    assert "--remote-build" in proc.stderr and "--local-build" in proc.stderr
    lines = printed(proc.stdout)
    assert "aws codebuild start-build" in "\n".join(lines)
    assert not any(line.startswith("docker") for line in lines)
    # ...and insisting on Docker then fails with the install hint.
    proc = run_script(["--dry-run", "--local-build", "--region", "eu-west-1"], env)
    assert proc.returncode != 0 and "'docker' not found on PATH" in proc.stderr and "Install Docker" in proc.stderr
    assert calls(log) == []


@pytest.mark.parametrize("args, message", [
    (["--remote-build", "--local-build"], "--remote-build and --local-build exclude each other"),
    (["--endpoint", "async", "--remote-build"], "with --endpoint build locally"),
    (["--remote-build", "--model", "a,b"], "build arg MODEL=a,b cannot be passed to CodeBuild"),
])
def test_remote_build_option_errors(cloud, args, message):
    _, log, env, _, _ = cloud
    proc = run_script(["--dry-run", "--region", "eu-west-1", "--vpc-id", "vpc-1", "--subnets", "subnet-1", *args], env)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert calls(log) == []


# ---------------------------------------------------------------------------- against the fakes
def test_unreachable_engine_builds_in_the_cloud_follows_phases_and_deploys(cloud, project):
    """docker installed but its engine down: the default becomes the remote build; the build is
    followed phase by phase, then the new tag is deployed (existing stack: build first, then deploy)."""
    bindir, log, env, states, uploads = cloud
    _write_exe(bindir / "docker", FAKE_DOCKER_NO_ENGINE)
    set_states(states, SUCCEEDING)
    env = dict(env, FAKE_STACK_EXISTS="1", FAKE_ARTIFACTS_EXIST="1")
    proc = run_script(["--region", "eu-west-1", "--stack-name", "wb", "--vpc-id", "vpc-1", "--subnets", "subnet-1",
                       "--image-tag", "r1", "--model", "base"], env, script=project / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the Docker engine is not reachable (docker info failed)" in proc.stderr
    cmds = calls(log)
    assert [c[1] for c in cmds if c[0] == "docker"] == ["info"]  # nothing built or pushed locally

    upload = next(c for c in cmds if c[:3] == ["aws", "s3", "cp"] and "/build-source/" in c[4])
    start = index_of(cmds, "aws", "codebuild", "start-build")
    polls = [i for i, c in enumerate(cmds) if c[:3] == ["aws", "codebuild", "batch-get-builds"]]
    deploys = [i for i, c in enumerate(cmds) if c[:3] == ["aws", "cloudformation", "deploy"]]
    assert cmds.index(upload) < start < polls[0] and len(polls) == len(SUCCEEDING)
    assert len(deploys) == 1 and polls[-1] < deploys[0]  # the stack is updated only once the image exists
    assert all(cmds[i][cmds[i].index("--ids") + 1] == "wb-image:build-1" for i in polls)
    assert "ImageTag=r1" in overrides_of(cmds[deploys[0]])
    s = cmds[start]
    assert s[s.index("--project-name") + 1] == "wb-image"  # from the stack output
    assert s[s.index("--source-location-override") + 1] == upload[4].removeprefix("s3://")
    assert env_overrides(s)["MODEL"] == "base"

    # one progress line per phase, then success
    for phase in ("PROVISIONING", "BUILD", "COMPLETED"):
        assert re.search(rf"remote build: phase {phase} \(\w+, \d+ s\)", proc.stderr), phase
    assert "remote build succeeded" in proc.stderr

    # the uploaded source (not a git checkout here): the tree with a manifest of every file
    with zipfile.ZipFile(uploads / "r1.zip") as zf:
        names = set(zf.namelist())
        assert {"batch_job/Dockerfile", "cloudformation/buildspec.yml", "submitter/app.py", "MANIFEST.sha256"} <= names
        manifest = dict(reversed(line.split("  ", 1)) for line in zf.read("MANIFEST.sha256").decode().splitlines())
        assert set(manifest) == names - {"MANIFEST.sha256"}
        import hashlib

        assert manifest["batch_job/Dockerfile"] == hashlib.sha256(zf.read("batch_job/Dockerfile")).hexdigest()
    assert "Dashboard:          https://eu-west-1.console.aws.amazon.com/cloudwatch/home#dashboards:name=wb" in proc.stdout
    assert "Image built by:     CodeBuild build wb-image:build-1" in proc.stdout


def test_failed_build_stops_with_its_phase_and_message(cloud, project):
    _, log, env, states, _ = cloud
    set_states(states, FAILING)
    env = dict(env, FAKE_STACK_EXISTS="1", FAKE_ARTIFACTS_EXIST="1")
    proc = run_script(["--remote-build", "--region", "eu-west-1", "--stack-name", "wb", "--vpc-id", "vpc-1",
                       "--subnets", "subnet-1", "--image-tag", "f1"], env, script=project / "buildArch.sh")
    assert proc.returncode != 0
    assert ("buildArch: error: remote build wb-image:build-1 FAILED in phase BUILD (FAILED): COMMAND_EXECUTION_ERROR: "
            "Error while executing command: docker build --platform linux/amd64") in proc.stderr
    assert "Reason: exit status 137" in proc.stderr
    assert "build log: https://console.example/codebuild/log" in proc.stderr
    cmds = calls(log)
    assert len([c for c in cmds if c[:3] == ["aws", "codebuild", "batch-get-builds"]]) == len(FAILING)
    assert not any(c[:3] == ["aws", "cloudformation", "deploy"] for c in cmds), "a failed build deploys nothing"
    assert "whisper-batch is deployed" not in proc.stdout


def test_first_remote_deploy_creates_the_stack_then_builds_then_deploys(cloud, project):
    _, log, env, states, _ = cloud
    set_states(states, SUCCEEDING)
    proc = run_script(["--remote-build", "--region", "eu-west-1", "--stack-name", "wb", "--vpc-id", "vpc-1",
                       "--subnets", "subnet-1", "--image-tag", "n1", "--speaker-labels"],
                      env, script=project / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmds = calls(log)
    deploys = [i for i, c in enumerate(cmds) if c[:3] == ["aws", "cloudformation", "deploy"]]
    start = index_of(cmds, "aws", "codebuild", "start-build")
    assert len(deploys) == 2 and deploys[0] < start < deploys[1]
    for i in deploys:
        assert {"ImageTag=n1", "SpeakerLabels=true"} <= set(overrides_of(cmds[i]))
    assert env_overrides(cmds[start])["WORD_TIMESTAMPS"] == "1"
    assert "first deploy: creating the stack (its ECR repository and CodeBuild project)" in proc.stderr


def test_stack_without_a_project_keeps_its_image_until_the_build_is_done(cloud, project):
    """A stack from before the CodeBuild project: updated first WITHOUT ImageTag (its job definitions
    keep naming an image that exists), built, then deployed with the new tag."""
    _, log, env, states, _ = cloud
    set_states(states, SUCCEEDING)
    env = dict(env, FAKE_STACK_EXISTS="1", FAKE_ARTIFACTS_EXIST="1", FAKE_NO_PROJECT="1")
    proc = run_script(["--remote-build", "--region", "eu-west-1", "--stack-name", "wb", "--vpc-id", "vpc-1",
                       "--subnets", "subnet-1", "--image-tag", "u1"], env, script=project / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has no CodeBuild project yet: updating it first (keeping its current image)" in proc.stderr
    cmds = calls(log)
    deploys = [i for i, c in enumerate(cmds) if c[:3] == ["aws", "cloudformation", "deploy"]]
    start = index_of(cmds, "aws", "codebuild", "start-build")
    assert len(deploys) == 2 and deploys[0] < start < deploys[1]
    assert not any(o.startswith("ImageTag=") for o in overrides_of(cmds[deploys[0]]))
    assert "ImageTag=u1" in overrides_of(cmds[deploys[1]])


def test_git_checkout_uploads_head_and_warns_about_uncommitted_changes(cloud, project):
    _, _, env, states, uploads = cloud
    set_states(states, SUCCEEDING)
    git = ["git", "-C", str(project), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    (project / "submitter" / "app.py").write_text("# changed, not committed\n", encoding="utf-8")
    (project / "untracked.txt").write_text("x\n", encoding="utf-8")
    env = dict(env, FAKE_STACK_EXISTS="1", FAKE_ARTIFACTS_EXIST="1")
    proc = run_script(["--remote-build", "--region", "eu-west-1", "--stack-name", "wb", "--vpc-id", "vpc-1",
                       "--subnets", "subnet-1", "--image-tag", "g1"], env, script=project / "buildArch.sh")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uncommitted changes are NOT part of the remote build" in proc.stderr
    with zipfile.ZipFile(uploads / "g1.zip") as zf:
        names = set(zf.namelist())
        assert "untracked.txt" not in names and "cloudformation/buildspec.yml" in names
        assert b"changed, not committed" not in zf.read("submitter/app.py")


# ---------------------------------------------------------------------------- the buildspec
def buildspec() -> dict:
    return yaml.safe_load(BUILDSPEC.read_text(encoding="utf-8"))


def script_build_args() -> list[str]:
    """The build-arg names buildArch.sh passes on both paths (its BUILD_ARGS array)."""
    m = re.search(r"^BUILD_ARGS=\(([^)]*)\)", SCRIPT.read_text(encoding="utf-8"), re.MULTILINE)
    assert m, "BUILD_ARGS=(...) not found in buildArch.sh"
    return [word.split("=", 1)[0] for word in shlex.split(m.group(1))]


def test_buildspec_logs_in_builds_with_the_build_args_and_pushes():
    from test_image import build_args, dockerfile_steps, stage_steps

    spec = buildspec()
    assert str(spec["version"]) == "0.2"
    assert spec["env"]["shell"] == "bash"
    assert list(spec["phases"]) == ["pre_build", "build", "post_build"]
    pre, main = spec["phases"]["pre_build"]["commands"], spec["phases"]["build"]["commands"]
    login = next(c for c in pre if "docker login" in c)
    assert "aws ecr get-login-password" in login and '--password-stdin "${REPOSITORY_URI%%/*}"' in login

    build_cmd = next(c for c in main if c.startswith("docker build"))
    words = shlex.split(build_cmd)  # the literal ${...} stay (shlex does no expansion)
    assert words[words.index("-f") + 1] == "batch_job/Dockerfile" and words[-1] == "."
    assert words[words.index("--platform") + 1] == "linux/amd64"
    assert words[words.index("-t") + 1] == "${REPOSITORY_URI}:${IMAGE_TAG}"
    args = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--build-arg")
    assert args == {name: "${" + name + "}" for name in args}, args  # each from its own env var
    # ...exactly the args the script passes, each one an ARG of the default (neuron) stage.
    assert list(args) == script_build_args()
    assert set(args) <= set(build_args(stage_steps(dockerfile_steps())))
    # push in the same phase, after the build: a failed build never pushes
    push = next(i for i, c in enumerate(main) if c.startswith("docker push"))
    assert main.index(build_cmd) < push and '"${REPOSITORY_URI}:${IMAGE_TAG}"' in main[push]
    assert not any("docker push" in c for c in spec["phases"]["post_build"]["commands"])
    # every variable the buildspec requires is set by the project (defaults) and overridden per build
    required = re.search(r"for v in ([A-Z_ ]+); do", " ".join(pre)).group(1).split()
    from test_template import load_template

    project_env = {v["Name"] for v in load_template()["Resources"]["ImageBuildProject"]["Properties"]["Environment"][
        "EnvironmentVariables"]}
    assert set(required) == project_env == {"REPOSITORY_URI", "IMAGE_TAG", *args}


def test_buildspec_commands_are_valid_bash():
    spec = buildspec()
    for phase, body in spec["phases"].items():
        for command in body["commands"]:
            proc = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert proc.returncode == 0, (phase, command, proc.stderr)
