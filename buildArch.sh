#!/usr/bin/env bash
# buildArch.sh - build the whisper-batch worker image, package the submitter Lambda and deploy
# cloudformation/template.yaml, then print where to drop audio. See docs/deploy.md.
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
cloudformation/template.yaml with `aws cloudformation deploy`, and prints where to drop audio.

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

Prerequisites: aws (CLI v2, credentials for the target account), docker (engine running),
python3 with pip (to package the Lambda).
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
if [[ "$NEED_DOCKER" -eq 1 ]]; then
  require docker "Install Docker (https://docs.docker.com/engine/install/) and start the engine; the worker image is built locally."
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
    docker info >/dev/null 2>&1 || die "docker is installed but the engine is not reachable (start Docker, or check permissions on its socket)."
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

# ------------------------------------------------------------------ image build
run docker build --platform linux/amd64 -f "$DOCKERFILE" \
  --build-arg "MODEL=$MODEL" --build-arg "BATCH_SIZE=$BATCH_SIZE" --build-arg "MAX_TOKENS=$MAX_TOKENS" \
  -t "$LOCAL_IMAGE:$IMAGE_TAG" "$SCRIPT_DIR"

deploy() {
  local overrides=(
    "LambdaCodeBucket=$ARTIFACTS_BUCKET"
    "LambdaCodeKey=$LAMBDA_KEY"
    "ImageTag=$IMAGE_TAG"
    "VpcId=$VPC_ID"
    "SubnetIds=$SUBNETS"
  )
  if [[ -n "$SECURITY_GROUPS" ]]; then overrides+=("SecurityGroupIds=$SECURITY_GROUPS"); fi
  if [[ -n "$ALARM_EMAIL" ]]; then overrides+=("AlarmEmail=$ALARM_EMAIL"); fi
  if [[ -n "$USE_SPOT" ]]; then overrides+=("UseSpot=$USE_SPOT"); fi
  if [[ -n "$WORD_TIMESTAMPS" ]]; then overrides+=("WordTimestamps=$WORD_TIMESTAMPS"); fi
  if [[ ${#EXTRA_PARAMS[@]} -gt 0 ]]; then overrides+=("${EXTRA_PARAMS[@]}"); fi
  run aws cloudformation deploy --region "$REGION" --stack-name "$STACK_NAME" \
    --template-file "$TEMPLATE" --s3-bucket "$ARTIFACTS_BUCKET" --s3-prefix cloudformation \
    --capabilities CAPABILITY_IAM --no-fail-on-empty-changeset \
    --tags Project=whisper-batch \
    --parameter-overrides "${overrides[@]}"
}

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
if dry; then
  echo "(dry run: nothing was built, uploaded or deployed)"
fi
