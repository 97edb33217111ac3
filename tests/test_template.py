"""Static checks of cloudformation/template.yaml: least privilege, encryption, the Batch/Neuron
sizing, the retry contract with batch_job.exit_codes, the submitter environment contract, and
cfn-lint / checkov (run from the lint venv when it is there)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from batch_job import exit_codes

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "cloudformation" / "template.yaml"
ARCH_DOC = REPO / "docs" / "architecture.md"
DEPLOY_DOC = REPO / "docs" / "deploy.md"

# inf2.xlarge: 4 vCPU, 16 GiB, one Inferentia2 chip with two NeuronCores.
INF2_XLARGE_VCPU = 4
INF2_XLARGE_MIB = 16 * 1024
AGENT_AND_OS_RESERVE_MIB = 1024  # ECS registers less than the instance's memory; keep >= 1 GiB free
JOBS_PER_INSTANCE = 2
# inf2 sizes: instance type -> (vCPU, memory GiB, Inferentia2 chips); every chip has 2 NeuronCores.
# Source: the EC2 Inf2 instance-type table (inf2.xlarge 4/16/1, inf2.8xlarge 32/128/1,
# inf2.24xlarge 96/384/6, inf2.48xlarge 192/768/12).
INF2_SIZES = {
    "inf2.xlarge": (4, 16, 1),
    "inf2.8xlarge": (32, 128, 1),
    "inf2.24xlarge": (96, 384, 6),
    "inf2.48xlarge": (192, 768, 12),
}
NEURONCORES_PER_CHIP = 2

# Actions that have no resource-level permissions, so "*" is the only valid Resource.
STAR_RESOURCE_ALLOWED = {
    "cloudwatch:putmetricdata",
    "xray:puttracesegments",
    "xray:puttelemetryrecords",
    "ecr:getauthorizationtoken",
    "batch:listjobs",
}
DATA_SERVICES = ("s3:", "dynamodb:", "sqs:")

ERROR_MARKER_TAG = ("whisper-batch:marker", "error")


# ---------------------------------------------------------------------------- loading
class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short tags (!Ref, !Sub, !GetAtt ...) into their long form."""


def _construct_tag(loader: yaml.Loader, tag_suffix: str, node: yaml.Node):
    name = "Ref" if tag_suffix == "Ref" else f"Fn::{tag_suffix}"
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag_suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


def load_template(path: Path = TEMPLATE) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass


@pytest.fixture(scope="module")
def tpl() -> dict:
    return load_template()


@pytest.fixture(scope="module")
def resources(tpl) -> dict:
    return tpl["Resources"]


def of_type(resources: dict, rtype: str) -> dict:
    return {k: v for k, v in resources.items() if v["Type"] == rtype}


def props(resource: dict) -> dict:
    return resource.get("Properties", {})


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def sub_text(value) -> str:
    """The string of a plain value, an Fn::Sub (short or list form) or a Ref, for pattern checks."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "Fn::Sub" in value:
            sub = value["Fn::Sub"]
            return sub if isinstance(sub, str) else sub[0]
        if "Ref" in value:
            return f"${{{value['Ref']}}}"
        if "Fn::GetAtt" in value:
            return f"${{{'.'.join(value['Fn::GetAtt'])}}}"
    return json.dumps(value, sort_keys=True)


def is_ref(value, name: str) -> bool:
    return isinstance(value, dict) and value.get("Ref") == name


# ---------------------------------------------------------------------------- IAM
def iam_statements(resources: dict):
    """(resource name, statement) for every identity policy statement in the template."""
    for name, res in resources.items():
        p = props(res)
        if res["Type"] == "AWS::IAM::Role":
            for pol in p.get("Policies", []):
                for st in as_list(pol["PolicyDocument"]["Statement"]):
                    yield name, st
        elif res["Type"] in ("AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"):
            for st in as_list(p["PolicyDocument"]["Statement"]):
                yield name, st


def actions_of(statement: dict) -> list[str]:
    return [a.lower() for a in as_list(statement.get("Action", []))]


def test_every_policy_statement_parses_and_has_no_star_on_data_actions(resources):
    statements = list(iam_statements(resources))
    assert len(statements) >= 10
    for name, st in statements:
        assert st["Effect"] in ("Allow", "Deny"), (name, st)
        assert "NotAction" not in st and "NotResource" not in st, (name, st)
        acts = actions_of(st)
        assert acts, (name, st)
        for a in acts:
            assert a != "*" and not a.endswith(":*"), f"{name}: service-wide wildcard action {a}"
        res = as_list(st["Resource"])
        if "*" in res:
            assert set(acts) <= STAR_RESOURCE_ALLOWED, f"{name}: Resource '*' on {acts}"
            assert not any(a.startswith(DATA_SERVICES) for a in acts)
        if any(a.startswith(DATA_SERVICES) for a in acts):
            for r in res:
                assert r != "*", f"{name}: '*' resource on data action {acts}"
                text = sub_text(r)
                assert not re.fullmatch(r"arn:[^:]*:(s3|sqs|dynamodb):[^/]*:\*", text), (name, text)


def test_put_metric_data_is_scoped_by_namespace(resources):
    seen = 0
    for name, st in iam_statements(resources):
        if "cloudwatch:putmetricdata" in actions_of(st):
            seen += 1
            cond = st["Condition"]["StringEquals"]["cloudwatch:namespace"]
            assert "MetricsNamespace" in sub_text(cond), name
    assert seen >= 1


def test_no_full_access_or_admin_managed_policies(resources):
    for name, res in resources.items():
        for arn in props(res).get("ManagedPolicyArns", []):
            text = sub_text(arn)
            assert "FullAccess" not in text, (name, text)
            assert "AdministratorAccess" not in text and "PowerUser" not in text, (name, text)
    roles = of_type(resources, "AWS::IAM::Role")
    assert {"SubmitterRole", "JobRole", "InstanceRole"} <= set(roles)


def _role_statements(resources, role: str) -> list[dict]:
    return [st for name, st in iam_statements(resources) if name == role]


def test_job_role_reads_input_prefix_writes_output_prefix_only(resources):
    statements = _role_statements(resources, "JobRole")
    services = {a.split(":")[0] for st in statements for a in actions_of(st)}
    assert services == {"s3", "cloudwatch"}, services
    read_only = {"s3:getobject", "s3:getobjectversion"}
    for st in statements:
        acts = set(actions_of(st))
        if not any(a.startswith("s3:") for a in acts):
            continue
        if acts == {"s3:listbucket"}:
            prefixes = as_list(st["Condition"]["StringLike"]["s3:prefix"])
            assert sorted(sub_text(p) for p in prefixes) == ["${InputPrefix}*", "${OutputPrefix}*"]
            continue
        for r in as_list(st["Resource"]):
            text = sub_text(r)
            if text.endswith("/${InputPrefix}*"):
                assert acts <= read_only, f"input prefix must be read-only: {acts}"
            else:
                assert text.endswith("/${OutputPrefix}*"), f"S3 resource outside the two prefixes: {text}"
    writes = {a for st in statements for a in actions_of(st)}
    assert {"s3:putobject", "s3:deleteobject", "s3:putobjecttagging"} <= writes


def test_job_role_is_separate_from_instance_role(resources):
    jd = of_type(resources, "AWS::Batch::JobDefinition")
    for jdef in jd.values():
        assert props(jdef)["ContainerProperties"]["JobRoleArn"] == {"Fn::GetAtt": ["JobRole", "Arn"]}
    profile = props(resources["InstanceProfile"])
    assert profile["Roles"] == [{"Ref": "InstanceRole"}]
    ce = props(resources["ComputeEnvironment"])["ComputeResources"]
    assert ce["InstanceRole"] == {"Fn::GetAtt": ["InstanceProfile", "Arn"]}
    trust = props(resources["JobRole"])["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}


def test_submitter_role_has_only_what_it_needs(resources):
    statements = _role_statements(resources, "SubmitterRole")
    actions = {a for st in statements for a in actions_of(st)}
    allowed = {
        "sqs:receivemessage", "sqs:deletemessage", "sqs:getqueueattributes", "sqs:changemessagevisibility",
        "batch:submitjob", "batch:tagresource",
        "dynamodb:getitem", "dynamodb:putitem", "dynamodb:updateitem", "dynamodb:deleteitem",
        "s3:getobject", "s3:getobjectversion", "s3:listbucket", "s3:putobject",
        "kms:decrypt", "kms:encrypt", "kms:generatedatakey",
        "logs:createlogstream", "logs:putlogevents",
        "xray:puttracesegments", "xray:puttelemetryrecords",
    }
    assert actions <= allowed, actions - allowed
    assert {"batch:submitjob", "sqs:receivemessage", "sqs:deletemessage", "dynamodb:putitem", "s3:getobject"} <= actions
    by_action = {a: st for st in statements for a in actions_of(st)}
    assert by_action["sqs:receivemessage"]["Resource"] == {"Fn::GetAtt": ["EventQueue", "Arn"]}
    assert by_action["dynamodb:putitem"]["Resource"] == {"Fn::GetAtt": ["IdempotencyTable", "Arn"]}
    assert sub_text(by_action["s3:getobject"]["Resource"]).endswith("/${InputPrefix}*")
    # the only thing the submitter writes: pack manifests (submitter/manifest.py), never transcripts
    assert [sub_text(r) for r in as_list(by_action["s3:putobject"]["Resource"])] == [
        "arn:${AWS::Partition}:s3:::${DataBucket}/${OutputPrefix}_manifests/*"]
    assert by_action["s3:listbucket"]["Condition"]["StringLike"]["s3:prefix"] == {"Fn::Sub": "${InputPrefix}*"}
    submit = [sub_text(r) for r in as_list(by_action["batch:submitjob"]["Resource"])]
    assert all(":job/" not in r for r in submit)
    assert [sub_text(r) for r in as_list(by_action["batch:tagresource"]["Resource"])] == [
        "arn:${AWS::Partition}:batch:${AWS::Region}:${AWS::AccountId}:job/*"]
    assert "${JobQueue}" in submit
    names = {props(jd)["JobDefinitionName"]["Fn::Sub"] for jd in of_type(resources, "AWS::Batch::JobDefinition").values()}
    for name in names:
        assert any(r.endswith("job-definition/" + name) for r in submit), name
        assert any(r.endswith("job-definition/" + name + ":*") for r in submit), name


def _resource_texts(statement: dict) -> list[str]:
    return [sub_text(r) for r in as_list(statement["Resource"])]


def test_build_role_touches_only_its_repository_source_prefix_and_log_group(resources):
    """The CodeBuild role: push to the stack's repository, read build-source/<stack>/*, write its log
    group; "*" only on ecr:GetAuthorizationToken, which has no resource types."""
    statements = _role_statements(resources, "BuildRole")
    by_resource: dict[str, set[str]] = {}
    for st in statements:
        assert st["Effect"] == "Allow" and "Condition" not in st, st
        for r in as_list(st["Resource"]):
            key = json.dumps(r, sort_keys=True) if not isinstance(r, str) else r
            by_resource.setdefault(key, set()).update(actions_of(st))
    repo = json.dumps({"Fn::GetAtt": ["Repository", "Arn"]}, sort_keys=True)
    source = json.dumps({"Fn::Sub": "arn:${AWS::Partition}:s3:::${LambdaCodeBucket}/build-source/${AWS::StackName}/*"},
                        sort_keys=True)
    logs = json.dumps({"Fn::Sub": "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:"
                                  "${BuildLogGroup}:log-stream:*"}, sort_keys=True)
    assert by_resource == {
        "*": {"ecr:getauthorizationtoken"},
        repo: {"ecr:batchchecklayeravailability", "ecr:initiatelayerupload", "ecr:uploadlayerpart",
               "ecr:completelayerupload", "ecr:putimage"},
        source: {"s3:getobject", "s3:getobjectversion"},
        logs: {"logs:createlogstream", "logs:putlogevents"},
    }, by_resource
    trust = props(resources["BuildRole"])["AssumeRolePolicyDocument"]["Statement"]
    assert [s["Principal"] for s in trust] == [{"Service": "codebuild.amazonaws.com"}]
    source_arn = sub_text(trust[0]["Condition"]["ArnEquals"]["aws:SourceArn"])
    assert source_arn.endswith(":project/" + props(resources["ImageBuildProject"])["Name"]["Fn::Sub"])


def test_image_build_project(tpl, resources):
    """x86-64 Linux, privileged (docker build), a compute type from the parameter, the stack's log group,
    the source prefix the role may read, and the buildspec in the repository."""
    p = props(resources["ImageBuildProject"])
    env = p["Environment"]
    assert env["Type"] == "LINUX_CONTAINER" and env["PrivilegedMode"] is True
    assert "x86_64" in env["Image"] or "standard" in env["Image"]
    assert env["ComputeType"] == {"Ref": "BuildComputeType"}
    compute = tpl["Parameters"]["BuildComputeType"]
    assert compute["Default"] in compute["AllowedValues"]
    assert set(compute["AllowedValues"]) <= {"BUILD_GENERAL1_LARGE", "BUILD_GENERAL1_XLARGE", "BUILD_GENERAL1_2XLARGE"}
    assert compute["Default"] != "BUILD_GENERAL1_LARGE"  # 16 GiB cannot compile large-v3/turbo
    variables = {v["Name"]: v["Value"] for v in env["EnvironmentVariables"]}
    assert variables["REPOSITORY_URI"] == {"Fn::GetAtt": ["Repository", "RepositoryUri"]}
    assert {"IMAGE_TAG", "MODEL", "BATCH_SIZE", "MAX_TOKENS", "WORD_TIMESTAMPS"} <= set(variables)
    assert p["ServiceRole"] == {"Fn::GetAtt": ["BuildRole", "Arn"]}
    assert p["Source"]["Type"] == "S3" and p["Source"]["BuildSpec"] == "cloudformation/buildspec.yml"
    assert (REPO / p["Source"]["BuildSpec"]).is_file()
    assert sub_text(p["Source"]["Location"]).startswith("${LambdaCodeBucket}/build-source/${AWS::StackName}/")
    assert p["Artifacts"] == {"Type": "NO_ARTIFACTS"}
    cw = p["LogsConfig"]["CloudWatchLogs"]
    assert cw["Status"] == "ENABLED" and cw["GroupName"] == {"Ref": "BuildLogGroup"}
    group = props(resources["BuildLogGroup"])
    assert group["RetentionInDays"] == {"Ref": "LogRetentionDays"} and "KmsKeyId" in group
    assert p["TimeoutInMinutes"] == {"Ref": "BuildTimeoutMinutes"}
    outputs = tpl["Outputs"]
    assert outputs["ImageBuildProjectName"]["Value"] == {"Ref": "ImageBuildProject"}


def test_queue_metrics_role_lists_jobs_and_publishes_one_namespace(resources):
    statements = _role_statements(resources, "QueueMetricsRole")
    actions = {a for st in statements for a in actions_of(st)}
    assert actions == {"batch:listjobs", "cloudwatch:putmetricdata", "kms:decrypt", "logs:createlogstream",
                       "logs:putlogevents", "xray:puttracesegments", "xray:puttelemetryrecords"}, actions
    by_action = {a: st for st in statements for a in actions_of(st)}
    assert by_action["kms:decrypt"]["Resource"] == {"Fn::GetAtt": ["StackKey", "Arn"]}
    assert _resource_texts(by_action["logs:putlogevents"]) == [
        "arn:${AWS::Partition}:logs:${AWS::Region}:${AWS::AccountId}:log-group:${QueueMetricsLogGroup}:log-stream:*"]
    assert by_action["cloudwatch:putmetricdata"]["Condition"]["StringEquals"]["cloudwatch:namespace"] == {
        "Ref": "MetricsNamespace"}


# ---------------------------------------------------------------------------- storage
def test_buckets_encrypted_private_tls_only_versioned(resources):
    buckets = of_type(resources, "AWS::S3::Bucket")
    assert set(buckets) == {"DataBucket", "AccessLogsBucket"}
    policies = {props(p)["Bucket"]["Ref"]: props(p)["PolicyDocument"] for p in of_type(resources, "AWS::S3::BucketPolicy").values()}
    for name, b in buckets.items():
        p = props(b)
        sse = p["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
        assert sse["SSEAlgorithm"] in ("AES256", "aws:kms", "aws:kms:dsse"), name
        assert all(p["PublicAccessBlockConfiguration"][k] is True for k in
                   ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")), name
        assert p["VersioningConfiguration"]["Status"] == "Enabled", name
        assert p["OwnershipControls"]["Rules"][0]["ObjectOwnership"] == "BucketOwnerEnforced"
        deny = [st for st in policies[name]["Statement"] if st["Effect"] == "Deny"]
        assert any(st["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for st in deny), name
    assert props(buckets["DataBucket"])["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": "AccessLogsBucket"}
    assert buckets["DataBucket"]["DeletionPolicy"] == "Retain"


def test_lifecycle_rules_cover_temporary_objects_and_error_markers(resources):
    rules = props(resources["DataBucket"])["LifecycleConfiguration"]["Rules"]
    assert all(r["Status"] == "Enabled" for r in rules)
    # bulk manifests: submitter/bulk.py writes them under <OutputPrefix>_manifests/
    assert any(r.get("Prefix") == {"Fn::Sub": "${OutputPrefix}_manifests/"} and "ExpirationInDays" in r for r in rules)
    assert any("AbortIncompleteMultipartUpload" in r and "Prefix" not in r for r in rules)
    assert any("NoncurrentVersionExpiration" in r for r in rules)
    markers = [r for r in rules if r.get("TagFilters")]
    assert len(markers) == 1
    rule = markers[0]
    assert is_ref(rule["Prefix"], "OutputPrefix")
    assert rule["TagFilters"] == [{"Key": ERROR_MARKER_TAG[0], "Value": ERROR_MARKER_TAG[1]}]
    assert "ExpirationInDays" in rule


@pytest.mark.parametrize("doc", [DEPLOY_DOC, ARCH_DOC], ids=lambda p: p.name)
def test_error_marker_convention_is_documented_for_the_worker(doc):
    text = doc.read_text(encoding="utf-8")
    assert f"{ERROR_MARKER_TAG[0]}={ERROR_MARKER_TAG[1]}" in text
    assert "_manifests/" in text


# ---------------------------------------------------------------------------- event wiring
def test_s3_to_sqs_to_lambda_wiring(resources):
    bucket = resources["DataBucket"]
    qconf = props(bucket)["NotificationConfiguration"]["QueueConfigurations"]
    assert len(qconf) == 1
    assert qconf[0]["Queue"] == {"Fn::GetAtt": ["EventQueue", "Arn"]}
    assert qconf[0]["Event"].startswith("s3:ObjectCreated:")
    assert qconf[0]["Filter"]["S3Key"]["Rules"] == [{"Name": "prefix", "Value": {"Ref": "InputPrefix"}}]
    # S3 checks the destination's permission when the notification is configured.
    assert "EventQueuePolicy" in bucket["DependsOn"]

    queue = props(resources["EventQueue"])
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["EventDeadLetterQueue", "Arn"]}
    assert 3 <= queue["RedrivePolicy"]["maxReceiveCount"] <= 10
    fn = props(resources["SubmitterFunction"])
    assert queue["VisibilityTimeout"] >= 6 * fn["Timeout"]

    policy = props(resources["EventQueuePolicy"])["PolicyDocument"]["Statement"]
    allows = [st for st in policy if st["Effect"] == "Allow"]
    assert len(allows) == 1
    st = allows[0]
    assert st["Principal"] == {"Service": "s3.amazonaws.com"} and st["Action"] == "sqs:SendMessage"
    source_arn = sub_text(st["Condition"]["ArnEquals"]["aws:SourceArn"])
    assert source_arn.startswith("arn:${AWS::Partition}:s3:::")
    assert sub_text(props(bucket)["BucketName"]) in source_arn  # the very name the bucket gets
    assert st["Condition"]["StringEquals"]["aws:SourceAccount"] == {"Ref": "AWS::AccountId"}

    esm = props(resources["SubmitterEventSource"])
    assert esm["EventSourceArn"] == {"Fn::GetAtt": ["EventQueue", "Arn"]}
    assert esm["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert "BatchSize" in esm and "MaximumBatchingWindowInSeconds" in esm
    assert esm["ScalingConfig"]["MaximumConcurrency"] == fn["ReservedConcurrentExecutions"]


def test_sqs_batches_are_large_enough_to_fill_packs(tpl, resources):
    params = tpl["Parameters"]
    esm = props(resources["SubmitterEventSource"])
    assert esm["BatchSize"] == {"Ref": "SubmitterBatchSize"}
    assert esm["MaximumBatchingWindowInSeconds"] == {"Ref": "SubmitterBatchingWindowSeconds"}
    size, window = params["SubmitterBatchSize"], params["SubmitterBatchingWindowSeconds"]
    assert size["Default"] >= 50 and size["MaxValue"] <= 10_000  # standard queues: at most 10,000
    # Lambda rejects a batch size above 10 without a batching window of at least 1 s: the window
    # parameter cannot go below 1 whatever batch size is chosen.
    assert window["MinValue"] >= 1 and 1 <= window["Default"] <= window["MaxValue"] <= 300
    # the Lambda timeout covers a full batch; the queue hides a batch 6 x that long
    fn = props(resources["SubmitterFunction"])
    assert fn["Timeout"] >= 120
    assert props(resources["EventQueue"])["VisibilityTimeout"] == 6 * fn["Timeout"]


def test_local_mode_delivers_batches_of_the_stack_default_size(tpl):
    from batch_job.local.watcher import SQS_BATCH_SIZE

    assert SQS_BATCH_SIZE == tpl["Parameters"]["SubmitterBatchSize"]["Default"]


def test_pack_parameters_reach_the_submitter(tpl, resources):
    from submitter.settings import SubmitterSettings

    params = tpl["Parameters"]
    env = props(resources["SubmitterFunction"])["Environment"]["Variables"]
    for var, param in (("PACK_MAX_OBJECTS", "PackMaxObjects"), ("PACK_MAX_AUDIO_SECONDS", "PackMaxAudioSeconds"),
                       ("PACK_PARALLELISM", "PackParallelism")):
        assert env[var] == {"Ref": param}
        assert params[param]["Type"] == "Number" and params[param]["MinValue"] >= 1
        groups = tpl["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
        assert param in next(g for g in groups if g["Label"]["default"] == "Submitter")["Parameters"]
    # the stack's defaults are valid submitter settings
    settings = SubmitterSettings.from_env({
        "JOB_QUEUE": "q", "JOB_DEFINITION": "d", "JOB_DEFINITION_LONG": "l", "LONG_JOB_MIN_BYTES": "1",
        "MAX_OBJECT_BYTES": "1", "OUTPUT_PREFIX": "t/", "IDEMPOTENCY_TABLE": "t",
        **{var: str(params[param]["Default"]) for var, param in (
            ("PACK_MAX_OBJECTS", "PackMaxObjects"), ("PACK_MAX_AUDIO_SECONDS", "PackMaxAudioSeconds"),
            ("PACK_PARALLELISM", "PackParallelism"))},
    })
    # a burst spreads over the job slots of one inf2.xlarge (two NeuronCores, two jobs)
    assert settings.pack_parallelism == JOBS_PER_INSTANCE
    # a full pack (its audio over-estimated) fits the standard attempt at 2x real time; the engine
    # runs ~19x on 2 CPU cores with tiny.en (docs/benchmarks.md), an estimated 58x+ on inf2
    assert settings.pack_max_audio_seconds <= 2 * params["StandardJobTimeoutSeconds"]["Default"]


def test_queues_table_logs_topic_repo_and_volume_are_encrypted(resources):
    for name, q in of_type(resources, "AWS::SQS::Queue").items():
        assert props(q).get("KmsMasterKeyId") or props(q).get("SqsManagedSseEnabled"), name
    table = props(resources["IdempotencyTable"])
    assert table["SSESpecification"]["SSEEnabled"] is True
    for name, lg in of_type(resources, "AWS::Logs::LogGroup").items():
        assert props(lg)["KmsKeyId"] and props(lg)["RetentionInDays"], name
    for name, topic in of_type(resources, "AWS::SNS::Topic").items():
        assert props(topic)["KmsMasterKeyId"], name
    repo = props(resources["Repository"])
    assert repo["EncryptionConfiguration"]["EncryptionType"] == "KMS"
    ebs = props(resources["LaunchTemplate"])["LaunchTemplateData"]["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["VolumeType"] == "gp3"
    assert props(resources["StackKey"])["EnableKeyRotation"] is True
    assert props(resources["SubmitterFunction"])["KmsKeyArn"]


def test_idempotency_table(resources):
    t = props(resources["IdempotencyTable"])
    assert t["BillingMode"] == "PAY_PER_REQUEST"
    assert t["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    assert t["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert t["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]  # powertools' default key


# ---------------------------------------------------------------------------- Lambda
#: A literal environment read in Python source: environ["X"], environ.get("X"), getenv("X").
ENV_READ = re.compile(r"""(?:environ(?:\.get)?\s*[\[(]|getenv\s*\()\s*['"]([A-Z][A-Z0-9_]*)['"]""")


def submitter_env_vars() -> set[str]:
    """Env vars the submitter needs: the required ones of ``submitter.settings`` (when present),
    literal os.environ/getenv reads in submitter/*.py, and the contract in docs/architecture.md."""
    names: set[str] = set()
    try:
        from submitter import settings as submitter_settings
    except ImportError:
        submitter_settings = None
    table = getattr(getattr(submitter_settings, "SubmitterSettings", None), "_ENV", ())
    for entry in table:
        var, *_, required = entry
        if required:
            names.add(var)
    pattern = ENV_READ
    for path in (REPO / "submitter").rglob("*.py"):
        if path.name == "queue_metrics.py":
            continue  # a function of its own (QueueMetricsFunction; tests/test_queue_metrics.py checks its env)
        names |= set(pattern.findall(path.read_text(encoding="utf-8")))
    section = ARCH_DOC.read_text(encoding="utf-8").split("### Submitter environment", 1)[1]
    section = section.split("\n#", 1)[0]
    names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    names -= {"AWS_REGION", "AWS_DEFAULT_REGION", "AWS_LAMBDA_FUNCTION_NAME", "_X_AMZN_TRACE_ID"}  # set by Lambda
    return names


def test_lambda_environment_covers_what_the_submitter_reads(resources):
    env = props(resources["SubmitterFunction"])["Environment"]["Variables"]
    wanted = submitter_env_vars()
    assert {"JOB_QUEUE", "JOB_DEFINITION", "JOB_DEFINITION_LONG", "IDEMPOTENCY_TABLE",
            "POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE"} <= wanted
    assert wanted <= set(env), wanted - set(env)
    # ...and nothing the submitter does not know about (typos): settings table, docs, powertools.
    try:
        from submitter.settings import SubmitterSettings
        known = {e[0] for e in getattr(SubmitterSettings, "_ENV", ())}
    except ImportError:
        known = set()
    known |= wanted | {"LOG_LEVEL"}
    assert set(env) <= known, set(env) - known
    assert env["JOB_QUEUE"] == {"Ref": "JobQueue"}
    assert env["JOB_DEFINITION"] == {"Ref": "StandardJobDefinition"}
    assert env["JOB_DEFINITION_LONG"] == {"Ref": "LongJobDefinition"}
    assert env["IDEMPOTENCY_TABLE"] == {"Ref": "IdempotencyTable"}
    assert env["INPUT_PREFIX"] == {"Ref": "InputPrefix"} and env["OUTPUT_PREFIX"] == {"Ref": "OutputPrefix"}
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == {"Ref": "MetricsNamespace"}


def test_lambda_runtime_tracing_concurrency_logs(tpl, resources):
    fn = props(resources["SubmitterFunction"])
    assert fn["Handler"] == "submitter.app.handler"
    assert fn["Runtime"] == "python3.12"
    assert fn["Code"] == {"S3Bucket": {"Ref": "LambdaCodeBucket"}, "S3Key": {"Ref": "LambdaCodeKey"}}
    assert fn["TracingConfig"] == {"Mode": "Active"}
    assert fn["ReservedConcurrentExecutions"] == {"Ref": "SubmitterConcurrency"}
    # SubmitJob is throttled per account (~50 TPS): the default must stay small.
    assert tpl["Parameters"]["SubmitterConcurrency"]["Default"] <= 10
    assert fn["LoggingConfig"]["LogGroup"] == {"Ref": "SubmitterLogGroup"}


# ---------------------------------------------------------------------------- Batch
def test_compute_environment_inf2_neuron_ami(tpl, resources):
    ce = props(resources["ComputeEnvironment"])
    assert ce["Type"] == "MANAGED"
    cr = ce["ComputeResources"]
    assert cr["MinvCpus"] == 0
    params = tpl["Parameters"]
    assert is_ref(cr["MaxvCpus"], "MaxvCpus") and params["MaxvCpus"]["Default"] <= 64
    assert is_ref(cr["InstanceTypes"], "InstanceTypes") and params["InstanceTypes"]["Default"] == "inf2.xlarge"
    assert cr["Type"] == {"Fn::If": ["UseSpotCondition", "SPOT", "EC2"]}
    assert "SPOT" in json.dumps(cr["AllocationStrategy"])
    assert params["NeuronAmiId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert params["NeuronAmiId"]["Default"] == "/aws/service/ecs/optimized-ami/amazon-linux-2023/neuron/recommended/image_id"
    assert cr["Ec2Configuration"][0]["ImageIdOverride"] == {"Ref": "NeuronAmiId"}
    assert cr["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": "LaunchTemplate"}
    assert is_ref(cr["Subnets"], "SubnetIds")
    for p in ("VpcId", "SubnetIds", "SecurityGroupIds"):
        assert p in params


def test_launch_template_imdsv2_and_user_data(resources):
    data = props(resources["LaunchTemplate"])["LaunchTemplateData"]
    md = data["MetadataOptions"]
    assert md["HttpTokens"] == "required"
    # 1 keeps containers (one hop further) away from the instance role; 2 would let them reach IMDS.
    assert md["HttpPutResponseHopLimit"] in (1, 2)
    user_data = sub_text(data["UserData"]["Fn::Base64"])
    assert "Content-Type: multipart/mixed" in user_data  # Batch only merges MIME multi-part user data
    assert "text/x-shellscript" in user_data
    assert "neuron-monitor" in user_data
    boundary = re.search(r'boundary="([^"]+)"', user_data).group(1)
    assert user_data.rstrip().endswith(f"--{boundary}--")


def job_definitions(resources) -> dict:
    jds = of_type(resources, "AWS::Batch::JobDefinition")
    assert len(jds) == 2
    return jds


def test_job_definitions_contract_devices_and_env(resources):
    timeouts = set()
    for name, jd in job_definitions(resources).items():
        p = props(jd)
        c = p["ContainerProperties"]
        assert c["Command"] == ["run-job", "--input", "Ref::input", "--output", "Ref::output"], name
        assert set(p.get("Parameters", {})) <= {"input", "output"}
        assert sub_text(p["Parameters"]["output"]) == "s3://${DataBucket}/${OutputPrefix}"
        assert p["PlatformCapabilities"] == ["EC2"]
        devices = c["LinuxParameters"]["Devices"]
        assert {"HostPath": "/dev/neuron0", "ContainerPath": "/dev/neuron0"}.items() <= devices[0].items()
        assert "Privileged" not in c or c["Privileged"] is False
        env = {e["Name"]: e["Value"] for e in c["Environment"]}
        assert env["NEURON_RT_NUM_CORES"] == "1"
        vcpu = next(r["Value"] for r in c["ResourceRequirements"] if r["Type"] == "VCPU")
        assert env["WHISPER_BATCH_THREADS"] == vcpu, name  # host threads never exceed the job's vCPUs
        assert env["WHISPER_BATCH_METRICS_NAMESPACE"] == {"Ref": "MetricsNamespace"}
        assert all(k.startswith(("WHISPER_BATCH_", "NEURON_RT_", "AWS_")) for k in env)
        assert ":${ImageTag}" in sub_text(c["Image"]) and "${Repository}" in sub_text(c["Image"])
        timeouts.add(p["Timeout"]["AttemptDurationSeconds"]["Ref"])
        assert c["LogConfiguration"]["LogDriver"] == "awslogs"
    assert timeouts == {"StandardJobTimeoutSeconds", "LongJobTimeoutSeconds"}


def test_word_timestamps_parameter_reaches_every_job(tpl, resources):
    """The stack's WordTimestamps switch is the worker's WHISPER_BATCH_WORD_TIMESTAMPS, which
    Settings reads as a bool ("true"/"false" are the parameter's only values)."""
    from batch_job.settings import Settings

    param = tpl["Parameters"]["WordTimestamps"]
    assert param["Default"] == "false" and param["AllowedValues"] == ["true", "false"]
    for name, jd in job_definitions(resources).items():
        env = {e["Name"]: e["Value"] for e in props(jd)["ContainerProperties"]["Environment"]}
        assert env["WHISPER_BATCH_WORD_TIMESTAMPS"] == {"Ref": "WordTimestamps"}, name
    for value, expected in (("true", True), ("false", False)):
        assert Settings.from_env({"WHISPER_BATCH_WORD_TIMESTAMPS": value}).word_timestamps is expected
    groups = tpl["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert any("WordTimestamps" in g["Parameters"] for g in groups)


def test_speaker_labels_parameter_reaches_every_job(tpl, resources):
    """SpeakerLabels is the worker's WHISPER_BATCH_DIARIZE (a bool in Settings, which also turns word
    timestamps on: speaker labels are per word)."""
    from batch_job.settings import Settings

    param = tpl["Parameters"]["SpeakerLabels"]
    assert param["Default"] == "false" and param["AllowedValues"] == ["true", "false"]
    for name, jd in job_definitions(resources).items():
        env = {e["Name"]: e["Value"] for e in props(jd)["ContainerProperties"]["Environment"]}
        assert env["WHISPER_BATCH_DIARIZE"] == {"Ref": "SpeakerLabels"}, name
    on = Settings.from_env({"WHISPER_BATCH_DIARIZE": "true", "WHISPER_BATCH_WORD_TIMESTAMPS": "false"})
    assert on.diarize is True and on.word_timestamps is True
    assert Settings.from_env({"WHISPER_BATCH_DIARIZE": "false"}).diarize is False
    groups = tpl["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert any("SpeakerLabels" in g["Parameters"] for g in groups)


def test_two_jobs_fit_on_one_inf2_xlarge(resources):
    for name, jd in job_definitions(resources).items():
        req = {r["Type"]: int(r["Value"]) for r in props(jd)["ContainerProperties"]["ResourceRequirements"]}
        assert "GPU" not in req
        assert JOBS_PER_INSTANCE * req["VCPU"] <= INF2_XLARGE_VCPU, name
        assert JOBS_PER_INSTANCE * req["MEMORY"] <= INF2_XLARGE_MIB - AGENT_AND_OS_RESERVE_MIB, name
        # ...and not three: the chip has two NeuronCores, one per job.
        assert (JOBS_PER_INSTANCE + 1) * req["VCPU"] > INF2_XLARGE_VCPU or \
            (JOBS_PER_INSTANCE + 1) * req["MEMORY"] > INF2_XLARGE_MIB - AGENT_AND_OS_RESERVE_MIB


def job_sizing(resources) -> tuple[int, int]:
    """(VCPU, MEMORY MiB) of the job definitions; both must ask for the same."""
    sizes = set()
    for jd in job_definitions(resources).values():
        req = {r["Type"]: int(r["Value"]) for r in props(jd)["ContainerProperties"]["ResourceRequirements"]}
        sizes.add((req["VCPU"], req["MEMORY"]))
    assert len(sizes) == 1, sizes
    return sizes.pop()


def jobs_per_instance(vcpu: int, mib: int, job_vcpu: int, job_mib: int) -> int:
    """How many jobs Batch places on one instance: it packs by vCPU and memory, never by NeuronCore."""
    return int(min(vcpu / job_vcpu, mib / job_mib))


def test_instance_types_allow_only_two_jobs_per_chip(tpl, resources):
    job_vcpu, job_mib = job_sizing(resources)
    exact = {name for name, (vcpu, gib, chips) in INF2_SIZES.items()
             if jobs_per_instance(vcpu, gib * 1024, job_vcpu, job_mib) == NEURONCORES_PER_CHIP * chips}
    # Same answer with the memory ECS does not register / keeps for the OS taken off.
    exact_reserved = {name for name, (vcpu, gib, chips) in INF2_SIZES.items()
                      if jobs_per_instance(vcpu, gib * 1024 - AGENT_AND_OS_RESERVE_MIB, job_vcpu, job_mib)
                      == NEURONCORES_PER_CHIP * chips}
    assert exact == exact_reserved == {"inf2.xlarge"}
    param = tpl["Parameters"]["InstanceTypes"]
    assert set(param["AllowedValues"]) == exact
    for name in param["AllowedValues"]:
        vcpu, gib, chips = INF2_SIZES[name]
        assert jobs_per_instance(vcpu, gib * 1024, job_vcpu, job_mib) == NEURONCORES_PER_CHIP * chips, name
    assert set(param["Default"].split(",")) <= set(param["AllowedValues"])
    # The refusal is explained where a user overriding the parameter reads it.
    assert "inf2.8xlarge" in param["Description"] and "16 jobs" in param["Description"]
    # e.g. what the refused sizes would get: 16 jobs on inf2.8xlarge's 2 cores.
    assert jobs_per_instance(32, 128 * 1024, job_vcpu, job_mib) == 16


def test_job_definitions_map_the_one_chip(resources):
    for name, jd in job_definitions(resources).items():
        c = props(jd)["ContainerProperties"]
        devices = c["LinuxParameters"]["Devices"]
        assert devices == [{"HostPath": "/dev/neuron0", "ContainerPath": "/dev/neuron0",
                            "Permissions": ["READ", "WRITE"]}], name
        env = {e["Name"]: e["Value"] for e in c["Environment"]}
        assert env["NEURON_RT_NUM_CORES"] == "1" and "NEURON_RT_VISIBLE_CORES" not in env, name


def _glob(pattern: str | None, value: str | None) -> bool:
    """AWS Batch EvaluateOnExit matching: exact, or prefix when the pattern ends in '*'."""
    if pattern is None:
        return True
    if value is None:
        return False
    return value.startswith(pattern[:-1]) if pattern.endswith("*") else value == pattern


def batch_decision(entries: list[dict], exit_code: int | None, reason: str = "", status_reason: str = "") -> str:
    """What Batch does with a failed attempt: the first entry whose every condition matches."""
    for e in entries:
        if (_glob(e.get("OnExitCode"), None if exit_code is None else str(exit_code))
                and _glob(e.get("OnReason"), reason) and _glob(e.get("OnStatusReason"), status_reason)):
            return e["Action"]
    return "RETRY"  # Batch retries when no entry matches


def test_retry_strategy_matches_exit_codes(resources):
    retryable = {str(c) for c in exit_codes.RETRYABLE}
    permanent = {str(c) for c in exit_codes.PERMANENT}
    for name, jd in job_definitions(resources).items():
        rs = props(jd)["RetryStrategy"]
        assert rs["Attempts"] == 3
        entries = rs["EvaluateOnExit"]
        assert len(entries) <= 5  # the AWS Batch limit
        retry_codes = {e["OnExitCode"] for e in entries if e["Action"] == "RETRY" and "OnExitCode" in e}
        assert retry_codes == retryable, name
        exit_codes_listed = {e["OnExitCode"] for e in entries if e["Action"] == "EXIT" and "OnExitCode" in e}
        assert exit_codes_listed <= permanent, name
        assert entries[-1] == {"Action": "EXIT", "OnReason": "*"}, "final catch-all EXIT"
        ended = "Essential container in task exited"
        for code in exit_codes.RETRYABLE:
            assert batch_decision(entries, code, status_reason=ended) == "RETRY", code
        for code in exit_codes.PERMANENT:
            assert batch_decision(entries, code, status_reason=ended) == "EXIT", code
        for code in (1, 2, 137):  # crash before our handler, usage error, OOM kill: not ours to retry
            assert batch_decision(entries, code, status_reason=ended) == "EXIT", code
        spot = "Host EC2 (instance i-0123456789abcdef0) terminated."
        assert batch_decision(entries, None, status_reason=spot) == "RETRY"
        assert batch_decision(entries, None, reason="CannotPullContainerError: x", status_reason="Task failed") == "EXIT"


def test_job_queue_uses_the_compute_environment(resources):
    q = props(resources["JobQueue"])
    assert q["ComputeEnvironmentOrder"][0]["ComputeEnvironment"] == {"Ref": "ComputeEnvironment"}


# ---------------------------------------------------------------------------- ECR, observability, outputs
def test_ecr_repository(resources):
    repo = props(resources["Repository"])
    assert repo["ImageScanningConfiguration"]["ScanOnPush"] is True
    assert repo["ImageTagMutability"] == "IMMUTABLE"
    policy = json.loads(repo["LifecyclePolicy"]["LifecyclePolicyText"])
    assert policy["rules"] and all(r["action"]["type"] == "expire" for r in policy["rules"])


def test_dashboard_and_alarms(resources):
    body, variables = props(resources["Dashboard"])["DashboardBody"]["Fn::Sub"]
    rendered = re.sub(r"\$\{([^}]+)\}", lambda m: "X" if m.group(1) in variables or m.group(1).startswith("AWS::") else m.group(0), body)
    assert "${" not in rendered, "unresolved ${...} in the dashboard body"
    widgets = json.loads(rendered)["widgets"]  # valid JSON once substituted
    assert len(widgets) >= 5
    for metric in ("JobsSubmitted", "ObjectsSubmitted", "JobsSucceeded", "JobsFailed", "ApproximateNumberOfMessagesVisible",
                   "AudioSeconds", "RealTimeFactor", "NeuronCoreUtilization"):
        assert metric in body, metric
    alarms = of_type(resources, "AWS::CloudWatch::Alarm")
    texts = {name: json.dumps(a) for name, a in alarms.items()}
    assert any("EventDeadLetterQueue" in t and "ApproximateNumberOfMessagesVisible" in t for t in texts.values())
    assert any("JobsFailed" in t for t in texts.values())
    assert any('"Errors"' in t and "AWS/Lambda" in t for t in texts.values())
    for a in alarms.values():
        assert props(a)["AlarmActions"] == {"Fn::If": ["HasAlarmEmail", [{"Ref": "AlarmTopic"}], {"Ref": "AWS::NoValue"}]}
    assert resources["AlarmTopic"]["Condition"] == "HasAlarmEmail"


def test_outputs(tpl):
    outputs = tpl["Outputs"]
    assert sub_text(outputs["InputLocation"]["Value"]) == "s3://${DataBucket}/${InputPrefix}"
    assert sub_text(outputs["OutputLocation"]["Value"]) == "s3://${DataBucket}/${OutputPrefix}"
    for key in ("JobQueueArn", "DashboardUrl", "EcrRepositoryUri", "ImageBuildProjectName"):
        assert key in outputs
    url = sub_text(outputs["DashboardUrl"]["Value"])
    assert "#dashboards:name=${Dashboard}" in url and "region=${AWS::Region}" in url


# ---------------------------------------------------------------------------- linters
def lint_bin(tool: str) -> str | None:
    bindir = os.environ.get("WHISPER_BATCH_LINT_BIN", str(REPO / ".venv-lint" / "bin"))
    path = Path(bindir) / tool
    return str(path) if path.exists() else shutil.which(tool)


def test_checkov_skips_carry_a_justification(resources):
    for name, res in resources.items():
        for skip in res.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert re.fullmatch(r"CKV2?_AWS_\d+", skip["id"]), (name, skip)
            assert len(skip.get("comment", "").split()) >= 5, f"{name}: skip {skip['id']} lacks a justification"


def test_cfn_lint_clean():
    tool = lint_bin("cfn-lint")
    if tool is None:
        pytest.skip("cfn-lint not installed (set WHISPER_BATCH_LINT_BIN or create .venv-lint)")
    proc = subprocess.run([tool, "--format", "parseable", str(TEMPLATE)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_checkov_no_failed_checks():
    tool = lint_bin("checkov")
    if tool is None:
        pytest.skip("checkov not installed (set WHISPER_BATCH_LINT_BIN or create .venv-lint)")
    # Relative path, as .ci/lint.sh does: checkov reads an absolute template path that happens to be
    # 40 characters long before ".yaml" as a hard-coded AWS secret in the Lambda environment (CKV_AWS_45).
    proc = subprocess.run(
        [tool, "-f", str(TEMPLATE.relative_to(REPO)), "--framework", "cloudformation", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = report.get("results", {}).get("failed_checks", [])
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]
    assert proc.returncode == 0, proc.stderr[-2000:]
