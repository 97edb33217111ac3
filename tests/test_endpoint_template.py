"""Static checks of cloudformation/endpoint.yaml, the SageMaker endpoint stack.

The template is evaluated here the way CloudFormation would for a given parameter set: conditions,
Fn::If, Ref, Fn::Sub, Fn::Select/Split, Fn::FindInMap are resolved (other resources' Refs and GetAtts
become ``<Name>`` / ``<Name.Attr>`` placeholders), so each Mode is checked for the resources and the
properties it really deploys. cfn-lint and checkov run from the lint venv when it is there.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from test_template import REPO, lint_bin, load_template

TEMPLATE = REPO / "cloudformation" / "endpoint.yaml"
MODES = ("async", "serverless", "realtime")
NO_VALUE = object()
PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "eu-west-1", "AWS::AccountId": "111122223333",
          "AWS::URLSuffix": "amazonaws.com", "AWS::StackId": "arn:aws:cloudformation:eu-west-1:111122223333:stack/x/y"}
IMAGE = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo:turbo-1"

# SageMaker limits (docs/endpoints.md cites them): request bodies per mode, serverless memory.
MAX_BODY_MB = {"async": 1000, "serverless": 4, "realtime": 6}
SERVERLESS_MEMORY_MB = [1024, 2048, 3072, 4096, 5120, 6144]

# Actions without resource-level permissions: "*" is the only valid Resource.
STAR_RESOURCE_ALLOWED = {"ecr:getauthorizationtoken", "cloudwatch:putmetricdata"}


@pytest.fixture(scope="module")
def tpl() -> dict:
    return load_template(TEMPLATE)


class Stack:
    """The template as deployed with ``params`` (defaults filled in)."""

    def __init__(self, tpl: dict, stack_name: str = "wb-endpoint", **params: str):
        self.tpl = tpl
        self.params = {k: str(v.get("Default", "")) for k, v in tpl["Parameters"].items()}
        self.params.update({k: str(v) for k, v in params.items()})
        self.params.setdefault("ImageUri", IMAGE)
        if not self.params["ImageUri"]:
            self.params["ImageUri"] = IMAGE
        self.pseudo = dict(PSEUDO, **{"AWS::StackName": stack_name})
        self.conditions: dict[str, bool] = {}
        for name in tpl["Conditions"]:
            self.condition(name)

    def condition(self, name: str) -> bool:
        if name not in self.conditions:
            self.conditions[name] = bool(self.resolve(self.tpl["Conditions"][name]))
        return self.conditions[name]

    def resolve(self, value):
        if isinstance(value, list):
            return [r for r in (self.resolve(v) for v in value) if r is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                if arg == "AWS::NoValue":
                    return NO_VALUE
                if arg in self.params:
                    return self.params[arg]
                if arg in self.pseudo:
                    return self.pseudo[arg]
                assert arg in self.tpl["Resources"], f"Ref to unknown {arg}"
                return f"<{arg}>"
            if key == "Fn::GetAtt":
                assert arg[0] in self.tpl["Resources"], f"GetAtt of unknown {arg}"
                return f"<{arg[0]}.{arg[1]}>"
            if key in ("Condition", "Fn::Condition"):  # the loader spells the short tag Fn::Condition
                return self.condition(arg)
            if key == "Fn::If":
                return self.resolve(arg[1] if self.condition(arg[0]) else arg[2])
            if key == "Fn::Equals":
                a, b = (self.resolve(x) for x in arg)
                return str(a) == str(b)
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::And":
                return all(self.resolve(x) for x in arg)
            if key == "Fn::Or":
                return any(self.resolve(x) for x in arg)
            if key == "Fn::Select":
                return self.resolve(arg[1])[int(arg[0])]
            if key == "Fn::Split":
                return self.resolve(arg[1]).split(arg[0])
            if key == "Fn::Join":
                return arg[0].join(str(x) for x in self.resolve(arg[1]))
            if key == "Fn::FindInMap":
                m, k1, k2 = (self.resolve(x) for x in arg)
                return self.tpl["Mappings"][m][k1][k2]
            if key == "Fn::Sub":
                text, local = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])
                local = {k: self.resolve(v) for k, v in local.items()}

                def one(m: re.Match) -> str:
                    name = m.group(1)
                    if name in local:
                        return str(local[name])
                    if name in self.params:
                        return self.params[name]
                    if name in self.pseudo:
                        return self.pseudo[name]
                    base = name.split(".", 1)[0]
                    assert base in self.tpl["Resources"], f"${{{name}}} names nothing"
                    return f"<{name}>"

                return re.sub(r"\$\{([^}!]+)\}", one, text)
        out = {}
        for k, v in value.items():
            r = self.resolve(v)
            if r is not NO_VALUE:
                out[k] = r
        return out

    @property
    def resources(self) -> dict:
        """Deployed resources: condition true (or none), properties resolved."""
        out = {}
        for name, res in self.tpl["Resources"].items():
            if "Condition" in res and not self.condition(res["Condition"]):
                continue
            out[name] = dict(res, Properties=self.resolve(res.get("Properties", {})))
        return out

    def of_type(self, rtype: str) -> dict:
        return {k: v["Properties"] for k, v in self.resources.items() if v["Type"] == rtype}

    def only(self, rtype: str) -> tuple[str, dict]:
        found = self.of_type(rtype)
        assert len(found) == 1, (rtype, list(found))
        return next(iter(found.items()))

    @property
    def outputs(self) -> dict:
        return {k: self.resolve(v["Value"]) for k, v in self.tpl["Outputs"].items()
                if "Condition" not in v or self.condition(v["Condition"])}


def stack(tpl, mode: str, **params) -> Stack:
    return Stack(tpl, stack_name=f"wb-endpoint-{mode}", Mode=mode, **params)


# ---------------------------------------------------------------------------- evaluator
def test_evaluator_resolves_conditions_and_intrinsics(tpl):
    s = stack(tpl, "async")
    assert s.conditions["IsAsync"] and not s.conditions["IsServerless"] and s.conditions["UsesNeuron"]
    assert not stack(tpl, "realtime", InstanceType="ml.c6i.xlarge").conditions["UsesNeuron"]
    assert not stack(tpl, "serverless").conditions["UsesNeuron"]
    assert s.resolve({"Fn::Sub": ["a-${X}-${AWS::Region}", {"X": {"Ref": "Mode"}}]}) == "a-async-eu-west-1"


# ---------------------------------------------------------------------------- endpoint config per mode
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_deploys_exactly_its_endpoint_config(tpl, mode):
    s = stack(tpl, mode)
    name, cfg = s.only("AWS::SageMaker::EndpointConfig")
    assert name == {"async": "AsyncEndpointConfig", "serverless": "ServerlessEndpointConfig",
                    "realtime": "RealtimeEndpointConfig"}[mode]
    _, endpoint = s.only("AWS::SageMaker::Endpoint")
    assert endpoint["EndpointConfigName"] == f"<{name}.EndpointConfigName>"
    assert endpoint["EndpointName"] == f"wb-endpoint-{mode}"
    (variant,) = cfg["ProductionVariants"]
    assert variant["VariantName"] == "AllTraffic" and variant["ModelName"] == "<Model.ModelName>"
    if mode == "serverless":
        assert set(variant) == {"VariantName", "ModelName", "ServerlessConfig"}
        assert variant["ServerlessConfig"] == {"MemorySizeInMB": "6144", "MaxConcurrency": "5"}
        assert "AsyncInferenceConfig" not in cfg
    else:
        assert "ServerlessConfig" not in variant
        assert variant["InstanceType"] == "ml.inf2.xlarge" and variant["InitialInstanceCount"] == 1
        for key in ("ModelDataDownloadTimeoutInSeconds", "ContainerStartupHealthCheckTimeoutInSeconds"):
            assert 60 <= int(variant[key]) <= 3600, key
        assert cfg["KmsKeyId"] == "<EndpointKey.Arn>"  # EBS-only instance types (test below)
        assert ("AsyncInferenceConfig" in cfg) == (mode == "async")


def test_async_config_outputs_to_s3_and_notifies_both_topics(tpl):
    s = stack(tpl, "async")
    _, cfg = s.only("AWS::SageMaker::EndpointConfig")
    aic = cfg["AsyncInferenceConfig"]
    assert aic["ClientConfig"] == {"MaxConcurrentInvocationsPerInstance": "8"}
    out = aic["OutputConfig"]
    assert out["S3OutputPath"] == "s3://<AsyncBucket>/output/"
    assert out["S3FailurePath"] == "s3://<AsyncBucket>/failures/"
    assert out["KmsKeyId"] == "<EndpointKey.Arn>"
    assert out["NotificationConfig"] == {"SuccessTopic": "<SuccessTopic>", "ErrorTopic": "<ErrorTopic>"}
    topics = s.of_type("AWS::SNS::Topic")
    assert {"SuccessTopic", "ErrorTopic"} <= set(topics)
    assert all(t["KmsMasterKeyId"] == "<EndpointKey>" for t in topics.values())


@pytest.mark.parametrize("mode", ["serverless", "realtime"])
def test_only_async_has_a_bucket_topics_and_s3_permissions(tpl, mode):
    s = stack(tpl, mode)
    assert not s.of_type("AWS::S3::Bucket") and not s.of_type("AWS::SNS::Topic")
    _, role = s.only("AWS::IAM::Role")
    assert [p["PolicyName"] for p in role["Policies"]] == ["pull-image-and-log"]
    assert "InputLocation" not in s.outputs and "SuccessTopicArn" not in s.outputs


def test_serverless_is_cpu_and_within_the_serverless_limits(tpl):
    params = tpl["Parameters"]
    assert params["ServerlessMemoryMB"]["AllowedValues"] == SERVERLESS_MEMORY_MB
    assert params["ServerlessMemoryMB"]["Default"] == 6144
    assert 1 <= params["ServerlessMaxConcurrency"]["MinValue"] and params["ServerlessMaxConcurrency"]["MaxValue"] <= 200
    for memory in SERVERLESS_MEMORY_MB:
        s = stack(tpl, "serverless", ServerlessMemoryMB=memory)
        _, cfg = s.only("AWS::SageMaker::EndpointConfig")
        assert int(cfg["ProductionVariants"][0]["ServerlessConfig"]["MemorySizeInMB"]) <= 6144
        _, model = s.only("AWS::SageMaker::Model")
        env = model["PrimaryContainer"]["Environment"]
        assert env["WHISPER_BATCH_DEVICE"] == "cpu"
        assert model["EnableNetworkIsolation"] is False  # serverless does not support it
    assert not stack(tpl, "serverless").of_type("AWS::ApplicationAutoScaling::ScalableTarget")


@pytest.mark.parametrize("mode, instance_type, device", [
    ("async", "ml.inf2.xlarge", "neuron"), ("realtime", "ml.inf2.8xlarge", "neuron"),
    ("realtime", "ml.c6i.xlarge", "cpu"), ("async", "ml.m6i.2xlarge", "cpu"), ("serverless", "ml.inf2.xlarge", "cpu"),
])
def test_model_environment_per_mode(tpl, mode, instance_type, device):
    s = stack(tpl, mode, InstanceType=instance_type)
    _, model = s.only("AWS::SageMaker::Model")
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    env = container["Environment"]
    assert env["WHISPER_BATCH_DEVICE"] == device
    assert float(env["WHISPER_BATCH_SERVE_MAX_BODY_MB"]) == MAX_BODY_MB[mode]
    assert env["WHISPER_BATCH_METRICS_SERVICE"] == f"wb-endpoint-{mode}"  # = the endpoint name
    assert env["WHISPER_BATCH_METRICS_NAMESPACE"] == "WhisperBatch"
    assert env["WHISPER_BATCH_WORD_TIMESTAMPS"] == "false"
    assert "WHISPER_BATCH_MODEL" not in env  # the image's baked model
    assert all(k.startswith("WHISPER_BATCH_") and isinstance(v, str) for k, v in env.items())
    assert model["EnableNetworkIsolation"] is (mode != "serverless")


def test_model_id_and_word_timestamps_reach_the_container(tpl):
    s = stack(tpl, "serverless", ModelId="base", WordTimestamps="true", EndpointName="my-asr")
    env = s.only("AWS::SageMaker::Model")[1]["PrimaryContainer"]["Environment"]
    assert env["WHISPER_BATCH_MODEL"] == "base" and env["WHISPER_BATCH_WORD_TIMESTAMPS"] == "true"
    assert env["WHISPER_BATCH_METRICS_SERVICE"] == "my-asr"
    assert s.only("AWS::SageMaker::Endpoint")[1]["EndpointName"] == "my-asr"
    assert s.only("AWS::Logs::LogGroup")[1]["LogGroupName"] == "/aws/sagemaker/Endpoints/my-asr"


def test_instance_types_are_ebs_only(tpl):
    """KmsKeyId on the endpoint config fails for types with local NVMe instance storage."""
    allowed = tpl["Parameters"]["InstanceType"]["AllowedValues"]
    assert tpl["Parameters"]["InstanceType"]["Default"] == "ml.inf2.xlarge"
    for t in allowed:
        assert re.fullmatch(r"ml\.(inf2|c6i|m6i)\.\d*x?large", t), t


# ---------------------------------------------------------------------------- autoscaling
def test_async_scales_to_zero_and_back(tpl):
    s = stack(tpl, "async", MaxInstances=3)
    _, target = s.only("AWS::ApplicationAutoScaling::ScalableTarget")
    assert target["ServiceNamespace"] == "sagemaker"
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    assert target["ResourceId"] == "endpoint/<Endpoint.EndpointName>/variant/AllTraffic"
    assert target["MinCapacity"] == 0 and target["MaxCapacity"] == "3"
    policies = s.of_type("AWS::ApplicationAutoScaling::ScalingPolicy")
    tracking = [p for p in policies.values() if p["PolicyType"] == "TargetTrackingScaling"]
    steps = {k: p for k, p in policies.items() if p["PolicyType"] == "StepScaling"}
    assert len(tracking) == 1 and len(steps) == 1
    metric = tracking[0]["TargetTrackingScalingPolicyConfiguration"]["CustomizedMetricSpecification"]
    assert metric["MetricName"] == "ApproximateBacklogSizePerInstance" and metric["Namespace"] == "AWS/SageMaker"
    assert metric["Dimensions"] == [{"Name": "EndpointName", "Value": "<Endpoint.EndpointName>"}]
    assert all(p["ScalingTargetId"] == "<ScalableTarget>" for p in policies.values())
    # Scale from zero: a step policy (+1 instance) fired by the HasBacklogWithoutCapacity alarm.
    (step_name, step), = steps.items()
    cfg = step["StepScalingPolicyConfiguration"]
    assert cfg["AdjustmentType"] == "ChangeInCapacity"
    assert cfg["StepAdjustments"] == [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}]
    alarms = [a for a in s.of_type("AWS::CloudWatch::Alarm").values() if a["MetricName"] == "HasBacklogWithoutCapacity"]
    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm["Namespace"] == "AWS/SageMaker" and alarm["AlarmActions"] == [f"<{step_name}>"]
    assert alarm["Threshold"] == 1 and alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "<Endpoint.EndpointName>"}]


def test_realtime_keeps_one_instance_and_tracks_invocations(tpl):
    s = stack(tpl, "realtime")
    _, target = s.only("AWS::ApplicationAutoScaling::ScalableTarget")
    assert target["MinCapacity"] == 1
    (policy,) = s.of_type("AWS::ApplicationAutoScaling::ScalingPolicy").values()
    spec = policy["TargetTrackingScalingPolicyConfiguration"]["PredefinedMetricSpecification"]
    assert spec["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"
    assert not any(a["MetricName"] == "HasBacklogWithoutCapacity" for a in s.of_type("AWS::CloudWatch::Alarm").values())


# ---------------------------------------------------------------------------- IAM
def statements(role: dict):
    for policy in role["Policies"]:
        for st in policy["PolicyDocument"]["Statement"]:
            yield policy["PolicyName"], st


@pytest.mark.parametrize("mode", MODES)
def test_execution_role_least_privilege(tpl, mode):
    s = stack(tpl, mode)
    _, role = s.only("AWS::IAM::Role")
    trust = role["AssumeRolePolicyDocument"]["Statement"]
    assert [t["Principal"] for t in trust] == [{"Service": "sagemaker.amazonaws.com"}]
    assert trust[0]["Condition"] == {"StringEquals": {"aws:SourceAccount": "111122223333"}}
    assert "ManagedPolicyArns" not in role
    for name, st in statements(role):
        assert st["Effect"] == "Allow", (name, st)
        actions = [a.lower() for a in (st["Action"] if isinstance(st["Action"], list) else [st["Action"]])]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        for a in actions:
            assert a != "*" and not a.endswith(":*"), (name, a)
        if "*" in resources:
            assert set(actions) <= STAR_RESOURCE_ALLOWED, (name, st)
            if "cloudwatch:putmetricdata" in actions:
                assert "cloudwatch:namespace" in st["Condition"]["StringEquals"]
        for r in resources:
            assert r == "*" or not r.endswith(":*:*"), r


@pytest.mark.parametrize("image, repo_arn", [
    (IMAGE, "arn:aws:ecr:eu-west-1:111122223333:repository/wb-repo"),
    ("444455556666.dkr.ecr.us-east-2.amazonaws.com/whisper-batch-repository-1ab2:tiny.en-cpu-20260101000000",
     "arn:aws:ecr:us-east-2:444455556666:repository/whisper-batch-repository-1ab2"),
    ("111122223333.dkr.ecr.eu-west-1.amazonaws.com/wb-repo@sha256:" + "a" * 64,
     "arn:aws:ecr:eu-west-1:111122223333:repository/wb-repo"),
])
def test_image_pull_is_scoped_to_the_image_repository(tpl, image, repo_arn):
    assert re.fullmatch(tpl["Parameters"]["ImageUri"]["AllowedPattern"], image)
    s = stack(tpl, "async", ImageUri=image)
    pulls = [st for _, st in statements(s.only("AWS::IAM::Role")[1]) if "ecr:BatchGetImage" in st["Action"]]
    assert len(pulls) == 1 and pulls[0]["Resource"] == repo_arn


def test_image_uri_pattern_rejects_other_registries(tpl):
    pattern = tpl["Parameters"]["ImageUri"]["AllowedPattern"]
    for bad in ("python:3.11", "docker.io/library/python:3.11", "111122223333.dkr.ecr.eu-west-1.amazonaws.com/ns/repo:t",
                "111122223333.dkr.ecr.eu-west-1.amazonaws.com/repo"):
        assert not re.fullmatch(pattern, bad), bad


def test_async_role_reads_input_writes_output_and_publishes_its_topics(tpl):
    s = stack(tpl, "async")
    by_sid = {st["Sid"]: st for _, st in statements(s.only("AWS::IAM::Role")[1])}
    assert by_sid["ReadRequests"]["Action"] == "s3:GetObject"
    assert by_sid["ReadRequests"]["Resource"] == "<AsyncBucket.Arn>/input/*"
    assert by_sid["WriteResponses"]["Resource"] == ["<AsyncBucket.Arn>/output/*", "<AsyncBucket.Arn>/failures/*"]
    assert "s3:GetObject" not in by_sid["WriteResponses"]["Action"]
    assert by_sid["ListRequestsForBatchTransform"]["Condition"] == {"StringLike": {"s3:prefix": ["input/*"]}}
    assert by_sid["Notify"] == {"Sid": "Notify", "Effect": "Allow", "Action": "sns:Publish",
                                "Resource": ["<SuccessTopic>", "<ErrorTopic>"]}
    assert by_sid["UseTheStackKey"]["Resource"] == "<EndpointKey.Arn>"
    logs = by_sid["EndpointLogs"]["Resource"]
    assert all(":log-group:/aws/sagemaker/" in r for r in logs)


# ---------------------------------------------------------------------------- encryption
def test_everything_is_encrypted(tpl):
    s = stack(tpl, "async")
    res = s.resources
    key = res["EndpointKey"]["Properties"]
    assert key["EnableKeyRotation"] is True
    bucket = res["AsyncBucket"]["Properties"]
    (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert rule["ServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "<EndpointKey.Arn>"}
    for name, props in s.of_type("AWS::S3::Bucket").items():
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}, name
        assert props["BucketEncryption"]["ServerSideEncryptionConfiguration"], name
        assert res[name].get("DeletionPolicy") == "Retain"
    policies = {p["Bucket"]: p for p in s.of_type("AWS::S3::BucketPolicy").values()}
    for bucket_name in s.of_type("AWS::S3::Bucket"):
        deny = [st for st in policies[f"<{bucket_name}>"]["PolicyDocument"]["Statement"] if st["Effect"] == "Deny"]
        assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}, bucket_name
    assert bucket["LoggingConfiguration"]["DestinationBucketName"] == "<AccessLogsBucket>"
    for topic in s.of_type("AWS::SNS::Topic").values():
        assert topic["KmsMasterKeyId"] == "<EndpointKey>"
    (log_group,) = s.of_type("AWS::Logs::LogGroup").values()
    assert log_group["KmsKeyId"] == "<EndpointKey.Arn>" and int(log_group["RetentionInDays"]) > 0
    assert log_group["LogGroupName"] == "/aws/sagemaker/Endpoints/wb-endpoint-async"
    # The key lets CloudWatch Logs use it for exactly the SageMaker endpoint log groups.
    logs_stmt = next(st for st in key["KeyPolicy"]["Statement"] if st["Sid"] == "CloudWatchLogsEncryptsTheEndpointLogGroup")
    assert logs_stmt["Condition"]["ArnLike"]["kms:EncryptionContext:aws:logs:arn"].endswith(
        ":log-group:/aws/sagemaker/Endpoints/*")
    with_email = stack(tpl, "realtime", AlarmEmail="ops@example.com")
    assert with_email.of_type("AWS::SNS::Topic")["AlarmTopic"]["KmsMasterKeyId"] == "<EndpointKey>"


def test_outputs(tpl):
    a = stack(tpl, "async").outputs
    assert a["EndpointName"] == "<Endpoint.EndpointName>" and a["ModelName"] == "<Model.ModelName>"
    assert a["InputLocation"] == "s3://<AsyncBucket>/input/"
    assert a["OutputPath"] == "s3://<AsyncBucket>/output/" and a["FailurePath"] == "s3://<AsyncBucket>/failures/"
    assert a["SuccessTopicArn"] == "<SuccessTopic>" and a["ErrorTopicArn"] == "<ErrorTopic>"
    r = stack(tpl, "realtime").outputs
    assert set(r) == {"Mode", "EndpointName", "EndpointArn", "ModelName", "LogGroup", "KmsKeyArn"}


def test_max_body_per_mode_within_sagemaker_limits(tpl):
    mapping = tpl["Mappings"]["ModeSettings"]
    assert set(mapping) == set(MODES) == set(tpl["Parameters"]["Mode"]["AllowedValues"])
    for mode, limit in MAX_BODY_MB.items():
        assert float(mapping[mode]["MaxBodyMB"]) == limit


# ---------------------------------------------------------------------------- linters
def test_checkov_skips_carry_a_justification(tpl):
    for name, res in tpl["Resources"].items():
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
    proc = subprocess.run(
        [tool, "-f", str(TEMPLATE.relative_to(REPO)), "--framework", "cloudformation", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = report.get("results", {}).get("failed_checks", [])
    assert not failed, [(c["check_id"], c["resource"]) for c in failed]
    assert proc.returncode == 0, proc.stderr[-2000:]
