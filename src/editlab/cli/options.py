"""Every CLI option that means the same thing in several commands, declared once.

Options are `Annotated` typer types; the ones that travel together form small frozen dataclasses
(`OptionGroup`s). A command takes a group as one parameter, e.g. `run: RunOptions`, and
`with_option_groups` expands the group's fields into the options typer sees, then rebuilds the
dataclass before calling the command. So `eval` exposes its eighteen options while the function
itself takes five parameters, and `compare` gets exactly the same options as `eval` by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHOD = "rome"
DEFAULT_METHODS = "ft,rome,memit"

_MODEL_PANEL = "Model"
_DATA_PANEL = "Data"
_HPARAM_PANEL = "Hyper-parameters"
_RUN_PANEL = "Run"
_EXEC_PANEL = "Executor"

# --- single options, reused by every command that has them -------------------------------------------
Model = Annotated[str, typer.Option(help="Model name (see `editlab models`) or local path", rich_help_panel=_MODEL_PANEL)]
Device = Annotated[str, typer.Option(help="Device, e.g. cpu or cuda", rich_help_panel=_MODEL_PANEL)]
Dtype = Annotated[str, typer.Option(help="float32 | bfloat16 | float16", rich_help_panel=_MODEL_PANEL)]
DeviceMap = Annotated[Optional[str], typer.Option(
    help="Spread a model too large for one device over the available ones (accelerate): auto, balanced, balanced_low_0 or sequential",
    rich_help_panel=_MODEL_PANEL)]
AllowHub = Annotated[bool, typer.Option(
    "--allow-hub", help="Allow downloading a model from the Hugging Face hub (also: EDITLAB_ALLOW_HUB=1)",
    rich_help_panel=_MODEL_PANEL)]
Method = Annotated[str, typer.Option(help="Editing method (see `editlab methods`)")]
Methods = Annotated[str, typer.Option(help="Comma-separated editing methods (see `editlab methods`)")]
Data = Annotated[str, typer.Option(help="Dataset name (see `editlab datasets`) or file path", rich_help_panel=_DATA_PANEL)]
Limit = Annotated[Optional[int], typer.Option(
    help="Use the first N requests (with --suite: the first N records of each split; mquake: N groups of k cases)",
    rich_help_panel=_DATA_PANEL)]
Format = Annotated[Optional[str], typer.Option(help="File format if it cannot be detected", rich_help_panel=_DATA_PANEL)]
Suite = Annotated[Optional[str], typer.Option(
    help="Run a pitfall suite (see `editlab suites`) with its own data and protocol instead of --data",
    rich_help_panel=_DATA_PANEL)]
SuiteSets = Annotated[Optional[list[str]], typer.Option(
    "--suite-set", help="Suite option key=value (repeatable; see `editlab suites`)", rich_help_panel=_DATA_PANEL)]
OnBad = Annotated[str, typer.Option(
    help="Suite records lacking a field a metric needs: stop (default) or skip them", rich_help_panel=_DATA_PANEL)]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="Hparam override key=value (repeatable)", rich_help_panel=_HPARAM_PANEL)]
HparamsFile = Annotated[Optional[Path], typer.Option("--hparams", help="YAML file of hparam overrides", rich_help_panel=_HPARAM_PANEL)]
Mode = Annotated[str, typer.Option(help="single | batch | sequential", rich_help_panel=_RUN_PANEL)]
BatchSize = Annotated[int, typer.Option(help="Requests per edit in batch mode", rich_help_panel=_RUN_PANEL)]
Checkpoints = Annotated[Optional[str], typer.Option(
    help="Sequential mode: numbers of edits at which to evaluate, increasing, e.g. 0,10,50 (0: the unedited model)",
    rich_help_panel=_RUN_PANEL)]
Probes = Annotated[Optional[str], typer.Option(
    help="Sequential mode: probes measured at each checkpoint, e.g. perplexity,downstream,nkl,norm (see `editlab probes`)",
    rich_help_panel=_RUN_PANEL)]
ProbeBudget = Annotated[str, typer.Option(help="Probe sizes: quick or full (see docs/pitfalls.md)", rich_help_panel=_RUN_PANEL)]
Db = Annotated[Path, typer.Option(help="SQLite result database", rich_help_panel=_RUN_PANEL)]
Resume = Annotated[bool, typer.Option(help="Continue an interrupted run in the same database", rich_help_panel=_RUN_PANEL)]
Generation = Annotated[bool, typer.Option(help="Also compute generation exact match", rich_help_panel=_RUN_PANEL)]
Fluency = Annotated[bool, typer.Option(help="Also compute generation fluency (n-gram entropy)", rich_help_panel=_RUN_PANEL)]
PplText = Annotated[Optional[Path], typer.Option(
    help="Sequential mode: text file for perplexity (default: the built-in corpus)", rich_help_panel=_RUN_PANEL)]
Seed = Annotated[int, typer.Option(help="Random seed of the run", rich_help_panel=_RUN_PANEL)]
Executor = Annotated[str, typer.Option(
    help="Where the run is carried out: local (this process) or ray (Ray worker actors; see docs/scale.md)",
    rich_help_panel=_EXEC_PANEL)]
RayAddress = Annotated[Optional[str], typer.Option(
    help="With --executor ray: unset starts a local Ray on this machine; auto or host:port joins a cluster",
    rich_help_panel=_EXEC_PANEL)]
Workers = Annotated[int, typer.Option(help="With --executor ray: worker actors, each holding one copy of the model",
                                      rich_help_panel=_EXEC_PANEL)]
CpusPerWorker = Annotated[int, typer.Option(help="With --executor ray: CPU threads per worker", rich_help_panel=_EXEC_PANEL)]
MaxRetries = Annotated[int, typer.Option(
    help="With --executor ray: times a task whose worker died is given to a worker again", rich_help_panel=_EXEC_PANEL)]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks of errors")]


# --- groups --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionGroup:
    """Base of the option groups; a subclass's fields (annotated with the types above) become options."""

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(cls, include_extras=True)
        out = []
        for f in dataclasses.fields(cls):
            default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name]))
        return out

    @classmethod
    def take(cls, values: dict[str, Any]) -> Any:
        """Build the group from (and remove its fields from) the keyword arguments typer passed."""
        return cls(**{f.name: values.pop(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ModelOptions(OptionGroup):
    model: Model = DEFAULT_MODEL
    device: Device = "cpu"
    dtype: Dtype = "float32"
    allow_hub: AllowHub = False
    device_map: DeviceMap = None


@dataclass(frozen=True)
class DataOptions(OptionGroup):
    data: Data = "builtin"
    limit: Limit = None
    format: Format = None
    suite: Suite = None
    suite_set: SuiteSets = None
    on_bad: OnBad = "stop"


@dataclass(frozen=True)
class HparamOptions(OptionGroup):
    set_: Sets = None
    hparams: HparamsFile = None


@dataclass(frozen=True)
class RunOptions(OptionGroup):
    """How a run is carried out and stored (everything of `RunConfig` that is not method or data)."""

    mode: Mode = "single"
    batch_size: BatchSize = 1
    checkpoints: Checkpoints = None
    db: Db = Path("runs.db")
    resume: Resume = False
    generation: Generation = False
    fluency: Fluency = False
    ppl_text: PplText = None
    probes: Probes = None
    probe_budget: ProbeBudget = "quick"
    seed: Seed = 0


@dataclass(frozen=True)
class ExecutorOptions(OptionGroup):
    """Where runs are carried out (`editlab.distributed.ExecutorSpec`)."""

    executor: Executor = "local"
    ray_address: RayAddress = None
    workers: Workers = 2
    cpus_per_worker: CpusPerWorker = 1
    max_retries: MaxRetries = 3

    def spec(self, model: ModelOptions | None = None) -> Any:
        """The checked `ExecutorSpec` (raises `OptionError`/`ExecutorError`; imports neither torch nor ray)."""
        from ..distributed.spec import ExecutorSpec, check_executor
        from ..errors import OptionError

        spec = check_executor(ExecutorSpec(self.executor, self.ray_address, self.workers, self.cpus_per_worker,
                                           0.0, self.max_retries))
        if spec.is_ray and model is not None and model.device_map is not None:
            raise OptionError("--device-map applies to --executor local; a Ray worker holds one model copy on its own device")
        return spec


F = TypeVar("F", bound=Callable[..., Any])


def with_option_groups(func: F) -> F:
    """Expose each `OptionGroup` parameter of `func` to typer as its fields' options; other parameters
    pass through unchanged. Option names must be unique across a command's groups."""
    hints = typing.get_type_hints(func, include_extras=True)
    groups: dict[str, type[OptionGroup]] = {}
    params: list[inspect.Parameter] = []
    for p in inspect.signature(func).parameters.values():
        tp = hints.get(p.name, p.annotation)
        if isinstance(tp, type) and issubclass(tp, OptionGroup):
            groups[p.name] = tp
            params += tp.parameters()
        else:
            params.append(p.replace(annotation=tp, kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in params]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise TypeError(f"{func.__name__}: options declared twice: {', '.join(clashes)}")

    @functools.wraps(func)
    def command(**values: Any) -> Any:
        built = {name: group.take(values) for name, group in groups.items()}
        return func(**built, **values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return typing.cast(F, command)
