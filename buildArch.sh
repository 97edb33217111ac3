#!/usr/bin/env bash
# buildArch.sh - build the whisper-batch worker image, package the submitter Lambda and deploy
# cloudformation/template.yaml, then print where to drop audio. See docs/deploy.md.
# The image is built with the local Docker engine, or in the cloud by the stack's CodeBuild project
# (--remote-build; the default when no Docker engine is reachable).
# With --endpoint MODE: build + push the serving image to the (existing) stack's ECR repository and
# deploy cloudformation/endpoint.yaml as a SageMaker endpoint instead. See docs/endpoints.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEMPLATE="$SCRIPT_DIR/cloudformation/template.yaml"
ENDPOINT_TEMPLATE="$SCRIPT_DIR/cloudformation/endpoint.yaml"
DOCKERFILE="$SCRIPT_DIR/batch_job/Dockerfile"
SUBMITTER_DIR="$SCRIPT_DIR/submitter"
LOCAL_IMAGE=whisper-batch

STACK_NAME=whisper-batch
REGION=""
MODEL=openai/whisper-large-v3-turbo   # = the image's default (batch_job/Dockerfile ARG MODEL)
MODEL_SET=0
BATCH_SIZE=8
MAX_TOKENS=224
VPC_ID=""
SUBNETS=""
SECURITY_GROUPS=""
IMAGE_TAG=""
ALARM_EMAIL=""
WORD_TIMESTAMPS=""
SPEAKER_LABELS=""
# The Dockerfile's WORD_TIMESTAMPS build arg, passed explicitly on both build paths: graphs with the
# alignment output, which word timestamps and speaker labels (per word) need at run time.
WORD_TIMESTAMPS_BUILD=1
BUILD_MODE=""        # local | remote; "" = local when a Docker engine is reachable, else remote
BUILD_MODE_WHY=""
BUILD_ID=""
POLL_SECONDS=${WHISPER_BATCH_BUILD_POLL_SECONDS:-15}
USE_SPOT=""
DRY_RUN=0
EXTRA_PARAMS=()
ENDPOINT_MODE=""
INSTANCE_TYPE=""
IMAGE_URI=""

usage() {
  cat <<'EOF'
Usage: ./buildArch.sh [options]

Builds the worker image (batch_job/Dockerfile, which compiles the Neuron graphs), pushes it to the
stack's ECR repository, packages and uploads the submitter Lambda, deploys
cloudformation/template.yaml with `aws cloudformation deploy`, and prints where to drop audio and
the dashboard URL. The image is built by the local Docker engine or, with --remote-build (the
default when no Docker engine is reachable), by the stack's CodeBuild project in the cloud.

Options:
  --stack-name NAME        CloudFormation stack name (default: whisper-batch)
  --region REGION          AWS region (default: $AWS_REGION, $AWS_DEFAULT_REGION or `aws configure`)
  --model MODEL            Whisper model baked into the image (default: openai/whisper-large-v3-turbo,
                           transcription only; openai/whisper-large-v3 also translates; tiny.en and
                           base for a quick test deploy)
  --batch-size N           windows per Neuron batch, fixed at compile time (default: 8)
  --max-tokens N           static decoder KV-cache length (default: 224)
  --vpc-id VPC             VPC of the Batch instances (default: the region's default VPC)
  --subnets A,B            subnets (default: the default subnets of the VPC)
  --security-groups A,B    security groups (default: the stack creates an egress-only group)
  --image-tag TAG          image tag (default: <model>-<UTC timestamp>; tags are immutable)
  --alarm-email ADDRESS    subscribe ADDRESS to the alarms' (encrypted) SNS topic
  --spot                   run the compute environment on Spot
  --word-timestamps        time every word (stack parameter WordTimestamps=true; the image's graphs
                           always carry the alignment output, so no rebuild is needed to switch)
  --speaker-labels         label who speaks (stack parameter SpeakerLabels=true, WHISPER_BATCH_DIARIZE);
                           per-word labels: the image is built with WORD_TIMESTAMPS=1
  --remote-build           build the image in the cloud: upload the source (git archive HEAD, or the
                           tree with a manifest) to the artifacts bucket, run the stack's CodeBuild
                           project (x86-64, sized for neuronx-cc), follow its phases, then deploy.
                           The default when no Docker engine is reachable.
  --local-build            build with the local Docker engine, and fail if none is reachable
  --parameter KEY=VALUE    extra template parameter override (repeatable; with --endpoint, of endpoint.yaml)
  --dry-run                print every aws/docker command instead of running it
  -h, --help               show this help

SageMaker endpoint (docs/endpoints.md), instead of the Batch deploy:
  --endpoint MODE          async | serverless | realtime: build the serving image (serverless and CPU
                           instance types: the Dockerfile's `cpu` target, default --model tiny.en;
                           ml.inf2.*: the default Neuron build), push it to the ECR repository of the
                           existing stack --stack-name (deploy that first), and deploy
                           cloudformation/endpoint.yaml as stack <stack-name>-endpoint-<MODE>. The Batch
                           stack itself is not redeployed.
  --instance-type TYPE     async/realtime instance type (default: the template's, ml.inf2.xlarge)
  --image-uri URI          serve this ECR image as is (no build, no push, no main stack needed)

Prerequisites: aws (CLI v2, credentials for the target account), python3 with pip (to package the
Lambda), and docker with a running engine for a local build (without one the image is built in
the cloud). Environment: WHISPER_BATCH_BUILD_POLL_SECONDS (default 15) between remote-build polls.
EOF
}

die() { echo "buildArch: error: $*" >&2; exit 1; }
note() { echo "buildArch: $*" >&2; }

need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --stack-name) need_value "$@"; STACK_NAME=$2; shift 2 ;;
    --region) need_value "$@"; REGION=$2; shift 2 ;;
    --model) need_value "$@"; MODEL=$2; MODEL_SET=1; shift 2 ;;
    --batch-size) need_value "$@"; BATCH_SIZE=$2; shift 2 ;;
    --max-tokens) need_value "$@"; MAX_TOKENS=$2; shift 2 ;;
    --vpc-id) need_value "$@"; VPC_ID=$2; shift 2 ;;
    --subnets) need_value "$@"; SUBNETS=$2; shift 2 ;;
    --security-groups) need_value "$@"; SECURITY_GROUPS=$2; shift 2 ;;
    --image-tag) need_value "$@"; IMAGE_TAG=$2; shift 2 ;;
    --alarm-email) need_value "$@"; ALARM_EMAIL=$2; shift 2 ;;
    --spot) USE_SPOT=true; shift ;;
    --word-timestamps) WORD_TIMESTAMPS=true; shift ;;
    --speaker-labels) SPEAKER_LABELS=true; shift ;;
    --remote-build) [[ "$BUILD_MODE" != local ]] || die "--remote-build and --local-build exclude each other"; BUILD_MODE=remote; shift ;;
    --local-build) [[ "$BUILD_MODE" != remote ]] || die "--remote-build and --local-build exclude each other"; BUILD_MODE=local; shift ;;
    --parameter) need_value "$@"; EXTRA_PARAMS+=("$2"); shift 2 ;;
    --endpoint) need_value "$@"; ENDPOINT_MODE=$2; shift 2 ;;
    --instance-type) need_value "$@"; INSTANCE_TYPE=$2; shift 2 ;;
    --image-uri) need_value "$@"; IMAGE_URI=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[[ "$STACK_NAME" =~ ^[A-Za-z][A-Za-z0-9-]{0,100}$ ]] || die "--stack-name must match [A-Za-z][A-Za-z0-9-]*"
case "$ENDPOINT_MODE" in
  ""|async|serverless|realtime) ;;
  *) die "--endpoint must be async, serverless or realtime, not '$ENDPOINT_MODE'" ;;
esac
ENDPOINT_STACK=""
ENDPOINT_TARGET=""
[[ "$POLL_SECONDS" =~ ^[0-9]+$ ]] || die "WHISPER_BATCH_BUILD_POLL_SECONDS must be a whole number of seconds"
if [[ -n "$ENDPOINT_MODE" ]]; then
  [[ "$BUILD_MODE" != remote ]] || die "--remote-build builds the Batch worker; with --endpoint build locally (or pass --image-uri)"
  [[ -z "$SPEAKER_LABELS" ]] || die "--speaker-labels applies to the Batch stack, not to --endpoint"
fi
if [[ -z "$ENDPOINT_MODE" ]]; then
  [[ -z "$INSTANCE_TYPE" && -z "$IMAGE_URI" ]] || die "--instance-type and --image-uri need --endpoint MODE"
else
  ENDPOINT_STACK="$STACK_NAME-endpoint-$ENDPOINT_MODE"
  # The endpoint is named after its stack: SageMaker endpoint names have at most 63 characters.
  [[ ${#ENDPOINT_STACK} -le 63 ]] || die "endpoint stack name $ENDPOINT_STACK is longer than 63 characters: use a shorter --stack-name"
  if [[ -n "$INSTANCE_TYPE" ]]; then
    [[ "$ENDPOINT_MODE" != serverless ]] || die "--instance-type does not apply to --endpoint serverless (use --parameter ServerlessMemoryMB=...)"
    [[ "$INSTANCE_TYPE" =~ ^ml\.[a-z0-9]+\.[a-z0-9]+$ ]] || die "invalid --instance-type: $INSTANCE_TYPE (e.g. ml.inf2.xlarge)"
  fi
  if [[ -n "$IMAGE_URI" ]]; then
    [[ "$IMAGE_URI" =~ ^[0-9]{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[a-z0-9][a-z0-9._-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*|@sha256:[0-9a-f]{64})$ ]] \
      || die "invalid --image-uri: $IMAGE_URI (ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY:TAG)"
  fi
  # Which build target serves it: serverless endpoints have no Inferentia (and no GPU), nor do CPU types.
  if [[ "$ENDPOINT_MODE" == serverless || ( -n "$INSTANCE_TYPE" && "$INSTANCE_TYPE" != ml.inf2.* ) ]]; then
    ENDPOINT_TARGET=cpu
    if [[ "$MODEL_SET" -eq 0 ]]; then MODEL=tiny.en; fi   # = the cpu target's ARG MODEL
  else
    ENDPOINT_TARGET=neuron
  fi
fi
[[ "$BATCH_SIZE" =~ ^[1-9][0-9]*$ ]] || die "--batch-size must be a positive integer"
[[ "$MAX_TOKENS" =~ ^[1-9][0-9]*$ ]] || die "--max-tokens must be a positive integer"
if [[ -z "$IMAGE_TAG" ]]; then
  IMAGE_TAG="${MODEL//[^A-Za-z0-9_.-]/-}${ENDPOINT_TARGET:+-$ENDPOINT_TARGET}-$(date -u +%Y%m%d%H%M%S)"
fi
[[ "$IMAGE_TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid --image-tag: $IMAGE_TAG"

# ------------------------------------------------------------------ command helpers
exec 3>&1   # commands are echoed on the original stdout, even from inside $(...)

dry() { [[ "$DRY_RUN" -eq 1 ]]; }

quote() {
  local a out=""
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
      out+=" $a"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s' "${out# }"
}

# run CMD...: a command with side effects; printed (and not run) with --dry-run.
run() {
  printf '+ %s\n' "$(quote "$@")" >&3
  dry || "$@"
}

# query PLACEHOLDER CMD...: a read-only command whose output a later step needs;
# with --dry-run it is printed and PLACEHOLDER stands in for its output.
query() {
  local placeholder=$1
  shift
  printf '+ %s\n' "$(quote "$@")" >&3
  if dry; then
    printf '%s\n' "$placeholder"
  else
    "$@"
  fi
}

# ------------------------------------------------------------------ prerequisites
require() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH. $2"
}
require aws "Install AWS CLI v2: https://docs.aws.amazon.com/cli/latest/userguide/getting-started-install.html"
NEED_DOCKER=1   # --endpoint with --image-uri builds nothing
NEED_LAMBDA=1   # --endpoint packages no Lambda
if [[ -n "$ENDPOINT_MODE" ]]; then
  NEED_LAMBDA=0
  if [[ -n "$IMAGE_URI" ]]; then NEED_DOCKER=0; fi
fi
# docker_reachable: why not ("" when it is): docker on PATH and (outside a dry run) its engine answering.
docker_unreachable() {
  if ! command -v docker >/dev/null 2>&1; then
    echo "docker is not on PATH"
  elif ! dry && ! docker info >/dev/null 2>&1; then
    echo "the Docker engine is not reachable (docker info failed)"
  fi
}
if [[ -z "$ENDPOINT_MODE" && "$BUILD_MODE" != local ]]; then
  # The Batch image can be built in the cloud; the endpoint path always builds locally.
  if [[ "$BUILD_MODE" == remote ]]; then
    NEED_DOCKER=0
  else
    BUILD_MODE_WHY=$(docker_unreachable)
    if [[ -n "$BUILD_MODE_WHY" ]]; then
      BUILD_MODE=remote
      NEED_DOCKER=0
      note "no local Docker engine ($BUILD_MODE_WHY): building the image in the cloud with the stack's CodeBuild project, as --remote-build does (pass --local-build to insist on Docker)"
    else
      BUILD_MODE=local
    fi
  fi
fi
if [[ "$NEED_DOCKER" -eq 1 ]]; then
  require docker "Install Docker (https://docs.docker.com/engine/install/) and start the engine; the worker image is built locally (or pass --remote-build to build it in the cloud)."
fi
if [[ "$NEED_LAMBDA" -eq 1 ]]; then
  require python3 "Install Python 3 (with pip); it packages the submitter Lambda."
fi
if ! dry; then
  if [[ "$NEED_LAMBDA" -eq 1 ]]; then
    python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (install python3-pip); it packages the submitter Lambda."
    [[ -d "$SUBMITTER_DIR" ]] || die "missing $SUBMITTER_DIR"
  fi
  if [[ "$NEED_DOCKER" -eq 1 ]]; then
    docker info >/dev/null 2>&1 || die "docker is installed but the engine is not reachable (start Docker, or check permissions on its socket; or pass --remote-build to build in the cloud)."
    [[ -f "$DOCKERFILE" ]] || die "missing $DOCKERFILE"
  fi
  if [[ -n "$ENDPOINT_MODE" ]]; then
    [[ -f "$ENDPOINT_TEMPLATE" ]] || die "missing $ENDPOINT_TEMPLATE"
  fi
fi

# ------------------------------------------------------------------ account, region
if [[ -z "$REGION" ]]; then
  REGION=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
fi
if [[ -z "$REGION" ]]; then
  REGION=$(query us-east-1 aws configure get region || true)
fi
[[ -n "$REGION" ]] || die "no AWS region: pass --region or configure one (aws configure set region ...)"

ACCOUNT=$(query 123456789012 aws sts get-caller-identity --query Account --output text) \
  || die "aws cannot reach the account: configure credentials (aws configure / aws sso login)"
note "account $ACCOUNT, region $REGION, stack $STACK_NAME, image tag $IMAGE_TAG"

# ------------------------------------------------------------------ stack outputs, image push
# stack_output_of STACK KEY PLACEHOLDER: one output of a stack ("" when the stack does not exist).
stack_output_of() {
  query "$3" aws cloudformation describe-stacks --region "$REGION" --stack-name "$1" \
    --query "Stacks[0].Outputs[?OutputKey=='$2'].OutputValue" --output text 2>/dev/null || true
}

stack_output() { stack_output_of "$STACK_NAME" "$1" "$2"; }

push_image() {
  local repo_uri=$1 registry=${1%%/*}
  run docker tag "$LOCAL_IMAGE:$IMAGE_TAG" "$repo_uri:$IMAGE_TAG"
  printf '+ %s | %s\n' "$(quote aws ecr get-login-password --region "$REGION")" \
    "$(quote docker login --username AWS --password-stdin "$registry")" >&3
  if ! dry; then
    aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "$registry" >/dev/null
  fi
  run docker push "$repo_uri:$IMAGE_TAG"
}

# ------------------------------------------------------------------ SageMaker endpoint (--endpoint)
# Endpoint only: the image goes to the main stack's ECR repository (the Batch stack is not redeployed;
# its job definitions keep their image tag), then cloudformation/endpoint.yaml is deployed as its own
# stack <stack-name>-endpoint-<mode> (its own lifecycle and bill: docs/endpoints.md).
deploy_endpoint() {
  local image_uri=$IMAGE_URI repo_uri target_args=() overrides name input limit
  if [[ -z "$image_uri" ]]; then
    repo_uri=$(stack_output EcrRepositoryUri "$ACCOUNT.dkr.ecr.$REGION.amazonaws.com/DRYRUN-repository")
    [[ -n "$repo_uri" && "$repo_uri" != None ]] \
      || die "stack $STACK_NAME (and its ECR repository) not found in $REGION: deploy it first (./buildArch.sh --stack-name $STACK_NAME), or pass --image-uri"
    if [[ "$ENDPOINT_TARGET" == cpu ]]; then
      target_args=(--target cpu --build-arg "MODEL=$MODEL")
    else
      target_args=(--build-arg "MODEL=$MODEL" --build-arg "BATCH_SIZE=$BATCH_SIZE" --build-arg "MAX_TOKENS=$MAX_TOKENS")
    fi
    note "building the $ENDPOINT_TARGET image (model $MODEL) for the $ENDPOINT_MODE endpoint"
    run docker build --platform linux/amd64 -f "$DOCKERFILE" "${target_args[@]}" \
      -t "$LOCAL_IMAGE:$IMAGE_TAG" "$SCRIPT_DIR"
    push_image "$repo_uri"
    image_uri="$repo_uri:$IMAGE_TAG"
  else
    note "serving $image_uri as is (no build, no push)"
  fi

  overrides=("Mode=$ENDPOINT_MODE" "ImageUri=$image_uri")
  if [[ -n "$INSTANCE_TYPE" ]]; then overrides+=("InstanceType=$INSTANCE_TYPE"); fi
  if [[ -n "$WORD_TIMESTAMPS" ]]; then overrides+=("WordTimestamps=$WORD_TIMESTAMPS"); fi
  if [[ -n "$ALARM_EMAIL" ]]; then overrides+=("AlarmEmail=$ALARM_EMAIL"); fi
  if [[ ${#EXTRA_PARAMS[@]} -gt 0 ]]; then overrides+=("${EXTRA_PARAMS[@]}"); fi
  run aws cloudformation deploy --region "$REGION" --stack-name "$ENDPOINT_STACK" \
    --template-file "$ENDPOINT_TEMPLATE" \
    --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset \
    --tags Project=whisper-batch \
    --parameter-overrides "${overrides[@]}"

  name=$(stack_output_of "$ENDPOINT_STACK" EndpointName "$ENDPOINT_STACK")
  printf '\nwhisper-batch %s endpoint deployed (stack %s, image %s).\n' "$ENDPOINT_MODE" "$ENDPOINT_STACK" "$image_uri"
  printf '  Endpoint name: %s\n' "$name"
  if [[ "$ENDPOINT_MODE" == async ]]; then
    input=$(stack_output_of "$ENDPOINT_STACK" InputLocation "s3://DRYRUN-async-bucket/input/")
    printf '  Upload a request, then queue it (the result lands at the OutputLocation it prints; SNS says when):\n'
    printf '    aws s3 cp talk.flac %stalk.flac\n' "$input"
    printf '    aws sagemaker-runtime invoke-endpoint-async --region %s --endpoint-name %s \\\n' "$REGION" "$name"
    printf '      --content-type audio/flac --accept application/json --custom-attributes language=en \\\n'
    printf '      --invocation-timeout-seconds 3600 --input-location %stalk.flac\n' "$input"
  else
    limit=6
    if [[ "$ENDPOINT_MODE" == serverless ]]; then limit=4; fi
    printf '  Transcribe a file (request body up to %s MB, answered within 60 s):\n' "$limit"
    printf '    aws sagemaker-runtime invoke-endpoint --region %s --endpoint-name %s \\\n' "$REGION" "$name"
    printf '      --content-type audio/flac --accept text/vtt --custom-attributes language=en \\\n'
    printf '      --body fileb://talk.flac talk.vtt\n'
  fi
  if dry; then
    echo "(dry run: nothing was built, pushed or deployed)"
  fi
}

if [[ -n "$ENDPOINT_MODE" ]]; then
  deploy_endpoint
  exit 0
fi

# ------------------------------------------------------------------ network
if [[ -z "$VPC_ID" && -z "$SUBNETS" ]]; then
  note "no --vpc-id/--subnets given: discovering the default VPC of $REGION and its default subnets"
  VPC_ID=$(query vpc-DRYRUN aws ec2 describe-vpcs --region "$REGION" \
    --filters Name=is-default,Values=true --query 'Vpcs[0].VpcId' --output text)
  [[ -n "$VPC_ID" && "$VPC_ID" != None ]] || die "no default VPC in $REGION: pass --vpc-id and --subnets"
  SUBNETS=$(query "subnet-DRYRUN1 subnet-DRYRUN2" aws ec2 describe-subnets --region "$REGION" \
    --filters "Name=vpc-id,Values=$VPC_ID" Name=default-for-az,Values=true \
    --query 'Subnets[].SubnetId' --output text)
  note "using default VPC $VPC_ID"
elif [[ -z "$SUBNETS" ]]; then
  note "no --subnets given: using every subnet of $VPC_ID"
  SUBNETS=$(query "subnet-DRYRUN1 subnet-DRYRUN2" aws ec2 describe-subnets --region "$REGION" \
    --filters "Name=vpc-id,Values=$VPC_ID" --query 'Subnets[].SubnetId' --output text)
elif [[ -z "$VPC_ID" ]]; then
  VPC_ID=$(query vpc-DRYRUN aws ec2 describe-subnets --region "$REGION" \
    --subnet-ids "${SUBNETS%%,*}" --query 'Subnets[0].VpcId' --output text)
fi
SUBNETS=$(echo "$SUBNETS" | tr -s ' \t\n,' ',' | sed 's/^,//; s/,$//')
[[ -n "$SUBNETS" && "$SUBNETS" != None ]] || die "no subnets found in $VPC_ID: pass --subnets"
note "subnets: $SUBNETS"
if [[ -z "$SECURITY_GROUPS" ]]; then
  note "no --security-groups given: the stack creates an egress-only (HTTPS) security group in $VPC_ID"
fi

# ------------------------------------------------------------------ artifacts bucket
ARTIFACTS_BUCKET="whisper-batch-artifacts-$ACCOUNT-$REGION"
if dry || ! aws s3api head-bucket --bucket "$ARTIFACTS_BUCKET" --region "$REGION" >/dev/null 2>&1; then
  dry && printf '+ %s\n' "$(quote aws s3api head-bucket --bucket "$ARTIFACTS_BUCKET" --region "$REGION") (when it fails:)" >&3
  note "creating artifacts bucket s3://$ARTIFACTS_BUCKET"
  if [[ "$REGION" == us-east-1 ]]; then
    run aws s3api create-bucket --bucket "$ARTIFACTS_BUCKET" --region "$REGION" >/dev/null
  else
    run aws s3api create-bucket --bucket "$ARTIFACTS_BUCKET" --region "$REGION" \
      --create-bucket-configuration "LocationConstraint=$REGION" >/dev/null
  fi
  run aws s3api wait bucket-exists --bucket "$ARTIFACTS_BUCKET" --region "$REGION"
  run aws s3api put-public-access-block --bucket "$ARTIFACTS_BUCKET" --region "$REGION" \
    --public-access-block-configuration \
    BlockPublicAcls=true,IgnorePublicAcls=true,BlockPublicPolicy=true,RestrictPublicBuckets=true
  run aws s3api put-bucket-encryption --bucket "$ARTIFACTS_BUCKET" --region "$REGION" \
    --server-side-encryption-configuration \
    '{"Rules":[{"ApplyServerSideEncryptionByDefault":{"SSEAlgorithm":"AES256"},"BucketKeyEnabled":true}]}'
  run aws s3api put-bucket-policy --bucket "$ARTIFACTS_BUCKET" --region "$REGION" --policy \
    "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Sid\":\"DenyInsecureTransport\",\"Effect\":\"Deny\",\"Principal\":\"*\",\"Action\":\"s3:*\",\"Resource\":[\"arn:aws:s3:::$ARTIFACTS_BUCKET\",\"arn:aws:s3:::$ARTIFACTS_BUCKET/*\"],\"Condition\":{\"Bool\":{\"aws:SecureTransport\":\"false\"}}}]}"
fi

# ------------------------------------------------------------------ submitter Lambda zip
BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/whisper-batch-build.XXXXXX")
trap 'rm -rf "$BUILD_DIR"' EXIT
ZIP="$BUILD_DIR/submitter.zip"
PKG="$BUILD_DIR/package"
if dry; then
  printf '+ %s\n' "$(quote python3 -m pip install -r "$SUBMITTER_DIR/requirements.txt" -t "$PKG" \
    --platform manylinux2014_x86_64 --implementation cp --python-version 3.12 --only-binary=:all:)" >&3
  printf '+ %s\n' "(zip $PKG + $SUBMITTER_DIR -> $ZIP)" >&3
  LAMBDA_KEY="lambda/submitter-DRYRUN.zip"
else
  mkdir -p "$PKG"
  if [[ -f "$SUBMITTER_DIR/requirements.txt" ]] && grep -qvE '^[[:space:]]*(#|$)' "$SUBMITTER_DIR/requirements.txt"; then
    note "installing the submitter's requirements for python3.12/x86_64"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-conflicts -r "$SUBMITTER_DIR/requirements.txt" \
      -t "$PKG" --platform manylinux2014_x86_64 --implementation cp --python-version 3.12 --only-binary=:all: \
      || die "pip could not install submitter/requirements.txt"
    # The Lambda runtime ships the AWS SDK; a second (different) botocore would shadow it.
    rm -rf "${PKG:?}"/boto3 "${PKG:?}"/boto3-* "${PKG:?}"/botocore "${PKG:?}"/botocore-* \
      "${PKG:?}"/s3transfer "${PKG:?}"/s3transfer-* "${PKG:?}"/bin
  else
    note "submitter/requirements.txt absent or empty: packaging submitter/ alone"
  fi
  mkdir -p "$PKG/submitter"
  (cd "$SUBMITTER_DIR" && tar --exclude='__pycache__' --exclude='*.pyc' --exclude='tests' -cf - .) \
    | tar -C "$PKG/submitter" -xf -
  # Deterministic zip (sorted names, fixed timestamps): same code -> same key -> no function update.
  python3 - "$PKG" "$ZIP" <<'PY'
import os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in sorted(filenames):
            if name.endswith(".pyc"):
                continue
            path = os.path.join(dirpath, name)
            info = zipfile.ZipInfo(os.path.relpath(path, root), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(path, "rb") as fh:
                zf.writestr(info, fh.read())
PY
  DIGEST=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest()[:16])' "$ZIP")
  LAMBDA_KEY="lambda/submitter-$DIGEST.zip"
fi
run aws s3 cp "$ZIP" "s3://$ARTIFACTS_BUCKET/$LAMBDA_KEY" --region "$REGION" --only-show-errors

# ------------------------------------------------------------------ deploy
# deploy [keep-image]: the stack with every override; keep-image leaves ImageTag at the stack's
# current value (aws cloudformation deploy keeps the previous value of a parameter not overridden).
deploy() {
  local overrides=(
    "LambdaCodeBucket=$ARTIFACTS_BUCKET"
    "LambdaCodeKey=$LAMBDA_KEY"
    "VpcId=$VPC_ID"
    "SubnetIds=$SUBNETS"
  )
  if [[ "${1:-}" != keep-image ]]; then overrides+=("ImageTag=$IMAGE_TAG"); fi
  if [[ -n "$SECURITY_GROUPS" ]]; then overrides+=("SecurityGroupIds=$SECURITY_GROUPS"); fi
  if [[ -n "$ALARM_EMAIL" ]]; then overrides+=("AlarmEmail=$ALARM_EMAIL"); fi
  if [[ -n "$USE_SPOT" ]]; then overrides+=("UseSpot=$USE_SPOT"); fi
  if [[ -n "$WORD_TIMESTAMPS" ]]; then overrides+=("WordTimestamps=$WORD_TIMESTAMPS"); fi
  if [[ -n "$SPEAKER_LABELS" ]]; then overrides+=("SpeakerLabels=$SPEAKER_LABELS"); fi
  if [[ ${#EXTRA_PARAMS[@]} -gt 0 ]]; then overrides+=("${EXTRA_PARAMS[@]}"); fi
  run aws cloudformation deploy --region "$REGION" --stack-name "$STACK_NAME" \
    --template-file "$TEMPLATE" --s3-bucket "$ARTIFACTS_BUCKET" --s3-prefix cloudformation \
    --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset \
    --tags Project=whisper-batch \
    --parameter-overrides "${overrides[@]}"
}

# The Dockerfile's build args, the same on both build paths (local docker build, CodeBuild).
BUILD_ARGS=("MODEL=$MODEL" "BATCH_SIZE=$BATCH_SIZE" "MAX_TOKENS=$MAX_TOKENS" "WORD_TIMESTAMPS=$WORD_TIMESTAMPS_BUILD")

# ------------------------------------------------------------------ image build: local Docker
local_build_and_deploy() {
  local docker_args=() arg
  for arg in "${BUILD_ARGS[@]}"; do docker_args+=(--build-arg "$arg"); done
  run docker build --platform linux/amd64 -f "$DOCKERFILE" "${docker_args[@]}" \
    -t "$LOCAL_IMAGE:$IMAGE_TAG" "$SCRIPT_DIR"

  # ECR bootstrap: the repository belongs to the stack. On the first deploy the stack (and its
  # repository) is created first and the image pushed right after; nobody knows the bucket until this
  # script prints it, so no job can start before the image exists. On later deploys the repository
  # exists: push first, then deploy, so the new job-definition revision never names a missing tag.
  REPO_URI=$(stack_output EcrRepositoryUri "")
  if [[ -n "$REPO_URI" && "$REPO_URI" != None ]]; then
    note "stack exists: pushing the image to $REPO_URI before deploying"
    push_image "$REPO_URI"
    deploy
  else
    note "first deploy: creating the stack (and its ECR repository), then pushing the image"
    deploy
    REPO_URI=$(stack_output EcrRepositoryUri "$ACCOUNT.dkr.ecr.$REGION.amazonaws.com/DRYRUN-repository")
    [[ -n "$REPO_URI" && "$REPO_URI" != None ]] || die "stack $STACK_NAME has no EcrRepositoryUri output"
    push_image "$REPO_URI"
  fi
}

# ------------------------------------------------------------------ image build: CodeBuild (--remote-build)
# package_source ZIP: the source CodeBuild builds. A git checkout: `git archive HEAD` (committed
# files only; the script says when uncommitted changes are left out). Otherwise the tree, minus
# VCS/venv/cache directories, with MANIFEST.sha256 listing every file and its digest.
package_source() {
  local zip=$1 head
  if command -v git >/dev/null 2>&1 \
      && [[ "$(git -C "$SCRIPT_DIR" rev-parse --show-toplevel 2>/dev/null)" == "$SCRIPT_DIR" ]]; then
    head=$(git -C "$SCRIPT_DIR" rev-parse --short HEAD)
    if [[ -n "$(git -C "$SCRIPT_DIR" status --porcelain --untracked-files=no)" ]]; then
      note "uncommitted changes are NOT part of the remote build: it builds commit $head (commit them, or use --local-build)"
    fi
    note "source: git archive of commit $head"
    run git -C "$SCRIPT_DIR" archive --format=zip -o "$zip" HEAD
    return
  fi
  note "source: not a git checkout; zipping the tree with a MANIFEST.sha256"
  if dry; then
    printf '+ %s\n' "(zip $SCRIPT_DIR, without .git/.venv*/caches, + MANIFEST.sha256 -> $zip)" >&3
    return
  fi
  python3 - "$SCRIPT_DIR" "$zip" <<'PY'
import hashlib, os, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
skip_dirs = {".git", "__pycache__", ".cache", ".pytest_cache", ".ruff_cache", "node_modules", "build", "dist",
             "local-data", "out"}
lines = []
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in skip_dirs and not d.startswith(".venv") and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".pyc") or os.path.abspath(path) == os.path.abspath(out) or not os.path.isfile(path):
                continue
            rel = os.path.relpath(path, root)
            with open(path, "rb") as fh:
                data = fh.read()
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = (os.stat(path).st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
            lines.append(f"{hashlib.sha256(data).hexdigest()}  {rel}\n")
    zf.writestr("MANIFEST.sha256", "".join(lines))
PY
}

# build_state: one batch-get-builds JSON document on stdin -> status, current phase, the first phase
# that did not succeed, its status, its context messages and the build log link, separated by \x1f.
BUILD_STATE_PY='
import json, sys
builds = json.load(sys.stdin).get("builds") or [{}]
b = builds[0]
bad = [p for p in b.get("phases") or [] if p.get("phaseStatus") not in (None, "SUCCEEDED")]
f = bad[0] if bad else {}
msg = "; ".join(": ".join(x for x in (c.get("statusCode"), c.get("message")) if x)
                for c in f.get("contexts") or [] if c.get("statusCode") or c.get("message"))
fields = [b.get("buildStatus") or "", b.get("currentPhase") or "", f.get("phaseType") or "",
          f.get("phaseStatus") or "", " ".join(msg.split()), (b.get("logs") or {}).get("deepLink") or ""]
print("\x1f".join(fields))
'

# wait_for_build ID: poll batch-get-builds, one progress line per phase; a build that ends in any
# state but SUCCEEDED stops the script with its failing phase and that phase's own message.
wait_for_build() {
  local id=$1 started=$SECONDS json state status phase fphase fstatus message link last=""
  printf '+ %s   (every %s s until the build ends)\n' \
    "$(quote aws codebuild batch-get-builds --region "$REGION" --ids "$id" --output json)" "$POLL_SECONDS" >&3
  if dry; then return 0; fi
  while :; do
    json=$(aws codebuild batch-get-builds --region "$REGION" --ids "$id" --output json) \
      || die "cannot read the state of build $id (aws codebuild batch-get-builds failed)"
    state=$(printf '%s' "$json" | python3 -c "$BUILD_STATE_PY") || die "unreadable batch-get-builds answer for build $id"
    IFS=$'\x1f' read -r status phase fphase fstatus message link <<<"$state"
    [[ -n "$status" ]] || die "build $id not found (aws codebuild batch-get-builds returned no build)"
    if [[ "$status $phase" != "$last" ]]; then
      note "remote build: phase ${phase:-?} ($status, $((SECONDS - started)) s)"
      last="$status $phase"
    fi
    case "$status" in
      IN_PROGRESS) sleep "$POLL_SECONDS" ;;
      SUCCEEDED) note "remote build succeeded: pushed $IMAGE_TAG"; return 0 ;;
      *) die "remote build $id $status in phase ${fphase:-$phase}${fstatus:+ ($fstatus)}: ${message:-no message from CodeBuild}${link:+
  build log: $link}" ;;
    esac
  done
}

# remote_build PROJECT: upload the source, start the build with the build args, follow it.
remote_build() {
  local project=$1 zip="$BUILD_DIR/source.zip" key="build-source/$STACK_NAME/$IMAGE_TAG.zip" env_overrides=() arg
  for arg in "${BUILD_ARGS[@]}" "IMAGE_TAG=$IMAGE_TAG"; do
    # CLI shorthand (name=...,value=...): a value must not contain a comma, quote or space.
    [[ "${arg#*=}" =~ ^[A-Za-z0-9_./:@+-]+$ ]] || die "build arg $arg cannot be passed to CodeBuild (letters, digits and ._/:@+- only)"
    env_overrides+=("name=${arg%%=*},value=${arg#*=},type=PLAINTEXT")
  done
  package_source "$zip"
  run aws s3 cp "$zip" "s3://$ARTIFACTS_BUCKET/$key" --region "$REGION" --sse AES256 --only-show-errors
  note "starting the image build in the cloud: CodeBuild project $project (${BUILD_ARGS[*]})"
  BUILD_ID=$(query "$project:DRYRUN-build-id" aws codebuild start-build --region "$REGION" --project-name "$project" \
    --source-type-override S3 --source-location-override "$ARTIFACTS_BUCKET/$key" \
    --environment-variables-override "${env_overrides[@]}" \
    --query build.id --output text) || die "aws codebuild start-build failed for project $project"
  note "remote build $BUILD_ID started; logs in /whisper-batch/$STACK_NAME/image-build"
  wait_for_build "$BUILD_ID"
}

# The CodeBuild project is part of the stack: a first deploy (or a stack from before the project)
# is deployed first, then built, then deployed again with the new tag. A first deploy's job
# definitions name the tag before it exists, harmless as on the local path (nobody knows the bucket
# yet); an existing stack keeps its current image until the build has pushed the new one.
remote_build_and_deploy() {
  local project repo_uri
  project=$(stack_output ImageBuildProjectName "")
  if [[ -z "$project" || "$project" == None ]]; then
    repo_uri=$(stack_output EcrRepositoryUri "")
    if [[ -n "$repo_uri" && "$repo_uri" != None ]]; then
      note "stack $STACK_NAME has no CodeBuild project yet: updating it first (keeping its current image)"
      deploy keep-image
    else
      note "first deploy: creating the stack (its ECR repository and CodeBuild project), then building the image in the cloud"
      deploy
    fi
    project=$(stack_output ImageBuildProjectName "$STACK_NAME-image")
    [[ -n "$project" && "$project" != None ]] || die "stack $STACK_NAME has no ImageBuildProjectName output"
  fi
  remote_build "$project"
  deploy
}

if [[ "$BUILD_MODE" == remote ]]; then
  remote_build_and_deploy
else
  local_build_and_deploy
fi

# ------------------------------------------------------------------ where to drop audio
INPUT_LOCATION=$(stack_output InputLocation "s3://DRYRUN-bucket/audio/")
OUTPUT_LOCATION=$(stack_output OutputLocation "s3://DRYRUN-bucket/transcripts/")
DASHBOARD_URL=$(stack_output DashboardUrl "https://$REGION.console.aws.amazon.com/cloudwatch/home")
cat <<EOF

whisper-batch is deployed (stack $STACK_NAME, image tag $IMAGE_TAG).
  Drop audio into:    $INPUT_LOCATION
      e.g. aws s3 cp talk.mp3 ${INPUT_LOCATION}talk.mp3
  Transcripts appear: $OUTPUT_LOCATION<input key>.{json,txt,srt,vtt}
  Dashboard:          $DASHBOARD_URL
EOF
if [[ "$BUILD_MODE" == remote ]]; then
  echo "  Image built by:     CodeBuild build $BUILD_ID (log group /whisper-batch/$STACK_NAME/image-build)"
fi
if dry; then
  echo "(dry run: nothing was built, uploaded or deployed)"
fi
