"""``raytrainer fit|validate|test|predict|sweep --config run.yaml``: LightningCLI conventions.

    model:   {class_path: pkg.mod.Lit, init_args: {lr: 0.01}}     # an rt.Module subclass
    data:    {class_path: pkg.mod.Data, init_args: {...}}          # an rt.DataModule (optional)
    trainer: {max_epochs: 3, callbacks: [{class_path: ModelCheckpoint, init_args: {...}}], ...}
    ckpt_path: last                                                # fit/validate/test/predict
    sweep:   {search_space: {lr: {type: loguniform, lower: 1e-4, upper: 0.1}}, metric: val_loss,
              mode: min, num_samples: 8}                           # `raytrainer sweep` only

Several --config files are deep-merged, later ones winning (a different class_path replaces the
whole entry, init_args included); then dotted overrides apply in order: --trainer.max_epochs 3,
--model.init_args.lr 0.1 (or --model.lr 0.1), --ckpt_path=last. Values are read with
yaml.safe_load (numbers, booleans, lists, mappings); a string in scientific notation such as 1e-3
(PyYAML reads it as a string) becomes a float where the argument takes a float.

Every check runs before any model is trained or Ray is started, and each error names the key and
where it was set (``run.yaml: trainer.max_epochs: ...`` or ``command line (--trainer.max_epochs)``).
``fit`` and ``sweep`` save the resolved config as ``{storage_path}/{name}/config.yaml`` next to the
run's checkpoints, never with ``storage_options``; credentials (secret-looking keys such as
``api_key``, values of secret-looking environment variables) are written as ``<redacted>``, and a
config holding ``<redacted>`` is refused, naming the key (raytrainer/redaction.py).
"""
from __future__ import annotations

import copy
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

import raytrainer as rt
from raytrainer import redaction, storage
from raytrainer.cli.config_files import TOP_LEVEL, CLIError, Origins, load_config
from raytrainer.cli.objects import (build_objects, check_init_args, class_spec, coerce, instantiate,
                                    resolve_class, trainer_arguments)
from raytrainer.cli.sweep import ModuleFactory, parse_sweep

COMMANDS = {"fit": "train a model (resume with ckpt_path: last)", "validate": "run the validation loop once",
            "test": "run the test loop once", "predict": "run the predict loop",
            "sweep": "tune hyperparameters with Ray Tune (the sweep: section)"}
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


# ----------------------------------------------------------------------- command line

@dataclass
class Args:
    command: str
    configs: list[str]
    overrides: list[tuple[str, str]]   # (dotted key, raw value)
    print_config: bool = False


def _help(command: str | None) -> str:
    """argparse only formats the help; dotted overrides are parsed by ``parse_args``."""
    import argparse
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="raytrainer", formatter_class=fmt, description=__doc__.split("\n\n")[0],
                                     epilog="On a cluster: ray job submit --working-dir . -- raytrainer fit --config run.yaml")
    sub = parser.add_subparsers(metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        s = sub.add_parser(name, help=text, description=text, formatter_class=fmt,
                           epilog="\n\n".join(__doc__.split("\n\n")[1:3]))
        s.add_argument("--config", action="append", metavar="FILE", help="a YAML config; repeat to merge (later wins)")
        s.add_argument("--print_config", action="store_true", help="print the resolved config as YAML and exit")
        s.add_argument("--KEY.PATH", metavar="VALUE", help="override one value: --trainer.max_epochs 3, --ckpt_path=last")
        if name == command:
            return s.format_help()
    return parser.format_help()


def parse_args(argv: list[str]) -> Args | int:
    """The parsed command line, or an exit code when it only asked for help."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(None), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"raytrainer {rt.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise CLIError(f"unknown command {command!r}: choose one of {', '.join(COMMANDS)}")
    args, i = Args(command, [], []), 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if tok in ("-h", "--help"):
            print(_help(command))
            return 0
        if tok in ("--print_config", "--print-config"):
            args.print_config = True
            continue
        if not tok.startswith("--") or tok == "--":
            raise CLIError(f"unexpected argument {tok!r}: expected --config FILE, --print_config or a "
                           "dotted override such as --trainer.max_epochs 3")
        key, eq, value = tok[2:].partition("=")
        if not eq:
            if i >= len(rest):
                raise CLIError(f"--{key} needs a value")
            value, i = rest[i], i + 1
        if key == "config":
            args.configs.append(value)
        elif not _KEY.match(key):
            raise CLIError(f"--{key}: not a dotted config key such as --trainer.max_epochs")
        else:
            args.overrides.append((key, value))
    if not args.configs and not args.overrides:
        raise CLIError(f"`raytrainer {command}` needs --config FILE (see --help)")
    return args


def _build_trainer(section: Any, origins: Origins) -> Any:
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise origins.error(("trainer",), f"expected a mapping of Trainer arguments, got {section!r}")
    valid = trainer_arguments()
    kwargs = {}
    for key, value in section.items():
        if key not in valid:
            raise origins.error(("trainer", key), f"unknown Trainer argument {key!r}; valid arguments: "
                                                  f"{', '.join(valid)}")
        kwargs[key] = section[key] = coerce(value, valid[key])
    if kwargs.get("callbacks") is not None:
        kwargs["callbacks"] = build_objects(kwargs["callbacks"], ("trainer", "callbacks"), origins, rt.Callback)
    if kwargs.get("logger") not in (None, True, False):
        kwargs["logger"] = build_objects(kwargs["logger"], ("trainer", "logger"), origins, rt.loggers.Logger)
    try:
        return rt.Trainer(**kwargs)
    except (ValueError, TypeError) as e:  # the Trainer's own validation (ConfigError is a ValueError)
        m = re.search(r"Trainer\((\w+)\s*=", str(e))
        raise origins.error(("trainer", m.group(1)) if m and m.group(1) in kwargs else ("trainer",), str(e)) from None


# ----------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Everything a command needs, validated; the model and data are built on demand."""
    command: str
    config: dict                 # the resolved config (--print_config prints it)
    origins: Origins
    model_class: type
    model_args: dict
    data_class: type | None
    data_args: dict
    trainer: Any                 # rt.Trainer
    ckpt_path: str | None
    sweep: dict | None           # rt.sweep keyword arguments after (module, data, trainer)

    def build_model(self) -> Any:
        return instantiate(self.model_class, self.model_args, ("model",), self.origins)

    def build_data(self) -> Any:
        return None if self.data_class is None else instantiate(self.data_class, self.data_args, ("data",),
                                                                self.origins)


def _section_class(config: dict, key: str, origins: Origins, base: type) -> tuple[type, dict]:
    class_path, args = class_spec(config[key], (key,), origins)
    return resolve_class(class_path, (key,), origins, base), args


def prepare(command: str, config: dict, origins: Origins) -> Plan:
    """Validate the whole config (coercing values in place) and build the Trainer."""
    refuse_redacted(config, origins)
    for key in config:
        if key not in TOP_LEVEL:
            raise origins.error((key,), f"unknown top-level key {key!r}; valid keys: {', '.join(TOP_LEVEL)}")
    if config.get("model") is None:
        raise CLIError("no model: set model.class_path (an rt.Module subclass) in a --config file "
                       "or with --model.class_path")
    model_class, model_args = _section_class(config, "model", origins, rt.Module)
    data_class, data_args = None, {}
    if config.get("data") is not None:
        data_class, data_args = _section_class(config, "data", origins, rt.DataModule)
        data_args = check_init_args(data_class, data_args, ("data",), origins)
    sweep, sampled = None, ()
    if command == "sweep":
        if config.get("sweep") is None:
            raise CLIError("`raytrainer sweep` needs a sweep: section (search_space, metric, mode, num_samples)")
        sweep = parse_sweep(config["sweep"], origins, model_class, data_class)
        sampled = tuple(k for k in sweep["search_space"] if "." not in k)  # model arguments
    elif config.get("sweep") is not None:
        print("raytrainer: note: the sweep: section is used only by `raytrainer sweep`", file=sys.stderr)
    model_args = check_init_args(model_class, model_args, ("model",), origins, sampled)
    for key, args in (("model", model_args), ("data", data_args)):
        if isinstance(config.get(key), dict) and args:
            config[key]["init_args"] = args
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise origins.error(("ckpt_path",), f"expected 'last', 'best' or a checkpoint URI, got {ckpt_path!r}")
    if command == "sweep" and ckpt_path is not None:
        raise origins.error(("ckpt_path",), "not used by `raytrainer sweep`: set ckpt_path: null "
                                             "(a sweep resumes with sweep.resume: true)")
    trainer = _build_trainer(config.get("trainer"), origins)
    return Plan(command, config, origins, model_class, model_args, data_class, data_args, trainer, ckpt_path, sweep)


# ----------------------------------------------------------------------- sweep (see cli/sweep.py)

def sweep_kwargs(plan: Plan) -> dict:
    """All keyword arguments of ``rt.sweep`` for a prepared sweep plan."""
    module = ModuleFactory(plan.model_class, plan.model_args) if plan.model_args else plan.model_class
    return {"module": module, "data": plan.build_data(), "trainer": plan.trainer, **plan.sweep}


def run_sweep(kwargs: dict):
    """The one call into rt.sweep (kept alone: its signature may still change)."""
    return rt.sweep(**kwargs)


# ----------------------------------------------------------------------- output

def _without_storage_options(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_storage_options(v) for k, v in value.items() if k != "storage_options"}
    return [_without_storage_options(v) for v in value] if isinstance(value, list) else value


def _without_secrets(value: Any) -> Any:
    """No fsspec options (credentials, endpoints) at all; other credentials as "<redacted>"."""
    return redaction.redact(_without_storage_options(value))


def dump_config(config: dict) -> str:
    """The resolved config as YAML, without storage_options, credentials as ``<redacted>``."""
    return (f"# resolved by raytrainer; fsspec options are left out, credentials are {redaction.MARKER}\n"
            + yaml.safe_dump(_without_secrets(config), sort_keys=False, default_flow_style=False))


def refuse_redacted(config: dict, origins: Origins) -> None:
    """A config saved by raytrainer holds ``<redacted>`` where a credential was: never pass the
    marker on to a class as if it were the value."""
    found = redaction.find_markers(config)
    if found:
        also = "".join(f" (so is {'.'.join(map(str, p))})" for p in found[1:])
        raise origins.error(found[0], f"is {redaction.MARKER!r}{also}: raytrainer writes credentials that way in "
                                      "the configs it saves. Read the secret from the environment (os.environ) in "
                                      "the class that needs it, or set the value in a config file you keep private")


def save_config(config: dict, trainer) -> str:
    """Write the resolved config to ``{storage_path}/{name}/config.yaml`` (through fsspec); return its
    URI. The run name is recorded even when generated, so the file reruns (resumes) the same run."""
    cfg = trainer.cfg
    resolved = copy.deepcopy(config)
    section = resolved.get("trainer") if isinstance(resolved.get("trainer"), dict) else {}
    resolved["trainer"] = {**section, "name": cfg.name}
    uri = storage.join(cfg.run_dir, "config.yaml")
    fs, path = storage.filesystem(uri, cfg.storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(dump_config(resolved))
    return uri


# ----------------------------------------------------------------------- commands

def run(plan: Plan) -> int:
    """Build what the command needs (the last checks), then run it."""
    if plan.command == "sweep":
        kwargs = sweep_kwargs(plan)
        uri = save_config(plan.config, plan.trainer)
        result = run_sweep(kwargs)
        best = getattr(result, "best", None)
        print(f"[raytrainer] sweep finished: best checkpoint {getattr(best, 'checkpoint', None)}\n"
              f"  config: {uri}", flush=True)
        return 0
    if plan.trainer.cfg.seed is not None:
        # As LightningCLI: seed before the model is built, so its initial weights are the seed's.
        rt.seed_everything(plan.trainer.cfg.seed)
    model, data = plan.build_model(), plan.build_data()
    if plan.command == "fit":
        uri = save_config(plan.config, plan.trainer)
        r = plan.trainer.fit(model, datamodule=data, ckpt_path=plan.ckpt_path)
        metrics = ", ".join(f"{k}={v:.6g}" for k, v in sorted(r.metrics.items()))
        print(f"[raytrainer] fit finished: epochs={r.current_epoch} steps={r.global_step} {metrics}\n"
              f"  best checkpoint: {r.best_checkpoint}\n  last checkpoint: {r.last_checkpoint}\n"
              f"  logs: {r.log_dir}\n  config: {uri}", flush=True)
    elif plan.command == "predict":
        predictions = plan.trainer.predict(model, datamodule=data, ckpt_path=plan.ckpt_path)
        print(f"[raytrainer] predict finished: {len(predictions or [])} batches", flush=True)
    else:  # validate / test
        metrics = getattr(plan.trainer, plan.command)(model, datamodule=data, ckpt_path=plan.ckpt_path,
                                                      verbose=False)[0]
        print(f"[raytrainer] {plan.command}: " + ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())),
              flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``raytrainer`` and ``python -m raytrainer``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The console script's sys.path[0] is its bin/ folder: import class paths from the current
    # directory as `python -m` does (a `ray job submit --working-dir` job runs in the working dir).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        args = parse_args(argv)
        if isinstance(args, int):
            return args
        config, origins = load_config(args.configs, args.overrides)
        plan = prepare(args.command, config, origins)
        if args.print_config:
            sys.stdout.write(dump_config(plan.config))
            return 0
        return run(plan)
    except CLIError as e:
        print(f"raytrainer: error: {e}", file=sys.stderr)
        return 2
